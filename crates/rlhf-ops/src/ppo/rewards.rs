//! The KL-shaped reward of TRL 0.11 PPO (`PPOTrainer._kl_penalty`, `compute_rewards`) and the
//! KL coefficient controllers (`AdaptiveKLController`, `FixedKLController` in
//! `trl/trainer/utils.py`, after Ziegler et al. 2019, arXiv 1909.08593).

use candle_core::{DType, Tensor, D};

use super::{same_dims, PpoError, Result};

/// How the per-token KL penalty is estimated from policy and reference log-probs
/// (`PPOConfig.kl_penalty`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum KlPenalty {
    /// `"kl"`: `logp - ref_logp` (the k1 estimator; can be negative per token).
    #[default]
    Kl,
    /// `"abs"`: `|logp - ref_logp|`.
    Abs,
    /// `"mse"`: `0.5 * (logp - ref_logp)^2` (the k2 estimator).
    Mse,
    /// `"full"`: the exact KL over the vocabulary, from full log-probability rows.
    Full,
}

impl KlPenalty {
    /// The names TRL's `PPOConfig.kl_penalty` accepts, in [`KlPenalty`] order.
    pub const TRL_NAMES: &'static [&'static str] = &["kl", "abs", "mse", "full"];

    /// Parses a TRL `kl_penalty` name.
    pub fn from_trl_name(name: &str) -> Option<Self> {
        match name {
            "kl" => Some(Self::Kl),
            "abs" => Some(Self::Abs),
            "mse" => Some(Self::Mse),
            "full" => Some(Self::Full),
            _ => None,
        }
    }

    /// The TRL name of this estimator.
    pub fn trl_name(self) -> &'static str {
        match self {
            Self::Kl => "kl",
            Self::Abs => "abs",
            Self::Mse => "mse",
            Self::Full => "full",
        }
    }
}

/// Per-token KL penalty between the policy and the reference (`PPOTrainer._kl_penalty`):
/// - `Kl`: `logprob - ref_logprob`; `Abs`: `|logprob - ref_logprob|`;
///   `Mse`: `0.5 * (logprob - ref_logprob)^2`;
/// - `Full`: `sum_v exp(logprob) * (logprob - ref_logprob)`, which is TRL's
///   `F.kl_div(ref_logprob, logprob, log_target=True, reduction="none").sum(-1)`, i.e.
///   `KL(policy || ref)` per position. The inputs are full-vocabulary **log-probabilities**
///   (`log_softmax` of the logits, see [`super::log_softmax`]), as in TRL, not raw logits.
///
/// # Shapes
/// `Kl`/`Abs`/`Mse`: `logprob`, `ref_logprob`: `(B, T)` → `(B, T)`.
/// `Full`: `logprob`, `ref_logprob`: `(B, T, V)` → `(B, T)`.
pub fn kl_penalty(logprob: &Tensor, ref_logprob: &Tensor, kind: KlPenalty) -> Result<Tensor> {
    same_dims("kl_penalty", ("logprob", logprob), ("ref_logprob", ref_logprob))?;
    let diff = (logprob - ref_logprob)?;
    let kl = match kind {
        KlPenalty::Kl => diff,
        KlPenalty::Abs => diff.abs()?,
        KlPenalty::Mse => diff.sqr()?.affine(0.5, 0.0)?,
        KlPenalty::Full => (logprob.exp()? * diff)?.sum(D::Minus1)?,
    };
    Ok(kl)
}

/// The three outputs of [`compute_rewards`], TRL's `(rewards, non_score_rewards, kls)`.
#[derive(Clone, Debug)]
pub struct Rewards {
    /// `non_score_rewards` with each sample's score added at its last response token. `(B, T)`.
    pub rewards: Tensor,
    /// The KL penalty reward, `-kl_coef * kls`, unmasked. `(B, T)`.
    pub non_score_rewards: Tensor,
    /// The per-token KL estimate of [`kl_penalty`], unmasked. `(B, T)`.
    pub kls: Tensor,
}

