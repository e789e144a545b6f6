//! The GRPO loss family of TRL 1.16 (`GRPOTrainer._compute_loss`) and every metric it logs.
//!
//! Per token, with `logp` the current policy, `old` the sampling policy (`logp.detach()`
//! when `num_iterations == 1`), `ref` the reference, `A` the sequence's advantage and `m`
//! the loss mask:
//! ```text
//! lr  = logp − old
//! lw  = lr                                   importance_sampling_level = "token"
//! lw  = Σ_t m·lr / max(Σ_t m, 1)             "sequence" (GSPO, Zheng et al. 2025), per row
//! w   = exp(lw)
//! dapo | grpo | bnpo | dr_grpo | luspo:  L = −min(w'·A, clip(w, 1−ε_low, 1+ε_high)·A),
//!                                        w' = min(w, δ) when `delta` is set (INTELLECT-2)
//! cispo: L = −min(w, ε_high).detach() · A · logp                        (MiniMax-M1)
//! sapo:  L = −σ(τ(w − 1))·4/τ · A,  τ = τ_pos if A > 0 else τ_neg        (Gao et al. 2025)
//! vespo: L = −φ.detach() · A · logp,  φ = exp(λ + k·lW − λ·e^lW),
//!        lW = clamp(Σ_t m·clamp(lr, ±20), ln 1e-8, 20), (k, λ) = (k_pos, λ_pos) if A ≥ 0
//! β ≠ 0: k3 = e^(ref−logp) − (ref−logp) − 1 (Schulman's k3), ×w with
//!        `use_bias_correction_kl`;  L += β·k3
//! ```
//! Reductions (`GA` = gradient-accumulation steps of the current window):
//! ```text
//! grpo, sapo          mean_i(Σ_t m L / max(Σ_t m, 1)) / GA
//! bnpo                Σ m L / max(Σ m, 1) / GA
//! dr_grpo             Σ m L / (B · max_completion_length) / GA
//! dapo, cispo, vespo  Σ m L / (max(num_items_in_batch, 1) / processes · GA / steps_per_generation)
//! luspo               mean_i(Σ_t m L) / GA
//! ```
//! Rows whose mask is all zero (truncated rows under `mask_truncated_completions`) still
//! count in `B`. TRL's log-probs are 0 at masked positions; inputs are zeroed there too, so
//! values outside the mask never reach the loss.

use candle_core::{DType, Tensor};

use super::stats::{nanmax, nanmin};
use super::{expect_dims, host, zero_outside, Metrics, Result, RlError};
use crate::ppo::logsigmoid;

/// `GRPOConfig.loss_type`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum GrpoLossType {
    /// `"dapo"` (default): token sum over the generation batch's active tokens (Yu et al. 2025).
    #[default]
    Dapo,
    /// `"grpo"`: mean over sequences of the per-sequence token mean (Shao et al. 2024).
    Grpo,
    /// `"bnpo"`: token mean over the local micro-batch.
    Bnpo,
    /// `"dr_grpo"`: token sum over `B · max_completion_length` (Liu et al. 2025).
    DrGrpo,
    /// `"luspo"`: mean over sequences of the per-sequence token sum.
    Luspo,
    /// `"cispo"`: clipped, detached importance weight times the log-prob.
    Cispo,
    /// `"sapo"`: soft, sigmoid-gated importance weight.
    Sapo,
    /// `"vespo"`: Gamma-shaped sequence weight times the log-prob.
    Vespo,
}

impl GrpoLossType {
    /// Parses TRL's name.
    pub fn from_trl_name(name: &str) -> Option<Self> {
        Some(match name {
            "dapo" => Self::Dapo,
            "grpo" => Self::Grpo,
            "bnpo" => Self::Bnpo,
            "dr_grpo" => Self::DrGrpo,
            "luspo" => Self::Luspo,
            "cispo" => Self::Cispo,
            "sapo" => Self::Sapo,
            "vespo" => Self::Vespo,
            _ => return None,
        })
    }

    /// Whether the loss is the clipped-ratio objective (and logs `clip_ratio/*`).
    fn is_clipped(self) -> bool {
        matches!(self, Self::Dapo | Self::Grpo | Self::Bnpo | Self::DrGrpo | Self::Luspo)
    }
}

