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
//! The loop, logging and checkpoints are [`crate::online::run`]'s. Deviations from TRL: one
//! process (no data-parallel GRPO yet), no vLLM, no evaluation-time sampling settings of
//! their own, plain-text prompts only, and the optimizer windows do not restart at epoch
//! boundaries (the micro-steps run on across them).

use rlhf_models::Model;
use rlhf_ops::rl::grpo::{grpo_loss, GrpoLossConfig, GrpoLossInputs};
use rlhf_ops::rl::rewards::{group_advantages, reward_metrics};
use rlhf_ops::rl::Metrics;

use crate::config_values::setting_of;
use crate::error::Result;
use crate::grpo_config::{GrpoConfig, GrpoPlan};
use crate::online::buffer::{completion_logps, Buffer};
use crate::online::rollout::Rollout;
use crate::online::run::{train_online, Algorithm, Job, OnlineOutcome};
use crate::online::Reference;
use crate::stop::StopSignal;

/// Trains a policy as `GRPOTrainer.train()` does.
pub fn train(cfg: &GrpoConfig) -> Result<OnlineOutcome> {
    train_until(cfg, &StopSignal::new())
}

/// [`train`], stopping between optimizer steps once `stop` is requested (the last completed
/// step is saved as a checkpoint; the error is [`crate::TrainError::Interrupted`]).
pub fn train_until(cfg: &GrpoConfig, stop: &StopSignal) -> Result<OnlineOutcome> {
    let plan = cfg.plan(1)?;
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

/// Stage 4: the loss of micro-batch `rows` of the buffer (already divided for `ga`
/// accumulated micro-batches) and its metrics (`entropy`, `kl`, `clip_ratio/*`).
pub fn micro_loss(
    policy: &Model,
    plan: &GrpoPlan,
    buf: &Buffer,
    rows: &[usize],
    ga: usize,
    fwd: &mut rlhf_models::Fwd,
) -> Result<(candle_core::Tensor, Metrics)> {
    let dev = policy.device();
    let x = buf.tensors(rows, dev)?;
    let (logps, entropy) = completion_logps(policy, &x, plan.online.temperature, fwd)?;
    let old = buf
        .old_logps
        .as_ref()
        .map(|t| Buffer::rows_of(t, rows, dev))
        .transpose()?;
    let reference = buf
        .ref_logps
        .as_ref()
        .map(|t| Buffer::rows_of(t, rows, dev))
        .transpose()?;
    let advantages = buf.advantages_of(rows, dev)?;
    let cfg = GrpoLossConfig {
        gradient_accumulation_steps: ga,
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
    Ok((out.loss, out.metrics))
}
