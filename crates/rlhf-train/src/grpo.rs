//! GRPO (Shao et al. 2024, DeepSeekMath §4) as TRL 1.16's `GRPOTrainer`: for each prompt,
//! sample `G` completions, score them with the reward functions, take group-relative
//! advantages and optimise the clipped, token-level policy objective (`loss_type`, default
//! `dapo`), optionally with a k3 KL to a reference.
//!
//! Stages of one generation batch, then of each micro-batch:
//! 1. **rollout** ([`crate::online::rollout`]): `prompts_per_generation` prompts × `G`
//!    completions, each prompt prefilled once, one random stream per completion;
//! 2. **score**: every reward function, weighted (`None` → NaN);
//! 3. **advantages** ([`prepare`]): `(r − mean_g) / (std + 1e-4)` per `scale_rewards`;
//!    old log-probs when the buffer is reused (`num_iterations > 1` or
//!    `steps_per_generation > gradient_accumulation_steps`), reference log-probs when
//!    `beta != 0`;
//! 4. **loss** ([`micro_loss`]): `rlhf_ops::rl::grpo::grpo_loss` on the micro-batch's
//!    current log-probs, then the shared [`TrainLoop`](crate::trainer::TrainLoop) step.
//!
//! The loop, logging and checkpoints are [`crate::online::run`]'s; with several ranks each
//! generates and scores its own prompts' groups and takes its part of every micro-batch
//! ([`rank_share`]). Deviations from TRL: no vLLM, no evaluation-time sampling settings of
//! their own, the optimizer windows do not restart at epoch boundaries (the micro-steps run
//! on across them), and across ranks `bnpo` divides by the whole micro-batch's tokens
//! (TRL: each process's own).

use rlhf_models::Model;
use rlhf_ops::rl::grpo::{grpo_loss, GrpoLossConfig, GrpoLossInputs, GrpoLossType, ImportanceSamplingLevel};
use rlhf_ops::rl::rewards::{group_advantages, reward_metrics};
use rlhf_ops::rl::Metrics;

use crate::config_values::setting_of;
use crate::error::Result;
use crate::grpo_config::{GrpoConfig, GrpoPlan};
use crate::online::buffer::{completion_logps, Buffer};
use crate::online::rollout::Rollout;
use crate::online::run::{train_online, Algorithm, Job, OnlineOutcome};
use crate::online::{Pool, Reference};
use crate::stop::StopSignal;

/// Trains a policy as `GRPOTrainer.train()` does.
pub fn train(cfg: &GrpoConfig) -> Result<OnlineOutcome> {
    train_until(cfg, &StopSignal::new())
}

/// [`train`], stopping between optimizer steps once `stop` is requested (the last completed
/// step is saved as a checkpoint; the error is [`crate::TrainError::Interrupted`]).
pub fn train_until(cfg: &GrpoConfig, stop: &StopSignal) -> Result<OnlineOutcome> {
    let plan = cfg.plan(crate::dist::world().size())?;
    let job = Job {
        name: "grpo",
        model_name_or_path: &cfg.model_name_or_path,
        train_file: cfg.train_file.as_deref(),
        eval_file: cfg.eval_file.as_deref(),
        dataset_name: cfg.dataset_name.as_deref(),
        online: &cfg.online,
        args: &cfg.args,
        peft: &cfg.peft,
    };
    train_online(cfg, &job, Algorithm::Grpo(&plan), stop)
}

/// Whether TRL computes old log-probs at generation time: the buffer serves more than one
/// optimizer step's worth of micro-batches, so the policy moves before it is used up.
pub fn needs_old_logps(plan: &GrpoPlan) -> bool {
    let o = &plan.online;
    o.num_iterations > 1 || o.steps_per_generation > o.gradient_accumulation_steps
}