/// `GRPOConfig.importance_sampling_level`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ImportanceSamplingLevel {
    /// `"token"` (default): one ratio per token.
    #[default]
    Token,
    /// `"sequence"` (GSPO): the geometric mean of a sequence's token ratios, for every token.
    Sequence,
}

impl ImportanceSamplingLevel {
    /// Parses TRL's name.
    pub fn from_trl_name(name: &str) -> Option<Self> {
        match name {
            "token" => Some(Self::Token),
            "sequence" => Some(Self::Sequence),
            _ => None,
        }
    }
}

/// The `GRPOConfig` fields the loss reads, and the run's accumulation layout. [`Default`]
/// is TRL 1.16's `GRPOConfig()` on one process with no accumulation.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GrpoLossConfig {
    /// `loss_type`.
    pub loss_type: GrpoLossType,
    /// `beta`: weight of the k3 KL term; 0 (default) skips it and needs no reference.
    pub beta: f64,
    /// `epsilon` (0.2): lower clip `1 − epsilon`.
    pub epsilon_low: f64,
    /// `epsilon_high`, or `epsilon` when TRL's is `None`: upper clip `1 + epsilon_high`;
    /// for cispo the ratio cap itself (TRL recommends 5.0 there).
    pub epsilon_high: f64,
    /// `delta`: cap of the unclipped ratio (two-sided clipping); `None` by default.
    pub delta: Option<f64>,
    /// `importance_sampling_level`.
    pub importance_sampling_level: ImportanceSamplingLevel,
    /// `use_bias_correction_kl` (true): multiply k3 by the importance weight.
    pub use_bias_correction_kl: bool,
    /// `max_completion_length` (512): dr_grpo's per-row normaliser.
    pub max_completion_length: usize,
    /// `sapo_temperature_pos` (1.0), for `A > 0`.
    pub sapo_temperature_pos: f64,
    /// `sapo_temperature_neg` (1.05), for `A ≤ 0`.
    pub sapo_temperature_neg: f64,
    /// `vespo_k_pos` (2.0).
    pub vespo_k_pos: f64,
    /// `vespo_lambda_pos` (3.0).
    pub vespo_lambda_pos: f64,
    /// `vespo_k_neg` (3.0).
    pub vespo_k_neg: f64,
    /// `vespo_lambda_neg` (2.0).
    pub vespo_lambda_neg: f64,
    /// Trainer's `current_gradient_accumulation_steps` (1 in evaluation).
    pub gradient_accumulation_steps: usize,
    /// `steps_per_generation` (defaults to `gradient_accumulation_steps`; 1 in evaluation).
    pub steps_per_generation: usize,
    /// Number of data-parallel processes.
    pub num_processes: usize,
}

impl Default for GrpoLossConfig {
    fn default() -> Self {
        Self {
            loss_type: GrpoLossType::Dapo,
            beta: 0.0,
            epsilon_low: 0.2,
            epsilon_high: 0.2,
            delta: None,
            importance_sampling_level: ImportanceSamplingLevel::Token,
            use_bias_correction_kl: true,
            max_completion_length: 512,
            sapo_temperature_pos: 1.0,
            sapo_temperature_neg: 1.05,
            vespo_k_pos: 2.0,
            vespo_lambda_pos: 3.0,
            vespo_k_neg: 3.0,
            vespo_lambda_neg: 2.0,
            gradient_accumulation_steps: 1,
            steps_per_generation: 1,
            num_processes: 1,
        }
    }
}

