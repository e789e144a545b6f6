//! The clipped PPO loss of TRL 0.11 (`PPOTrainer.loss`) with every statistic it logs.

use candle_core::{DType, Tensor};

use super::{masked_mean, masked_var, PpoError, Result};

/// The `PPOConfig` fields the loss reads (TRL defaults in [`Default`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PpoLossConfig {
    /// Policy ratio clip `epsilon`: the ratio is clamped to `[1 - cliprange, 1 + cliprange]`.
    /// TRL default 0.2.
    pub cliprange: f64,
    /// Value clip: the new value may move at most this far from the old one. Default 0.2.
    pub cliprange_value: f64,
    /// Weight of the value loss in the total loss. Default 0.1.
    pub vf_coef: f64,
    /// When the masked mean ratio exceeds this, every loss is multiplied by 0 (the minibatch
    /// is skipped; TRL still steps the optimizer). Default 10.0.
    pub ratio_threshold: f64,
}

impl Default for PpoLossConfig {
    fn default() -> Self {
        Self {
            cliprange: 0.2,
            cliprange_value: 0.2,
            vf_coef: 0.1,
            ratio_threshold: 10.0,
        }
    }
}

/// The tensors of one minibatch, named as the arguments of TRL's `PPOTrainer.loss`.
/// All are `(B, T)`.
#[derive(Clone, Copy, Debug)]
pub struct PpoLossInputs<'a> {
    /// Log-probs of the sampled tokens under the policy that generated them (rollout time).
    pub old_logprobs: &'a Tensor,
    /// Old values, masked (the `values` of [`super::compute_advantages`]).
    pub values: &'a Tensor,
    /// Per-token entropy of the current policy (only the `policy/entropy` stat reads it;
    /// TRL passes the logits and computes it inside, here [`super::logprobs_and_entropy`]
    /// gives it with the log-probs, or [`super::entropy_from_logits`] from logits).
    pub entropy: &'a Tensor,
    /// Current value predictions (differentiable).
    pub vpreds: &'a Tensor,
    /// Current log-probs of the sampled tokens (differentiable).
    pub logprobs: &'a Tensor,
    /// Response mask, 0/1.
    pub mask: &'a Tensor,
    /// Whitened advantages (detached).
    pub advantages: &'a Tensor,
    /// Value targets.
    pub returns: &'a Tensor,
}

/// Everything `PPOTrainer.loss` puts in its stats dict; TRL names in [`PpoStats::scalars`].
/// Scalars are detached values; the two tensors are detached `(B, T)` copies.
#[derive(Clone, Debug)]
pub struct PpoStats {
    /// `loss/policy`: the clipped policy loss (0 when the ratio threshold tripped).
    pub loss_policy: f64,
    /// `loss/value`: the clipped value loss, *not* multiplied by `vf_coef`.
    pub loss_value: f64,
    /// `loss/total`: `loss/policy + vf_coef * loss/value`.
    pub loss_total: f64,
    /// `policy/entropy`: masked mean of the per-token entropy of the current policy.
    pub policy_entropy: f64,
    /// `policy/approxkl`: `0.5 * masked_mean((logp - logp_old)^2)` (k2 estimator).
    pub policy_approxkl: f64,
    /// `policy/policykl`: `masked_mean(logp_old - logp)` (k1 estimator).
    pub policy_policykl: f64,
    /// `policy/clipfrac`: fraction of tokens whose clipped policy loss was the larger.
    pub policy_clipfrac: f64,
    /// `policy/advantages`: the advantages, `(B, T)`.
    pub policy_advantages: Tensor,
    /// `policy/advantages_mean`: their masked mean (≈ 0 after whitening).
    pub policy_advantages_mean: f64,
    /// `policy/ratio`: `exp(logp - logp_old)`, `(B, T)`.
    pub policy_ratio: Tensor,
    /// `returns/mean`: masked mean of the returns.
    pub returns_mean: f64,
    /// `returns/var`: unbiased masked variance of the returns.
    pub returns_var: f64,
    /// `val/vpred`: masked mean of the current value predictions.
    pub val_vpred: f64,
    /// `val/error`: `masked_mean((vpred - returns)^2)`.
    pub val_error: f64,
    /// `val/clipfrac`: fraction of tokens whose clipped value loss was the larger.
    pub val_clipfrac: f64,
    /// `val/mean`: masked mean of the old values.
    pub val_mean: f64,
    /// `val/var`: unbiased masked variance of the old values.
    pub val_var: f64,
    /// Whether the masked mean ratio exceeded `ratio_threshold`, so the losses were zeroed
    /// (TRL warns instead of logging this).
    pub ratio_threshold_exceeded: bool,
}

