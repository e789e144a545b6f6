//! `DPOConfig`: TRL 1.16's names and defaults (`trl/trainer/dpo_config.py`), validated once
//! into a [`DpoPlan`] with the typed settings of the DPO math (`rlhf_ops::rl::dpo`,
//! `rlhf_ops::rl::dpo_data`).
//!
//! Data: preference rows `prompt`, `chosen`, `rejected` (TRL's "explicit prompt"
//! preference type). `per_device_train_batch_size` counts pairs; a micro-batch runs `2N`
//! rows (chosen, then rejected), right-padded.
//!
//! Deviations from TRL 1.16's defaults and surface:
//! - `bf16 = false` (TRL: `None` → `True`); no gradient checkpointing.
//! - `ref_model_name_or_path` names the reference model TRL takes as the trainer's
//!   `ref_model` argument (default: a frozen copy of the initial policy, or the policy with
//!   adapters disabled under `use_peft`, as TRL).
//! - `f_divergence_type` must be `reverse_kl` (TRL's default); `use_weighting`, `ld_alpha`,
//!   `padding_free`, `sync_ref_model`, `activation_offloading` are not supported
//!   (unknown keys).

use rlhf_ops::rl::dpo::{DpoLossConfig, DpoLossType};
use rlhf_ops::rl::dpo_data::TruncationMode;
use serde::{Deserialize, Serialize};

use crate::collate::PadSide;
use crate::config_values::{names, opt_multiple, opt_numbers, setting_of, unknown_name};
use crate::error::{Result, TrainError};
use crate::online_config::ReferenceModel;
use crate::peft_args::PeftArgs;
use crate::trainer::TrainingArgs;

/// The `loss_type` names of TRL 1.16's DPO.
pub const DPO_LOSS_TYPES: [&str; 15] = [
    "sigmoid",
    "hinge",
    "ipo",
    "exo_pair",
    "nca_pair",
    "robust",
    "bco_pair",
    "sppo_hard",
    "aot",
    "aot_unpaired",
    "apo_zero",
    "apo_down",
    "discopop",
    "sft",
    "sigmoid_norm",
];

/// `DPOConfig`: TRL 1.16's names and defaults (deviations in the module docs).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct DpoConfig {
    /// The policy to train (a causal LM directory).
    pub model_name_or_path: String,
    /// The reference model (default: see [`ReferenceModel::resolve`]).
    pub ref_model_name_or_path: Option<String>,
    /// Preference data (JSONL, CSV, TSV or Parquet with `prompt`, `chosen`, `rejected`).
    pub train_file: Option<String>,
    /// Evaluation data.
    pub eval_file: Option<String>,
    /// A directory with `train.*` and optionally `validation.*`.
    pub dataset_name: Option<String>,
    /// Temperature of the implicit reward (for ipo, the regulariser τ).
    pub beta: f64,
    /// One loss or several summed with `loss_weights` (a list, or names separated by commas).
    #[serde(deserialize_with = "names")]
    pub loss_type: Vec<String>,
    /// One weight per `loss_type` entry (default: 1.0 each).
    #[serde(deserialize_with = "opt_numbers")]
    pub loss_weights: Option<Vec<f64>>,
    /// Assumed label-noise rate (robust, exo_pair, aot, aot_unpaired only).
    pub label_smoothing: f64,
    /// DiscoPOP's τ.
    pub discopop_tau: f64,
    /// Only `reverse_kl` (the default) is implemented.
    pub f_divergence_type: String,
    /// Tokens per row (prompt + completion) after truncation; none: no limit.
    pub max_length: Option<usize>,
    /// `keep_start` (default) or `keep_end` (deprecated in TRL).
    pub truncation_mode: String,
    /// Pad each batch's length to a multiple of this (TRL's `"auto"`: none off Neuron).
    #[serde(deserialize_with = "opt_multiple")]
    pub pad_to_multiple_of: Option<usize>,
    /// Compute the reference log-probs once before training instead of at every step.
    pub precompute_ref_log_probs: bool,
    /// Pairs per forward pass of that precomputation (default: `per_device_eval_batch_size`).
    pub precompute_ref_batch_size: Option<usize>,
    /// Shared training settings (`per_device_train_batch_size` counts pairs).
    #[serde(flatten)]
    pub args: TrainingArgs,
    /// LoRA / quantization (`use_peft`: the reference is the policy with adapters disabled).
    #[serde(flatten)]
    pub peft: PeftArgs,
}