impl GrpoLossConfig {
    /// Checks the ranges TRL would turn into NaN or a division by zero.
    ///
    /// # Errors
    /// [`RlError::Config`] naming the field.
    pub fn validate(&self) -> Result<()> {
        let bad = |field: &'static str, msg: String| Err(RlError::Config { field, msg });
        if !self.beta.is_finite() {
            return bad("beta", format!("{} is not finite", self.beta));
        }
        if !(self.epsilon_low.is_finite() && self.epsilon_high.is_finite() && self.epsilon_high >= 0.0) {
            return bad(
                "epsilon",
                format!(
                    "epsilon {} / epsilon_high {} must be finite, epsilon_high >= 0",
                    self.epsilon_low, self.epsilon_high
                ),
            );
        }
        if self.delta.is_some_and(|d| !(d.is_finite() && d > 0.0)) {
            return bad("delta", format!("{:?} must be a positive number or None", self.delta));
        }
        for (field, v) in [
            ("gradient_accumulation_steps", self.gradient_accumulation_steps),
            ("steps_per_generation", self.steps_per_generation),
            ("num_processes", self.num_processes),
            ("max_completion_length", self.max_completion_length),
        ] {
            if v == 0 {
                return bad(field, "must be at least 1".into());
            }
        }
        for (field, v) in [
            ("sapo_temperature_pos", self.sapo_temperature_pos),
            ("sapo_temperature_neg", self.sapo_temperature_neg),
        ] {
            if !(v.is_finite() && v > 0.0) {
                return bad(field, format!("{v} must be positive"));
            }
        }
        Ok(())
    }
}

/// One micro-batch's tensors. Per-token tensors are `(B, T)` over the completion tokens
/// and line up with the completion ids; log-probs are at the sampling temperature.
#[derive(Clone, Copy, Debug)]
pub struct GrpoLossInputs<'a> {
    /// Current policy log-probs, differentiable.
    pub logps: &'a Tensor,
    /// `old_per_token_logps` of the sampling policy, or `None` when TRL skips them
    /// (`num_iterations == 1` and `steps_per_generation <= gradient_accumulation_steps`):
    /// then `old = logps.detach()` and every ratio is 1.
    pub old_logps: Option<&'a Tensor>,
    /// Reference log-probs; required when `beta != 0`.
    pub ref_logps: Option<&'a Tensor>,
    /// Per-sequence advantages `(B)`.
    pub advantages: &'a Tensor,
    /// Loss mask `(B, T)`: the completion mask (zero after the first EOS, and on truncated
    /// rows under `mask_truncated_completions`).
    pub mask: &'a Tensor,
    /// Per-token entropy of the current policy (only the `entropy` metric reads it).
    pub entropy: &'a Tensor,
    /// `num_items_in_batch`: the loss mask's sum over the whole generation batch and all
    /// processes (dapo, cispo and vespo divide by it).
    pub num_items_in_batch: f64,
}

/// The loss and the metrics `_compute_loss` logs.
#[derive(Clone, Debug)]
pub struct GrpoLoss {
    /// The scalar to call `backward` on (already divided for gradient accumulation).
    pub loss: Tensor,
    /// `entropy`, `kl` (β ≠ 0), `clip_ratio/{low_mean,low_min,high_mean,high_max,
    /// region_mean}` (clipped types), `cispo_clip_ratio` or `vespo/phi_seq_mean`.
    pub metrics: Metrics,
}

