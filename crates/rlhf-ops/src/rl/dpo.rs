//! The DPO losses and metrics of TRL 1.16 (`DPOTrainer._compute_loss`; Rafailov et al.
//! 2023, arXiv 2305.18290, and the variants named per loss type).
//!
//! A batch holds `2N` rows: chosen `0..N`, rejected `N..2N` (the collator's order). The
//! per-token log-probs are `(2N, L − 1)`, column `t` scoring `input_ids[:, t + 1]`
//! (`shift_completion_mask = completion_mask[:, 1:]`); they are **summed** over the
//! completion tokens and taken without temperature.
//! ```text
//! cl = logp_c − ref_c,  rl = logp_r − ref_r,  Δ = cl − rl          (f_divergence "reverse_kl")
//! sigmoid −logσ(βΔ)               hinge relu(1 − βΔ)
//! ipo     (cl/n_c − rl/n_r − 1/(2β))²        n = completion_mask row sum (unshifted), ≥ 1
//! robust  (−(1−ls)·logσ(βΔ) + ls·logσ(−βΔ)) / (1 − 2ls)
//! exo_pair σ(βΔ)(logσ(βΔ) − log(1−ls)) + σ(−βΔ)(logσ(−βΔ) − log ls)
//! nca_pair −logσ(β cl) − ½logσ(−β cl) − ½logσ(−β rl)
//! bco_pair −logσ(β cl) − logσ(−β rl)          sppo_hard (cl − 1/(2β))² + (rl + 1/(2β))²
//! aot     the sigmoid/robust form on Δ_sorted = sort(logp_c − logp_r) − sort(ref_c − ref_r)
//! aot_unpaired  the same on sort(cl) − sort(rl)
//! apo_zero 1 − σ(β cl) + σ(β rl)               apo_down σ(β cl) + 1 − σ(βΔ)
//! discopop −logσ(βΔ)·(1 − σ(βΔ/τ)) + e^(−βΔ)·σ(βΔ/τ)
//! sft      mean NLL over the chosen completion tokens
//! sigmoid_norm −logσ(β(cl/n_c − rl/n_r))
//! loss = Σ_types weight · mean_rows(per-row loss)
//! ```
//! `label_smoothing` enters robust, exo_pair, aot and aot_unpaired only (sigmoid ignores it).

use candle_core::Tensor;

use super::{expect_dims, host, zero_outside, Metrics, Result, RlError};
use crate::ppo::logsigmoid;

/// One entry of `DPOConfig.loss_type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DpoLossType {
    /// `"sigmoid"` (default): DPO.
    Sigmoid,
    /// `"hinge"`: SLiC (Zhao et al. 2023).
    Hinge,
    /// `"ipo"`: IPO (Azar et al. 2023), length-normalised as TRL.
    Ipo,
    /// `"exo_pair"`: EXO (Ji et al. 2024); needs `label_smoothing > 0`.
    ExoPair,
    /// `"nca_pair"`: NCA (Chen et al. 2024).
    NcaPair,
    /// `"robust"`: robust DPO (Chowdhury et al. 2024).
    Robust,
    /// `"bco_pair"`: BCO on pairs (Jung et al. 2024), without the running reward shift.
    BcoPair,
    /// `"sppo_hard"`: SPPO with hard labels (Wu et al. 2024).
    SppoHard,
    /// `"aot"`: alignment via optimal transport, paired (Melnyk et al. 2024).
    Aot,
    /// `"aot_unpaired"`: AOT, unpaired.
    AotUnpaired,
    /// `"apo_zero"`: anchored preference optimisation (D'Oosterlinck et al. 2024).
    ApoZero,
    /// `"apo_down"`: APO, chosen worse than the model's own outputs.
    ApoDown,
    /// `"discopop"`: DiscoPOP (Chris Lu et al. 2024).
    Discopop,
    /// `"sft"`: negative log-likelihood of the chosen completions.
    Sft,
    /// `"sigmoid_norm"`: DPO on length-normalised log-ratios.
    SigmoidNorm,
}