/// Per-token rewards for PPO (`PPOTrainer.compute_rewards`):
/// `kl = kl_penalty(logprobs, ref_logprobs)`, `non_score = -kl_coef * kl`,
/// `reward = non_score` plus `score[b]` at `t = last index where masks[b, t] != 0`.
/// Nothing is masked here (TRL masks later, in [`super::compute_advantages`]).
///
/// # Errors
/// [`PpoError::EmptyMaskRow`] when a row of `masks` is all zero; [`PpoError::Shape`] on
/// mismatched inputs.
///
/// # Shapes
/// `scores`: `(B)`; `logprobs`, `ref_logprobs`: `(B, T)` (`(B, T, V)` log-probs for
/// [`KlPenalty::Full`]); `masks`: `(B, T)` → three `(B, T)` tensors.
pub fn compute_rewards(
    scores: &Tensor,
    logprobs: &Tensor,
    ref_logprobs: &Tensor,
    masks: &Tensor,
    kl_coef: f64,
    kind: KlPenalty,
) -> Result<Rewards> {
    let kls = kl_penalty(logprobs, ref_logprobs, kind)?;
    same_dims("compute_rewards", ("masks", masks), ("kls", &kls))?;
    let (b, t) = kls.dims2()?;
    if scores.dims() != [b] {
        return Err(PpoError::Shape {
            function: "compute_rewards",
            msg: format!("`scores` has shape {:?}, expected (B) = ({b})", scores.dims()),
        });
    }
    let non_score_rewards = kls.affine(-kl_coef, 0.0)?;

    // One-hot of the last unmasked position of every row (`mask.nonzero()[-1]`).
    let mask_rows = masks.to_dtype(DType::F32)?.to_vec2::<f32>()?;
    let mut last = vec![0u8; b * t];
    for (row, mask) in mask_rows.iter().enumerate() {
        let idx = mask
            .iter()
            .rposition(|&m| m != 0.0)
            .ok_or(PpoError::EmptyMaskRow { row })?;
        last[row * t + idx] = 1;
    }
    let last = Tensor::from_vec(last, (b, t), kls.device())?;
    let with_score = non_score_rewards.broadcast_add(&scores.unsqueeze(1)?.to_dtype(kls.dtype())?)?;
    // `where_cond` rather than `+ onehot * score`, so a non-finite score stays on its token.
    let rewards = last.where_cond(&with_score, &non_score_rewards)?;
    Ok(Rewards {
        rewards,
        non_score_rewards,
        kls,
    })
}

/// The KL coefficient `beta` of the reward `score - beta * kl` (`PPOConfig.adap_kl_ctrl`
/// chooses the variant; `init_kl_coef` is the starting value).
#[derive(Clone, Debug, PartialEq)]
pub enum KlController {
    /// `FixedKLController`: `value` never changes.
    Fixed {
        /// The KL coefficient.
        value: f64,
    },
    /// `AdaptiveKLController` (Ziegler et al. 2019): after every batch,
    /// `err = clip(current_kl / target - 1, -0.2, 0.2)`,
    /// `value *= 1 + err * n_steps / horizon`.
    Adaptive {
        /// The KL coefficient.
        value: f64,
        /// The KL (per-sequence sum, `objective/kl`) the controller steers towards.
        target: f64,
        /// How many samples it takes to move `value` by up to a factor `e^0.2`.
        horizon: f64,
    },
}

impl KlController {
    /// A constant coefficient (`FixedKLController(kl_coef)`).
    pub fn fixed(kl_coef: f64) -> Self {
        Self::Fixed { value: kl_coef }
    }

    /// An adaptive coefficient (`AdaptiveKLController(init_kl_coef, target, horizon)`).
    pub fn adaptive(init_kl_coef: f64, target: f64, horizon: f64) -> Self {
        Self::Adaptive {
            value: init_kl_coef,
            target,
            horizon,
        }
    }

    /// The current coefficient.
    pub fn value(&self) -> f64 {
        match self {
            Self::Fixed { value } | Self::Adaptive { value, .. } => *value,
        }
    }