/// The GRPO loss and its metrics (formulas in the module docs).
///
/// # Errors
/// [`RlError::Config`] for an invalid config or `beta != 0` without `ref_logps`;
/// [`RlError::Shape`] when the tensors are not `(B, T)` / `(B)`.
///
/// # Shapes
/// Per-token inputs `(B, T)`, `advantages` `(B)` → a scalar loss.
pub fn grpo_loss(inputs: &GrpoLossInputs<'_>, cfg: &GrpoLossConfig) -> Result<GrpoLoss> {
    cfg.validate()?;
    let (b, t) = inputs.logps.dims2()?;
    let dt = inputs.logps.dtype();
    check_inputs(inputs, b, t)?;
    let mask = inputs.mask.to_dtype(dt)?.detach();
    let clean = |x: &Tensor| zero_outside(&mask, x);
    let logps = clean(inputs.logps)?;
    let old = match inputs.old_logps {
        Some(o) => clean(&o.detach())?,
        None => logps.detach(),
    };
    let adv = inputs.advantages.to_dtype(dt)?.detach().reshape((b, 1))?;

    // 1. importance weights w: (B, T) per token, or (B, 1) per sequence.
    let log_ratio = (&logps - &old)?;
    let log_w = match cfg.importance_sampling_level {
        ImportanceSamplingLevel::Token => log_ratio.clone(),
        ImportanceSamplingLevel::Sequence => (&log_ratio * &mask)?
            .sum_keepdim(1)?
            .div(&mask.sum_keepdim(1)?.clamp(1.0, f64::INFINITY)?)?,
    };
    let coef_1 = log_w.exp()?;

    // 2. the k3 KL to the reference, (B, T).
    let per_token_kl = if cfg.beta != 0.0 {
        let r = inputs.ref_logps.ok_or_else(|| RlError::Config {
            field: "beta",
            msg: format!(
                "beta = {} needs the reference log-probs\nhint: pass `ref_logps`, or set beta = 0",
                cfg.beta
            ),
        })?;
        let d = (clean(&r.detach())? - &logps)?;
        let k3 = ((d.exp()? - &d)? - 1.0)?;
        Some(if cfg.use_bias_correction_kl {
            k3.broadcast_mul(&coef_1)?
        } else {
            k3
        })
    } else {
        None
    };

    // 3. the policy term, plus the KL, reduced per loss type.
    let policy = policy_term(&logps, &log_ratio, &coef_1, &adv, &mask, cfg)?;
    let per_token_loss = match &per_token_kl {
        Some(kl) => policy.per_token_loss.broadcast_add(&kl.affine(cfg.beta, 0.0)?)?,
        None => policy.per_token_loss.clone(),
    };
    let masked = per_token_loss.broadcast_mul(&mask)?;
    let loss = reduce(&masked, &mask, inputs.num_items_in_batch, cfg)?;

    // 4. metrics, on the host in f64 from the tensors' own values.
    let mask_h = host(&mask)?;
    let mut metrics = Metrics::new();
    if let Some(kl) = &per_token_kl {
        metrics.insert("kl".into(), token_mean(&host(kl)?, &mask_h));
    }
    let entropy = host(&inputs.entropy.to_dtype(dt)?)?;
    metrics.insert("entropy".into(), token_mean(&entropy, &mask_h));
    ratio_metrics(&policy, &host(&adv)?, &mask_h, t, cfg, dt == DType::F32, &mut metrics)?;
    Ok(GrpoLoss { loss, metrics })
}

/// The policy part of the per-token loss and what its metrics read.
struct PolicyTerm {
    /// `L` without the KL: `(B, T)`, or `(B, 1)` for sapo / clipped types per sequence.
    per_token_loss: Tensor,
    /// The importance weight the clip metrics compare (delta-capped for clipped types).
    weight: Tensor,
    /// VESPO's detached sequence weight `(B, 1)`.
    phi: Option<Tensor>,
}

/// The per-token policy loss of each loss type (module docs).
fn policy_term(
    logps: &Tensor,
    log_ratio: &Tensor,
    coef_1: &Tensor,
    adv: &Tensor,
    mask: &Tensor,
    cfg: &GrpoLossConfig,
) -> Result<PolicyTerm> {
    let mut phi = None;
    let (per_token_loss, weight) = match cfg.loss_type {
        GrpoLossType::Cispo => {
            let capped = coef_1.minimum(cfg.epsilon_high)?.detach();
            let loss = capped.broadcast_mul(adv)?.broadcast_mul(logps)?.neg()?;
            (loss, coef_1.clone())
        }
        GrpoLossType::Sapo => {
            let tau: Vec<f64> = host(adv)?
                .iter()
                .map(|&a| {
                    if a > 0.0 {
                        cfg.sapo_temperature_pos
                    } else {
                        cfg.sapo_temperature_neg
                    }
                })
                .collect();
            let rows = tau.len();
            let tau = Tensor::from_vec(tau, (rows, 1), adv.device())?.to_dtype(adv.dtype())?;
            let x = (coef_1 - 1.0)?.broadcast_mul(&tau)?;
            // σ(x) as exp(logσ(x)): finite and differentiable for any ratio.
            let soft = logsigmoid(&x)?.exp()?.broadcast_div(&tau)?.affine(4.0, 0.0)?;
            (soft.broadcast_mul(adv)?.neg()?, coef_1.clone())
        }
        GrpoLossType::Vespo => {
            let w = vespo_phi(log_ratio, mask, &host(adv)?, cfg)?;
            let loss = w.broadcast_mul(adv)?.broadcast_mul(logps)?.neg()?;
            phi = Some(w);
            (loss, coef_1.clone())
        }
        _ => {
            let coef_2 = coef_1.clamp(1.0 - cfg.epsilon_low, 1.0 + cfg.epsilon_high)?;
            let coef_1 = match cfg.delta {
                Some(delta) => coef_1.minimum(delta)?,
                None => coef_1.clone(),
            };
            let unclipped = coef_1.broadcast_mul(adv)?;
            let clipped = coef_2.broadcast_mul(adv)?;
            (unclipped.minimum(&clipped)?.neg()?, coef_1)
        }
    };
    Ok(PolicyTerm {
        per_token_loss,
        weight,
        phi,
    })
}

