//! `GRPOConfig`: TRL 1.16's names and defaults (`trl/trainer/grpo_config.py`), validated
//! once into a [`GrpoPlan`] with every derived size and the typed settings of the GRPO math
//! (`rlhf_ops::rl`).
//!
//! Deviations from TRL 1.16's defaults and surface:
//! - `bf16 = false` (TRL: `None`, which becomes `True`): training runs in f32 on the CPU;
//!   `bf16 = true` gives bf16 matrix products with f32 weights (`rlhf_ops::precision`).
//! - No gradient checkpointing (no numerical effect in TRL).
//! - `max_completion_length` must be a number (TRL also takes `None`). TRL 1.16 has no
//!   `max_prompt_length`: prompts are not truncated.
//! - Not supported (unknown keys): vLLM and continuous batching, `min_p`,
//!   `repetition_penalty`, `generation_kwargs`, the entropy bonus (`entropy_coef`,
//!   `use_adaptive_entropy`, ...), `top_entropy_quantile`, `off_policy_mask_threshold`,
//!   `sync_ref_model`, tools and environments, `cast_lm_head_to_fp32`.
//! - Reward functions are configured by keys (`reward_funcs`, `reward_model_name_or_path`
//!   as TRL's `grpo.py` script, plus `reward_command` and the rules' parameters; see
//!   [`crate::reward_fns`]) instead of Python objects.

use rlhf_ops::rl::grpo::{GrpoLossConfig, GrpoLossType, ImportanceSamplingLevel};
use rlhf_ops::rl::rewards::{RewardAggregation, ScaleRewards};
use serde::{Deserialize, Serialize};

use crate::config_values::{scale_rewards, setting_of, unknown_name};
use crate::error::{Result, TrainError};
use crate::online_config::{OnlineArgs, OnlinePlan, ReferenceModel};
use crate::peft_args::PeftArgs;
use crate::trainer::TrainingArgs;

/// `GRPOConfig`: TRL 1.16's names and defaults (deviations in the module docs).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct GrpoConfig {
    /// The policy to train (a causal LM directory).
    pub model_name_or_path: String,
    /// Prompts (JSONL, CSV, TSV or Parquet with a `prompt` or `query` column; the other
    /// columns go to the reward functions).
    pub train_file: Option<String>,
    /// Evaluation prompts.
    pub eval_file: Option<String>,
    /// A directory with `train.*` and optionally `validation.*`.
    pub dataset_name: Option<String>,
    /// Weight of the k3 KL term; 0 (default) loads no reference model.
    pub beta: f64,
    /// `dapo` (default), `grpo`, `bnpo`, `dr_grpo`, `luspo`, `cispo`, `sapo` or `vespo`.
    pub loss_type: String,
    /// `token` (default) or `sequence` (GSPO).
    pub importance_sampling_level: String,
    /// `group` (default), `batch` or `none`; `true` / `false` read as `group` / `none`.
    #[serde(deserialize_with = "scale_rewards")]
    pub scale_rewards: String,
    /// `sum_then_normalize` (default) or `normalize_then_sum` (GDPO).
    pub multi_objective_aggregation: String,
    /// Cap of the unclipped ratio (two-sided clipping, INTELLECT-2); off by default.
    pub delta: Option<f64>,
    /// Multiply the k3 KL by the importance ratio.
    pub use_bias_correction_kl: bool,
    /// sapo's temperature for positive advantages.
    pub sapo_temperature_pos: f64,
    /// sapo's temperature for non-positive advantages.
    pub sapo_temperature_neg: f64,
    /// vespo's `k` for non-negative advantages.
    pub vespo_k_pos: f64,
    /// vespo's `λ` for non-negative advantages.
    pub vespo_lambda_pos: f64,
    /// vespo's `k` for negative advantages.
    pub vespo_k_neg: f64,
    /// vespo's `λ` for negative advantages.
    pub vespo_lambda_neg: f64,
    /// Generation, clipping and reward-function keys shared with RLOO.
    #[serde(flatten)]
    pub online: OnlineArgs,
    /// Shared training settings (`per_device_train_batch_size` counts completions).
    #[serde(flatten)]
    pub args: TrainingArgs,
    /// LoRA / quantization (`use_peft`: the reference is the policy with adapters disabled).
    #[serde(flatten)]
    pub peft: PeftArgs,
}

