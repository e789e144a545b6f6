//! RLOO (Kool et al. 2019; Ahmadian et al. 2024) as TRL 1.16's `RLOOTrainer`: `G`
//! completions per prompt, the reward minus `beta` times the sequence's k1 KL to the
//! reference, a leave-one-out baseline, and a PPO-style clip on the **sequence** ratio.
//!
//! Stages: 1. rollout and 2. score as GRPO ([`crate::online::rollout`]); 3. [`prepare`]:
//! the sampling policy's log-probs (always, TRL's `old_logps`), the reference's when
//! `beta != 0`, the KL folded into the reward and the leave-one-out advantages
//! (`rlhf_ops::rl::rloo::rloo_advantages`); 4. [`micro_loss`]:
//! `rlhf_ops::rl::rloo::rloo_loss`, divided by the accumulation steps (TRL leaves that to
//! `Trainer`). Deviations as [`crate::grpo`]'s.

use candle_core::Tensor;
use rlhf_models::Model;
use rlhf_ops::rl::logprobs::masked_sequence_sum;
use rlhf_ops::rl::rewards::reward_metrics;
use rlhf_ops::rl::rloo::{kl_metric, rloo_advantages, rloo_loss, sequence_kl, RlooLossInputs};
use rlhf_ops::rl::Metrics;

use crate::config_values::setting_of;
use crate::error::Result;
use crate::online::buffer::{completion_logps, Buffer};
use crate::online::rollout::Rollout;
use crate::online::run::{train_online, Algorithm, Job, OnlineOutcome};
use crate::online::{Pool, Reference};
use crate::rloo_config::{RlooConfig, RlooPlan};
use crate::stop::StopSignal;

/// Trains a policy as `RLOOTrainer.train()` does.
pub fn train(cfg: &RlooConfig) -> Result<OnlineOutcome> {
    train_until(cfg, &StopSignal::new())
}

/// [`train`], stopping between optimizer steps once `stop` is requested.
pub fn train_until(cfg: &RlooConfig, stop: &StopSignal) -> Result<OnlineOutcome> {
    let plan = cfg.plan(crate::dist::world().size())?;
    let job = Job {
        name: "rloo",
        model_name_or_path: &cfg.model_name_or_path,
        train_file: cfg.train_file.as_deref(),
        eval_file: cfg.eval_file.as_deref(),
        dataset_name: cfg.dataset_name.as_deref(),
        online: &cfg.online,
        args: &cfg.args,
        peft: &cfg.peft,
    };
    train_online(cfg, &job, Algorithm::Rloo(&plan), stop)
}

/// Stage 3: the buffered generation batch — masks, old and reference log-probs, KL-folded
/// leave-one-out advantages — and the generation's metrics (`num_tokens`, `completions/*`,
/// `kl` when `beta != 0`, `rewards/<name>/*`, `reward`, `reward_std`,
/// `frac_reward_zero_std`).
pub fn prepare(
    policy: &Model,
    reference: &Reference<'_>,
    plan: &RlooPlan,
    rollout: &Rollout,
    rewards: &[Vec<f64>],
    num_tokens_seen: f64,
    mask_truncated_completions: bool,
) -> Result<(Buffer, Metrics)> {
    let o = &plan.online;
    let (mut buf, mut metrics) = Buffer::from_rollout(policy, rollout, num_tokens_seen, mask_truncated_completions)?;
    let chunk = o.per_device_train_batch_size;
    let dev = policy.device();
    let all: Vec<usize> = (0..buf.len()).collect();
    let old = buf.logps_no_grad(policy, o.temperature, chunk, true)?;
    let reference_logps = if plan.advantages.beta != 0.0 {
        reference.logps(policy, &buf, o.temperature, chunk)?
    } else {
        None
    };
    let mask = Buffer::rows_of(&buf.completion_mask, &all, dev)?;
    let kl = match &reference_logps {
        Some(r) => {
            let (old_t, ref_t) = (Buffer::rows_of(&old, &all, dev)?, Buffer::rows_of(r, &all, dev)?);
            metrics.insert("kl".into(), kl_metric(&old_t, &ref_t, &mask).map_err(setting_of)?);
            let kl = sequence_kl(&old_t, &ref_t, &mask).map_err(setting_of)?;
            Some(kl.to_dtype(candle_core::DType::F64)?.to_vec1::<f64>()?)
        }
        None => None,
    };
    let adv = rloo_advantages(rewards, &o.reward_weights, kl.as_deref(), &plan.advantages).map_err(setting_of)?;
    let names: Vec<&str> = o.reward_names.iter().map(String::as_str).collect();
    metrics.extend(reward_metrics(rewards, &o.reward_weights, &names, adv.frac_reward_zero_std).map_err(setting_of)?);
    buf.advantages = adv.advantages;
    buf.old_logps = Some(old);
    buf.ref_logps = reference_logps;
    Ok((buf, metrics))
}

/// How a micro-batch metric of [`micro_loss`] pools over ranks: the clip ratios are means
/// over sequences, the entropy over tokens.
pub fn metric_pool(key: &str) -> Pool {
    match key {
        k if k.ends_with("_min") => Pool::Min,
        k if k.ends_with("_max") => Pool::Max,
        "entropy" => Pool::Tokens,
        _ => Pool::Rows,
    }
}

/// Stage 4: this rank's part `mine` of the loss of micro-batch `global` (the sequence mean
/// weighted by the part's share of rows; divided by `ga`) and its metrics over `mine`
/// (`entropy`, `clip_ratio/*`).
pub fn micro_loss(
    policy: &Model,
    plan: &RlooPlan,
    buf: &Buffer,
    (mine, global): (&[usize], &[usize]),
    ga: usize,
    fwd: &mut rlhf_models::Fwd,
) -> Result<(Tensor, Metrics)> {
    let dev = policy.device();
    let x = buf.tensors(mine, dev)?;
    let (logps, entropy) = completion_logps(policy, &x, plan.online.temperature, fwd)?;
    let old = buf.old_logps.as_ref().ok_or_else(|| {
        crate::TrainError::Config("internal: an RLOO buffer without the sampling policy's log-probs".into())
    })?;
    let old = masked_sequence_sum(&Buffer::rows_of(old, mine, dev)?, &x.mask).map_err(setting_of)?;
    let advantages = buf.advantages_of(mine, dev)?;
    let inputs = RlooLossInputs {
        logps: &logps,
        mask: &x.mask,
        old_logps: &old,
        advantages: &advantages,
        entropy: &entropy,
    };
    let out = rloo_loss(&inputs, &plan.loss).map_err(setting_of)?;
    let loss = if mine.len() == global.len() {
        (out.loss / ga as f64)?
    } else {
        out.loss
            .affine(mine.len() as f64 / (global.len() as f64 * ga as f64), 0.0)?
    };
    Ok((loss, out.metrics))
}
