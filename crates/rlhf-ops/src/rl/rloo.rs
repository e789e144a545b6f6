//! RLOO of TRL 1.16 (`RLOOTrainer._generate_and_score_completions`, `_compute_loss`):
//! REINFORCE with a leave-one-out baseline (Kool et al. 2019; Ahmadian et al. 2024,
//! arXiv 2402.14740) and a PPO-style clip on the **sequence** ratio.
//!
//! ```text
//! r_i   = nansum_k w_k r_ik (NaN if unscorable);  clamp to reward_clip_range if set
//! r_i  -= β · Σ_t m (logp_old − logp_ref)      k1 KL per sequence, no gradient; can be < 0
//! b_i   = (Σ_{j in group} r_j − r_i) / (n_scorable − 1)     (NaN-aware sum; 0/0 → NaN)
//! A_i   = r_i − b_i;  normalize_advantages: A = (A − nanmean A) / (nanstd A + 1e-4)
//! A_i   = 0 where NaN
//! ρ_i   = exp(Σ_t m logp_t − old_logps_i)
//! loss  = mean_i −min(ρ_i A_i, clip(ρ_i, 1 − ε, 1 + ε_high) A_i)
//! ```
//! There is no KL term in the loss. The loss is not divided for gradient accumulation
//! (TRL leaves that to `Trainer`, `loss_is_scaled_for_ga = False`): divide by the
//! accumulation steps before `backward`.

use candle_core::{DType, Tensor};

use super::rewards::{aggregate_rewards, check_groups};
use super::stats::{is_close_to_zero, nanmax, nanmean, nanmin, nanstd};
use super::{expect_dims, expect_len, host, zero_outside, Metrics, Result, RlError};

/// `Σ_t m (old − ref)` per sequence, detached: the k1 KL estimate RLOO subtracts from the
/// reward (TRL: `(per_token_kl * completion_mask).sum(-1)`).
///
/// # Shapes
/// `old_logps`, `ref_logps`, `mask`: `(B, T)` → `(B)`.
pub fn sequence_kl(old_logps: &Tensor, ref_logps: &Tensor, mask: &Tensor) -> Result<Tensor> {
    expect_dims("sequence_kl", "ref_logps", ref_logps, old_logps.dims())?;
    expect_dims("sequence_kl", "mask", mask, old_logps.dims())?;
    let mask = mask.to_dtype(old_logps.dtype())?;
    Ok((old_logps.detach() - ref_logps.detach())?.mul(&mask)?.sum(1)?)
}

/// The `kl` metric: the token mean `Σ m (old − ref) / max(Σ m, 1)` (not the per-sequence
/// sum; negative values are normal).
///
/// # Shapes
/// `old_logps`, `ref_logps`, `mask`: `(B, T)` → a number.
pub fn kl_metric(old_logps: &Tensor, ref_logps: &Tensor, mask: &Tensor) -> Result<f64> {
    let total: f64 = host(&sequence_kl(old_logps, ref_logps, mask)?)?.iter().sum();
    let n: f64 = host(mask)?.iter().sum();
    Ok(total / n.max(1.0))
}

/// The `RLOOConfig` fields the advantages read.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RlooAdvantageConfig {
    /// `num_generations` (2): group size.
    pub num_generations: usize,
    /// `beta` (0.05): weight of the per-sequence KL folded into the reward.
    pub beta: f64,
    /// `reward_clip_range`: `(min, max)` clamp of the aggregated reward; `None` (default).
    pub reward_clip_range: Option<(f64, f64)>,
    /// `normalize_advantages` (false): whiten the advantages over the batch.
    pub normalize_advantages: bool,
}

impl Default for RlooAdvantageConfig {
    fn default() -> Self {
        Self {
            num_generations: 2,
            beta: 0.05,
            reward_clip_range: None,
            normalize_advantages: false,
        }
    }
}

