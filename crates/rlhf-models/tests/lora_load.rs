//! Loading PEFT adapter directories: the quirks PEFT writes are accepted
//! (`fixtures/lora/README.md`), and adapters that do not fit the model fail with errors that
//! name the file, the tensor and the fix.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use common::*;
use rlhf_models::lora::{apply_lora, load_adapter, save_adapter, AdapterLoadOptions};
use rlhf_models::weights::save_safetensors;
use rlhf_models::{Fwd, Model, ModelConfig, ModelError};
use rlhf_peft::lora::ReferenceBias;
use rlhf_peft::LoraConfig;
use serde_json::Value;

fn adapter_dir(name: &str) -> PathBuf {
    fixtures().join("lora").join(name)
}

/// A copy of a fixture adapter with its config and tensors rewritten by `edit`.
fn edited_copy(
    name: &str,
    edit_cfg: impl FnOnce(&mut serde_json::Map<String, Value>),
    edit_tensors: impl FnOnce(&mut BTreeMap<String, Tensor>),
) -> tempfile::TempDir {
    let src = adapter_dir(name);
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("adapter_config.json")).unwrap()).unwrap();
    edit_cfg(cfg.as_object_mut().unwrap());
    std::fs::write(tmp.path().join("adapter_config.json"), cfg.to_string()).unwrap();
    let mut t: BTreeMap<String, Tensor> =
        candle_core::safetensors::load(src.join("adapter_model.safetensors"), &Device::Cpu)
            .unwrap()
            .into_iter()
            .collect();
    edit_tensors(&mut t);
    save_safetensors(&t, &tmp.path().join("adapter_model.safetensors")).unwrap();
    tmp
}

