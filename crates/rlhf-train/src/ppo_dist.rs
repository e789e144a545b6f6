//! The PPO step across ranks ([`crate::dist`]): the global batch every rank works on, rows
//! computed on one rank and gathered, and minibatch statistics over all ranks' parts.
//!
//! Every function is the identity (or the one-process value) on one process.

use candle_core::{DType, Tensor};
use rlhf_ops::ppo::{masked_mean, PpoLoss};

use crate::dist::{world, ReduceOp};
use crate::error::{Result, TrainError};

/// Names of `PpoStats::scalars`, in its order.
const NAMES: [&str; 15] = [
    "loss/policy",
    "loss/value",
    "loss/total",
    "policy/entropy",
    "policy/approxkl",
    "policy/policykl",
    "policy/clipfrac",
    "policy/advantages_mean",
    "returns/mean",
    "returns/var",
    "val/vpred",
    "val/error",
    "val/clipfrac",
    "val/mean",
    "val/var",
];

/// The minibatch statistics of one PPO minibatch, named.
pub type Scalars = [(&'static str, f64); 15];

/// The value of `name` in `s` (NaN if absent).
pub fn stat(s: &Scalars, name: &str) -> f64 {
    s.iter().find(|(k, _)| *k == name).map_or(f64::NAN, |&(_, v)| v)
}

/// Queries, responses and scores of a PPO batch.
pub type Batch = (Vec<Vec<u32>>, Vec<Vec<u32>>, Vec<f32>);

/// Every rank's queries, responses and scores in rank order (`None` on one process): the
/// global batch of a PPO step, as one process holding all of it would see it.
pub fn gather_batch(queries: &[Vec<u32>], responses: &[Vec<u32>], scores: &[f32]) -> Result<Option<Batch>> {
    let dist = world();
    if dist.size() == 1 {
        return Ok(None);
    }
    Ok(Some((
        dist.all_gather_seqs(queries)?,
        dist.all_gather_seqs(responses)?,
        dist.all_gather_f32(scores)?,
    )))
}

/// Every rank's rows of `t` (`(B_r, ...)`, the same trailing shape everywhere) stacked in
/// rank order → `(Σ B_r, ...)`, in `t`'s dtype.
pub fn gather_rows(t: &Tensor) -> Result<Tensor> {
    let dist = world();
    if dist.size() == 1 {
        return Ok(t.clone());
    }
    let dims = t.dims().to_vec();
    let row: usize = dims[1..].iter().product();
    let all = dist.all_gather_f32(&t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?)?;
    let mut shape = dims;
    shape[0] = all.len() / row.max(1);
    Ok(Tensor::from_vec(all, shape, t.device())?.to_dtype(t.dtype())?)
}

/// The statistics of a minibatch split over ranks: each rank's masked means weighted by its
/// response tokens (`tokens`), so means are the whole minibatch's; the two variances
/// (`returns/var`, `val/var`, unbiased) are recombined from the parts' means and variances
/// (Chan et al.'s parallel formula). `out`: this rank's loss and its mask (`None` when it has no
/// rows); when the minibatch's mean ratio exceeds `ratio_threshold`, its losses are zeroed
/// on every rank (TRL's skip, decided for the whole minibatch).
pub fn reduce_minibatch(out: Option<(&mut PpoLoss, &Tensor)>, tokens: f64, ratio_threshold: f64) -> Result<Scalars> {
    let dist = world();
    if dist.size() == 1 {
        let (out, _) = out.ok_or_else(|| TrainError::Config("internal: an empty PPO minibatch".into()))?;
        return Ok(out.stats.scalars());
    }
    // Variances and the means they are around: (variance, mean) positions in NAMES.
    const VARS: [(usize, usize); 2] = [(9, 8), (14, 13)];
    // [Σ ratio, tokens, Σ stat_k · tokens ..., Σ tokens · E[x²] per variance]
    let mut buf = vec![0.0; 2 + NAMES.len() + VARS.len()];
    if let Some((out, mask)) = &out {
        let ratio = masked_mean(&out.stats.policy_ratio, mask, None)?
            .to_dtype(DType::F64)?
            .to_scalar::<f64>()?;
        buf[0] = ratio * tokens;
        buf[1] = tokens;
        for (k, (name, v)) in out.stats.scalars().iter().enumerate() {
            debug_assert_eq!(*name, NAMES[k]);
            buf[2 + k] = v * tokens;
        }
        let s = out.stats.scalars();
        for (j, &(var, mean)) in VARS.iter().enumerate() {
            // Unbiased → biased variance, plus the squared mean: E[x²] of this part.
            let biased = s[var].1 * (tokens - 1.0) / tokens.max(1.0);
            buf[2 + NAMES.len() + j] = tokens * (biased + s[mean].1 * s[mean].1);
        }
    }
    dist.all_reduce_f64(&mut buf, ReduceOp::Sum)?;
    let n = buf[1].max(f64::MIN_POSITIVE);
    let exceeded = buf[0] / n > ratio_threshold;
    let mut s: Scalars = [("", 0.0); 15];
    for (k, name) in NAMES.iter().enumerate() {
        let zeroed = exceeded && name.starts_with("loss/");
        s[k] = (name, if zeroed { 0.0 } else { buf[2 + k] / n });
    }
    for (j, &(var, mean)) in VARS.iter().enumerate() {
        let m = buf[2 + mean] / n;
        let biased = buf[2 + NAMES.len() + j] / n - m * m;
        s[var].1 = biased * n / (n - 1.0).max(f64::MIN_POSITIVE);
    }
    if let (Some((out, _)), true) = (out, exceeded) {
        out.pg_loss = out.pg_loss.affine(0.0, 0.0)?;
        out.vf_loss = out.vf_loss.affine(0.0, 0.0)?;
        out.stats.ratio_threshold_exceeded = true;
    }
    Ok(s)
}
