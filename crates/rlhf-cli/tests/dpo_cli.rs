//! `rlhf dpo` end to end: at learning rate 0 with a separate reference checkpoint, the
//! logged `loss` and `rewards/*` are TRL's formulas on model forwards computed here
//! independently (plain padded-free forward, `log_softmax` of full logits, sums over the
//! completion tokens), not through the trainer's packed forward and fused LM head.

use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::{Device, Tensor, D};
use rlhf_models::{Fwd, LoadOptions, Model};
use serde_json::Value;

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

/// tiny-gpt2 with `ln_f` set to `model_states.json`'s `current` vectors, saved to `dir`: a
/// policy that differs from the reference file.
fn perturbed_policy(dir: &Path) -> PathBuf {
    let src = fixtures().join("tiny-gpt2");
    std::fs::create_dir_all(dir).unwrap();
    for f in std::fs::read_dir(&src).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, dir.join(f.file_name().unwrap())).unwrap();
    }
    let states: Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("algorithms/model_states.json")).unwrap())
            .unwrap();
    let mut tensors = candle_core::safetensors::load(src.join("model.safetensors"), &Device::Cpu).unwrap();
    for name in ["transformer.ln_f.weight", "transformer.ln_f.bias"] {
        let v: Vec<f32> = states["states"]["current"][name]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap() as f32)
            .collect();
        let n = v.len();
        tensors.insert(name.into(), Tensor::from_vec(v, n, &Device::Cpu).unwrap());
    }
    candle_core::safetensors::save(&tensors, dir.join("model.safetensors")).unwrap();
    dir.to_path_buf()
}

/// Summed log-prob of `ids[start..]` given the tokens before each, one unpadded row.
fn completion_logp(model: &Model, ids: &[u32], start: usize) -> f64 {
    let t = ids.len();
    let x = Tensor::from_vec(ids.to_vec(), (1, t), &Device::Cpu).unwrap();
    let mask = Tensor::ones((1, t), candle_core::DType::U32, &Device::Cpu).unwrap();
    let logits = model.logits(&x, &mask, &mut Fwd::eval()).unwrap().squeeze(0).unwrap();
    let logits = logits.to_dtype(candle_core::DType::F64).unwrap();
    let lse = logits.exp().unwrap().sum_keepdim(D::Minus1).unwrap().log().unwrap();
    let logp = logits.broadcast_sub(&lse).unwrap().to_vec2::<f64>().unwrap();
    (start.max(1)..t).map(|k| logp[k - 1][ids[k] as usize]).sum()
}

/// `(prompt length, prompt + chosen, prompt + rejected)` as TRL 1.16 tokenizes a text row.
fn tokenize(model: &Model, row: &Value) -> (usize, Vec<u32>, Vec<u32>) {
    let tok = model.tokenizer().unwrap();
    let text = |k: &str| row[k].as_str().unwrap().to_string();
    let prompt = tok.encode(&text("prompt")).unwrap();
    let c = tok
        .encode(&format!("{}{}<|endoftext|>", text("prompt"), text("chosen")))
        .unwrap();
    let r = tok
        .encode(&format!("{}{}<|endoftext|>", text("prompt"), text("rejected")))
        .unwrap();
    let common = |a: &[u32], b: &[u32]| a.iter().zip(b).take_while(|(x, y)| x == y).count();
    (common(&prompt, &c).min(common(&prompt, &r)), c, r)
}

#[test]
fn dpo_at_learning_rate_zero_with_a_separate_reference_logs_trls_loss_and_rewards() {
    let tmp = tempfile::tempdir().unwrap();
    let policy_dir = perturbed_policy(&tmp.path().join("policy"));
    let reference_dir = fixtures().join("tiny-gpt2");
    // Rows other than the fixture's: the first 6 of the validation file.
    let rows: Vec<Value> = std::fs::read_to_string(fixtures().join("data/prefs_val.jsonl"))
        .unwrap()
        .lines()
        .take(6)
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let train = tmp.path().join("rows.jsonl");
    std::fs::write(&train, rows.iter().map(|r| format!("{r}\n")).collect::<String>()).unwrap();
    let out = tmp.path().join("run");
    let beta = 0.2;
    let (ok, stdout, stderr) = rlhf(&[
        "dpo",
        "--model-name-or-path",
        policy_dir.to_str().unwrap(),
        "--ref-model-name-or-path",
        reference_dir.to_str().unwrap(),
        "--train-file",
        train.to_str().unwrap(),
        "--output-dir",
        out.to_str().unwrap(),
        "--learning-rate",
        "0",
        "--beta",
        "0.2",
        "--per-device-train-batch-size",
        "6",
        "--max-steps",
        "2",
        "--logging-steps",
        "1",
        "--quiet",
        "true",
    ]);
    assert!(ok, "{stdout}\n{stderr}");
    assert!(stdout.contains("policy saved to"), "{stdout}");

    // Expected: TRL's sigmoid loss and rewards from independent forwards.
    let policy = Model::load(&policy_dir, &LoadOptions::default()).unwrap();
    let reference = Model::load(&reference_dir, &LoadOptions::default()).unwrap();
    let (mut cl, mut rl) = (Vec::new(), Vec::new());
    for row in &rows {
        let (p, c, r) = tokenize(&policy, row);
        cl.push(completion_logp(&policy, &c, p) - completion_logp(&reference, &c, p));
        rl.push(completion_logp(&policy, &r, p) - completion_logp(&reference, &r, p));
    }
    let n = rows.len() as f64;
    let mean = |v: Vec<f64>| v.iter().sum::<f64>() / n;
    let logsigmoid = |x: f64| -(1.0 + (-x).exp()).ln();
    let delta: Vec<f64> = cl.iter().zip(&rl).map(|(c, r)| c - r).collect();
    let want = [
        ("loss", mean(delta.iter().map(|d| -logsigmoid(beta * d)).collect())),
        ("rewards/chosen", mean(cl.iter().map(|c| beta * c).collect())),
        ("rewards/rejected", mean(rl.iter().map(|r| beta * r).collect())),
        ("rewards/margins", mean(delta.iter().map(|d| beta * d).collect())),
        (
            "rewards/accuracies",
            mean(delta.iter().map(|d| f64::from(u8::from(*d > 0.0))).collect()),
        ),
    ];
    assert!(delta.iter().all(|d| d.abs() > 1e-3), "ambiguous pairs: {delta:?}");
    let logged: Vec<Value> = std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(logged.len(), 2);
    for line in &logged {
        for (k, w) in want {
            let g = line[k].as_f64().unwrap_or_else(|| panic!("{k} not logged: {line}"));
            assert!(
                (g - w).abs() <= 1e-4 * w.abs().max(1e-2),
                "{k}: logged {g}, expected {w}"
            );
        }
    }
}

#[test]
fn dpo_help_lists_the_trl_keys() {
    let (ok, stdout, _) = rlhf(&["dpo", "--help"]);
    assert!(ok);
    for key in [
        "--model-name-or-path",
        "--ref-model-name-or-path",
        "--train-file",
        "--learning-rate",
        "--beta",
        "--loss-type",
        "--precompute-ref-log-probs",
        "--use-peft",
    ] {
        assert!(stdout.contains(key), "{key} missing from:\n{stdout}");
    }
}