impl Default for DpoConfig {
    fn default() -> Self {
        Self {
            model_name_or_path: String::new(),
            ref_model_name_or_path: None,
            train_file: None,
            eval_file: None,
            dataset_name: None,
            beta: 0.1,
            loss_type: vec!["sigmoid".into()],
            loss_weights: None,
            label_smoothing: 0.0,
            discopop_tau: 0.05,
            f_divergence_type: "reverse_kl".into(),
            max_length: Some(1024),
            truncation_mode: "keep_start".into(),
            pad_to_multiple_of: None,
            precompute_ref_log_probs: false,
            precompute_ref_batch_size: None,
            args: TrainingArgs {
                output_dir: "runs/dpo".into(),
                learning_rate: 1e-6,
                logging_steps: 10,
                disable_dropout: true,
                ..TrainingArgs::default()
            },
            peft: PeftArgs::default(),
        }
    }
}

/// A validated DPO run.
#[derive(Clone, Debug, PartialEq)]
pub struct DpoPlan {
    /// The loss settings (`rlhf_ops::rl::dpo::dpo_loss`).
    pub loss: DpoLossConfig,
    /// The `(loss type, weight)` pairs, validated.
    pub weighted_losses: Vec<(DpoLossType, f64)>,
    /// Row length limit of the collator.
    pub max_length: Option<usize>,
    /// How rows longer than `max_length` are cut.
    pub truncation_mode: TruncationMode,
    /// Batch length multiple.
    pub pad_to_multiple_of: Option<usize>,
    /// Rows are padded on the right (TRL's `DataCollatorForPreference`).
    pub padding_side: PadSide,
    /// Where the reference log-probs come from. With `precompute_ref_log_probs` and
    /// [`ReferenceModel::InitialPolicy`], TRL computes them with the policy itself before
    /// the first step (no copy is kept).
    pub reference: ReferenceModel,
    /// Reference log-probs computed once, before training.
    pub precompute_ref_log_probs: bool,
    /// Pairs per forward pass of the precomputation.
    pub precompute_ref_batch_size: usize,
    /// Pairs per micro-batch (per process).
    pub pairs_per_micro_batch: usize,
    /// Pairs per optimizer step over all processes (`bs × GA × P`).
    pub pairs_per_optimizer_step: usize,
    /// Settings TRL accepts with a warning; the trainer logs them once.
    pub warnings: Vec<String>,
}

