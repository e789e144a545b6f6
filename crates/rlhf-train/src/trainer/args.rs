//! transformers' `TrainingArguments` fields shared by the trainers, with their checks.

use serde::{Deserialize, Serialize};

use crate::error::{Result, TrainError};

/// transformers `TrainingArguments` fields shared by the SFT and reward trainers (same
/// names; defaults set by each trainer's config).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct TrainingArgs {
    /// Where checkpoints, metrics and the final model go.
    pub output_dir: String,
    /// Replace a run already in `output_dir`.
    pub overwrite_output_dir: bool,
    /// `latest` or a `checkpoint-<step>` directory to continue from.
    pub resume_from_checkpoint: Option<String>,
    /// Sequences (pairs for reward models) per micro-batch.
    pub per_device_train_batch_size: usize,
    /// Batch size for evaluation.
    pub per_device_eval_batch_size: usize,
    /// Micro-batches per optimizer step.
    pub gradient_accumulation_steps: usize,
    /// Peak learning rate.
    pub learning_rate: f64,
    /// Decoupled weight decay (not on biases and layer norms).
    pub weight_decay: f64,
    /// Adam β₁.
    pub adam_beta1: f64,
    /// Adam β₂.
    pub adam_beta2: f64,
    /// Adam ε.
    pub adam_epsilon: f64,
    /// Global gradient-norm clip (0 disables).
    pub max_grad_norm: f64,
    /// Epochs when `max_steps` is not positive.
    pub num_train_epochs: f64,
    /// Total optimizer steps (overrides epochs when > 0).
    pub max_steps: i64,
    /// `linear` or `constant`.
    pub lr_scheduler_type: String,
    /// Warm-up steps (wins over `warmup_ratio`).
    pub warmup_steps: u64,
    /// Warm-up as a fraction of all steps.
    pub warmup_ratio: f64,
    /// Log every this many optimizer steps.
    pub logging_steps: u64,
    /// `no`, `steps` or `epoch`.
    pub eval_strategy: String,
    /// Evaluate every this many steps (default: `logging_steps`).
    pub eval_steps: Option<u64>,
    /// `no`, `steps` or `epoch`.
    pub save_strategy: String,
    /// Checkpoint every this many steps.
    pub save_steps: u64,
    /// Keep only this many checkpoints.
    pub save_total_limit: Option<usize>,
    /// Seed of shuffling, dropout and head initialisation.
    pub seed: u64,
    /// Set every dropout probability to 0.
    pub disable_dropout: bool,
    /// Matrix products with bf16 operands and f32 sums (AVX512-BF16 where the CPU has it);
    /// weights, gradients and optimizer state stay f32 (see `rlhf_ops::precision`).
    pub bf16: bool,
    /// Logs only, no progress bar.
    pub quiet: bool,
    /// `report_to` and `logging_dir` (TensorBoard).
    #[serde(flatten)]
    pub report: crate::tensorboard::ReportArgs,
}

impl Default for TrainingArgs {
    /// transformers' `TrainingArguments` defaults.
    fn default() -> Self {
        Self {
            output_dir: "runs/train".into(),
            overwrite_output_dir: false,
            resume_from_checkpoint: None,
            per_device_train_batch_size: 8,
            per_device_eval_batch_size: 8,
            gradient_accumulation_steps: 1,
            learning_rate: 5e-5,
            weight_decay: 0.0,
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_epsilon: 1e-8,
            max_grad_norm: 1.0,
            num_train_epochs: 3.0,
            max_steps: -1,
            lr_scheduler_type: "linear".into(),
            warmup_steps: 0,
            warmup_ratio: 0.0,
            logging_steps: 500,
            eval_strategy: "no".into(),
            eval_steps: None,
            save_strategy: "steps".into(),
            save_steps: 500,
            save_total_limit: None,
            seed: 42,
            disable_dropout: false,
            bf16: false,
            quiet: false,
            report: Default::default(),
        }
    }
}

impl TrainingArgs {
    /// Checks ranges and names, saying which key is wrong and how to fix it.
    pub fn validate(&self) -> Result<()> {
        let bad = |k: &str, msg: String| Err(TrainError::setting(k, msg));
        if !(self.learning_rate.is_finite() && self.learning_rate >= 0.0) {
            return bad(
                "learning_rate",
                format!("must be a non-negative number, got {}", self.learning_rate),
            );
        }
        for (k, v) in [
            ("per_device_train_batch_size", self.per_device_train_batch_size),
            ("per_device_eval_batch_size", self.per_device_eval_batch_size),
            ("gradient_accumulation_steps", self.gradient_accumulation_steps),
        ] {
            if v == 0 {
                return bad(k, "must be at least 1".into());
            }
        }
        if self.max_steps <= 0 && self.num_train_epochs <= 0.0 {
            return bad("max_steps", "set max_steps > 0 or num_train_epochs > 0".into());
        }
        if !(0.0..1.0).contains(&self.warmup_ratio) {
            return bad("warmup_ratio", format!("must be in [0, 1), got {}", self.warmup_ratio));
        }
        if self.weight_decay < 0.0 || self.max_grad_norm < 0.0 {
            return bad("weight_decay", "weight_decay and max_grad_norm must be >= 0".into());
        }
        if !["linear", "constant"].contains(&self.lr_scheduler_type.as_str()) {
            return bad(
                "lr_scheduler_type",
                format!("`{}` is not supported; use linear or constant", self.lr_scheduler_type),
            );
        }
        for (k, v) in [
            ("eval_strategy", &self.eval_strategy),
            ("save_strategy", &self.save_strategy),
        ] {
            if !["no", "steps", "epoch"].contains(&v.as_str()) {
                return bad(k, format!("`{v}`: expected no, steps or epoch"));
            }
        }
        if self.logging_steps == 0 || self.save_steps == 0 || self.eval_steps == Some(0) {
            return bad(
                "logging_steps",
                "logging_steps, eval_steps and save_steps must be at least 1".into(),
            );
        }
        Ok(())
    }
}
