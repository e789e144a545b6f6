//! `rlhf merge`, `rlhf generate --adapter` and `rlhf score --adapter` on the PEFT fixture
//! adapters in `fixtures/lora` (see its README: `adapter` is a CAUSAL_LM LoRA on tiny-gpt2,
//! `adapter_seqcls` a SEQ_CLS LoRA whose `modules_to_save` supplies the score head).

use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::{DType, Device, Tensor};
use rlhf_models::lora::load_adapter;
use rlhf_models::{Fwd, Model};

fn fixtures() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../fixtures"))
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

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn merge(adapter: &str, out: &Path) {
    let (tiny, adapter) = (fixtures().join("tiny-gpt2"), fixtures().join("lora").join(adapter));
    let (ok, _, err) = rlhf(&[
        "merge",
        "--model",
        s(&tiny),
        "--adapter",
        s(&adapter),
        "--output",
        s(out),
    ]);
    assert!(ok, "{err}");
    assert!(err.contains("merged"), "{err}");
}

fn adapted(adapter: &str) -> Model {
    let mut m = Model::load(&fixtures().join("tiny-gpt2"), &Default::default()).unwrap();
    load_adapter(&mut m, &fixtures().join("lora").join(adapter), &Default::default()).unwrap();
    m
}

fn batch() -> (Tensor, Tensor) {
    let ids = Tensor::new(
        &[
            [12982u32, 25, 1680, 345, 1560, 50256],
            [19509, 318, 14081, 13, 50256, 50256],
        ],
        &Device::Cpu,
    );
    let mask = Tensor::new(&[[1u32, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0]], &Device::Cpu);
    (ids.unwrap(), mask.unwrap())
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

#[test]
fn merge_writes_a_plain_model_with_the_adapted_logits() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("merged");
    merge("adapter", &out);
    assert!(out.join("tokenizer.json").is_file() && !out.join("adapter_config.json").exists());
    let merged = Model::load(&out, &Default::default()).unwrap();
    assert!(merged.lora.is_none() && merged.score_head.is_none());
    let (ids, mask) = batch();
    let want = adapted("adapter").logits(&ids, &mask, &mut Fwd::eval()).unwrap();
    let got = merged.logits(&ids, &mask, &mut Fwd::eval()).unwrap();
    let d = max_diff(&got, &want);
    assert!(d < 1e-5, "merged logits differ by {d}");
    let base = Model::load(&fixtures().join("tiny-gpt2"), &Default::default()).unwrap();
    assert!(max_diff(&base.logits(&ids, &mask, &mut Fwd::eval()).unwrap(), &want) > 1e-3);
}

#[test]
fn merging_the_seqcls_adapter_gives_a_reward_model_with_the_adapted_scores() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("rm");
    merge("adapter_seqcls", &out);
    let cfg = std::fs::read_to_string(out.join("config.json")).unwrap();
    assert!(cfg.contains("GPT2ForSequenceClassification"), "{cfg}");
    let merged = Model::load(&out, &Default::default()).unwrap();
    let (ids, mask) = batch();
    let want = adapted("adapter_seqcls").scores(&ids, &mask, &mut Fwd::eval()).unwrap();
    let d = max_diff(&merged.scores(&ids, &mask, &mut Fwd::eval()).unwrap(), &want);
    assert!(d < 1e-5, "merged scores differ by {d}");
}

#[test]
fn merge_refuses_to_overwrite_the_base_model() {
    let tiny = fixtures().join("tiny-gpt2");
    let adapter = fixtures().join("lora").join("adapter");
    let (ok, _, err) = rlhf(&[
        "merge",
        "--model",
        s(&tiny),
        "--adapter",
        s(&adapter),
        "--output",
        s(&tiny),
    ]);
    assert!(!ok && err.contains("hint"), "{err}");
}

#[test]
fn generate_with_an_adapter_equals_generate_with_the_merged_model() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("merged");
    merge("adapter", &out);
    let (tiny, adapter) = (fixtures().join("tiny-gpt2"), fixtures().join("lora").join("adapter"));
    let common = [
        "--prompt",
        "User: Can you tell me",
        "--max-new-tokens",
        "12",
        "--greedy",
        "--json",
    ];
    let run = |extra: &[&str]| {
        let args: Vec<&str> = ["generate"].iter().chain(extra).chain(&common).copied().collect();
        let (ok, stdout, err) = rlhf(&args);
        assert!(ok, "{err}");
        let v: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
        v["completion_ids"].clone()
    };
    let with_adapter = run(&["--model", s(&tiny), "--adapter", s(&adapter)]);
    assert_eq!(with_adapter, run(&["--model", s(&out)]));
    assert_ne!(
        with_adapter,
        run(&["--model", s(&tiny)]),
        "the adapter changes the greedy continuation"
    );
}

#[test]
fn score_with_the_seqcls_adapter_equals_score_with_the_merged_reward_model() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("rm");
    merge("adapter_seqcls", &out);
    let data = tmp.path().join("pairs.jsonl");
    std::fs::write(
        &data,
        "{\"prompt\": \"User: Hi!\\nAssistant:\", \"chosen\": \" Hello, happy to help.\", \"rejected\": \" No. Go away.\"}\n\
         {\"text\": \"short\"}\n",
    )
    .unwrap();
    let tiny = fixtures().join("tiny-gpt2");
    let adapter = fixtures().join("lora").join("adapter_seqcls");
    let run = |args: &[&str]| -> Vec<f64> {
        let all: Vec<&str> = ["score"]
            .iter()
            .chain(args)
            .chain(&["--data", s(&data), "--json"])
            .copied()
            .collect();
        let (ok, stdout, err) = rlhf(&all);
        assert!(ok, "{err}");
        let lines: Vec<serde_json::Value> = stdout.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        let r = |v: &serde_json::Value| v.as_f64().unwrap();
        vec![
            r(&lines[0]["reward_chosen"]),
            r(&lines[0]["reward_rejected"]),
            r(&lines[1]["reward"]),
        ]
    };
    let (ok, _, err) = rlhf(&[
        "score",
        "--model",
        s(&tiny),
        "--adapter",
        s(&adapter),
        "--data",
        s(&data),
    ]);
    assert!(ok && err.contains("warning") && err.contains("score head"), "{err}");
    let (a, b) = (
        run(&["--model", s(&tiny), "--adapter", s(&adapter)]),
        run(&["--model", s(&out)]),
    );
    for (x, y) in a.iter().zip(&b) {
        assert!((x - y).abs() < 1e-5, "{a:?} vs {b:?}");
    }
}

#[test]
fn a_mismatched_adapter_is_a_clear_cli_error() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = rlhf_models::ModelConfig::gpt2(1, 2, 16, 32, 50257);
    let mut m = Model::random(cfg, 0, DType::F32, &Device::Cpu).unwrap();
    m.set_tokenizer(
        Model::load(&fixtures().join("tiny-gpt2"), &Default::default())
            .unwrap()
            .tokenizer
            .unwrap(),
    );
    m.save(dir.path()).unwrap();
    let adapter = fixtures().join("lora").join("adapter");
    let (ok, _, err) = rlhf(&[
        "generate",
        "--model",
        s(dir.path()),
        "--adapter",
        s(&adapter),
        "--prompt",
        "x",
    ]);
    assert!(
        !ok && err.contains("loading adapter") && err.contains("lora_A.weight") && err.contains("hint"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}
