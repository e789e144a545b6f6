//! `RLOOConfig`: TRL 1.16's names and defaults (`trl/trainer/rloo_config.py`), validated
//! once into an [`RlooPlan`] with every derived size and the typed settings of the RLOO
//! math (`rlhf_ops::rl::rloo`).
//!
//! RLOO shares GRPO's generation, clipping and reward keys ([`OnlineArgs`], with
//! `num_generations = 2`) and the batch plan; its own keys are `beta` (0.05, the k1 KL
//! folded into the reward), `normalize_advantages` and `reward_clip_range`. It has no
//! `loss_type`: the loss is the sequence-level clipped objective.
//!
//! Deviations: as GRPO's ([`crate::grpo_config`]): `bf16 = false`, no gradient
//! checkpointing, no vLLM, `min_p`, `repetition_penalty` or `sync_ref_model`.

use rlhf_ops::rl::rloo::{RlooAdvantageConfig, RlooLossConfig};
use serde::{Deserialize, Serialize};

use crate::config_values::opt_range;
use crate::error::{Result, TrainError};
use crate::online_config::{OnlineArgs, OnlinePlan, ReferenceModel};
use crate::peft_args::PeftArgs;
use crate::trainer::TrainingArgs;

/// `RLOOConfig`: TRL 1.16's names and defaults (deviations in the module docs).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct RlooConfig {
    /// The policy to train (a causal LM directory).
    pub model_name_or_path: String,
    /// Prompts (JSONL, CSV, TSV or Parquet with a `prompt` or `query` column; the other
    /// columns go to the reward functions).
    pub train_file: Option<String>,
    /// Evaluation prompts.
    pub eval_file: Option<String>,
    /// A directory with `train.*` and optionally `validation.*`.
    pub dataset_name: Option<String>,
    /// Weight of the per-sequence k1 KL subtracted from the reward; 0 loads no reference.
    pub beta: f64,
    /// Whiten the advantages over the batch.
    pub normalize_advantages: bool,
    /// Clamp of the aggregated reward, `[min, max]` (or `"min,max"`); off by default.
    #[serde(deserialize_with = "opt_range")]
    pub reward_clip_range: Option<(f64, f64)>,
    /// Generation, clipping and reward-function keys shared with GRPO.
    #[serde(flatten)]
    pub online: OnlineArgs,
    /// Shared training settings (`per_device_train_batch_size` counts completions).
    #[serde(flatten)]
    pub args: TrainingArgs,
    /// LoRA / quantization (`use_peft`: the reference is the policy with adapters disabled).
    #[serde(flatten)]
    pub peft: PeftArgs,
}

impl Default for RlooConfig {
    fn default() -> Self {
        Self {
            model_name_or_path: String::new(),
            train_file: None,
            eval_file: None,
            dataset_name: None,
            beta: 0.05,
            normalize_advantages: false,
            reward_clip_range: None,
            online: OnlineArgs {
                num_generations: 2,
                ..OnlineArgs::default()
            },
            args: TrainingArgs {
                output_dir: "runs/rloo".into(),
                learning_rate: 1e-6,
                logging_steps: 10,
                disable_dropout: false,
                ..TrainingArgs::default()
            },
            peft: PeftArgs::default(),
        }
    }
}

/// A validated RLOO run.
#[derive(Clone, Debug, PartialEq)]
pub struct RlooPlan {
    /// Sizes, sampling, clipping and rewards.
    pub online: OnlinePlan,
    /// The advantage settings (`rlhf_ops::rl::rloo::rloo_advantages`).
    pub advantages: RlooAdvantageConfig,
    /// The loss settings (`rlhf_ops::rl::rloo::rloo_loss`; divide the loss by
    /// `gradient_accumulation_steps` before `backward`).
    pub loss: RlooLossConfig,
    /// Where the reference log-probs come from (none when `beta = 0`).
    pub reference: ReferenceModel,
}

