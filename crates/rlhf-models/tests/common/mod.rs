//! Shared helpers of the model tests: fixture paths and JSON readers.
#![allow(dead_code)]

use std::path::PathBuf;

use candle_core::{Device, Tensor, D};
use rlhf_models::{LoadOptions, Model};
use serde_json::Value;

pub fn fixtures() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../fixtures"))
}

pub fn tiny_dir() -> PathBuf {
    fixtures().join("tiny-gpt2")
}

pub fn tiny() -> Model {
    Model::load(&tiny_dir(), &LoadOptions::default()).expect("tiny-gpt2 loads")
}

pub fn parity() -> Value {
    let text = std::fs::read_to_string(fixtures().join("parity_tiny.json")).expect("parity_tiny.json");
    serde_json::from_str(&text).expect("valid json")
}

pub fn f32s(v: &Value) -> Vec<f32> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_f64().expect("number") as f32)
        .collect()
}

pub fn f32s2(v: &Value) -> Vec<Vec<f32>> {
    v.as_array().expect("array").iter().map(f32s).collect()
}

pub fn u32s(v: &Value) -> Vec<u32> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_u64().expect("int") as u32)
        .collect()
}

pub fn u32s2(v: &Value) -> Vec<Vec<u32>> {
    v.as_array().expect("array").iter().map(u32s).collect()
}

pub fn tensor2(rows: &[Vec<u32>]) -> Tensor {
    let flat: Vec<u32> = rows.iter().flatten().copied().collect();
    Tensor::from_vec(flat, (rows.len(), rows[0].len()), &Device::Cpu).expect("tensor")
}

/// log-softmax over the last dim (composed, for tests).
pub fn log_softmax(logits: &Tensor) -> Tensor {
    let max = logits.max_keepdim(D::Minus1).unwrap();
    let shifted = logits.broadcast_sub(&max).unwrap();
    let lse = shifted.exp().unwrap().sum_keepdim(D::Minus1).unwrap().log().unwrap();
    shifted.broadcast_sub(&lse).unwrap()
}

pub fn assert_close(got: f32, want: f32, tol: f32, what: &str) {
    assert!((got - want).abs() <= tol, "{what}: got {got}, want {want} (tol {tol})");
}
