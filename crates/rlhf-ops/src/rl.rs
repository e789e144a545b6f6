//! The math of TRL 1.16's online and offline preference trainers — `GRPOTrainer`,
//! `RLOOTrainer` and `DPOTrainer` — as free functions, so the trainers only move data.
//!
//! - [`completions`]: completion masks cut at the first EOS, truncation, length metrics.
//! - [`rewards`]: weighted reward aggregation with `None` rewards, GRPO group advantages,
//!   reward metrics.
//! - [`grpo`]: the GRPO family of losses (dapo, grpo, dr_grpo, bnpo, luspo, cispo, sapo,
//!   vespo) with the KL term and every logged metric.
//! - [`rloo`]: the KL-folded reward, the leave-one-out baseline and the sequence-level loss.
//! - [`dpo`]: the DPO losses (a weighted list of 15 types) and metrics; [`dpo_data`] the
//!   prompt/completion split, truncation and collation on token ids.
//! - [`logprobs`]: per-token log-probs and entropy at a sampling temperature, masked sums.
//! - [`stats`]: NaN-aware mean / std / min / max as TRL's `nanmean`, `nanstd`, ...
//!
//! Losses are candle tensors that carry gradients (per-token log-probs `(B, T)` in, a
//! scalar out); rewards, advantages and metrics are host `f64` (TRL computes them in f32
//! on a few numbers per completion). Metrics use TRL's exact names.
//!
//! Every formula was read from the `trl` 1.16.0 wheel (`trl/trainer/grpo_trainer.py`,
//! `rloo_trainer.py`, `dpo_trainer.py`, `utils.py`, `data_utils.py`) and is checked against
//! `fixtures/algorithms/*.json` by `tests/{grpo,rloo,dpo}_parity.rs`.
//!
//! # Deliberate deviations from TRL
//! - Metrics are the local batch's (one process). TRL all-reduces sums and counts across
//!   processes first; a data-parallel trainer must reduce the same sums before dividing.
//! - A metric TRL logs as `None` (a NaN, e.g. `rewards/<f>/std` when a function scored one
//!   completion) is returned as `f64::NAN`; the logger decides how to write it.
//! - Invalid configurations that TRL accepts and turns into NaN/inf (a zero temperature,
//!   `exo_pair` without label smoothing) are errors here.

pub mod completions;
pub mod dpo;
pub mod dpo_data;
pub mod grpo;
pub mod logprobs;
pub mod rewards;
pub mod rloo;
pub mod stats;

use std::collections::BTreeMap;

use candle_core::Tensor;

/// Logged metrics under TRL's names (`"clip_ratio/low_mean"`, `"rewards/chosen"`, ...).
pub type Metrics = BTreeMap<String, f64>;

/// Everything that can go wrong in the RL math.
#[derive(Debug, thiserror::Error)]
pub enum RlError {
    /// A tensor operation failed (usually mismatched shapes or dtypes).
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// An input does not have the shape (or length) the function documents.
    #[error("{function}: {msg}")]
    Shape {
        /// The function that checked.
        function: &'static str,
        /// What was expected and what was found.
        msg: String,
    },
    /// A shared kernel of [`crate::ppo`] (log-probs, entropy) rejected its input.
    #[error(transparent)]
    Ops(#[from] crate::ppo::PpoError),
    /// A configuration value is out of range or inconsistent with the others.
    #[error("invalid `{field}`: {msg}")]
    Config {
        /// The TRL config field.
        field: &'static str,
        /// What is wrong and how to fix it.
        msg: String,
    },
}

/// The result type of the RL math.
pub type Result<T> = std::result::Result<T, RlError>;

/// Fails with [`RlError::Shape`] unless `t` has exactly the dimensions `want`.
fn expect_dims(function: &'static str, name: &str, t: &Tensor, want: &[usize]) -> Result<()> {
    if t.dims() == want {
        Ok(())
    } else {
        Err(RlError::Shape {
            function,
            msg: format!("`{name}` has shape {:?}, expected {want:?}", t.dims()),
        })
    }
}

/// Fails with [`RlError::Shape`] unless a host slice has `want` entries.
fn expect_len(function: &'static str, name: &str, got: usize, want: usize) -> Result<()> {
    if got == want {
        Ok(())
    } else {
        Err(RlError::Shape {
            function,
            msg: format!("`{name}` has {got} entries, expected {want}"),
        })
    }
}

/// `x` where `mask != 0`, else exactly 0 (differentiable in `x` inside the mask). TRL's
/// fused head returns 0 for masked labels; zeroing keeps any value there (even inf) out
/// of the loss, where a product with a 0 mask would give NaN.
fn zero_outside(mask: &Tensor, x: &Tensor) -> Result<Tensor> {
    let keep = mask.ne(0.0)?;
    Ok(keep.where_cond(&x.to_dtype(mask.dtype())?, &mask.zeros_like()?)?)
}

/// A detached tensor as a flat `f64` vector.
fn host(t: &Tensor) -> Result<Vec<f64>> {
    Ok(t.detach()
        .to_dtype(candle_core::DType::F64)?
        .flatten_all()?
        .to_vec1::<f64>()?)
}
