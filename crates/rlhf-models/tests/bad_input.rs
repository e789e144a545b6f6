//! Bad checkpoints and inputs give errors that name the file (and field or tensor), say
//! what was expected and how to fix it — never a panic.

mod common;

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use common::*;
use rlhf_models::{Fwd, LoadOptions, Model, ModelConfig};

/// A tiny random checkpoint (with the real tokenizer) written to `dir`.
fn write_small(dir: &Path) {
    let mut model = Model::random(ModelConfig::gpt2(1, 2, 8, 32, 50257), 0, DType::F32, &Device::Cpu).unwrap();
    model.tokenizer = tiny().tokenizer;
    model.save(dir).unwrap();
}

fn load_err(dir: &Path) -> String {
    Model::load(dir, &LoadOptions::default()).unwrap_err().to_string()
}

fn edit_config(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let p = dir.join("config.json");
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(&p, serde_json::to_string(&v).unwrap()).unwrap();
}

#[test]
fn a_missing_directory_or_weights_file_is_named() {
    let err = load_err(Path::new("/nonexistent/model"));
    assert!(
        err.contains("/nonexistent/model") && err.contains("no such directory"),
        "{err}"
    );
    let dir = tempfile::tempdir().unwrap();
    write_small(dir.path());
    std::fs::remove_file(dir.path().join("model.safetensors")).unwrap();
    let err = load_err(dir.path());
    assert!(err.contains("model.safetensors") && err.contains("hint"), "{err}");
}

#[test]
fn a_config_field_of_the_wrong_type_names_the_field() {
    let dir = tempfile::tempdir().unwrap();
    write_small(dir.path());
    edit_config(dir.path(), |v| v["n_layer"] = "two".into());
    let err = load_err(dir.path());
    assert!(
        err.contains("config.json") && err.contains("`n_layer`") && err.contains("integer"),
        "{err}"
    );
}

#[test]
fn an_unknown_activation_lists_the_known_ones() {
    let dir = tempfile::tempdir().unwrap();
    write_small(dir.path());
    edit_config(dir.path(), |v| v["activation_function"] = "swiglu".into());
    let err = load_err(dir.path());
    assert!(
        err.contains("activation_function") && err.contains("swiglu") && err.contains("gelu_new"),
        "{err}"
    );
}

#[test]
fn malformed_config_json_is_named() {
    let dir = tempfile::tempdir().unwrap();
    write_small(dir.path());
    std::fs::write(dir.path().join("config.json"), "{\"n_layer\": 1,").unwrap();
    let err = load_err(dir.path());
    assert!(err.contains("config.json") && err.contains("not valid JSON"), "{err}");
}

#[test]
fn a_tensor_of_the_wrong_shape_is_named_with_both_shapes() {
    let dir = tempfile::tempdir().unwrap();
    write_small(dir.path());
    // The config now promises 64 positions; the weights hold 32.
    edit_config(dir.path(), |v| v["n_positions"] = 64.into());
    let err = load_err(dir.path());
    assert!(
        err.contains("transformer.wpe.weight") || err.contains("wpe.weight"),
        "{err}"
    );
    assert!(err.contains("[32, 8]") && err.contains("[64, 8]"), "{err}");
}

#[test]
fn a_missing_tensor_is_named() {
    let dir = tempfile::tempdir().unwrap();
    write_small(dir.path());
    edit_config(dir.path(), |v| v["n_layer"] = 2.into());
    let err = load_err(dir.path());
    assert!(err.contains("h.1.ln_1.weight") && err.contains("missing"), "{err}");
}

#[test]
fn a_truncated_safetensors_file_is_reported_as_corrupt() {
    let dir = tempfile::tempdir().unwrap();
    write_small(dir.path());
    let p = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
    let err = load_err(dir.path());
    assert!(
        err.contains("model.safetensors") && err.contains("truncated or corrupt"),
        "{err}"
    );
    std::fs::write(&p, b"garbage").unwrap();
    let err = load_err(dir.path());
    assert!(err.contains("truncated or corrupt"), "{err}");
}

#[test]
fn a_tokenizer_larger_than_the_vocabulary_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut model = Model::random(ModelConfig::gpt2(1, 2, 8, 32, 1000), 0, DType::F32, &Device::Cpu).unwrap();
    model.tokenizer = tiny().tokenizer;
    model.save(dir.path()).unwrap();
    let err = load_err(dir.path());
    assert!(err.contains("vocab_size") && err.contains("50257"), "{err}");
}

#[test]
fn scoring_without_a_score_head_says_what_to_pass() {
    let model = tiny();
    let ids = Tensor::new(&[[1u32, 2]], &Device::Cpu).unwrap();
    let mask = Tensor::new(&[[1u32, 1]], &Device::Cpu).unwrap();
    let err = model.scores(&ids, &mask, &mut Fwd::eval()).unwrap_err().to_string();
    assert!(err.contains("no score head") && err.contains("hint"), "{err}");
}

#[test]
fn a_sequence_longer_than_n_positions_is_refused() {
    let model = tiny();
    let ids = Tensor::zeros((1, 300), DType::U32, &Device::Cpu).unwrap();
    let mask = Tensor::ones((1, 300), DType::U32, &Device::Cpu).unwrap();
    let err = model.logits(&ids, &mask, &mut Fwd::eval()).unwrap_err().to_string();
    assert!(err.contains("n_positions (256)") && err.contains("300 tokens"), "{err}");
}