impl DpoLossType {
    /// Parses TRL's name.
    pub fn from_trl_name(name: &str) -> Option<Self> {
        use DpoLossType::*;
        Some(match name {
            "sigmoid" => Sigmoid,
            "hinge" => Hinge,
            "ipo" => Ipo,
            "exo_pair" => ExoPair,
            "nca_pair" => NcaPair,
            "robust" => Robust,
            "bco_pair" => BcoPair,
            "sppo_hard" => SppoHard,
            "aot" => Aot,
            "aot_unpaired" => AotUnpaired,
            "apo_zero" => ApoZero,
            "apo_down" => ApoDown,
            "discopop" => Discopop,
            "sft" => Sft,
            "sigmoid_norm" => SigmoidNorm,
            _ => return None,
        })
    }
}

/// The `DPOConfig` fields the loss reads ([`Default`]: TRL 1.16's).
#[derive(Clone, Debug, PartialEq)]
pub struct DpoLossConfig {
    /// `loss_type`: one or more losses, summed with `loss_weights`.
    pub loss_types: Vec<DpoLossType>,
    /// `loss_weights`: one per loss type; `None` means all 1.0.
    pub loss_weights: Option<Vec<f64>>,
    /// `beta` (0.1); for ipo the regulariser τ.
    pub beta: f64,
    /// `label_smoothing` (0.0): the assumed label-noise rate.
    pub label_smoothing: f64,
    /// `discopop_tau` (0.05).
    pub discopop_tau: f64,
}

impl Default for DpoLossConfig {
    fn default() -> Self {
        Self {
            loss_types: vec![DpoLossType::Sigmoid],
            loss_weights: None,
            beta: 0.1,
            label_smoothing: 0.0,
            discopop_tau: 0.05,
        }
    }
}

impl DpoLossConfig {
    /// The `(type, weight)` pairs after validation.
    ///
    /// # Errors
    /// [`RlError::Config`] for an empty list, a weight count that differs from the type
    /// count, a non-finite β (or β = 0 for ipo / sppo_hard, which divide by it), a
    /// label smoothing outside `(0, 1)` for exo_pair or `[0, 0.5)` for robust (TRL
    /// only warns there; 0.5 divides by zero).
    pub fn weighted_types(&self) -> Result<Vec<(DpoLossType, f64)>> {
        let bad = |field: &'static str, msg: String| Err(RlError::Config { field, msg });
        if self.loss_types.is_empty() {
            return bad("loss_type", "is empty\nhint: TRL's default is [\"sigmoid\"]".into());
        }
        let weights = match &self.loss_weights {
            Some(w) if w.len() != self.loss_types.len() => {
                return bad(
                    "loss_weights",
                    format!(
                        "has {} weights for {} loss types; give one weight per type",
                        w.len(),
                        self.loss_types.len()
                    ),
                )
            }
            Some(w) => w.clone(),
            None => vec![1.0; self.loss_types.len()],
        };
        let has = |t| self.loss_types.contains(&t);
        if !self.beta.is_finite() || ((has(DpoLossType::Ipo) || has(DpoLossType::SppoHard)) && self.beta == 0.0) {
            return bad(
                "beta",
                format!("{} is not usable here; ipo and sppo_hard divide by it", self.beta),
            );
        }
        let ls = self.label_smoothing;
        if has(DpoLossType::ExoPair) && !(ls > 0.0 && ls < 1.0) {
            return bad(
                "label_smoothing",
                format!("{ls}: exo_pair needs 0 < ls < 1 (the EXO paper uses 1e-3)"),
            );
        }
        if has(DpoLossType::Robust) && !(0.0..0.5).contains(&ls) {
            return bad("label_smoothing", format!("{ls}: robust needs 0 <= ls < 0.5"));
        }
        if has(DpoLossType::Discopop) && !(self.discopop_tau.is_finite() && self.discopop_tau > 0.0) {
            return bad("discopop_tau", format!("{} must be positive", self.discopop_tau));
        }
        Ok(self.loss_types.iter().copied().zip(weights).collect())
    }
}