impl DpoConfig {
    /// Validates the config into the plan of a run on `num_processes` processes.
    pub fn plan(&self, num_processes: usize) -> Result<DpoPlan> {
        self.args.validate()?;
        let bad = |k: &str, msg: String| Err(TrainError::setting(k, msg));
        if num_processes == 0 {
            return Err(TrainError::Config("the run has no process (num_processes = 0)".into()));
        }
        if !(self.beta.is_finite() && self.beta >= 0.0) {
            return bad("beta", format!("must be a number >= 0, got {}", self.beta));
        }
        if !(self.label_smoothing.is_finite() && (0.0..1.0).contains(&self.label_smoothing)) {
            return bad(
                "label_smoothing",
                format!("must be in [0, 1), got {}", self.label_smoothing),
            );
        }
        let loss_types = self
            .loss_type
            .iter()
            .map(|t| DpoLossType::from_trl_name(t).ok_or_else(|| unknown_name("loss_type", t, &DPO_LOSS_TYPES)))
            .collect::<Result<Vec<_>>>()?;
        let loss = DpoLossConfig {
            loss_types,
            loss_weights: self.loss_weights.clone(),
            beta: self.beta,
            label_smoothing: self.label_smoothing,
            discopop_tau: self.discopop_tau,
        };
        let weighted_losses = loss.weighted_types().map_err(setting_of)?;
        if weighted_losses.iter().any(|(_, w)| !w.is_finite()) {
            return bad(
                "loss_weights",
                format!("{:?}: every weight must be a finite number", self.loss_weights),
            );
        }
        match self.f_divergence_type.as_str() {
            "reverse_kl" => {}
            "forward_kl" | "js_divergence" | "alpha_divergence" => {
                return bad(
                    "f_divergence_type",
                    format!(
                        "`{}` is not implemented; only reverse_kl (TRL's default) is",
                        self.f_divergence_type
                    ),
                )
            }
            other => {
                return Err(unknown_name(
                    "f_divergence_type",
                    other,
                    &["reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"],
                ))
            }
        }
        let truncation_mode = TruncationMode::from_trl_name(&self.truncation_mode)
            .ok_or_else(|| unknown_name("truncation_mode", &self.truncation_mode, &["keep_start", "keep_end"]))?;
        for (k, v) in [
            ("max_length", self.max_length),
            ("pad_to_multiple_of", self.pad_to_multiple_of),
            ("precompute_ref_batch_size", self.precompute_ref_batch_size),
        ] {
            if v == Some(0) {
                return bad(k, "must be at least 1 (or unset)".into());
            }
        }
        let mut warnings = Vec::new();
        if truncation_mode == TruncationMode::KeepEnd {
            warnings.push(
                "truncation_mode = \"keep_end\" is deprecated in TRL 1.16 and may cut a row's whole prompt".into(),
            );
        }
        let reads_smoothing = |t: &DpoLossType| {
            matches!(
                t,
                DpoLossType::Robust | DpoLossType::ExoPair | DpoLossType::Aot | DpoLossType::AotUnpaired
            )
        };
        if self.label_smoothing > 0.0 && !weighted_losses.iter().any(|(t, _)| reads_smoothing(t)) {
            warnings.push(format!(
                "label_smoothing = {} has no effect on loss_type {:?} (only robust, exo_pair, aot and aot_unpaired \
                 read it)",
                self.label_smoothing, self.loss_type
            ));
        }
        let bs = self.args.per_device_train_batch_size;
        Ok(DpoPlan {
            loss,
            weighted_losses,
            max_length: self.max_length,
            truncation_mode,
            pad_to_multiple_of: self.pad_to_multiple_of,
            padding_side: PadSide::Right,
            reference: ReferenceModel::resolve(true, self.ref_model_name_or_path.as_deref(), self.peft.use_peft),
            precompute_ref_log_probs: self.precompute_ref_log_probs,
            precompute_ref_batch_size: self
                .precompute_ref_batch_size
                .unwrap_or(self.args.per_device_eval_batch_size),
            pairs_per_micro_batch: bs,
            pairs_per_optimizer_step: bs * self.args.gradient_accumulation_steps * num_processes,
            warnings,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{parse_flags, read_toml, resolve, to_toml};

    #[test]
    fn defaults_equal_trl_1_16_dpo_config() {
        // fixtures/algorithms/README.md "TRL 1.16 defaults that matter", DPOConfig column.
        let c = DpoConfig::default();
        assert_eq!(
            (c.args.learning_rate, c.beta, c.args.disable_dropout),
            (1e-6, 0.1, true)
        );
        assert_eq!(
            (c.loss_type.clone(), c.loss_weights.clone()),
            (vec!["sigmoid".to_string()], None)
        );
        assert_eq!(
            (c.label_smoothing, c.discopop_tau, c.f_divergence_type.as_str()),
            (0.0, 0.05, "reverse_kl")
        );
        assert_eq!((c.max_length, c.truncation_mode.as_str()), (Some(1024), "keep_start"));
        assert_eq!((c.precompute_ref_log_probs, c.pad_to_multiple_of), (false, None));
        assert_eq!(
            (c.args.per_device_train_batch_size, c.args.logging_steps, c.args.bf16),
            (8, 10, false)
        );
    }

    #[test]
    fn the_default_plan_is_the_maths_default_with_a_frozen_copy_as_reference() {
        let p = DpoConfig::default().plan(1).unwrap();
        assert_eq!(p.loss, DpoLossConfig::default());
        assert_eq!(p.weighted_losses, [(DpoLossType::Sigmoid, 1.0)]);
        assert_eq!(
            (p.truncation_mode, p.padding_side),
            (TruncationMode::KeepStart, PadSide::Right)
        );
        assert_eq!(p.reference, ReferenceModel::InitialPolicy);
        assert_eq!(
            (
                p.precompute_ref_batch_size,
                p.pairs_per_micro_batch,
                p.pairs_per_optimizer_step
            ),
            (8, 8, 8)
        );
        assert!(p.warnings.is_empty());
    }

    #[test]
    fn loss_type_is_a_list_or_a_string_from_toml_and_flags() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dpo.toml");
        std::fs::write(
            &path,
            "loss_type = [\"sigmoid\", \"sft\"]\nloss_weights = [1, 0.5]\npad_to_multiple_of = \"auto\"\n",
        )
        .unwrap();
        let c: DpoConfig = resolve(&read_toml(&path).unwrap(), "dpo.toml").unwrap();
        let p = c.plan(2).unwrap();
        assert_eq!(
            p.weighted_losses,
            [(DpoLossType::Sigmoid, 1.0), (DpoLossType::Sft, 0.5)]
        );
        assert_eq!(p.pairs_per_optimizer_step, 16);
        let flags: Vec<String> = "--loss-type ipo --beta 0.5 --truncation-mode keep_end --max-length 32 \
                                  --ref-model-name-or-path runs/sft/final --precompute-ref-log-probs --pad-to-multiple-of 8"
            .split_whitespace()
            .map(String::from)
            .collect();
        let c: DpoConfig = resolve(&parse_flags(&flags).unwrap(), "flags").unwrap();
        let p = c.plan(1).unwrap();
        assert_eq!(
            (p.weighted_losses.clone(), p.loss.beta),
            (vec![(DpoLossType::Ipo, 1.0)], 0.5)
        );
        assert_eq!(
            (p.truncation_mode, p.max_length, p.pad_to_multiple_of),
            (TruncationMode::KeepEnd, Some(32), Some(8))
        );
        assert_eq!(p.reference, ReferenceModel::Model("runs/sft/final".into()));
        assert!(p.precompute_ref_log_probs && p.warnings[0].contains("keep_end"));
        let m = parse_flags(&["--loss-type".into(), "sigmoid,sft".into()]).unwrap();
        assert_eq!(resolve::<DpoConfig>(&m, "flags").unwrap().loss_type, ["sigmoid", "sft"]);
        std::fs::write(&path, to_toml(&c).unwrap()).unwrap();
        assert_eq!(
            resolve::<DpoConfig>(&read_toml(&path).unwrap(), "config.toml").unwrap(),
            c
        );
    }

    #[test]
    fn every_bad_dpo_setting_is_an_error_naming_its_key() {
        type Edit = fn(&mut DpoConfig);
        let cases: Vec<(Edit, &str)> = vec![
            (
                |c| c.loss_type = vec!["sigmod".into()],
                "`loss_type`: `sigmod` is not one of sigmoid, hinge",
            ),
            (|c| c.loss_type = vec!["sigmod".into()], "did you mean `sigmoid`?"),
            (|c| c.loss_type = vec![], "`loss_type`"),
            (
                |c| c.loss_weights = Some(vec![1.0, 2.0]),
                "has 2 weights for 1 loss types",
            ),
            (|c| c.loss_weights = Some(vec![f64::NAN]), "finite"),
            (|c| c.beta = -1.0, "`beta`: must be a number >= 0"),
            (
                |c| {
                    c.loss_type = vec!["ipo".into()];
                    c.beta = 0.0
                },
                "ipo and sppo_hard divide by it",
            ),
            (|c| c.label_smoothing = 1.0, "`label_smoothing`: must be in [0, 1)"),
            (
                |c| {
                    c.loss_type = vec!["exo_pair".into()];
                },
                "exo_pair needs 0 < ls < 1",
            ),
            (
                |c| {
                    c.loss_type = vec!["robust".into()];
                    c.label_smoothing = 0.5
                },
                "robust needs 0 <= ls < 0.5",
            ),
            (|c| c.f_divergence_type = "js_divergence".into(), "not implemented"),
            (
                |c| c.f_divergence_type = "kl".into(),
                "`f_divergence_type`: `kl` is not one of",
            ),
            (|c| c.truncation_mode = "keep_middle".into(), "`truncation_mode`"),
            (|c| c.max_length = Some(0), "`max_length`: must be at least 1"),
            (|c| c.pad_to_multiple_of = Some(0), "`pad_to_multiple_of`"),
            (|c| c.precompute_ref_batch_size = Some(0), "`precompute_ref_batch_size`"),
            (
                |c| c.args.gradient_accumulation_steps = 0,
                "`gradient_accumulation_steps`",
            ),
        ];
        for (edit, want) in cases {
            let mut c = DpoConfig::default();
            edit(&mut c);
            let e = c.plan(1).unwrap_err().to_string();
            assert!(e.contains(want), "{want}: {e}");
        }
    }

    #[test]
    fn label_smoothing_without_a_loss_that_reads_it_is_a_warning() {
        let c = DpoConfig {
            label_smoothing: 0.1,
            ..DpoConfig::default()
        };
        let w = c.plan(1).unwrap().warnings;
        assert!(w[0].contains("no effect"), "{w:?}");
        let c = DpoConfig {
            label_smoothing: 0.1,
            loss_type: vec!["robust".into()],
            ..DpoConfig::default()
        };
        assert!(c.plan(1).unwrap().warnings.is_empty());
        let c = DpoConfig {
            peft: PeftArgs {
                use_peft: true,
                ..PeftArgs::default()
            },
            ..DpoConfig::default()
        };
        assert_eq!(c.plan(1).unwrap().reference, ReferenceModel::AdaptersDisabled);
    }
}
