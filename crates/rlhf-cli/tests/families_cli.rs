//! Every command end to end on the tiny Llama-family checkpoints (`fixtures/families`):
//! SFT, reward, PPO, generate, score and merge, with LoRA on the family's default targets and
//! on `all-linear`, over f32, 8-bit and NF4 bases, conversational data through the chat
//! template, and exact resume.

use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::{DType, Device, Tensor};
use rlhf_models::{Fwd, Model};

fn fixtures() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../fixtures"))
}

fn family(name: &str) -> PathBuf {
    fixtures().join("families").join(name)
}

fn rlhf(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_rlhf"))
        .args(args)
        .output()
        .expect("runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

fn ok(args: &[&str]) -> String {
    let (ok, out, err) = rlhf(args);
    assert!(ok, "rlhf {args:?}\n{err}");
    out
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// The first `n` rows of a fixture data file.
fn head(src: &str, n: usize, dst: &Path) -> PathBuf {
    let text = std::fs::read_to_string(fixtures().join("data").join(src)).unwrap();
    let rows: Vec<&str> = text.lines().take(n).collect();
    std::fs::write(dst, rows.join("\n") + "\n").unwrap();
    dst.to_path_buf()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

fn logits(m: &Model) -> Tensor {
    let ids = Tensor::new(&[[5u32, 17, 301, 44, 9, 1200]], &Device::Cpu).unwrap();
    let mask = Tensor::ones((1, 6), DType::U32, &Device::Cpu).unwrap();
    m.logits(&ids, &mask, &mut Fwd::eval()).unwrap()
}

/// SFT with LoRA on the family's default targets, merged, then generation from the merged
/// directory; the merged model's logits equal the adapter's.
#[test]
fn llama_sft_lora_merge_and_generate() {
    let tmp = tempfile::tempdir().unwrap();
    let data = head("prefs_train.jsonl", 16, &tmp.path().join("sft.jsonl"));
    // SFT rows: prompt + completion (the chosen answer).
    let rows: Vec<String> = std::fs::read_to_string(&data)
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            serde_json::json!({"prompt": v["prompt"], "completion": v["chosen"]}).to_string()
        })
        .collect();
    std::fs::write(&data, rows.join("\n")).unwrap();
    let out = tmp.path().join("sft");
    let llama = family("tiny-llama");
    ok(&[
        "sft",
        "--model-name-or-path",
        s(&llama),
        "--train-file",
        s(&data),
        "--output-dir",
        s(&out),
        "--use-peft",
        "--max-steps",
        "3",
        "--per-device-train-batch-size",
        "4",
        "--learning-rate",
        "1e-2",
        "--logging-steps",
        "1",
    ]);
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("final/adapter_config.json")).unwrap()).unwrap();
    let mut targets: Vec<&str> = cfg["target_modules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    targets.sort();
    // PEFT's default targets for the Llama family.
    assert_eq!(targets, ["q_proj", "v_proj"]);

    let merged = tmp.path().join("merged");
    ok(&[
        "merge",
        "--model",
        s(&llama),
        "--adapter",
        s(&out.join("final")),
        "--output",
        s(&merged),
    ]);
    let mut adapted = Model::load(&llama, &Default::default()).unwrap();
    rlhf_models::lora::load_adapter(&mut adapted, &out.join("final"), &Default::default()).unwrap();
    let plain = Model::load(&merged, &Default::default()).unwrap();
    let d = max_diff(&logits(&adapted), &logits(&plain));
    assert!(d < 1e-4, "merged vs adapter logits differ by {d}");
    let base = Model::load(&llama, &Default::default()).unwrap();
    assert!(
        max_diff(&logits(&base), &logits(&plain)) > 1e-4,
        "training changed nothing"
    );

    let g = ok(&[
        "generate",
        "--model",
        s(&merged),
        "--prompt",
        "User: hi",
        "--greedy",
        "--max-new-tokens",
        "4",
        "--json",
    ]);
    let v: serde_json::Value = serde_json::from_str(g.lines().next().unwrap()).unwrap();
    // Text prompts are tokenised without special tokens, as `generate` always did.
    assert!(!v["completion_ids"].as_array().unwrap().is_empty());
}

/// A reward model with LoRA on all linear layers over an 8-bit base, scored by `rlhf score`
/// with its adapter; then PPO with LoRA over an NF4 base against it.
#[test]
fn qwen2_reward_all_linear_int8_then_ppo_nf4() {
    let tmp = tempfile::tempdir().unwrap();
    let train = head("prefs_train.jsonl", 16, &tmp.path().join("train.jsonl"));
    let qwen = family("tiny-qwen2");
    let rm = tmp.path().join("rm");
    ok(&[
        "reward",
        "--model-name-or-path",
        s(&qwen),
        "--train-file",
        s(&train),
        "--output-dir",
        s(&rm),
        "--use-peft",
        "--lora-target-modules",
        "all-linear",
        "--load-in-8bit",
        "--max-steps",
        "2",
        "--per-device-train-batch-size",
        "4",
        "--logging-steps",
        "1",
    ]);
    let cfg = std::fs::read_to_string(rm.join("final/adapter_config.json")).unwrap();
    assert!(cfg.contains("SEQ_CLS") && cfg.contains("all-linear"), "{cfg}");
    // Adapters on every projection of the blocks (the safetensors header names them).
    let weights =
        String::from_utf8_lossy(&std::fs::read(rm.join("final/adapter_model.safetensors")).unwrap()).into_owned();
    for t in ["gate_proj", "up_proj", "down_proj", "q_proj", "k_proj", "o_proj"] {
        assert!(weights.contains(&format!("{t}.lora_A.weight")), "{t} has no adapter");
    }
    let scored = ok(&[
        "score",
        "--model",
        s(&qwen),
        "--adapter",
        s(&rm.join("final")),
        "--data",
        s(&train),
        "--json",
    ]);
    let last: serde_json::Value = serde_json::from_str(scored.lines().last().unwrap()).unwrap();
    assert_eq!(last["rows"], 16);

    // A full reward model for PPO (the adapter's merged form).
    let rm_full = tmp.path().join("rm_full");
    ok(&[
        "reward",
        "--model-name-or-path",
        s(&qwen),
        "--train-file",
        s(&train),
        "--output-dir",
        s(&rm_full),
        "--max-steps",
        "1",
        "--per-device-train-batch-size",
        "4",
    ]);
    let prompts = head("ppo_prompts.jsonl", 8, &tmp.path().join("prompts.jsonl"));
    let ppo = tmp.path().join("ppo");
    let out = ok(&[
        "ppo",
        "--model-name-or-path",
        s(&qwen),
        "--reward-model-path",
        s(&rm_full.join("final")),
        "--train-file",
        s(&prompts),
        "--output-dir",
        s(&ppo),
        "--use-peft",
        "--load-in-4bit",
        "--batch-size",
        "4",
        "--mini-batch-size",
        "2",
        "--steps",
        "4",
        "--max-new-tokens",
        "4",
    ]);
    assert!(out.contains("policy saved"), "{out}");
    assert!(ppo.join("final/adapter_model.safetensors").is_file());
    let metrics = std::fs::read_to_string(ppo.join("metrics.jsonl")).unwrap();
    assert!(metrics.contains("objective/kl"), "{metrics}");
}

/// Conversational SFT and reward rows on Qwen2 (rendered with its chat template), and an
/// interrupted-then-resumed full fine-tune equal to an uninterrupted one.
#[test]
fn qwen2_conversational_sft_resumes_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let rows: Vec<String> = (0..8)
        .map(|i| {
            serde_json::json!({"messages": [
                {"role": "user", "content": format!("What is {i} plus {i}?")},
                {"role": "assistant", "content": format!("It is {}.", 2 * i)},
            ]})
            .to_string()
        })
        .collect();
    let data = tmp.path().join("chat.jsonl");
    std::fs::write(&data, rows.join("\n")).unwrap();
    let qwen = family("tiny-qwen2");
    let run = |dir: &Path, steps: &str, extra: &[&str]| {
        let args = [
            &[
                "sft",
                "--model-name-or-path",
                s(&qwen),
                "--train-file",
                s(&data),
                "--output-dir",
                s(dir),
            ][..],
            &[
                "--max-steps",
                steps,
                "--per-device-train-batch-size",
                "2",
                "--save-steps",
                "2",
                "--learning-rate",
                "1e-3",
            ],
            &["--seed", "7", "--logging-steps", "1"],
            extra,
        ]
        .concat();
        ok(&args)
    };
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    run(&a, "4", &[]);
    run(&b, "4", &[]);
    assert!(b.join("checkpoint-2").is_dir());
    std::fs::remove_dir_all(b.join("final")).unwrap();
    run(&b, "4", &["--resume-from-checkpoint", s(&b.join("checkpoint-2"))]);
    let (ma, mb) = (
        Model::load(&a.join("final"), &Default::default()).unwrap(),
        Model::load(&b.join("final"), &Default::default()).unwrap(),
    );
    assert_eq!(max_diff(&logits(&ma), &logits(&mb)), 0.0, "resumed run differs");
    // The chat template travels with the checkpoint.
    assert!(a.join("final/chat_template.jinja").is_file());
}