/// Where the reference log-probs come from.
#[derive(Clone, Copy, Debug)]
pub enum DpoReference<'a> {
    /// Per-token reference log-probs `(2N, L − 1)` from a reference forward.
    PerToken(&'a Tensor),
    /// Precomputed summed log-probs (`precompute_ref_log_probs`): `(N)` each.
    Summed {
        /// `ref_chosen_logps`.
        chosen: &'a Tensor,
        /// `ref_rejected_logps`.
        rejected: &'a Tensor,
    },
}

/// The tensors of one DPO batch.
#[derive(Clone, Copy, Debug)]
pub struct DpoLossInputs<'a> {
    /// Policy per-token log-probs `(2N, L − 1)`, differentiable.
    pub policy_logps: &'a Tensor,
    /// The reference.
    pub reference: DpoReference<'a>,
    /// The collator's `completion_mask` `(2N, L)` (unshifted).
    pub completion_mask: &'a Tensor,
}

/// The loss and the metrics computed from log-probs.
#[derive(Clone, Debug)]
pub struct DpoLoss {
    /// The scalar to call `backward` on.
    pub loss: Tensor,
    /// `rewards/{chosen,rejected,accuracies,margins}` and `logps/{chosen,rejected}`.
    pub metrics: Metrics,
}

/// The DPO loss (module docs) and its reward / log-prob metrics: `rewards/chosen` =
/// mean `β·cl`, `rewards/rejected` = mean `β·rl`, `rewards/accuracies` = mean
/// `[β·cl > β·rl]`, `rewards/margins` = mean `β(cl − rl)`, `logps/*` = mean summed policy
/// log-probs.
///
/// # Errors
/// [`RlError::Config`] from [`DpoLossConfig::weighted_types`]; [`RlError::Shape`] when the
/// rows are odd in number or the tensors disagree.
///
/// # Shapes
/// See [`DpoLossInputs`] → a scalar.
pub fn dpo_loss(inputs: &DpoLossInputs<'_>, cfg: &DpoLossConfig) -> Result<DpoLoss> {
    const F: &str = "dpo_loss";
    let types = cfg.weighted_types()?;
    let (rows, cols) = inputs.policy_logps.dims2()?;
    if rows == 0 || rows % 2 != 0 {
        return Err(RlError::Shape {
            function: F,
            msg: format!("{rows} rows; expected 2N > 0 (chosen rows, then rejected rows)"),
        });
    }
    let n = rows / 2;
    expect_dims(F, "completion_mask", inputs.completion_mask, &[rows, cols + 1])?;
    let dt = inputs.policy_logps.dtype();
    let cmask = inputs.completion_mask.to_dtype(dt)?.detach();
    let shift = cmask.narrow(1, 1, cols)?;
    let policy = zero_outside(&shift, inputs.policy_logps)?;
    let logps = policy.sum(1)?;
    let (chosen, rejected) = (logps.narrow(0, 0, n)?, logps.narrow(0, n, n)?);
    let (ref_c, ref_r) = match inputs.reference {
        DpoReference::PerToken(r) => {
            expect_dims(F, "reference", r, &[rows, cols])?;
            let s = zero_outside(&shift, &r.detach())?.sum(1)?;
            (s.narrow(0, 0, n)?, s.narrow(0, n, n)?)
        }
        DpoReference::Summed { chosen, rejected } => {
            expect_dims(F, "reference chosen", chosen, &[n])?;
            expect_dims(F, "reference rejected", rejected, &[n])?;
            (chosen.to_dtype(dt)?.detach(), rejected.to_dtype(dt)?.detach())
        }
    };
    let cl = (&chosen - &ref_c)?;
    let rl = (&rejected - &ref_r)?;
    let delta = (&cl - &rl)?;
    let lengths = cmask.sum(1)?.clamp(1.0, f64::INFINITY)?;
    let (n_c, n_r) = (lengths.narrow(0, 0, n)?, lengths.narrow(0, n, n)?);

    let ctx = Ctx {
        cfg,
        cl: &cl,
        rl: &rl,
        delta: &delta,
        n_c: &n_c,
        n_r: &n_r,
        chosen: &chosen,
        rejected: &rejected,
        ref_c: &ref_c,
        ref_r: &ref_r,
        chosen_tokens: (&policy.narrow(0, 0, n)?, &shift.narrow(0, 0, n)?),
    };
    let mut loss: Option<Tensor> = None;
    for (ty, weight) in types {
        let term = ctx.per_row(ty)?.mean(0)?.affine(weight, 0.0)?;
        loss = Some(match loss {
            Some(l) => (l + term)?,
            None => term,
        });
    }
    let loss = loss.expect("invariant: weighted_types returns at least one loss type");

    // Metrics in the batch's dtype, as TRL's `beta * logratios` and strict comparison.
    let rc = host(&cl.affine(cfg.beta, 0.0)?)?;
    let rj = host(&rl.affine(cfg.beta, 0.0)?)?;
    let mean = |x: &[f64]| x.iter().sum::<f64>() / x.len() as f64;
    let acc: Vec<f64> = rc.iter().zip(&rj).map(|(c, r)| f64::from(u8::from(c > r))).collect();
    let margins: Vec<f64> = rc.iter().zip(&rj).map(|(c, r)| c - r).collect();
    let mut metrics = Metrics::new();
    metrics.insert("rewards/chosen".into(), mean(&rc));
    metrics.insert("rewards/rejected".into(), mean(&rj));
    metrics.insert("rewards/accuracies".into(), mean(&acc));
    metrics.insert("rewards/margins".into(), mean(&margins));
    metrics.insert("logps/chosen".into(), mean(&host(&chosen)?));
    metrics.insert("logps/rejected".into(), mean(&host(&rejected)?));
    Ok(DpoLoss { loss, metrics })
}

