//! Generalised advantage estimation as in TRL 0.11 (`PPOTrainer.compute_advantages`; GAE
//! from Schulman et al. 2016, arXiv 1506.02438).

use candle_core::{DType, Tensor};

use super::{masked_whiten, same_dims, Result};

/// The three outputs of [`compute_advantages`], TRL's `(values, advantages, returns)`.
#[derive(Clone, Debug)]
pub struct Advantages {
    /// `values * mask`: the old values the value loss clips around. `(B, T)`.
    pub values: Tensor,
    /// GAE advantages whitened over the mask (mean 0, unit variance), detached. `(B, T)`.
    pub advantages: Tensor,
    /// `A + values` with the *unwhitened* advantages: the value targets. `(B, T)`.
    pub returns: Tensor,
}

/// GAE over the full time axis, exactly as `PPOTrainer.compute_advantages`:
/// 1. `values *= mask; rewards *= mask`; if `whiten_rewards`,
///    `rewards = masked_whiten(rewards, mask, shift_mean = false)`;
/// 2. for `t = T-1 .. 0`: `delta_t = r_t + gamma * V_{t+1} - V_t` (with `V_T = 0`),
///    `A_t = delta_t + gamma * lam * A_{t+1}`;
/// 3. `returns = A + values`; `advantages = masked_whiten(A, mask)`, detached.
///
/// The recursion runs over all `T` positions, masked ones included (their zeroed values and
/// rewards still feed earlier steps, which is what TRL does with right padding).
///
/// # Errors
/// [`super::PpoError::MaskTooSmall`] when the mask sums to less than 2 (whitening needs an
/// unbiased variance); [`super::PpoError::Shape`] on mismatched inputs.
///
/// # Shapes
/// `values`, `rewards`, `mask`: `(B, T)` → three `(B, T)` tensors in the dtype of `values`.
pub fn compute_advantages(
    values: &Tensor,
    rewards: &Tensor,
    mask: &Tensor,
    gamma: f64,
    lam: f64,
    whiten_rewards: bool,
) -> Result<Advantages> {
    same_dims("compute_advantages", ("values", values), ("rewards", rewards))?;
    same_dims("compute_advantages", ("values", values), ("mask", mask))?;
    let dtype = values.dtype();
    let mask = mask.to_dtype(dtype)?;
    let values = values.mul(&mask)?;
    let mut rewards = rewards.to_dtype(dtype)?.mul(&mask)?;
    if whiten_rewards {
        rewards = masked_whiten(&rewards, &mask, false)?;
    }

    // The recursion is sequential in t, so it runs on host rows (in f32, as TRL's tensors)
    // rather than as T small tensor ops; its output is detached in TRL anyway.
    let (b, t) = values.dims2()?;
    let v = values.to_dtype(DType::F32)?.to_vec2::<f32>()?;
    let r = rewards.to_dtype(DType::F32)?.to_vec2::<f32>()?;
    let (gamma32, gamma_lam32) = (gamma as f32, (gamma * lam) as f32);
    let mut adv = vec![0f32; b * t];
    for (row, (v, r)) in v.iter().zip(&r).enumerate() {
        let mut last_gae = 0f32;
        for step in (0..t).rev() {
            let next_value = if step + 1 < t { v[step + 1] } else { 0.0 };
            let delta = r[step] + gamma32 * next_value - v[step];
            last_gae = delta + gamma_lam32 * last_gae;
            adv[row * t + step] = last_gae;
        }
    }
    let adv = Tensor::from_vec(adv, (b, t), values.device())?.to_dtype(dtype)?;
    let returns = (&adv + &values)?;
    let advantages = masked_whiten(&adv, &mask, true)?.detach();
    Ok(Advantages {
        values,
        advantages,
        returns,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ppo::{masked_mean, masked_var};
    use candle_core::Device;

    fn t2(rows: &[&[f32]]) -> Tensor {
        let cols = rows[0].len();
        let flat: Vec<f32> = rows.iter().flat_map(|r| r.iter().copied()).collect();
        Tensor::from_vec(flat, (rows.len(), cols), &Device::Cpu).unwrap()
    }

    #[test]
    fn gae_matches_hand_computed_example() {
        // V = (1, 2, 3), r = (0, 0, 1), gamma 0.9, lam 0.5:
        // delta_2 = 1 - 3 = -2,            A_2 = -2
        // delta_1 = 0 + 0.9*3 - 2 = 0.7,   A_1 = 0.7 + 0.45*(-2) = -0.2
        // delta_0 = 0 + 0.9*2 - 1 = 0.8,   A_0 = 0.8 + 0.45*(-0.2) = 0.71
        let values = t2(&[&[1.0, 2.0, 3.0]]);
        let rewards = t2(&[&[0.0, 0.0, 1.0]]);
        let mask = t2(&[&[1.0, 1.0, 1.0]]);
        let out = compute_advantages(&values, &rewards, &mask, 0.9, 0.5, false).unwrap();
        let returns = out.returns.to_vec2::<f32>().unwrap();
        for (got, want) in returns[0].iter().zip([1.71f32, 1.8, 1.0]) {
            assert!((got - want).abs() < 1e-6, "{got} vs {want}");
        }
        // Whitened raw advantages (0.71, -0.2, -2): mean -0.49667, unbiased var 1.90103.
        let raw = [0.71f64, -0.2, -2.0];
        let mean = raw.iter().sum::<f64>() / 3.0;
        let var = raw.iter().map(|a| (a - mean).powi(2)).sum::<f64>() / 2.0;
        let adv = out.advantages.to_vec2::<f32>().unwrap();
        for (got, a) in adv[0].iter().zip(raw) {
            let want = (a - mean) / (var + 1e-8).sqrt();
            assert!((*got as f64 - want).abs() < 1e-6, "{got} vs {want}");
        }
    }

    #[test]
    fn masked_tail_contributes_zero_value_and_reward() {
        // The padded last step has value 5 and reward 7, both masked to 0, so they must not
        // reach the real tokens.
        let values = t2(&[&[1.0, 2.0, 5.0], &[0.5, 0.0, 0.0]]);
        let rewards = t2(&[&[0.0, 3.0, 7.0], &[1.0, 0.0, 0.0]]);
        let mask = t2(&[&[1.0, 1.0, 0.0], &[1.0, 0.0, 0.0]]);
        let out = compute_advantages(&values, &rewards, &mask, 1.0, 1.0, false).unwrap();
        assert_eq!(
            out.values.to_vec2::<f32>().unwrap(),
            vec![vec![1.0, 2.0, 0.0], vec![0.5, 0.0, 0.0]]
        );
        // Returns with gamma = lam = 1 are the reward-to-go: (3, 3, 0) and (1, 0, 0).
        assert_eq!(
            out.returns.to_vec2::<f32>().unwrap(),
            vec![vec![3.0, 3.0, 0.0], vec![1.0, 0.0, 0.0]]
        );
    }

    #[test]
    fn whitened_rewards_keep_their_mean() {
        let values = t2(&[&[0.0, 0.0, 0.0, 0.0]]);
        let rewards = t2(&[&[1.0, 2.0, 3.0, 10.0]]);
        let mask = t2(&[&[1.0, 1.0, 1.0, 0.0]]);
        let plain = compute_advantages(&values, &rewards, &mask, 1.0, 1.0, false).unwrap();
        let white = compute_advantages(&values, &rewards, &mask, 1.0, 1.0, true).unwrap();
        // Rewards (1, 2, 3) have mean 2 and unbiased variance 1, so whitening without the
        // mean shift leaves them unchanged (up to the 1e-8 in the rsqrt).
        let (p, w) = (
            plain.returns.to_vec2::<f32>().unwrap(),
            white.returns.to_vec2::<f32>().unwrap(),
        );
        for (a, b) in p[0].iter().zip(&w[0]).take(3) {
            assert!((a - b).abs() < 1e-5);
        }
        let adv = &white.advantages;
        assert!(masked_mean(adv, &mask, None).unwrap().to_scalar::<f32>().unwrap().abs() < 1e-6);
        let var = masked_var(adv, &mask, true).unwrap();
        assert!((var.to_scalar::<f32>().unwrap() - 1.0).abs() < 1e-5);
    }
}