/// RLOO's advantages and the rewards they came from.
#[derive(Clone, Debug, PartialEq)]
pub struct RlooAdvantages {
    /// `A_i`, 0 for unscorable rows and for the only scorable row of a group. Length `B`.
    pub advantages: Vec<f64>,
    /// The reward after clipping and the KL penalty (NaN when unscorable).
    pub rewards: Vec<f64>,
    /// `frac_reward_zero_std`: the fraction of groups whose (KL-folded) rewards have
    /// std 0 (`isclose`); a group with fewer than two scorable rows has NaN std, not 0.
    pub frac_reward_zero_std: f64,
}

/// RLOO's reward shaping and leave-one-out advantages (module docs).
/// `kl_per_sequence` is [`sequence_kl`] of the batch, required when `beta != 0`.
///
/// # Errors
/// [`RlError::Shape`] on a ragged reward table or a KL of the wrong length;
/// [`RlError::Config`] when the rows do not form whole groups, `beta != 0` comes without
/// a KL, or the clip range is reversed.
pub fn rloo_advantages(
    rewards_per_func: &[Vec<f64>],
    weights: &[f64],
    kl_per_sequence: Option<&[f64]>,
    cfg: &RlooAdvantageConfig,
) -> Result<RlooAdvantages> {
    let mut rewards = aggregate_rewards(rewards_per_func, weights)?;
    let b = rewards.len();
    let g = cfg.num_generations;
    check_groups("rloo_advantages", b, g)?;
    if let Some((lo, hi)) = cfg.reward_clip_range {
        if lo.is_nan() || hi.is_nan() || lo > hi {
            return Err(RlError::Config {
                field: "reward_clip_range",
                msg: format!("({lo}, {hi}) is not an interval; expected (min, max) with min <= max"),
            });
        }
        // NaN (unscorable) stays NaN, as under torch.clamp.
        rewards
            .iter_mut()
            .filter(|r| !r.is_nan())
            .for_each(|r| *r = r.clamp(lo, hi));
    }
    if cfg.beta != 0.0 {
        let kl = kl_per_sequence.ok_or_else(|| RlError::Config {
            field: "beta",
            msg: format!(
                "beta = {} folds the KL into the reward, but no per-sequence KL was given\nhint: \
                 pass `sequence_kl(old, ref, mask)`, or set beta = 0",
                cfg.beta
            ),
        })?;
        expect_len("rloo_advantages", "kl_per_sequence", kl.len(), b)?;
        rewards.iter_mut().zip(kl).for_each(|(r, k)| *r -= cfg.beta * k);
    }

    let mut advantages = vec![0.0; b];
    let mut zero_std = 0usize;
    for (gi, group) in rewards.chunks(g).enumerate() {
        let std = if g > 1 { nanstd(group) } else { 0.0 };
        zero_std += usize::from(is_close_to_zero(std));
        let scorable = group.iter().filter(|r| !r.is_nan()).count() as f64;
        let sum: f64 = group.iter().filter(|r| !r.is_nan()).sum();
        for (j, r) in group.iter().enumerate() {
            advantages[gi * g + j] = if g > 1 { r - (sum - r) / (scorable - 1.0) } else { 0.0 };
        }
    }
    if cfg.normalize_advantages {
        let (mean, std) = (nanmean(&advantages), nanstd(&advantages));
        advantages.iter_mut().for_each(|a| *a = (*a - mean) / (std + 1e-4));
    }
    advantages.iter_mut().filter(|a| a.is_nan()).for_each(|a| *a = 0.0);
    Ok(RlooAdvantages {
        advantages,
        rewards,
        frac_reward_zero_std: zero_std as f64 / (b / g) as f64,
    })
}

/// The `RLOOConfig` clip range.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RlooLossConfig {
    /// `epsilon` (0.2): lower clip `1 − epsilon`.
    pub epsilon_low: f64,
    /// `epsilon_high`, or `epsilon` when TRL's is `None`: upper clip `1 + epsilon_high`.
    pub epsilon_high: f64,
}

impl Default for RlooLossConfig {
    fn default() -> Self {
        Self {
            epsilon_low: 0.2,
            epsilon_high: 0.2,
        }
    }
}