/// The per-row quantities every loss type reads, all `(N)`.
struct Ctx<'a> {
    cfg: &'a DpoLossConfig,
    cl: &'a Tensor,
    rl: &'a Tensor,
    delta: &'a Tensor,
    n_c: &'a Tensor,
    n_r: &'a Tensor,
    chosen: &'a Tensor,
    rejected: &'a Tensor,
    ref_c: &'a Tensor,
    ref_r: &'a Tensor,
    /// The chosen rows' per-token log-probs `(N, L − 1)` and shifted completion mask.
    chosen_tokens: (&'a Tensor, &'a Tensor),
}

/// `σ(x)` as `exp(logσ(x))`: finite and differentiable everywhere.
fn sigmoid(x: &Tensor) -> Result<Tensor> {
    Ok(logsigmoid(x)?.exp()?)
}

/// `−(1 − ls)·logσ(βx) − ls·logσ(−βx)`: the smoothed logistic loss of aot / aot_unpaired.
fn smoothed_logistic(x: &Tensor, beta: f64, ls: f64) -> Result<Tensor> {
    let bx = x.affine(beta, 0.0)?;
    let pos = logsigmoid(&bx)?.affine(-(1.0 - ls), 0.0)?;
    let neg = logsigmoid(&bx.neg()?)?.affine(-ls, 0.0)?;
    Ok((pos + neg)?)
}

/// `x` sorted ascending, differentiably (`torch.sort` values: a gather by the host's order).
fn sorted(x: &Tensor) -> Result<Tensor> {
    let v = host(x)?;
    let mut idx: Vec<u32> = (0..v.len() as u32).collect();
    idx.sort_by(|&a, &b| v[a as usize].total_cmp(&v[b as usize]));
    let idx = Tensor::from_vec(idx, v.len(), x.device())?;
    Ok(x.index_select(&idx, 0)?)
}