impl Default for GrpoConfig {
    fn default() -> Self {
        Self {
            model_name_or_path: String::new(),
            train_file: None,
            eval_file: None,
            dataset_name: None,
            beta: 0.0,
            loss_type: "dapo".into(),
            importance_sampling_level: "token".into(),
            scale_rewards: "group".into(),
            multi_objective_aggregation: "sum_then_normalize".into(),
            delta: None,
            use_bias_correction_kl: true,
            sapo_temperature_pos: 1.0,
            sapo_temperature_neg: 1.05,
            vespo_k_pos: 2.0,
            vespo_lambda_pos: 3.0,
            vespo_k_neg: 3.0,
            vespo_lambda_neg: 2.0,
            online: OnlineArgs::default(),
            args: TrainingArgs {
                output_dir: "runs/grpo".into(),
                learning_rate: 1e-6,
                logging_steps: 10,
                disable_dropout: false,
                ..TrainingArgs::default()
            },
            peft: PeftArgs::default(),
        }
    }
}

/// A validated GRPO run: sizes, the loss settings, the advantage settings, the reference.
#[derive(Clone, Debug, PartialEq)]
pub struct GrpoPlan {
    /// Sizes, sampling, clipping and rewards.
    pub online: OnlinePlan,
    /// The loss settings (`rlhf_ops::rl::grpo::grpo_loss`), with the run's accumulation
    /// layout.
    pub loss: GrpoLossConfig,
    /// `scale_rewards`.
    pub scale_rewards: ScaleRewards,
    /// `multi_objective_aggregation`.
    pub aggregation: RewardAggregation,
    /// Where the reference log-probs come from (none when `beta = 0`).
    pub reference: ReferenceModel,
}

impl GrpoConfig {
    /// Validates the config into the plan of a run on `num_processes` processes.
    pub fn plan(&self, num_processes: usize) -> Result<GrpoPlan> {
        let mut online = self.online.plan(&self.args, num_processes, "GRPO")?;
        let loss_type = GrpoLossType::from_trl_name(&self.loss_type).ok_or_else(|| {
            unknown_name(
                "loss_type",
                &self.loss_type,
                &["dapo", "grpo", "bnpo", "dr_grpo", "luspo", "cispo", "sapo", "vespo"],
            )
        })?;
        let level = ImportanceSamplingLevel::from_trl_name(&self.importance_sampling_level).ok_or_else(|| {
            unknown_name(
                "importance_sampling_level",
                &self.importance_sampling_level,
                &["token", "sequence"],
            )
        })?;
        let scale = ScaleRewards::from_trl_name(&self.scale_rewards)
            .ok_or_else(|| unknown_name("scale_rewards", &self.scale_rewards, &["group", "batch", "none"]))?;
        let aggregation = RewardAggregation::from_trl_name(&self.multi_objective_aggregation).ok_or_else(|| {
            unknown_name(
                "multi_objective_aggregation",
                &self.multi_objective_aggregation,
                &["sum_then_normalize", "normalize_then_sum"],
            )
        })?;
        if !(self.beta.is_finite() && self.beta >= 0.0) {
            return Err(TrainError::setting(
                "beta",
                format!("must be a number >= 0, got {} (0 turns the KL term off)", self.beta),
            ));
        }
        let loss = GrpoLossConfig {
            loss_type,
            beta: self.beta,
            epsilon_low: online.epsilon_low,
            epsilon_high: online.epsilon_high,
            delta: self.delta,
            importance_sampling_level: level,
            use_bias_correction_kl: self.use_bias_correction_kl,
            max_completion_length: online.max_completion_length,
            sapo_temperature_pos: self.sapo_temperature_pos,
            sapo_temperature_neg: self.sapo_temperature_neg,
            vespo_k_pos: self.vespo_k_pos,
            vespo_lambda_pos: self.vespo_lambda_pos,
            vespo_k_neg: self.vespo_k_neg,
            vespo_lambda_neg: self.vespo_lambda_neg,
            gradient_accumulation_steps: online.gradient_accumulation_steps,
            steps_per_generation: online.steps_per_generation,
            num_processes: online.num_processes,
        };
        loss.validate().map_err(setting_of)?;
        online.warnings.extend(self.warnings(loss_type, level));
        Ok(GrpoPlan {
            online,
            loss,
            scale_rewards: scale,
            aggregation,
            reference: ReferenceModel::resolve(self.beta != 0.0, None, self.peft.use_peft),
        })
    }