impl PpoStats {
    /// The scalar stats under TRL's names (`PPOTrainer.step` prefixes them with `ppo/`).
    pub fn scalars(&self) -> [(&'static str, f64); 15] {
        [
            ("loss/policy", self.loss_policy),
            ("loss/value", self.loss_value),
            ("loss/total", self.loss_total),
            ("policy/entropy", self.policy_entropy),
            ("policy/approxkl", self.policy_approxkl),
            ("policy/policykl", self.policy_policykl),
            ("policy/clipfrac", self.policy_clipfrac),
            ("policy/advantages_mean", self.policy_advantages_mean),
            ("returns/mean", self.returns_mean),
            ("returns/var", self.returns_var),
            ("val/vpred", self.val_vpred),
            ("val/error", self.val_error),
            ("val/clipfrac", self.val_clipfrac),
            ("val/mean", self.val_mean),
            ("val/var", self.val_var),
        ]
    }
}

/// The outputs of [`ppo_loss`], TRL's `(pg_loss, vf_coef * vf_loss, stats)`.
#[derive(Clone, Debug)]
pub struct PpoLoss {
    /// The clipped policy loss, a differentiable scalar.
    pub pg_loss: Tensor,
    /// `vf_coef *` the clipped value loss, a differentiable scalar; backward on
    /// `pg_loss + vf_loss`.
    pub vf_loss: Tensor,
    /// The logged statistics.
    pub stats: PpoStats,
}

/// The PPO-clip loss of `PPOTrainer.loss` (Schulman et al. 2017, arXiv 1707.06347), all
/// means token-level over the mask of the whole minibatch:
/// - value: `vclip = clip(vpred, V_old - cv, V_old + cv)`,
///   `vf_loss = 0.5 * masked_mean(max((vpred - R)^2, (vclip - R)^2))`;
/// - policy: `ratio = exp(logp - logp_old)`,
///   `pg_loss = masked_mean(max(-A * ratio, -A * clamp(ratio, 1 - c, 1 + c)))`;
/// - if `masked_mean(ratio) > ratio_threshold`, both losses are multiplied by 0;
/// - returns `pg_loss` and `vf_coef * vf_loss` (differentiable w.r.t. `logprobs` and
///   `vpreds`), and the stats of [`PpoStats`].
///
/// # Errors
/// [`PpoError::Shape`] on mismatched inputs; [`PpoError::MaskTooSmall`] when the mask sums
/// to less than 2 (the `returns/var` and `val/var` stats are unbiased variances).
///
/// # Shapes
/// Every input `(B, T)` → scalars.
pub fn ppo_loss(inputs: &PpoLossInputs<'_>, cfg: &PpoLossConfig) -> Result<PpoLoss> {
    check_shapes(inputs)?;
    let PpoLossInputs {
        old_logprobs,
        values,
        entropy,
        vpreds,
        logprobs,
        mask,
        advantages,
        returns,
    } = *inputs;
    let dtype = logprobs.dtype();
    let mask = &mask.to_dtype(dtype)?;

    // Value loss, clipped around the old values (`clip_by_value` = max(min(x, hi), lo)).
    let cv = cfg.cliprange_value;
    let vpred_clipped = vpreds
        .minimum(&values.affine(1.0, cv)?)?
        .maximum(&values.affine(1.0, -cv)?)?;
    let vf_losses1 = (vpreds - returns)?.sqr()?;
    let vf_losses2 = (vpred_clipped - returns)?.sqr()?;
    let mut vf_loss = masked_mean(&vf_losses1.maximum(&vf_losses2)?, mask, None)?.affine(0.5, 0.0)?;
    let vf_clipfrac = masked_mean(&vf_losses2.gt(&vf_losses1)?.to_dtype(dtype)?, mask, None)?;

    // Policy loss, pessimistic over the clipped and unclipped ratio.
    let ratio = (logprobs - old_logprobs)?.exp()?;
    let neg_adv = advantages.neg()?;
    let pg_losses = (&neg_adv * &ratio)?;
    let ratio_clipped = ratio.clamp(1.0 - cfg.cliprange, 1.0 + cfg.cliprange)?;
    let pg_losses2 = (&neg_adv * ratio_clipped)?;
    let mut pg_loss = masked_mean(&pg_losses.maximum(&pg_losses2)?, mask, None)?;
    let pg_clipfrac = masked_mean(&pg_losses2.gt(&pg_losses)?.to_dtype(dtype)?, mask, None)?;

    let mut loss = (&pg_loss + vf_loss.affine(cfg.vf_coef, 0.0)?)?;

    // A ratio this far from 1 means the policy left the trust region; TRL zeroes the
    // minibatch (`loss * 0.0` keeps the graph, so backward still runs).
    let avg_ratio = scalar(&masked_mean(&ratio.detach(), mask, None)?)?;
    let ratio_threshold_exceeded = avg_ratio > cfg.ratio_threshold;
    if ratio_threshold_exceeded {
        pg_loss = pg_loss.affine(0.0, 0.0)?;
        vf_loss = vf_loss.affine(0.0, 0.0)?;
        loss = loss.affine(0.0, 0.0)?;
    }

    // Stats, all on detached tensors.
    let (logprobs, vpreds) = (logprobs.detach(), vpreds.detach());
    let log_ratio = (&logprobs - old_logprobs)?;
    let entropy = masked_mean(&entropy.detach(), mask, None)?;
    let approxkl = masked_mean(&log_ratio.sqr()?, mask, None)?.affine(0.5, 0.0)?;
    let policykl = masked_mean(&log_ratio.neg()?, mask, None)?;
    let val_error = masked_mean(&(&vpreds - returns)?.sqr()?, mask, None)?;
    let stats = PpoStats {
        loss_policy: scalar(&pg_loss)?,
        loss_value: scalar(&vf_loss)?,
        loss_total: scalar(&loss)?,
        policy_entropy: scalar(&entropy)?,
        policy_approxkl: scalar(&approxkl)?,
        policy_policykl: scalar(&policykl)?,
        policy_clipfrac: scalar(&pg_clipfrac)?,
        policy_advantages: advantages.detach(),
        policy_advantages_mean: scalar(&masked_mean(advantages, mask, None)?)?,
        policy_ratio: ratio.detach(),
        returns_mean: scalar(&masked_mean(returns, mask, None)?)?,
        returns_var: scalar(&masked_var(returns, mask, true)?)?,
        val_vpred: scalar(&masked_mean(&vpreds, mask, None)?)?,
        val_error: scalar(&val_error)?,
        val_clipfrac: scalar(&vf_clipfrac)?,
        val_mean: scalar(&masked_mean(values, mask, None)?)?,
        val_var: scalar(&masked_var(values, mask, true)?)?,
        ratio_threshold_exceeded,
    };
    Ok(PpoLoss {
        pg_loss,
        vf_loss: vf_loss.affine(cfg.vf_coef, 0.0)?,
        stats,
    })
}

/// A 0-d tensor of any float dtype as `f64`.
fn scalar(t: &Tensor) -> Result<f64> {
    Ok(t.to_dtype(DType::F64)?.to_scalar::<f64>()?)
}

fn check_shapes(inputs: &PpoLossInputs<'_>) -> Result<()> {
    let (b, t) = inputs.logprobs.dims2()?;
    let named = [
        ("entropy", inputs.entropy),
        ("old_logprobs", inputs.old_logprobs),
        ("values", inputs.values),
        ("vpreds", inputs.vpreds),
        ("logprobs", inputs.logprobs),
        ("mask", inputs.mask),
        ("advantages", inputs.advantages),
        ("returns", inputs.returns),
    ];
    for (name, tensor) in named {
        if tensor.dims() != [b, t] {
            return Err(PpoError::Shape {
                function: "ppo_loss",
                msg: format!(
                    "`{name}` has shape {:?}, expected (B, T) = ({b}, {t}) from `logprobs`",
                    tensor.dims(),
                ),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ppo::entropy_from_logits;
    use crate::rng::RngStream;
    use candle_core::{Device, Var};

    const B: usize = 2;
    const T: usize = 3;
    const V: usize = 4;

    fn random(n: usize, rng: &mut RngStream, scale: f64) -> Vec<f64> {
        (0..n).map(|_| scale * (2.0 * rng.uniform_f64() - 1.0)).collect()
    }

    fn t(data: Vec<f64>) -> Tensor {
        Tensor::from_vec(data, (B, T), &Device::Cpu).unwrap()
    }

    struct Batch {
        old_logprobs: Tensor,
        values: Tensor,
        logits: Tensor,
        mask: Tensor,
        advantages: Tensor,
        returns: Tensor,
    }

    fn batch(seed: u64) -> Batch {
        let mut rng = RngStream::new(seed);
        Batch {
            old_logprobs: t(random(B * T, &mut rng, 1.0)),
            values: t(random(B * T, &mut rng, 1.0)),
            logits: Tensor::from_vec(random(B * T * V, &mut rng, 2.0), (B, T, V), &Device::Cpu).unwrap(),
            mask: t(vec![1.0, 1.0, 0.0, 1.0, 1.0, 1.0]),
            advantages: t(random(B * T, &mut rng, 1.0)),
            returns: t(random(B * T, &mut rng, 1.0)),
        }
    }

    fn run(b: &Batch, logprobs: &Tensor, vpreds: &Tensor, cfg: &PpoLossConfig) -> PpoLoss {
        let inputs = PpoLossInputs {
            old_logprobs: &b.old_logprobs,
            values: &b.values,
            entropy: &entropy_from_logits(&b.logits).unwrap(),
            vpreds,
            logprobs,
            mask: &b.mask,
            advantages: &b.advantages,
            returns: &b.returns,
        };
        ppo_loss(&inputs, cfg).unwrap()
    }

    #[test]
    fn loss_at_the_old_policy_is_minus_the_mean_advantage() {
        let b = batch(1);
        let out = run(&b, &b.old_logprobs, &b.values, &PpoLossConfig::default());
        // ratio = 1 everywhere: pg_loss = -masked_mean(A), nothing clipped, no KL.
        let mean_adv = scalar(&masked_mean(&b.advantages, &b.mask, None).unwrap()).unwrap();
        assert!((out.stats.loss_policy + mean_adv).abs() < 1e-12);
        assert_eq!(out.stats.policy_clipfrac, 0.0);
        assert_eq!(out.stats.val_clipfrac, 0.0);
        assert_eq!(out.stats.policy_approxkl, 0.0);
        assert_eq!(out.stats.policy_policykl, 0.0);
        assert!(!out.stats.ratio_threshold_exceeded);
        let total = out.stats.loss_policy + 0.1 * out.stats.loss_value;
        assert!((out.stats.loss_total - total).abs() < 1e-12);
        let vf = scalar(&out.vf_loss).unwrap();
        assert!((vf - 0.1 * out.stats.loss_value).abs() < 1e-12);
    }

    #[test]
    fn ratio_above_threshold_zeroes_every_loss() {
        let b = batch(2);
        let logprobs = (&b.old_logprobs + 3.0).unwrap(); // ratio e^3 ≈ 20 > 10
        let out = run(&b, &logprobs, &b.values, &PpoLossConfig::default());
        assert!(out.stats.ratio_threshold_exceeded);
        assert_eq!(scalar(&out.pg_loss).unwrap(), 0.0);
        assert_eq!(scalar(&out.vf_loss).unwrap(), 0.0);
        assert_eq!(out.stats.loss_total, 0.0);
        // The stats that are not losses are still reported.
        assert!((out.stats.policy_policykl + 3.0).abs() < 1e-12);
    }

    #[test]
    fn ppo_loss_rejects_mismatched_shapes() {
        let b = batch(3);
        let short = Tensor::zeros((B, T - 1), DType::F64, &Device::Cpu).unwrap();
        let inputs = PpoLossInputs {
            old_logprobs: &b.old_logprobs,
            values: &b.values,
            entropy: &entropy_from_logits(&b.logits).unwrap(),
            vpreds: &short,
            logprobs: &b.old_logprobs,
            mask: &b.mask,
            advantages: &b.advantages,
            returns: &b.returns,
        };
        let err = ppo_loss(&inputs, &PpoLossConfig::default()).unwrap_err();
        assert!(matches!(err, PpoError::Shape { .. }), "{err}");
    }

    /// The gradient of `pg_loss + vf_loss` w.r.t. the new log-probs and value predictions,
    /// against central differences (f64 throughout; the random point is away from the clip
    /// kinks with overwhelming probability, and the check would flag it otherwise).
    #[test]
    fn ppo_loss_gradient_matches_finite_differences() {
        let b = batch(4);
        let mut rng = RngStream::new(5);
        // Some ratios inside the clip range and some outside, to exercise both branches.
        let delta = random(B * T, &mut rng, 0.4);
        let lp0: Vec<f64> = b
            .old_logprobs
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap()
            .iter()
            .zip(&delta)
            .map(|(o, d)| o + d)
            .collect();
        let vp0: Vec<f64> = b
            .values
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap()
            .iter()
            .zip(random(B * T, &mut rng, 0.5))
            .map(|(v, d)| v + d)
            .collect();
        let cfg = PpoLossConfig::default();
        let total = |lp: &[f64], vp: &[f64]| -> f64 {
            let out = run(&b, &t(lp.to_vec()), &t(vp.to_vec()), &cfg);
            scalar(&(out.pg_loss + out.vf_loss).unwrap()).unwrap()
        };
        let lp = Var::from_tensor(&t(lp0.clone())).unwrap();
        let vp = Var::from_tensor(&t(vp0.clone())).unwrap();
        let out = run(&b, lp.as_tensor(), vp.as_tensor(), &cfg);
        let grads = (out.pg_loss + out.vf_loss).unwrap().backward().unwrap();
        let flat = |x: &Var| {
            let g = grads.get(x.as_tensor()).unwrap();
            g.flatten_all().unwrap().to_vec1::<f64>().unwrap()
        };
        let (g_lp, g_vp) = (flat(&lp), flat(&vp));
        let eps = 1e-6;
        for i in 0..B * T {
            let (mut p, mut m) = (lp0.clone(), lp0.clone());
            p[i] += eps;
            m[i] -= eps;
            let fd = (total(&p, &vp0) - total(&m, &vp0)) / (2.0 * eps);
            assert!((g_lp[i] - fd).abs() < 1e-7, "logprobs[{i}]: {} vs {fd}", g_lp[i]);
            let (mut p, mut m) = (vp0.clone(), vp0.clone());
            p[i] += eps;
            m[i] -= eps;
            let fd = (total(&lp0, &p) - total(&lp0, &m)) / (2.0 * eps);
            assert!((g_vp[i] - fd).abs() < 1e-7, "vpreds[{i}]: {} vs {fd}", g_vp[i]);
        }
        // Masked-out tokens get no gradient.
        assert_eq!(g_lp[2], 0.0);
        assert_eq!(g_vp[2], 0.0);
    }
}