impl Ctx<'_> {
    /// The per-row loss of one type (every type but sft).
    fn per_row(&self, ty: DpoLossType) -> Result<Tensor> {
        let beta = self.cfg.beta;
        let ls = self.cfg.label_smoothing;
        let b = |x: &Tensor| x.affine(beta, 0.0);
        let bd = b(self.delta)?;
        Ok(match ty {
            DpoLossType::Sigmoid => logsigmoid(&bd)?.neg()?,
            DpoLossType::Hinge => (bd.affine(-1.0, 1.0)?).relu()?,
            DpoLossType::Ipo => {
                let d = (self.cl.div(self.n_c)? - self.rl.div(self.n_r)?)?;
                (d - 1.0 / (2.0 * beta))?.sqr()?
            }
            DpoLossType::ExoPair => {
                let (qw, lqw) = (sigmoid(&bd)?, logsigmoid(&bd)?);
                let (ql, lql) = (sigmoid(&bd.neg()?)?, logsigmoid(&bd.neg()?)?);
                let w = (qw * (lqw - (1.0 - ls).ln())?)?;
                let l = (ql * (lql - ls.ln())?)?;
                (w + l)?
            }
            DpoLossType::NcaPair => {
                let (c, r) = (b(self.cl)?, b(self.rl)?);
                let a = logsigmoid(&c)?.neg()?;
                let bb = logsigmoid(&c.neg()?)?.affine(-0.5, 0.0)?;
                let cc = logsigmoid(&r.neg()?)?.affine(-0.5, 0.0)?;
                ((a + bb)? + cc)?
            }
            DpoLossType::Robust => {
                let clean = logsigmoid(&bd)?.affine(-(1.0 - ls), 0.0)?;
                let flipped = logsigmoid(&bd.neg()?)?.affine(-ls, 0.0)?;
                (clean - flipped)?.affine(1.0 / (1.0 - 2.0 * ls), 0.0)?
            }
            DpoLossType::BcoPair => {
                let c = logsigmoid(&b(self.cl)?)?;
                let r = logsigmoid(&b(self.rl)?.neg()?)?;
                (c + r)?.neg()?
            }
            DpoLossType::SppoHard => {
                let w = (self.cl - 0.5 / beta)?.sqr()?;
                let l = (self.rl + 0.5 / beta)?.sqr()?;
                (w + l)?
            }
            DpoLossType::Aot => {
                let logratios = sorted(&(self.chosen - self.rejected)?)?;
                let ref_logratios = sorted(&(self.ref_c - self.ref_r)?)?;
                smoothed_logistic(&(logratios - ref_logratios)?, beta, ls)?
            }
            DpoLossType::AotUnpaired => {
                let d = (sorted(self.cl)? - sorted(self.rl)?)?;
                smoothed_logistic(&d, beta, ls)?
            }
            DpoLossType::ApoZero => {
                let c = sigmoid(&b(self.cl)?)?.affine(-1.0, 1.0)?;
                (c + sigmoid(&b(self.rl)?)?)?
            }
            DpoLossType::ApoDown => {
                let c = sigmoid(&b(self.cl)?)?;
                (c + sigmoid(&bd)?.affine(-1.0, 1.0)?)?
            }
            DpoLossType::Discopop => {
                let m = sigmoid(&bd.affine(1.0 / self.cfg.discopop_tau, 0.0)?)?;
                let logistic = logsigmoid(&bd)?.neg()?;
                let exp = bd.neg()?.exp()?;
                ((logistic * m.affine(-1.0, 1.0)?)? + (exp * m)?)?
            }
            DpoLossType::SigmoidNorm => {
                let d = (self.cl.div(self.n_c)? - self.rl.div(self.n_r)?)?;
                logsigmoid(&b(&d)?)?.neg()?
            }
            DpoLossType::Sft => {
                // A token mean over the whole chosen half, repeated per row (TRL expands
                // the scalar so that the row mean gives it back).
                let (lp, m) = self.chosen_tokens;
                let nll = lp.mul(m)?.sum_all()?.neg()?.div(&m.sum_all()?)?;
                nll.broadcast_as(self.cl.dims())?
            }
        })
    }
}

/// The per-token model outputs behind DPO's remaining metrics, each `(2N, L − 1)` and
/// aligned with the log-probs (column `t` is the prediction of `input_ids[:, t + 1]`).
#[derive(Clone, Copy, Debug)]
pub struct DpoTokenOutputs<'a> {
    /// Entropy of the policy's next-token distribution.
    pub entropy: &'a Tensor,
    /// Mean over the vocabulary of the policy's logits ([`mean_logits_from_hidden`]).
    pub mean_logits: &'a Tensor,
    /// 1 where the policy's argmax is the label ([`top1_matches`]), else 0.
    pub is_top1: &'a Tensor,
    /// The collator's `completion_mask` `(2N, L)`.
    pub completion_mask: &'a Tensor,
    /// The collator's `attention_mask` `(2N, L)`.
    pub attention_mask: &'a Tensor,
}

