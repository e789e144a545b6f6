//! Shared helpers of the trainer tests.
#![allow(dead_code)]

use std::path::PathBuf;

use candle_core::{Device, Tensor};
use rlhf_models::{LoadOptions, Model, ScoreHead};
use rlhf_peft::Param;
use serde_json::Value;

pub fn fixtures() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../fixtures"))
}

pub fn parity() -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixtures().join("parity_tiny.json")).unwrap()).unwrap()
}

pub fn f32s(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

pub fn u32s(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// tiny-gpt2 with the score head of `seqcls_padded_batch` saved to `dir` (the fixture's
/// "tiny-seqcls").
pub fn tiny_seqcls(dir: &std::path::Path) -> Model {
    let mut model = Model::load(&fixtures().join("tiny-gpt2"), &LoadOptions::default()).unwrap();
    let w: Vec<f32> = parity()["seqcls_padded_batch"]["score_weight"][0]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect();
    model.score_head = Some(ScoreHead {
        weight: Param::frozen(Tensor::from_vec(w, (1, 128), &Device::Cpu).unwrap()),
    });
    model.save(dir).unwrap();
    model
}

/// Metrics lines of a run, without wall-clock fields.
pub fn metrics(dir: &std::path::Path) -> Vec<Value> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let mut v: Value = serde_json::from_str(l).unwrap();
            v.as_object_mut().unwrap().remove("samples_per_second");
            v
        })
        .collect()
}

/// The first `n` lines of a JSONL fixture written to `path`.
pub fn head_jsonl(src: &str, n: usize, path: &std::path::Path) {
    let text = std::fs::read_to_string(fixtures().join("data").join(src)).unwrap();
    let lines: Vec<&str> = text.lines().take(n).collect();
    std::fs::write(path, lines.join("\n") + "\n").unwrap();
}