fn logits(model: &Model, fwd: &mut Fwd) -> Tensor {
    let ids = Tensor::new(&[[12982u32, 25, 1680, 345, 1560, 502]], &Device::Cpu).unwrap();
    let mask = Tensor::ones((1, 6), DType::U32, &Device::Cpu).unwrap();
    model.logits(&ids, &mask, fwd).unwrap()
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

fn load(dir: &Path) -> Result<(Model, Vec<String>), ModelError> {
    let mut model = tiny();
    let w = load_adapter(&mut model, dir, &AdapterLoadOptions::default())?;
    Ok((model, w))
}

#[test]
fn adapters_without_bias_tensors_load_as_peft_0_13_writes_them() {
    let tmp = edited_copy("adapter", |_| {}, |t| t.retain(|k, _| !k.ends_with(".bias")));
    let (model, _) = load(tmp.path()).unwrap();
    let trained = ReferenceBias::Trained;
    let mut peft_like = tiny();
    let opts = AdapterLoadOptions {
        is_trainable: false,
        reference_bias: Some(trained),
    };
    load_adapter(&mut peft_like, tmp.path(), &opts).unwrap();
    // No bias in the file: the base biases stay, so even PEFT's "disabled" is the base.
    let base = logits(&tiny(), &mut Fwd::eval());
    assert_eq!(
        max_diff(&logits(&peft_like, &mut Fwd::eval().without_adapters()), &base),
        0.0
    );
    assert!(max_diff(&logits(&model, &mut Fwd::eval()), &base) > 1e-3);
}

#[test]
fn peft_0_13_bias_keys_and_fan_in_fan_out_false_load_to_the_same_model() {
    let (want, _) = load(&adapter_dir("adapter")).unwrap();
    let tmp = edited_copy(
        "adapter",
        |c| {
            c.insert("fan_in_fan_out".into(), false.into());
        },
        |t| {
            let renamed: BTreeMap<String, Tensor> = std::mem::take(t)
                .into_iter()
                .map(|(k, v)| (k.replace(".base_layer.bias", ".bias"), v))
                .collect();
            *t = renamed;
        },
    );
    let (got, _) = load(tmp.path()).unwrap();
    assert_eq!(
        max_diff(&logits(&got, &mut Fwd::eval()), &logits(&want, &mut Fwd::eval())),
        0.0
    );
}

#[test]
fn a_different_base_model_name_only_warns() {
    let tmp = edited_copy(
        "adapter",
        |c| {
            c.insert("base_model_name_or_path".into(), "openai-community/gpt2-xl".into());
        },
        |_| {},
    );
    let (_, warnings) = load(tmp.path()).unwrap();
    assert_eq!(warnings.len(), 1);
    assert!(warnings[0].contains("gpt2-xl"), "{}", warnings[0]);
    assert!(
        load(&adapter_dir("adapter")).unwrap().1.is_empty(),
        "`../tiny-gpt2` names the fixture base"
    );
}

fn err_text(r: Result<impl std::fmt::Debug, ModelError>) -> String {
    r.expect_err("must fail").to_string()
}

#[test]
fn an_adapter_for_another_hidden_size_is_a_shape_error_naming_the_tensor() {
    let mut model = Model::random(ModelConfig::gpt2(2, 4, 64, 256, 50257), 0, DType::F32, &Device::Cpu).unwrap();
    let msg = err_text(load_adapter(&mut model, &adapter_dir("adapter"), &Default::default()));
    assert!(msg.contains("adapter_model.safetensors"), "{msg}");
    assert!(
        msg.contains("h.0.attn.c_attn.lora_A.weight") && msg.contains("[8, 128]") && msg.contains("[8, 64]"),
        "{msg}"
    );
    assert!(msg.contains("hint:"), "{msg}");
    assert!(model.lora.is_none(), "a failed load leaves the model unchanged");
}

#[test]
fn an_adapter_for_more_layers_is_an_error_naming_the_unmatched_tensors() {
    let mut model = Model::random(ModelConfig::gpt2(1, 4, 128, 256, 50257), 0, DType::F32, &Device::Cpu).unwrap();
    let msg = err_text(load_adapter(
        &mut model,
        &adapter_dir("adapter_seqcls"),
        &Default::default(),
    ));
    assert!(
        msg.contains("match no adapted module") && msg.contains("transformer.h.1."),
        "{msg}"
    );
}

#[test]
fn missing_factors_unsupported_features_and_pickles_are_refused_with_hints() {
    let tmp = edited_copy(
        "adapter",
        |_| {},
        |t| t.retain(|k, _| !k.contains("h.1.attn.c_attn.lora_B")),
    );
    let msg = err_text(load(tmp.path()));
    assert!(msg.contains("h.1.attn.c_attn.lora_B.weight` is missing"), "{msg}");
    let tmp = edited_copy(
        "adapter",
        |c| {
            c.insert("use_dora".into(), true.into());
        },
        |_| {},
    );
    let msg = err_text(load(tmp.path()));
    assert!(msg.contains("adapter_config.json") && msg.contains("use_dora"), "{msg}");
    let tmp = tempfile::tempdir().unwrap();
    std::fs::copy(
        adapter_dir("adapter").join("adapter_config.json"),
        tmp.path().join("adapter_config.json"),
    )
    .unwrap();
    std::fs::write(tmp.path().join("adapter_model.bin"), b"pickle").unwrap();
    assert!(err_text(load(tmp.path())).contains("safe_serialization=True"));
}

#[test]
fn adapted_models_refuse_plain_saves_and_second_adapters() {
    let (mut model, _) = load(&adapter_dir("adapter")).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let msg = err_text(model.save(tmp.path()));
    assert!(
        msg.contains("save_adapter") && msg.contains("merge_and_unload"),
        "{msg}"
    );
    assert!(err_text(apply_lora(&mut model, &LoraConfig::default(), 0)).contains("already has a LoRA adapter"));
    assert!(err_text(save_adapter(&tiny(), tmp.path())).contains("no LoRA adapter"));
}

#[test]
fn apply_lora_refuses_targets_that_match_nothing_and_saved_modules_the_model_lacks() {
    let mut model = tiny();
    let c = LoraConfig {
        target_modules: Some(rlhf_peft::lora::TargetModules::List(vec!["q_proj".into()])),
        ..Default::default()
    };
    assert!(err_text(apply_lora(&mut model, &c, 0)).contains("match no projection"));
    let c = LoraConfig {
        modules_to_save: Some(vec!["score".into()]),
        ..Default::default()
    };
    assert!(err_text(apply_lora(&mut model, &c, 0)).contains("ensure_score_head"));
    let c = LoraConfig {
        modules_to_save: Some(vec!["wte".into()]),
        ..Default::default()
    };
    assert!(err_text(apply_lora(&mut model, &c, 0)).contains("not supported"));
    assert!(model.lora.is_none());
}