    /// Updates after a batch, as TRL's `kl_ctl.update(stats["objective/kl"], batch_size *
    /// num_processes)`: `current_kl` is the mean over samples of the per-sequence summed KL,
    /// `n_steps` the number of samples in the (global) batch. `Fixed` ignores both.
    pub fn update(&mut self, current_kl: f64, n_steps: usize) {
        match self {
            Self::Fixed { .. } => {}
            Self::Adaptive { value, target, horizon } => {
                let err = (current_kl / *target - 1.0).clamp(-0.2, 0.2);
                *value *= 1.0 + err * n_steps as f64 / *horizon;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn t2(rows: &[&[f32]]) -> Tensor {
        let cols = rows[0].len();
        let flat: Vec<f32> = rows.iter().flat_map(|r| r.iter().copied()).collect();
        Tensor::from_vec(flat, (rows.len(), cols), &Device::Cpu).unwrap()
    }

    #[test]
    fn kl_penalty_estimators_match_their_formulas() {
        let lp = t2(&[&[-1.0, -2.0]]);
        let rf = t2(&[&[-1.5, -1.0]]);
        let get = |k| kl_penalty(&lp, &rf, k).unwrap().to_vec2::<f32>().unwrap()[0].clone();
        assert_eq!(get(KlPenalty::Kl), vec![0.5, -1.0]);
        assert_eq!(get(KlPenalty::Abs), vec![0.5, 1.0]);
        assert_eq!(get(KlPenalty::Mse), vec![0.125, 0.5]);
    }

    #[test]
    fn full_kl_penalty_is_the_exact_kl_and_zero_for_equal_distributions() {
        // p = (0.5, 0.25, 0.25), q = (0.25, 0.25, 0.5): KL(p||q) = 0.5 ln 2 - 0.25 ln 2.
        let p = [0.5f32, 0.25, 0.25].map(f32::ln);
        let q = [0.25f32, 0.25, 0.5].map(f32::ln);
        let lp = Tensor::new(&[[p, q]], &Device::Cpu).unwrap();
        let rf = Tensor::new(&[[q, q]], &Device::Cpu).unwrap();
        let kl = kl_penalty(&lp, &rf, KlPenalty::Full).unwrap();
        let kl = kl.to_vec2::<f32>().unwrap();
        assert!((kl[0][0] - 0.25 * 2f32.ln()).abs() < 1e-6);
        assert!(kl[0][1].abs() < 1e-7);
    }

    #[test]
    fn kl_penalty_names_round_trip() {
        for name in KlPenalty::TRL_NAMES {
            let kind = KlPenalty::from_trl_name(name).unwrap();
            assert_eq!(kind.trl_name(), *name);
        }
        assert_eq!(KlPenalty::from_trl_name("k3"), None);
    }

    #[test]
    fn score_goes_on_the_last_unmasked_token_of_each_row() {
        let lp = t2(&[&[-1.0, -1.0, -1.0], &[-1.0, -1.0, -1.0]]);
        let rf = t2(&[&[-2.0, -1.0, -1.0], &[-1.0, -1.0, -3.0]]);
        let masks = t2(&[&[0.0, 1.0, 0.0], &[1.0, 1.0, 1.0]]);
        let scores = Tensor::new(&[10.0f32, 20.0], &Device::Cpu).unwrap();
        let out = compute_rewards(&scores, &lp, &rf, &masks, 0.5, KlPenalty::Kl).unwrap();
        assert_eq!(
            out.kls.to_vec2::<f32>().unwrap(),
            vec![vec![1.0, 0.0, 0.0], vec![0.0, 0.0, 2.0]]
        );
        assert_eq!(
            out.non_score_rewards.to_vec2::<f32>().unwrap(),
            vec![vec![-0.5, 0.0, 0.0], vec![0.0, 0.0, -1.0]]
        );
        assert_eq!(
            out.rewards.to_vec2::<f32>().unwrap(),
            vec![vec![-0.5, 10.0, 0.0], vec![0.0, 0.0, 19.0]]
        );
    }

    #[test]
    fn compute_rewards_rejects_a_row_without_response_tokens() {
        let lp = t2(&[&[-1.0, -1.0], &[-1.0, -1.0]]);
        let masks = t2(&[&[1.0, 1.0], &[0.0, 0.0]]);
        let scores = Tensor::new(&[1.0f32, 2.0], &Device::Cpu).unwrap();
        let err = compute_rewards(&scores, &lp, &lp, &masks, 0.2, KlPenalty::Kl).unwrap_err();
        assert!(matches!(err, PpoError::EmptyMaskRow { row: 1 }));
    }

    #[test]
    fn adaptive_controller_moves_towards_target_with_clipped_error() {
        let mut ctl = KlController::adaptive(0.2, 6.0, 10_000.0);
        // KL 9 is 50% over target; the error is clipped to 0.2.
        ctl.update(9.0, 100);
        assert!((ctl.value() - 0.2 * (1.0 + 0.2 * 100.0 / 10_000.0)).abs() < 1e-15);
        // KL 5.4 is 10% under target: not clipped.
        let mut ctl = KlController::adaptive(0.2, 6.0, 10_000.0);
        ctl.update(5.4, 256);
        assert!((ctl.value() - 0.2 * (1.0 - 0.1 * 256.0 / 10_000.0)).abs() < 1e-15);
    }

    #[test]
    fn fixed_controller_never_changes() {
        let mut ctl = KlController::fixed(0.05);
        ctl.update(100.0, 1000);
        assert_eq!(ctl.value(), 0.05);
    }
}