/// The clip (or cispo / vespo) metrics. Bounds are compared in the tensors' precision
/// (`f32`: the bound rounded to f32, as torch compares a tensor with a Python float).
fn ratio_metrics(
    policy: &PolicyTerm,
    adv: &[f64],
    mask: &[f64],
    t: usize,
    cfg: &GrpoLossConfig,
    f32_bounds: bool,
    metrics: &mut Metrics,
) -> Result<()> {
    let round = |x: f64| if f32_bounds { x as f32 as f64 } else { x };
    let per_token = cfg.importance_sampling_level == ImportanceSamplingLevel::Token;
    let cols = if per_token { t } else { 1 };
    let w = host(&policy.weight)?;
    // One 0/1 flag per weight: per token, or per sequence.
    let flags = |f: &dyn Fn(f64, f64) -> bool| -> Vec<f64> {
        w.iter()
            .enumerate()
            .map(|(k, &w)| f64::from(u8::from(f(w, adv[k / cols]))))
            .collect()
    };
    if cfg.loss_type.is_clipped() {
        let (lo, hi) = (round(1.0 - cfg.epsilon_low), round(1.0 + cfg.epsilon_high));
        let low = flags(&|w, a| w < lo && a < 0.0);
        let high = flags(&|w, a| w > hi && a > 0.0);
        let region: Vec<f64> = low.iter().zip(&high).map(|(l, h)| l.max(*h)).collect();
        let mean = |x: &[f64]| global_mean(x, mask, per_token);
        metrics.insert("clip_ratio/low_mean".into(), mean(&low));
        metrics.insert("clip_ratio/high_mean".into(), mean(&high));
        metrics.insert("clip_ratio/region_mean".into(), mean(&region));
        let low_min = nanmin(&row_means(&low, mask, per_token, t));
        let high_max = nanmax(&row_means(&high, mask, per_token, t));
        metrics.insert("clip_ratio/low_min".into(), low_min);
        metrics.insert("clip_ratio/high_max".into(), high_max);
    } else if cfg.loss_type == GrpoLossType::Cispo {
        let cap = round(cfg.epsilon_high);
        let clipped = flags(&|w, a| w > cap && a > 0.0);
        metrics.insert("cispo_clip_ratio".into(), global_mean(&clipped, mask, per_token));
    } else if let Some(phi) = &policy.phi {
        let phi = host(phi)?;
        metrics.insert("vespo/phi_seq_mean".into(), phi.iter().sum::<f64>() / phi.len() as f64);
    }
    Ok(())
}

/// Checks every input against the `(B, T)` of `logps`.
fn check_inputs(inputs: &GrpoLossInputs<'_>, b: usize, t: usize) -> Result<()> {
    const F: &str = "grpo_loss";
    expect_dims(F, "mask", inputs.mask, &[b, t])?;
    expect_dims(F, "entropy", inputs.entropy, &[b, t])?;
    expect_dims(F, "advantages", inputs.advantages, &[b])?;
    if let Some(o) = inputs.old_logps {
        expect_dims(F, "old_logps", o, &[b, t])?;
    }
    if let Some(r) = inputs.ref_logps {
        expect_dims(F, "ref_logps", r, &[b, t])?;
    }
    Ok(())
}

