//! PPO math of TRL 0.11.4 (`PPOTrainer.compute_rewards`, `compute_advantages`, `loss`, the
//! `trl.core` helpers and the KL controllers of `trl/trainer/utils.py`) and the Bradley–Terry
//! loss of `RewardTrainer.compute_loss`, as free functions over candle tensors.
//!
//! Shapes use `B` batch, `T` time (response tokens), `V` vocab. Masks are 0/1 tensors of any
//! dtype; they are converted to the dtype of the values they weigh. Everything runs in the
//! dtype it is given (f32 in training, f64 in the gradient tests).
//!
//! The numbers match TRL to within f32 rounding; `tests/ppo_math_parity.rs` checks every
//! tensor and stat against `fixtures/parity_tiny.json` (section `ppo_math`).
//!
//! # Deliberate deviations from TRL
//! - [`masked_var`] (and so [`masked_whiten`], [`compute_advantages`], [`ppo_loss`]) returns
//!   [`PpoError::MaskTooSmall`] when the mask sums to 0, or to 1 with the unbiased
//!   correction. TRL raises a `ValueError` for the first and silently returns NaN for the
//!   second.
//! - [`compute_rewards`] returns [`PpoError::EmptyMaskRow`] for a row whose mask is all
//!   zero, where TRL fails with an `IndexError` from `mask.nonzero()[-1]`.
//! - [`logsigmoid`] computes `log(1 + exp(-|x|))` without `log1p`; the absolute error is below
//!   one f32 ulp of 1 (6e-8), which is all a loss needs.

mod advantages;
mod bradley_terry;
mod fused;
mod logits;
mod loss;
mod masked;
mod rewards;

pub use advantages::{compute_advantages, Advantages};
pub use bradley_terry::{bradley_terry_loss, logsigmoid};
pub use fused::{lm_head_logprobs_and_entropy, logprobs_and_entropy};
pub use logits::{entropy_from_logits, log_softmax, logprobs_from_logits};
pub use loss::{ppo_loss, PpoLoss, PpoLossConfig, PpoLossInputs, PpoStats};
pub use masked::{masked_mean, masked_var, masked_whiten};
pub use rewards::{compute_rewards, kl_penalty, KlController, KlPenalty, Rewards};

/// Everything that can go wrong in the PPO math.
#[derive(Debug, thiserror::Error)]
pub enum PpoError {
    /// A tensor operation failed (usually mismatched shapes or dtypes).
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// A masked variance was asked of too few unmasked elements.
    #[error(
        "masked variance needs a mask that sums to at least {needed}, got {sum}\n\
         hint: increase `mini_batch_size` or `gradient_accumulation_steps`, and check that \
         responses are not empty"
    )]
    MaskTooSmall {
        /// The sum of the mask.
        sum: f64,
        /// The smallest sum that works (1 biased, 2 unbiased).
        needed: usize,
    },
    /// A row of the response mask has no nonzero entry, so there is no token to put the
    /// score on.
    #[error(
        "row {row} of the response mask is all zero, so its score has no token to go on\n\
         hint: every response needs at least one token; drop empty generations before scoring"
    )]
    EmptyMaskRow {
        /// The row (sample) index.
        row: usize,
    },
    /// Two inputs do not have the shapes the function documents.
    #[error("{function}: {msg}")]
    Shape {
        /// The function that checked.
        function: &'static str,
        /// What was expected and what was found.
        msg: String,
    },
}

/// The result type of the PPO math.
pub type Result<T> = std::result::Result<T, PpoError>;

/// Fails with [`PpoError::Shape`] unless `a` and `b` have the same dimensions.
fn same_dims(function: &'static str, a: (&str, &candle_core::Tensor), b: (&str, &candle_core::Tensor)) -> Result<()> {
    if a.1.dims() == b.1.dims() {
        Ok(())
    } else {
        Err(PpoError::Shape {
            function,
            msg: format!(
                "`{}` has shape {:?} but `{}` has shape {:?}; they must match",
                a.0,
                a.1.dims(),
                b.0,
                b.1.dims()
            ),
        })
    }
}