    /// The combinations TRL 1.16 warns about (`GRPOTrainer.__init__`), and cispo's
    /// default cap.
    fn warnings(&self, loss_type: GrpoLossType, level: ImportanceSamplingLevel) -> Vec<String> {
        let mut w = Vec::new();
        if loss_type == GrpoLossType::Luspo && level != ImportanceSamplingLevel::Sequence {
            w.push(
                "loss_type = \"luspo\": set importance_sampling_level = \"sequence\" to mirror the paper's setup"
                    .into(),
            );
        }
        if loss_type == GrpoLossType::Vespo && level != ImportanceSamplingLevel::Token {
            w.push(
                "loss_type = \"vespo\" computes sequence-level weights itself; importance_sampling_level should be \
                 \"token\""
                    .into(),
            );
        }
        if level == ImportanceSamplingLevel::Sequence
            && matches!(
                loss_type,
                GrpoLossType::Bnpo | GrpoLossType::DrGrpo | GrpoLossType::Dapo | GrpoLossType::Cispo
            )
        {
            w.push(format!(
                "importance_sampling_level = \"sequence\" with loss_type = \"{}\" weights each sequence by its length; \
                 the GSPO paper's setup is loss_type = \"grpo\"",
                self.loss_type
            ));
        }
        if loss_type == GrpoLossType::Cispo && self.online.epsilon_high.is_none() {
            w.push(
                "loss_type = \"cispo\" caps the ratio at epsilon_high, which defaults to epsilon (0.2) and scales the \
                 loss down; TRL recommends epsilon_high = 5.0"
                    .into(),
            );
        }
        w
    }
}

#[cfg(test)]
mod tests {
    use serde_json::Value;

    use super::*;
    use crate::config::{parse_flags, read_toml, resolve, to_toml};

    /// The defaults with one reward function (a run needs one).
    fn cfg() -> GrpoConfig {
        let mut c = GrpoConfig::default();
        c.online.rewards.reward_funcs = vec!["distinct_words".into()];
        c
    }

    fn err(c: &GrpoConfig) -> String {
        c.plan(1).unwrap_err().to_string()
    }