/// Stage 3: the buffered generation batch of a scored rollout — masks, group advantages,
/// and the log-probs taken at generation time — and the generation's metrics
/// (`num_tokens`, `completions/*`, `rewards/<name>/*`, `reward`, `reward_std`,
/// `frac_reward_zero_std`). `rewards` is the `B × K` table of
/// [`crate::online::rollout::score`]; `num_tokens_seen` the run's `num_tokens` so far.
pub fn prepare(
    policy: &Model,
    reference: &Reference<'_>,
    plan: &GrpoPlan,
    rollout: &Rollout,
    rewards: &[Vec<f64>],
    num_tokens_seen: f64,
    mask_truncated_completions: bool,
) -> Result<(Buffer, Metrics)> {
    let o = &plan.online;
    let (mut buf, mut metrics) = Buffer::from_rollout(policy, rollout, num_tokens_seen, mask_truncated_completions)?;
    let adv = group_advantages(
        rewards,
        &o.reward_weights,
        o.num_generations,
        plan.scale_rewards,
        plan.aggregation,
    )
    .map_err(setting_of)?;
    let names: Vec<&str> = o.reward_names.iter().map(String::as_str).collect();
    metrics.extend(reward_metrics(rewards, &o.reward_weights, &names, adv.frac_reward_zero_std).map_err(setting_of)?);
    buf.advantages = adv.advantages;
    let chunk = o.per_device_train_batch_size;
    if needs_old_logps(plan) {
        buf.old_logps = Some(buf.logps_no_grad(policy, o.temperature, chunk, true)?);
    }
    if plan.loss.beta != 0.0 {
        buf.ref_logps = reference.logps(policy, &buf, o.temperature, chunk)?;
    }
    Ok((buf, metrics))
}

/// This rank's part of a micro-batch's loss: the loss of its rows `mine` times this share
/// is what they contribute to the loss of the whole micro-batch `global` (all ranks' rows),
/// so the ranks' gradients sum to the one-process gradient. 1 on one process.
pub fn rank_share(plan: &GrpoPlan, buf: &Buffer, mine: &[usize], global: &[usize]) -> f64 {
    if mine.len() == global.len() {
        return 1.0;
    }
    match plan.loss.loss_type {
        // Token sums over the generation batch's count: already a part of the whole.
        GrpoLossType::Dapo | GrpoLossType::Cispo | GrpoLossType::Vespo => 1.0,
        // A token mean over the micro-batch: re-weighted to the whole micro-batch's tokens.
        GrpoLossType::Bnpo => buf.tokens(mine).max(1.0) / buf.tokens(global).max(1.0),
        // Means over rows (dr_grpo: a sum over `B · max_completion_length`).
        _ => mine.len() as f64 / global.len().max(1) as f64,
    }
}

/// How a micro-batch metric of [`micro_loss`] pools over ranks.
pub fn metric_pool(plan: &GrpoPlan, key: &str) -> Pool {
    let per_token = plan.loss.importance_sampling_level == ImportanceSamplingLevel::Token;
    match key {
        k if k.ends_with("_min") => Pool::Min,
        k if k.ends_with("_max") => Pool::Max,
        "entropy" | "kl" => Pool::Tokens,
        "vespo/phi_seq_mean" => Pool::Rows,
        _ if per_token => Pool::Tokens,
        _ => Pool::Rows,
    }
}

/// Stage 4: this rank's part `mine` of the loss of micro-batch `global` (rows of the buffer;
/// the same on one process), already divided for `ga` accumulated micro-batches, and its
/// metrics over `mine` (`entropy`, `kl`, `clip_ratio/*`).
pub fn micro_loss(
    policy: &Model,
    plan: &GrpoPlan,
    buf: &Buffer,
    (mine, global): (&[usize], &[usize]),
    ga: usize,
    fwd: &mut rlhf_models::Fwd,
) -> Result<(candle_core::Tensor, Metrics)> {
    let dev = policy.device();
    let x = buf.tensors(mine, dev)?;
    let (logps, entropy) = completion_logps(policy, &x, plan.online.temperature, fwd)?;
    let old = buf
        .old_logps
        .as_ref()
        .map(|t| Buffer::rows_of(t, mine, dev))
        .transpose()?;
    let reference = buf
        .ref_logps
        .as_ref()
        .map(|t| Buffer::rows_of(t, mine, dev))
        .transpose()?;
    let advantages = buf.advantages_of(mine, dev)?;
    // Gradients are summed over ranks, not averaged: the token-sum types divide by the whole
    // generation batch's count, not by its per-process share.
    let cfg = GrpoLossConfig {
        gradient_accumulation_steps: ga,
        num_processes: 1,
        ..plan.loss
    };
    let inputs = GrpoLossInputs {
        logps: &logps,
        old_logps: old.as_ref(),
        ref_logps: reference.as_ref(),
        advantages: &advantages,
        mask: &x.mask,
        entropy: &entropy,
        num_items_in_batch: buf.num_items,
    };
    let out = grpo_loss(&inputs, &cfg).map_err(setting_of)?;
    let share = rank_share(plan, buf, mine, global);
    let loss = if share == 1.0 {
        out.loss
    } else {
        out.loss.affine(share, 0.0)?
    };
    Ok((loss, out.metrics))
}