/// VESPO's detached sequence weight `φ (B, 1)` (TRL `get_gamma_weights`, without a vLLM
/// importance-sampling ratio), computed on the host in f64.
fn vespo_phi(log_ratio: &Tensor, mask: &Tensor, adv: &[f64], cfg: &GrpoLossConfig) -> Result<Tensor> {
    let (b, t) = log_ratio.dims2()?;
    let (lr, m) = (host(log_ratio)?, host(mask)?);
    let lower = 1e-8f64.ln();
    let phi: Vec<f64> = (0..b)
        .map(|i| {
            let seq: f64 = (0..t).map(|j| lr[i * t + j].clamp(-20.0, 20.0) * m[i * t + j]).sum();
            let log_w = seq.clamp(lower, 20.0);
            let (k, lambda) = if adv[i] >= 0.0 {
                (cfg.vespo_k_pos, cfg.vespo_lambda_pos)
            } else {
                (cfg.vespo_k_neg, cfg.vespo_lambda_neg)
            };
            let lambda = lambda.max(1e-4);
            let phi = (lambda + k * log_w - lambda * log_w.exp()).exp();
            if phi.is_finite() {
                phi
            } else {
                0.0
            }
        })
        .collect();
    Ok(Tensor::from_vec(phi, (b, 1), log_ratio.device())?.to_dtype(log_ratio.dtype())?)
}

/// The loss-type reduction of the masked per-token loss `masked = L·m` (module docs).
fn reduce(masked: &Tensor, mask: &Tensor, num_items_in_batch: f64, cfg: &GrpoLossConfig) -> Result<Tensor> {
    let (b, _) = masked.dims2()?;
    let ga = cfg.gradient_accumulation_steps as f64;
    let loss = match cfg.loss_type {
        GrpoLossType::Grpo | GrpoLossType::Sapo => {
            let rows = mask.sum(1)?.clamp(1.0, f64::INFINITY)?;
            (masked.sum(1)? / rows)?.mean(0)?.affine(1.0 / ga, 0.0)?
        }
        GrpoLossType::Bnpo => {
            let n = mask.sum_all()?.clamp(1.0, f64::INFINITY)?;
            (masked.sum_all()? / n)?.affine(1.0 / ga, 0.0)?
        }
        GrpoLossType::DrGrpo => masked
            .sum_all()?
            .affine(1.0 / (b as f64 * cfg.max_completion_length as f64 * ga), 0.0)?,
        GrpoLossType::Dapo | GrpoLossType::Cispo | GrpoLossType::Vespo => {
            let normalizer =
                num_items_in_batch.max(1.0) / cfg.num_processes as f64 * ga / cfg.steps_per_generation as f64;
            masked.sum_all()?.affine(1.0 / normalizer, 0.0)?
        }
        GrpoLossType::Luspo => masked.sum(1)?.mean(0)?.affine(1.0 / ga, 0.0)?,
    };
    Ok(loss)
}

/// `Σ m x / max(Σ m, 1)` over `(B, T)` host values.
fn token_mean(x: &[f64], mask: &[f64]) -> f64 {
    debug_assert_eq!(x.len(), mask.len());
    let n: f64 = mask.iter().sum();
    x.iter().zip(mask).map(|(v, m)| v * m).sum::<f64>() / n.max(1.0)
}

/// TRL's `global_masked_mean`: the token mean of `(B, T)` values (`per_token`), the row
/// mean of per-sequence `(B, 1)` values.
fn global_mean(x: &[f64], mask: &[f64], per_token: bool) -> f64 {
    if per_token {
        token_mean(x, mask)
    } else {
        x.iter().sum::<f64>() / (x.len() as f64).max(1.0)
    }
}

/// TRL's `masked_seq_mean`: per row `Σ_t m x / Σ_t m` (NaN for an all-masked row) of
/// `(B, T)` values, or the per-sequence values themselves.
fn row_means(x: &[f64], mask: &[f64], per_token: bool, t: usize) -> Vec<f64> {
    if !per_token {
        return x.to_vec();
    }
    x.chunks(t)
        .zip(mask.chunks(t))
        .map(|(xr, mr)| xr.iter().zip(mr).map(|(v, m)| v * m).sum::<f64>() / mr.iter().sum::<f64>())
        .collect()
}

#[cfg(test)]
mod tests;