    #[test]
    fn defaults_equal_trl_1_16_grpo_config() {
        // fixtures/algorithms/README.md "TRL 1.16 defaults that matter", GRPOConfig column.
        let c = GrpoConfig::default();
        assert_eq!(
            (c.args.learning_rate, c.beta, c.args.disable_dropout),
            (1e-6, 0.0, false)
        );
        assert_eq!((c.online.num_generations, c.online.max_completion_length), (8, 512));
        assert_eq!((c.online.temperature, c.online.top_p, c.online.top_k), (1.0, 1.0, 0));
        assert_eq!(
            (c.online.num_iterations, c.online.epsilon, c.online.epsilon_high),
            (1, 0.2, None)
        );
        assert_eq!(
            (c.delta, c.loss_type.as_str(), c.importance_sampling_level.as_str()),
            (None, "dapo", "token")
        );
        assert_eq!(
            (c.scale_rewards.as_str(), c.multi_objective_aggregation.as_str()),
            ("group", "sum_then_normalize")
        );
        assert_eq!(
            (c.online.reward_weights.clone(), c.online.mask_truncated_completions),
            (None, false)
        );
        assert!(c.use_bias_correction_kl && c.online.shuffle_dataset);
        assert_eq!((c.sapo_temperature_pos, c.sapo_temperature_neg), (1.0, 1.05));
        assert_eq!(
            (c.vespo_k_pos, c.vespo_lambda_pos, c.vespo_k_neg, c.vespo_lambda_neg),
            (2.0, 3.0, 3.0, 2.0)
        );
        assert_eq!(
            (c.online.generation_batch_size, c.online.steps_per_generation),
            (None, None)
        );
        // TrainingArguments as TRL's base config sets them; bf16 is the documented deviation.
        let a = &c.args;
        assert_eq!(
            (a.per_device_train_batch_size, a.gradient_accumulation_steps, a.seed),
            (8, 1, 42)
        );
        assert_eq!(
            (a.lr_scheduler_type.as_str(), a.max_grad_norm, a.logging_steps),
            ("linear", 1.0, 10)
        );
        assert_eq!((a.num_train_epochs, a.weight_decay, a.bf16), (3.0, 0.0, false));
    }

    #[test]
    fn the_default_plan_is_one_prompt_with_eight_completions_and_the_maths_default_loss() {
        let p = cfg().plan(1).unwrap();
        assert_eq!((p.online.generation_batch_size, p.online.steps_per_generation), (8, 1));
        assert_eq!(
            (p.online.prompts_per_generation, p.online.micro_steps_per_generation),
            (1, 1)
        );
        assert_eq!(p.loss, GrpoLossConfig::default());
        assert_eq!(
            (p.scale_rewards, p.aggregation),
            (ScaleRewards::Group, RewardAggregation::SumThenNormalize)
        );
        assert_eq!(p.reference, ReferenceModel::None);
        assert_eq!(
            (p.online.reward_names.clone(), p.online.reward_weights.clone()),
            (vec!["distinct_words".to_string()], vec![1.0])
        );
        assert!(p.online.warnings.is_empty());
    }

    #[test]
    fn the_loss_settings_carry_the_accumulation_layout_and_the_named_options() {
        let mut c = cfg();
        c.args.gradient_accumulation_steps = 2;
        c.online.steps_per_generation = Some(4);
        c.loss_type = "dr_grpo".into();
        c.importance_sampling_level = "sequence".into();
        c.beta = 0.04;
        c.delta = Some(1.5);
        c.online.epsilon_high = Some(0.28);
        c.online.max_completion_length = 64;
        let p = c.plan(2).unwrap();
        let l = p.loss;
        assert_eq!(
            (l.loss_type, l.importance_sampling_level),
            (GrpoLossType::DrGrpo, ImportanceSamplingLevel::Sequence)
        );
        assert_eq!(
            (l.beta, l.delta, l.epsilon_low, l.epsilon_high),
            (0.04, Some(1.5), 0.2, 0.28)
        );
        assert_eq!(
            (l.gradient_accumulation_steps, l.steps_per_generation, l.num_processes),
            (2, 4, 2)
        );
        assert_eq!(l.max_completion_length, 64);
        assert_eq!(p.reference, ReferenceModel::InitialPolicy);
        assert_eq!(p.online.warnings.len(), 1, "{:?}", p.online.warnings);
        c.peft.use_peft = true;
        assert_eq!(c.plan(1).unwrap().reference, ReferenceModel::AdaptersDisabled);
    }

    #[test]
    fn trl_warnings_are_collected_in_the_plan() {
        for (loss, level, want) in [
            ("luspo", "token", "mirror the paper"),
            ("vespo", "sequence", "should be \"token\""),
            ("dapo", "sequence", "GSPO paper"),
            ("cispo", "token", "epsilon_high = 5.0"),
        ] {
            let mut c = cfg();
            c.loss_type = loss.into();
            c.importance_sampling_level = level.into();
            let w = c.plan(1).unwrap().online.warnings;
            assert!(w.iter().any(|m| m.contains(want)), "{loss}/{level}: {w:?}");
        }
    }