/// DPO's token-level metrics: `entropy` (token mean over every completion token, chosen
/// and rejected; 0 without tokens), `num_tokens` (`num_tokens_seen` + Σ attention mask),
/// `logits/chosen` and `logits/rejected` (Σ of the vocabulary-mean logit over that half's
/// completion tokens / their count: token-weighted across rows), `mean_token_accuracy`
/// (fraction of chosen completion tokens whose argmax is the label).
///
/// # Errors
/// [`RlError::Shape`] when the tensors disagree.
pub fn dpo_token_metrics(outputs: &DpoTokenOutputs<'_>, num_tokens_seen: f64) -> Result<Metrics> {
    const F: &str = "dpo_token_metrics";
    let (rows, cols) = outputs.entropy.dims2()?;
    if rows % 2 != 0 {
        return Err(RlError::Shape {
            function: F,
            msg: format!("{rows} rows; expected 2N (chosen rows, then rejected rows)"),
        });
    }
    expect_dims(F, "mean_logits", outputs.mean_logits, &[rows, cols])?;
    expect_dims(F, "is_top1", outputs.is_top1, &[rows, cols])?;
    expect_dims(F, "completion_mask", outputs.completion_mask, &[rows, cols + 1])?;
    expect_dims(F, "attention_mask", outputs.attention_mask, &[rows, cols + 1])?;
    let shift = host(&outputs.completion_mask.narrow(1, 1, cols)?)?;
    let (h, logits, top1) = (
        host(outputs.entropy)?,
        host(outputs.mean_logits)?,
        host(outputs.is_top1)?,
    );
    let half = rows / 2 * cols;
    let weighted = |x: &[f64], m: &[f64]| -> (f64, f64) { (x.iter().zip(m).map(|(v, m)| v * m).sum(), m.iter().sum()) };
    let ratio = |(s, n): (f64, f64)| if n > 0.0 { s / n } else { 0.0 };
    let mut m = Metrics::new();
    m.insert("entropy".into(), ratio(weighted(&h, &shift)));
    let tokens: f64 = host(outputs.attention_mask)?.iter().sum();
    m.insert("num_tokens".into(), num_tokens_seen + tokens);
    m.insert("logits/chosen".into(), ratio(weighted(&logits[..half], &shift[..half])));
    m.insert(
        "logits/rejected".into(),
        ratio(weighted(&logits[half..], &shift[half..])),
    );
    let hits: Vec<f64> = top1[..half].iter().map(|x| f64::from(u8::from(*x != 0.0))).collect();
    m.insert("mean_token_accuracy".into(), ratio(weighted(&hits, &shift[..half])));
    Ok(m)
}

/// The vocabulary-mean logit of every position, `mean_v(hidden · wᵀ) = hidden · mean_v(w)`
/// (exact: the head is linear), without building the logits. No gradient (a metric).
///
/// # Shapes
/// `hidden`: `(B, T, H)`, `w`: `(V, H)` → `(B, T)`.
pub fn mean_logits_from_hidden(hidden: &Tensor, w: &Tensor) -> Result<Tensor> {
    let (_, h) = w.dims2()?;
    let mean_w = w.detach().mean(0)?.reshape((h, 1))?;
    Ok(hidden
        .detach()
        .broadcast_matmul(&mean_w)?
        .squeeze(candle_core::D::Minus1)?)
}

/// 1 where `argmax_v logits == label`, else 0 (TRL's `is_top1`), as `u8`.
///
/// # Shapes
/// `logits`: `(B, T, V)`, `labels`: `(B, T)` → `(B, T)`.
pub fn top1_matches(logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
    let argmax = logits.detach().argmax(candle_core::D::Minus1)?;
    expect_dims("top1_matches", "labels", labels, argmax.dims())?;
    Ok(argmax.eq(&labels.to_dtype(argmax.dtype())?)?)
}

#[cfg(test)]
mod tests;