/// One micro-batch's tensors.
#[derive(Clone, Copy, Debug)]
pub struct RlooLossInputs<'a> {
    /// Current policy per-token log-probs `(B, T)` (at the sampling temperature),
    /// differentiable.
    pub logps: &'a Tensor,
    /// Completion mask `(B, T)`.
    pub mask: &'a Tensor,
    /// `old_logps` `(B)`: the summed completion log-probs of the sampling policy, taken
    /// without gradient at generation time ([`super::logprobs::masked_sequence_sum`]).
    pub old_logps: &'a Tensor,
    /// Advantages `(B)`.
    pub advantages: &'a Tensor,
    /// Per-token entropy `(B, T)` of the current policy (for the `entropy` metric).
    pub entropy: &'a Tensor,
}

/// The loss and its metrics.
#[derive(Clone, Debug)]
pub struct RlooLoss {
    /// The scalar loss (not divided for gradient accumulation).
    pub loss: Tensor,
    /// `entropy` and `clip_ratio/{low_mean,low_min,high_mean,high_max,region_mean}`
    /// (per sequence, then mean / nanmin / nanmax over the rows).
    pub metrics: Metrics,
}

/// RLOO's clipped sequence-level loss (module docs).
///
/// # Errors
/// [`RlError::Shape`] when the inputs are not `(B, T)` / `(B)`.
///
/// # Shapes
/// `logps`, `mask`, `entropy`: `(B, T)`; `old_logps`, `advantages`: `(B)` → a scalar.
pub fn rloo_loss(inputs: &RlooLossInputs<'_>, cfg: &RlooLossConfig) -> Result<RlooLoss> {
    const F: &str = "rloo_loss";
    let (b, t) = inputs.logps.dims2()?;
    expect_dims(F, "mask", inputs.mask, &[b, t])?;
    expect_dims(F, "entropy", inputs.entropy, &[b, t])?;
    expect_dims(F, "old_logps", inputs.old_logps, &[b])?;
    expect_dims(F, "advantages", inputs.advantages, &[b])?;
    let dt = inputs.logps.dtype();
    let mask = inputs.mask.to_dtype(dt)?.detach();
    let logps = zero_outside(&mask, inputs.logps)?.sum(1)?;
    let old = inputs.old_logps.to_dtype(dt)?.detach();
    let adv = inputs.advantages.to_dtype(dt)?.detach();
    let coef_1 = (logps - old)?.exp()?;
    let coef_2 = coef_1.clamp(1.0 - cfg.epsilon_low, 1.0 + cfg.epsilon_high)?;
    let loss = (&coef_1 * &adv)?.minimum(&(coef_2 * &adv)?)?.neg()?.mean(0)?;

    let (w, a, m) = (host(&coef_1)?, host(&adv)?, host(&mask)?);
    let entropy = host(&inputs.entropy.to_dtype(dt)?)?;
    let n: f64 = m.iter().sum();
    let round = |x: f64| if dt == DType::F32 { x as f32 as f64 } else { x };
    let (lo, hi) = (round(1.0 - cfg.epsilon_low), round(1.0 + cfg.epsilon_high));
    let low: Vec<f64> = w
        .iter()
        .zip(&a)
        .map(|(w, a)| f64::from(u8::from(*w < lo && *a < 0.0)))
        .collect();
    let high: Vec<f64> = w
        .iter()
        .zip(&a)
        .map(|(w, a)| f64::from(u8::from(*w > hi && *a > 0.0)))
        .collect();
    let region: Vec<f64> = low.iter().zip(&high).map(|(l, h)| l.max(*h)).collect();
    let mut metrics = Metrics::new();
    metrics.insert(
        "entropy".into(),
        entropy.iter().zip(&m).map(|(h, m)| h * m).sum::<f64>() / n.max(1.0),
    );
    metrics.insert("clip_ratio/low_mean".into(), nanmean(&low));
    metrics.insert("clip_ratio/low_min".into(), nanmin(&low));
    metrics.insert("clip_ratio/high_mean".into(), nanmean(&high));
    metrics.insert("clip_ratio/high_max".into(), nanmax(&high));
    metrics.insert("clip_ratio/region_mean".into(), nanmean(&region));
    Ok(RlooLoss { loss, metrics })
}

#[cfg(test)]
mod tests;