    #[test]
    fn every_bad_grpo_setting_is_an_error_naming_its_key() {
        type Edit = fn(&mut GrpoConfig);
        let cases: Vec<(Edit, &str)> = vec![
            (
                |c| c.loss_type = "dpo".into(),
                "config key `loss_type`: `dpo` is not one of dapo, grpo",
            ),
            (|c| c.loss_type = "drgrpo".into(), "did you mean `dr_grpo`?"),
            (
                |c| c.importance_sampling_level = "seq".into(),
                "`importance_sampling_level`: `seq`",
            ),
            (|c| c.scale_rewards = "groups".into(), "did you mean `group`?"),
            (
                |c| c.multi_objective_aggregation = "sum".into(),
                "`multi_objective_aggregation`",
            ),
            (|c| c.beta = -0.1, "`beta`: must be a number >= 0"),
            (|c| c.delta = Some(0.0), "`delta`"),
            (|c| c.sapo_temperature_neg = 0.0, "`sapo_temperature_neg`"),
            (|c| c.args.learning_rate = -1.0, "`learning_rate`"),
            (|c| c.online.num_generations = 1, "GRPO needs at least 2 generations"),
        ];
        for (edit, want) in cases {
            let mut c = cfg();
            edit(&mut c);
            let e = err(&c);
            assert!(e.contains(want), "{want}: {e}");
        }
    }

    #[test]
    fn a_grpo_config_reads_from_toml_and_flags_and_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("grpo.toml");
        std::fs::write(
            &path,
            "model_name_or_path = \"m\"\ntrain_file = \"p.jsonl\"\nscale_rewards = false\nreward_funcs = [\"distinct_words\", \"think_format_reward\"]\n\
             reward_weights = [1.0, 0.5]\nnum_generations = 4\nper_device_train_batch_size = 8\nepsilon_high = 0.28\nuse_peft = true\n",
        )
        .unwrap();
        let mut values = read_toml(&path).unwrap();
        let flags: Vec<String> =
            "--beta 0.04 --loss-type grpo --scale-rewards batch --max-steps 5 --reward-weights 2,1"
                .split_whitespace()
                .map(String::from)
                .collect();
        values.extend(parse_flags(&flags).unwrap());
        let c: GrpoConfig = resolve(&values, "grpo.toml").unwrap();
        assert_eq!(
            (c.beta, c.loss_type.as_str(), c.scale_rewards.as_str()),
            (0.04, "grpo", "batch")
        );
        assert_eq!(
            (c.online.num_generations, c.online.epsilon_high, c.args.max_steps),
            (4, Some(0.28), 5)
        );
        assert_eq!(c.online.reward_weights, Some(vec![2.0, 1.0]));
        assert!(c.peft.use_peft);
        let p = c.plan(1).unwrap();
        assert_eq!(
            (p.online.prompts_per_generation, p.scale_rewards),
            (2, ScaleRewards::Batch)
        );
        // The resolved config written to a run's config.toml reads back the same.
        std::fs::write(&path, to_toml(&c).unwrap()).unwrap();
        let again: GrpoConfig = resolve(&read_toml(&path).unwrap(), "config.toml").unwrap();
        assert_eq!(again, c);
        // `scale_rewards = false` in TOML is TRL's "none".
        let m: serde_json::Map<String, Value> = [("scale_rewards".to_string(), Value::Bool(false))]
            .into_iter()
            .collect();
        assert_eq!(resolve::<GrpoConfig>(&m, "x").unwrap().scale_rewards, "none");
        let m = parse_flags(&["--num-generation".into(), "4".into()]).unwrap();
        let e = resolve::<GrpoConfig>(&m, "flags").unwrap_err().to_string();
        assert!(e.contains("did you mean `num_generations`"), "{e}");
    }
}
