//! The policy-optimisation stage of the quickstart, for each algorithm: PPO (TRL 0.11's),
//! GRPO, RLOO (against the reward model) and DPO (on the preference pairs), all with LoRA
//! on the SFT model, and the measures the comparison table reports.

use std::path::{Path, PathBuf};

use candle_core::DType;
use rlhf_models::{Fwd, Model};
use rlhf_train::dpo_config::DpoConfig;
use rlhf_train::grpo_config::GrpoConfig;
use rlhf_train::online_config::OnlineArgs;
use rlhf_train::peft_args::PeftArgs;
use rlhf_train::ppo_config::PpoConfig;
use rlhf_train::ppo_run::PpoRunConfig;
use rlhf_train::reward_fns::RewardArgs;
use rlhf_train::rloo_config::RlooConfig;

use super::Plan;

/// An algorithm of `--algorithm`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Algorithm {
    /// PPO with a value head (the default pipeline).
    Ppo,
    /// GRPO against the reward model.
    Grpo,
    /// RLOO against the reward model.
    Rloo,
    /// DPO on the preference pairs.
    Dpo,
    /// All four from the same SFT and reward models, compared in one table.
    All,
}

impl Algorithm {
    /// The algorithms this choice runs, in table order.
    pub fn expand(self) -> Vec<Algorithm> {
        match self {
            Self::All => vec![Self::Ppo, Self::Grpo, Self::Rloo, Self::Dpo],
            one => vec![one],
        }
    }

    /// The name used for run directories and the table.
    pub fn name(self) -> &'static str {
        match self {
            Self::Ppo => "ppo",
            Self::Grpo => "grpo",
            Self::Rloo => "rloo",
            Self::Dpo => "dpo",
            Self::All => "all",
        }
    }
}

/// What the earlier stages made, as the algorithms read it.
pub struct Inputs<'a> {
    pub out: &'a Path,
    pub plan: &'a Plan,
    pub seed: u64,
    pub sft_dir: &'a Path,
    pub rm_dir: &'a Path,
    /// Prompt files (`train.jsonl` with `query`).
    pub prompts_dir: &'a Path,
    /// Preference pairs (`train.jsonl`).
    pub prefs_dir: &'a Path,
}

/// A trained policy and where it was saved.
pub struct Trained {
    pub model: Model,
    pub final_dir: PathBuf,
    /// The mean reward of each step, when the trainer logs one.
    pub reward_means: Vec<f64>,
}

/// LoRA as every quickstart stage uses it (PEFT defaults, no adapter dropout).
fn lora() -> PeftArgs {
    PeftArgs {
        use_peft: true,
        lora_dropout: 0.0,
        ..PeftArgs::default()
    }
}

/// The training settings of GRPO and RLOO: `batch` completions per step for `steps` steps.
fn online_args(dir: &str, lr: f64, batch: usize, steps: u64, seed: u64) -> rlhf_train::trainer::TrainingArgs {
    let mut args = super::args(Path::new(dir), 1.0, lr, seed);
    args.per_device_train_batch_size = batch;
    args.max_steps = steps as i64;
    args.logging_steps = 5;
    args
}

