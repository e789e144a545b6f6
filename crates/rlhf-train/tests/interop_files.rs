//! What rlhf writes is what the Python stack reads: the names, shapes and config fields of a
//! reward-model directory, a PEFT adapter and a PPO policy with TRL 0.11's value head,
//! checked against files transformers and PEFT wrote (`fixtures/tiny-gpt2`,
//! `fixtures/lora/adapter_seqcls`, made by transformers 5.23 / PEFT 0.21.2; see their
//! READMEs).

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use common::fixtures;
use rlhf_models::lora::{apply_lora, ADAPTER_CONFIG, ADAPTER_WEIGHTS};
use rlhf_models::{LoadOptions, Model};
use rlhf_peft::LoraConfig;
use rlhf_train::peft_args::save_trained;
use serde_json::Value;

fn tiny() -> Model {
    Model::load(&fixtures().join("tiny-gpt2"), &LoadOptions::default()).unwrap()
}

/// Tensor names and shapes of a safetensors file.
fn shapes(path: &Path) -> BTreeMap<String, Vec<usize>> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors().into_iter().map(|(n, v)| (n, v.shape().to_vec())).collect()
}

fn json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn a_reward_model_directory_is_what_gpt2_for_sequence_classification_loads() {
    let mut model = tiny();
    // tiny-gpt2's config has no pad id: the pooling pad (EOS, as TRL sets it) is written.
    assert!(model.cfg().pad_token_id.is_none());
    model.ensure_score_head(0).unwrap();
    let dir = tempfile::tempdir().unwrap();
    save_trained(&model, dir.path()).unwrap();
    let cfg = json(&dir.path().join("config.json"));
    assert_eq!(
        cfg["architectures"],
        serde_json::json!(["GPT2ForSequenceClassification"])
    );
    assert_eq!(cfg["pad_token_id"], 50256);
    assert_eq!(cfg["id2label"], serde_json::json!({"0": "LABEL_0"}));
    assert_eq!(cfg["label2id"], serde_json::json!({"LABEL_0": 0}));
    let got = shapes(&dir.path().join("model.safetensors"));
    let mut want = shapes(&fixtures().join("tiny-gpt2/model.safetensors"));
    want.insert("score.weight".into(), vec![1, 128]);
    assert_eq!(got, want, "GPT2LMHeadModel's tensors plus score.weight");
}

#[test]
fn a_seq_cls_adapter_has_peft_keys_and_config() {
    let mut model = tiny();
    model.ensure_score_head(0).unwrap();
    let peft_dir = fixtures().join("lora/adapter_seqcls");
    let theirs = json(&peft_dir.join(ADAPTER_CONFIG));
    let cfg = LoraConfig::from_json(
        r#"{"r": 4, "lora_alpha": 8, "target_modules": ["c_attn", "c_proj"], "modules_to_save": ["score"], "task_type": "SEQ_CLS"}"#,
    )
    .unwrap();
    apply_lora(&mut model, &cfg, 0).unwrap();
    let dir = tempfile::tempdir().unwrap();
    save_trained(&model, dir.path()).unwrap();
    assert_eq!(
        shapes(&dir.path().join(ADAPTER_WEIGHTS)),
        shapes(&peft_dir.join(ADAPTER_WEIGHTS)),
        "the same tensor names and shapes as PEFT's save_pretrained"
    );
    let ours = json(&dir.path().join(ADAPTER_CONFIG));
    for key in [
        "peft_type",
        "task_type",
        "r",
        "lora_alpha",
        "fan_in_fan_out",
        "bias",
        "use_rslora",
        "inference_mode",
    ] {
        assert_eq!(ours[key], theirs[key], "adapter_config.json `{key}`");
    }
    let set = |v: &Value| -> std::collections::BTreeSet<String> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(set(&ours["target_modules"]), set(&theirs["target_modules"]));
    assert!(set(&ours["modules_to_save"]).contains("score"));
}

#[test]
fn a_ppo_policy_keeps_trl_value_head_layout() {
    // Full fine-tuning: one transformers checkpoint holding the LM and `v_head.summary.*`.
    let mut model = tiny();
    model.ensure_value_head(0).unwrap();
    let dir = tempfile::tempdir().unwrap();
    save_trained(&model, dir.path()).unwrap();
    let mut want = shapes(&fixtures().join("tiny-gpt2/model.safetensors"));
    want.insert("v_head.summary.weight".into(), vec![1, 128]);
    want.insert("v_head.summary.bias".into(), vec![1]);
    assert_eq!(shapes(&dir.path().join("model.safetensors")), want);
    assert_eq!(
        json(&dir.path().join("config.json"))["architectures"],
        serde_json::json!(["GPT2LMHeadModel"])
    );

    // LoRA: the PEFT adapter files, and the value head alone beside them.
    let mut model = tiny();
    model.ensure_value_head(0).unwrap();
    let cfg = LoraConfig::from_json(r#"{"r": 8, "lora_alpha": 16, "task_type": "CAUSAL_LM"}"#).unwrap();
    apply_lora(&mut model, &cfg, 0).unwrap();
    let dir = tempfile::tempdir().unwrap();
    save_trained(&model, dir.path()).unwrap();
    let adapter = shapes(&dir.path().join(ADAPTER_WEIGHTS));
    assert!(
        adapter.keys().all(|k| k.starts_with("base_model.model.transformer.h.")),
        "{adapter:?}"
    );
    assert_eq!(adapter.len(), 4, "lora_A/lora_B of c_attn in 2 layers");
    let heads = shapes(&dir.path().join("model.safetensors"));
    let want: BTreeMap<String, Vec<usize>> = [
        ("v_head.summary.weight".to_string(), vec![1, 128]),
        ("v_head.summary.bias".to_string(), vec![1]),
    ]
    .into();
    assert_eq!(heads, want);
    assert_eq!(json(&dir.path().join(ADAPTER_CONFIG))["task_type"], "CAUSAL_LM");
}