impl RlooConfig {
    /// Validates the config into the plan of a run on `num_processes` processes.
    pub fn plan(&self, num_processes: usize) -> Result<RlooPlan> {
        let online = self.online.plan(&self.args, num_processes, "RLOO")?;
        if !(self.beta.is_finite() && self.beta >= 0.0) {
            return Err(TrainError::setting(
                "beta",
                format!("must be a number >= 0, got {} (0 turns the KL penalty off)", self.beta),
            ));
        }
        if let Some((lo, hi)) = self.reward_clip_range {
            if !(lo.is_finite() && hi.is_finite() && lo <= hi) {
                return Err(TrainError::setting(
                    "reward_clip_range",
                    format!("[{lo}, {hi}] is not an interval; give [min, max] with min <= max"),
                ));
            }
        }
        Ok(RlooPlan {
            advantages: RlooAdvantageConfig {
                num_generations: online.num_generations,
                beta: self.beta,
                reward_clip_range: self.reward_clip_range,
                normalize_advantages: self.normalize_advantages,
            },
            loss: RlooLossConfig {
                epsilon_low: online.epsilon_low,
                epsilon_high: online.epsilon_high,
            },
            reference: ReferenceModel::resolve(self.beta != 0.0, None, self.peft.use_peft),
            online,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{parse_flags, resolve};

    fn cfg() -> RlooConfig {
        let mut c = RlooConfig::default();
        c.online.rewards.reward_funcs = vec!["distinct_words".into()];
        c
    }

    #[test]
    fn defaults_equal_trl_1_16_rloo_config() {
        // fixtures/algorithms/README.md "TRL 1.16 defaults that matter", RLOOConfig column.
        let c = RlooConfig::default();
        assert_eq!(
            (c.args.learning_rate, c.beta, c.args.disable_dropout),
            (1e-6, 0.05, false)
        );
        assert_eq!((c.online.num_generations, c.online.max_completion_length), (2, 512));
        assert_eq!(
            (c.online.num_iterations, c.online.epsilon, c.online.epsilon_high),
            (1, 0.2, None)
        );
        assert_eq!((c.normalize_advantages, c.reward_clip_range), (false, None));
        assert_eq!((c.online.temperature, c.online.top_p, c.online.top_k), (1.0, 1.0, 0));
        assert!(!c.online.mask_truncated_completions && c.online.shuffle_dataset);
        assert_eq!(
            (c.args.per_device_train_batch_size, c.args.logging_steps, c.args.bf16),
            (8, 10, false)
        );
    }

    #[test]
    fn the_default_plan_is_four_prompts_of_two_and_the_maths_defaults() {
        let p = cfg().plan(1).unwrap();
        assert_eq!(
            (p.online.generation_batch_size, p.online.prompts_per_generation),
            (8, 4)
        );
        assert_eq!(p.advantages, RlooAdvantageConfig::default());
        assert_eq!(p.loss, RlooLossConfig::default());
        assert_eq!(p.reference, ReferenceModel::InitialPolicy);
        let mut c = cfg();
        c.beta = 0.0;
        assert_eq!(c.plan(1).unwrap().reference, ReferenceModel::None);
    }

    #[test]
    fn rloo_keys_read_from_flags_and_bad_ones_name_the_key() {
        let flags: Vec<String> = "--reward-clip-range -0.3,1.0 --normalize-advantages --epsilon-high 0.28 \
                                  --reward-funcs distinct_words --num-generations 4"
            .split_whitespace()
            .map(String::from)
            .collect();
        let c: RlooConfig = resolve(&parse_flags(&flags).unwrap(), "flags").unwrap();
        let p = c.plan(1).unwrap();
        assert_eq!(p.advantages.reward_clip_range, Some((-0.3, 1.0)));
        assert!(p.advantages.normalize_advantages);
        assert_eq!((p.loss.epsilon_high, p.advantages.num_generations), (0.28, 4));
        for (edit, want) in [
            (
                (|c| c.reward_clip_range = Some((1.0, -1.0))) as fn(&mut RlooConfig),
                "not an interval",
            ),
            (|c| c.beta = f64::INFINITY, "`beta`: must be a number >= 0"),
            (|c| c.online.num_generations = 1, "RLOO needs at least 2 generations"),
            (|c| c.online.num_generations = 3, "whole groups of num_generations (3)"),
        ] {
            let mut c = cfg();
            edit(&mut c);
            let e = c.plan(1).unwrap_err().to_string();
            assert!(e.contains(want), "{want}: {e}");
        }
        let m = parse_flags(&["--loss-type".into(), "grpo".into()]).unwrap();
        let e = resolve::<RlooConfig>(&m, "flags").unwrap_err().to_string();
        assert!(e.contains("unknown config key `loss_type`"), "{e}");
    }
}