/// Trains `algo` from the SFT model.
pub fn train(algo: Algorithm, i: &Inputs<'_>) -> anyhow::Result<Trained> {
    let dir = |name: &str| i.out.join(name).display().to_string();
    let p = i.plan;
    let prompts = i.prompts_dir.join("train.jsonl").display().to_string();
    let sft = i.sft_dir.display().to_string();
    let online = || OnlineArgs {
        max_completion_length: 40,
        rewards: RewardArgs {
            reward_model_name_or_path: Some(i.rm_dir.display().to_string()),
            ..RewardArgs::default()
        },
        ..OnlineArgs::default()
    };
    Ok(match algo {
        Algorithm::Ppo => {
            let cfg = PpoRunConfig {
                model_name_or_path: sft,
                reward_model_path: i.rm_dir.display().to_string(),
                train_file: prompts,
                output_dir: dir("ppo"),
                overwrite_output_dir: true,
                max_new_tokens: 40,
                save_steps: 0,
                log_samples: p.ppo_steps / 2,
                ppo: PpoConfig {
                    batch_size: p.ppo_batch,
                    mini_batch_size: p.ppo_mini_batch,
                    learning_rate: p.ppo_lr,
                    steps: p.ppo_steps * p.ppo_batch as u64,
                    seed: i.seed,
                    ..PpoConfig::default()
                },
                peft: lora(),
                ..PpoRunConfig::default()
            };
            let r = rlhf_train::ppo_run::train(&cfg)?;
            Trained {
                model: r.model,
                final_dir: r.final_dir,
                reward_means: r.reward_means,
            }
        }
        Algorithm::Grpo => {
            let mut cfg = GrpoConfig {
                model_name_or_path: sft,
                train_file: Some(prompts),
                beta: 0.04,
                online: OnlineArgs {
                    num_generations: 8,
                    ..online()
                },
                peft: lora(),
                ..GrpoConfig::default()
            };
            cfg.args = online_args(&dir("grpo"), p.grpo_lr, p.grpo_batch, p.online_steps, i.seed);
            let r = rlhf_train::grpo::train(&cfg)?;
            Trained {
                model: r.model,
                final_dir: r.final_dir,
                reward_means: r.rewards,
            }
        }
        Algorithm::Rloo => {
            let mut cfg = RlooConfig {
                model_name_or_path: sft,
                train_file: Some(prompts),
                // Groups of 4 rather than TRL's default 2: a steadier leave-one-out baseline
                // on a model this small.
                online: OnlineArgs {
                    num_generations: 4,
                    ..online()
                },
                peft: lora(),
                ..RlooConfig::default()
            };
            cfg.args = online_args(&dir("rloo"), p.rloo_lr, p.rloo_batch, p.online_steps, i.seed);
            let r = rlhf_train::rloo::train(&cfg)?;
            Trained {
                model: r.model,
                final_dir: r.final_dir,
                reward_means: r.rewards,
            }
        }
        Algorithm::Dpo => {
            let mut cfg = DpoConfig {
                model_name_or_path: sft,
                dataset_name: Some(i.prefs_dir.display().to_string()),
                max_length: Some(p.max_length),
                peft: lora(),
                ..DpoConfig::default()
            };
            cfg.args = super::args(Path::new(&dir("dpo")), 1.0, p.dpo_lr, i.seed);
            cfg.args.max_steps = p.dpo_steps as i64;
            cfg.args.disable_dropout = true;
            let r = rlhf_train::dpo::train(&cfg)?;
            Trained {
                model: r.model,
                final_dir: r.final_dir,
                reward_means: Vec::new(),
            }
        }
        Algorithm::All => anyhow::bail!("`all` is expanded before training"),
    })
}

/// Summed log-probability of each response given its prompt under `model`.
fn response_logprobs(model: &Model, pairs: &[(Vec<u32>, Vec<u32>)]) -> anyhow::Result<Vec<f64>> {
    use rlhf_train::collate::{pad, PadSide};
    let pad_id = model.pad_token_id().unwrap_or(0);
    let mut out = Vec::with_capacity(pairs.len());
    for chunk in pairs.chunks(32) {
        let seqs: Vec<Vec<u32>> = chunk.iter().map(|(q, r)| [q.as_slice(), r].concat()).collect();
        let (ids, mask) = pad(&seqs, pad_id, PadSide::Right, model.device())?;
        let width = ids.dim(1)?;
        if width < 2 {
            out.extend(std::iter::repeat_n(0.0, chunk.len()));
            continue;
        }
        let logits = model.logits(&ids, &mask, &mut Fwd::eval())?.to_dtype(DType::F32)?;
        // Position t predicts the token at t + 1.
        let lp = rlhf_ops::ppo::logprobs_from_logits(&logits.narrow(1, 0, width - 1)?, &ids.narrow(1, 1, width - 1)?)?
            .to_vec2::<f32>()?;
        for (row, (q, r)) in lp.iter().zip(chunk) {
            // The response's tokens sit at q.len()..; each is predicted one position earlier
            // (a first token with no prompt before it has no prediction).
            let start = q.len().max(1) - 1;
            let end = (q.len() + r.len()).saturating_sub(1);
            out.push(row[start.min(end)..end].iter().map(|&x| x as f64).sum());
        }
    }
    Ok(out)
}

/// The mean sequence-level KL estimate `E[log π(y|x) − log π_sft(y|x)]` over the policy's
/// own samples (TRL's `objective/kl` on held-out prompts).
pub fn kl_to(policy: &Model, sft: &Model, pairs: &[(Vec<u32>, Vec<u32>)]) -> anyhow::Result<f64> {
    if pairs.is_empty() {
        return Ok(0.0);
    }
    let a = response_logprobs(policy, pairs)?;
    let b = response_logprobs(sft, pairs)?;
    Ok(a.iter().zip(&b).map(|(x, y)| x - y).sum::<f64>() / pairs.len() as f64)
}
