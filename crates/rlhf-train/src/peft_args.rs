//! LoRA and quantization settings of the trainers, with TRL's `ModelConfig` names
//! (`use_peft`, `lora_r`, `lora_alpha`, `lora_dropout`, `lora_target_modules`, ...) and
//! transformers' `BitsAndBytesConfig` names (`load_in_8bit`, `load_in_4bit`, ...).

use rlhf_models::lora::{apply_lora, count_parameters, quantize, ParamCounts, QuantConfig};
use rlhf_models::Model;
use rlhf_peft::lora::LoraConfig;
use serde::{Deserialize, Serialize};

use crate::error::{Result, TrainError};

/// TRL `ModelConfig`'s PEFT fields (same names and defaults) plus the reference-bias choice
/// and the base quantization.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct PeftArgs {
    /// Train LoRA adapters instead of every weight.
    pub use_peft: bool,
    /// LoRA rank.
    pub lora_r: usize,
    /// LoRA alpha (scaling `alpha / r`, or `alpha / sqrt(r)` with rsLoRA).
    pub lora_alpha: f64,
    /// Dropout on the adapter input.
    pub lora_dropout: f64,
    /// Module names (default: the family's, PEFT's table; GPT-2 `c_attn`) or `all-linear`;
    /// a list, or names separated by commas.
    #[serde(default, deserialize_with = "crate::config_values::opt_names")]
    pub lora_target_modules: Option<Vec<String>>,
    /// Modules trained in full and saved with the adapter (a reward model's `score` always is).
    #[serde(default, deserialize_with = "crate::config_values::opt_names")]
    pub lora_modules_to_save: Option<Vec<String>>,
    /// `none`, `all` or `lora_only`: which biases train.
    pub lora_bias: String,
    /// rsLoRA scaling.
    pub use_rslora: bool,
    /// `original` (adapters disabled = the base model) or `trained` (PEFT/TRL behaviour).
    pub reference_bias: String,
    /// Base quantization of the frozen projections.
    #[serde(flatten)]
    pub quant: QuantConfig,
    /// Hub revision (branch, tag or commit) of `model_name_or_path` when it is a Hub id
    /// (TRL `ModelConfig.model_revision`; default `main`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_revision: Option<String>,
}

impl Default for PeftArgs {
    fn default() -> Self {
        Self {
            use_peft: false,
            lora_r: 16,
            lora_alpha: 32.0,
            lora_dropout: 0.05,
            lora_target_modules: None,
            lora_modules_to_save: None,
            lora_bias: "none".into(),
            use_rslora: false,
            reference_bias: "original".into(),
            quant: QuantConfig::default(),
            model_revision: None,
        }
    }
}

impl PeftArgs {
    /// The PEFT `LoraConfig` these settings describe, for `task_type` (`CAUSAL_LM` or
    /// `SEQ_CLS`; a sequence classifier always saves its `score` head).
    pub fn lora_config(&self, task_type: &str) -> Result<LoraConfig> {
        let mut modules = self.lora_modules_to_save.clone().unwrap_or_default();
        if task_type == "SEQ_CLS" && !modules.iter().any(|m| m == "score") {
            modules.push("score".into());
        }
        let v = serde_json::json!({
            "task_type": task_type,
            "r": self.lora_r,
            "lora_alpha": self.lora_alpha,
            "lora_dropout": self.lora_dropout,
            // One name is passed as a string, as TRL's `ModelConfig` does, so that
            // `all-linear` means PEFT's "every linear layer but the output".
            "target_modules": match self.lora_target_modules.as_deref() {
                Some([one]) => serde_json::json!(one),
                other => serde_json::json!(other),
            },
            "modules_to_save": if modules.is_empty() { None } else { Some(modules) },
            "bias": self.lora_bias,
            "use_rslora": self.use_rslora,
            "reference_bias": self.reference_bias,
        });
        serde_json::from_value(v).map_err(|e| TrainError::Config(format!("LoRA settings: {e}")))
    }

    /// Quantizes the base (if asked) and adds adapters (if `use_peft`) to `model`;
    /// returns the trainable-parameter counts (PEFT's `print_trainable_parameters`).
    pub fn apply(&self, model: &mut Model, task_type: &str, seed: u64) -> Result<Option<ParamCounts>> {
        if (self.quant.load_in_8bit || self.quant.load_in_4bit) && !self.use_peft {
            return Err(TrainError::Config(
                "load_in_8bit / load_in_4bit freeze the base: set use_peft = true to train adapters on it".into(),
            ));
        }
        if !self.use_peft {
            return Ok(None);
        }
        let cfg = self.lora_config(task_type)?;
        apply_lora(model, &cfg, seed)?;
        if self.quant.load_in_8bit || self.quant.load_in_4bit {
            quantize(model, &self.quant)?;
        }
        Ok(Some(count_parameters(model)))
    }
}

/// Loads the model a trainer optimises. Full fine-tuning: every weight of `model_path` (or of
/// the checkpoint when resuming) trains. With `use_peft`: the base from `model_path` gets
/// fresh adapters, or the checkpoint's adapter when resuming. `prepare` runs on the loaded
/// base first (dropout settings, a fresh head).
pub fn load_trainable(
    model_path: &std::path::Path,
    resume: Option<&std::path::Path>,
    peft: &PeftArgs,
    task_type: &str,
    seed: u64,
    prepare: impl FnOnce(&mut Model) -> Result<()>,
) -> Result<Model> {
    let opts = rlhf_models::LoadOptions {
        revision: peft.model_revision.clone(),
        ..Default::default()
    };
    if !peft.use_peft {
        let mut model = Model::load(resume.unwrap_or(model_path), &opts)?;
        prepare(&mut model)?;
        model.set_trainable(true)?;
        return Ok(model);
    }
    let mut model = Model::load(model_path, &opts)?;
    prepare(&mut model)?;
    match resume {
        Some(ckpt) => {
            let lopts = rlhf_models::lora::AdapterLoadOptions {
                is_trainable: true,
                reference_bias: None,
            };
            rlhf_models::lora::load_adapter(&mut model, ckpt, &lopts)?;
            if peft.quant.load_in_8bit || peft.quant.load_in_4bit {
                quantize(&mut model, &peft.quant)?;
            }
        }
        None => {
            if let Some(counts) = peft.apply(&mut model, task_type, seed)? {
                tracing::info!("{counts}");
            }
        }
    }
    Ok(model)
}

/// Saves what a trainer trained: a full Hugging Face directory, or, for a LoRA model, the
/// PEFT adapter files (plus `model.safetensors` with only `v_head.summary.*` when there is a
/// value head, as TRL saves a PEFT policy).
pub fn save_trained(model: &Model, dir: &std::path::Path) -> Result<()> {
    if model.lora.is_none() {
        return Ok(model.save(dir)?);
    }
    rlhf_models::lora::save_adapter(model, dir)?;
    if let Some(v) = &model.value_head {
        let t: std::collections::BTreeMap<String, candle_core::Tensor> = [
            ("v_head.summary.weight".to_string(), v.weight.value().clone()),
            ("v_head.summary.bias".to_string(), v.bias.value().clone()),
        ]
        .into();
        crate::checkpoint::save_tensors(&t, &dir.join("model.safetensors"))?;
    }
    if let Some(tok) = &model.tokenizer {
        crate::checkpoint::write_atomic(&dir.join("tokenizer.json"), tok.json().as_bytes())?;
    }
    Ok(())
}
