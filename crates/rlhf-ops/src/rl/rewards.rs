//! Rewards of several reward functions, GRPO's group-relative advantages and the reward
//! metrics (TRL 1.16 `GRPOTrainer._generate_and_score_completions`; the aggregation and
//! metrics are shared with `RLOOTrainer`).
//!
//! Rewards are `rewards_per_func[i][k]`: completion `i`, reward function `k`, with **NaN
//! for `None`** (the function does not apply). Groups are `num_generations` consecutive
//! rows (TRL's `RepeatSampler` puts a prompt's completions next to each other).
//!
//! ```text
//! r_i   = Σ_k w_k r_ik over the non-NaN r_ik (nansum);  NaN if every r_ik is NaN
//! A_i   = r_i − mean_g(r)                                     scale_rewards = "none"
//! A_i   = (r_i − mean_g(r)) / (std_g(r) + 1e-4)               "group"
//! A_i   = (r_i − mean_g(r)) / (std_batch(r) + 1e-4)           "batch" (mean still per group)
//! mean/std skip NaN rows; std is unbiased (n − 1); A_i = 0 where NaN
//! ```
//! `normalize_then_sum` (GDPO, Liu et al. 2026) z-scores each function within its group,
//! sums with the weights, then z-scores over the batch.

use super::stats::{is_close_to_zero, nanmean, nanstd, nansum_or_nan};
use super::{Metrics, Result, RlError};

/// `GRPOConfig.scale_rewards`: what the centred rewards are divided by.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ScaleRewards {
    /// `"group"` (default; also `True`): the group's std.
    #[default]
    Group,
    /// `"batch"`: the std over the whole generation batch.
    Batch,
    /// `"none"` (also `False`): no scaling (Dr. GRPO, Liu et al. 2025).
    None,
}

impl ScaleRewards {
    /// Parses TRL's value (`"group"`, `"batch"`, `"none"`, or `"true"` / `"false"`).
    pub fn from_trl_name(name: &str) -> Option<Self> {
        match name {
            "group" | "true" | "True" => Some(Self::Group),
            "batch" => Some(Self::Batch),
            "none" | "false" | "False" => Some(Self::None),
            _ => None,
        }
    }
}

/// `GRPOConfig.multi_objective_aggregation`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RewardAggregation {
    /// `"sum_then_normalize"` (default): weighted sum, then group advantages.
    #[default]
    SumThenNormalize,
    /// `"normalize_then_sum"` (GDPO): per-function group z-scores, weighted sum, batch z-score.
    NormalizeThenSum,
}

impl RewardAggregation {
    /// Parses TRL's value.
    pub fn from_trl_name(name: &str) -> Option<Self> {
        match name {
            "sum_then_normalize" => Some(Self::SumThenNormalize),
            "normalize_then_sum" => Some(Self::NormalizeThenSum),
            _ => None,
        }
    }
}

/// The GRPO advantages of a generation batch and what they were computed from.
#[derive(Clone, Debug, PartialEq)]
pub struct GroupAdvantages {
    /// `A_i`, 0 for unscorable rows. Length `B`.
    pub advantages: Vec<f64>,
    /// The aggregated reward `r_i` (NaN when unscorable); for `normalize_then_sum` the
    /// weighted sum of z-scores.
    pub rewards: Vec<f64>,
    /// The std each row was (or, for `"none"`, would have been) divided by, before the
    /// `+ 1e-4`: per group, per batch, or the batch std of `normalize_then_sum`.
    pub std: Vec<f64>,
    /// `frac_reward_zero_std`: the fraction of rows whose `std` is 0 (`isclose`).
    pub frac_reward_zero_std: f64,
}

/// Checks that `rewards_per_func` is `B × K` with `K = weights.len()` and returns `B`.
fn check_rewards(function: &'static str, rewards_per_func: &[Vec<f64>], weights: &[f64]) -> Result<usize> {
    for (i, row) in rewards_per_func.iter().enumerate() {
        if row.len() != weights.len() {
            return Err(RlError::Shape {
                function,
                msg: format!(
                    "completion {i} has {} rewards but there are {} reward weights\nhint: \
                     `reward_weights` needs one weight per reward function",
                    row.len(),
                    weights.len()
                ),
            });
        }
    }
    Ok(rewards_per_func.len())
}

/// Checks that `b` rows split into whole groups of `num_generations`.
pub(crate) fn check_groups(function: &'static str, b: usize, num_generations: usize) -> Result<()> {
    if num_generations == 0 || !b.is_multiple_of(num_generations) {
        return Err(RlError::Config {
            field: "num_generations",
            msg: format!(
                "{function}: {b} completions do not split into groups of {num_generations}\nhint: \
                 the generation batch must hold whole groups (a multiple of `num_generations`)"
            ),
        });
    }
    Ok(())
}

/// `r_i = Σ_k w_k r_ik` over the non-NaN rewards, NaN when every function returned `None`
/// (TRL: `(rewards_per_func * w).nansum(1)`, then `rewards[unscorable] = nan`).
///
/// # Errors
/// [`RlError::Shape`] when a row does not have one reward per weight.
pub fn aggregate_rewards(rewards_per_func: &[Vec<f64>], weights: &[f64]) -> Result<Vec<f64>> {
    check_rewards("aggregate_rewards", rewards_per_func, weights)?;
    Ok(rewards_per_func
        .iter()
        .map(|row| nansum_or_nan(row.iter().zip(weights).map(|(r, w)| r * w)))
        .collect())
}

/// GRPO's group-relative advantages (Shao et al. 2024, DeepSeekMath §4.1.2) with TRL 1.16's
/// `scale_rewards` and `multi_objective_aggregation` (formulas in the module docs).
/// With `num_generations == 1` the group std is taken as 0, as TRL does in evaluation.
///
/// # Errors
/// [`RlError::Shape`] on a ragged reward table; [`RlError::Config`] when the rows do not
/// form whole groups.
pub fn group_advantages(
    rewards_per_func: &[Vec<f64>],
    weights: &[f64],
    num_generations: usize,
    scale_rewards: ScaleRewards,
    aggregation: RewardAggregation,
) -> Result<GroupAdvantages> {
    let b = check_rewards("group_advantages", rewards_per_func, weights)?;
    check_groups("group_advantages", b, num_generations)?;
    let g = num_generations;
    let (rewards, advantages, std) = match aggregation {
        RewardAggregation::SumThenNormalize => {
            let rewards = aggregate_rewards(rewards_per_func, weights)?;
            let mut std = vec![0.0; b];
            let mut advantages = vec![0.0; b];
            let batch_std = if b > 1 { nanstd(&rewards) } else { 0.0 };
            for (gi, group) in rewards.chunks(g).enumerate() {
                let mean = nanmean(group);
                let s = match scale_rewards {
                    ScaleRewards::Batch => batch_std,
                    _ if g > 1 => nanstd(group),
                    _ => 0.0,
                };
                for (j, r) in group.iter().enumerate() {
                    let i = gi * g + j;
                    std[i] = s;
                    let centred = r - mean;
                    advantages[i] = match scale_rewards {
                        ScaleRewards::None => centred,
                        _ => centred / (s + 1e-4),
                    };
                }
            }
            (rewards, advantages, std)
        }
        RewardAggregation::NormalizeThenSum => {
            let k = weights.len();
            let mut rewards = vec![0.0; b];
            for start in (0..b).step_by(g) {
                let group = &rewards_per_func[start..start + g];
                let z: Vec<(f64, f64)> = (0..k)
                    .map(|f| {
                        let col: Vec<f64> = group.iter().map(|row| row[f]).collect();
                        let std = if g > 1 { nanstd(&col) } else { 0.0 };
                        (nanmean(&col), std)
                    })
                    .collect();
                for (j, row) in group.iter().enumerate() {
                    let terms = row
                        .iter()
                        .zip(&z)
                        .zip(weights)
                        .map(|((r, (mean, std)), w)| (r - mean) / (std + 1e-4) * w);
                    rewards[start + j] = nansum_or_nan(terms);
                }
            }
            let batch_std = if b > 1 { nanstd(&rewards) } else { 0.0 };
            let mean = nanmean(&rewards);
            let advantages = rewards.iter().map(|r| (r - mean) / (batch_std + 1e-4)).collect();
            (rewards, advantages, vec![batch_std; b])
        }
    };
    let advantages = advantages
        .into_iter()
        .map(|a: f64| if a.is_nan() { 0.0 } else { a })
        .collect();
    let frac_reward_zero_std = std.iter().filter(|s| is_close_to_zero(**s)).count() as f64 / b.max(1) as f64;
    Ok(GroupAdvantages {
        advantages,
        rewards,
        std,
        frac_reward_zero_std,
    })
}

/// The reward metrics GRPO and RLOO log: `rewards/<name>/mean` and `rewards/<name>/std`
/// (NaN-aware, over the completions that function scored), `reward` and `reward_std`
/// (over the scorable aggregated rewards, before any clipping or KL), and the given
/// `frac_reward_zero_std`.
///
/// # Errors
/// [`RlError::Shape`] when `names` or a row does not match `weights`.
pub fn reward_metrics(
    rewards_per_func: &[Vec<f64>],
    weights: &[f64],
    names: &[&str],
    frac_reward_zero_std: f64,
) -> Result<Metrics> {
    super::expect_len("reward_metrics", "names", names.len(), weights.len())?;
    let rewards = aggregate_rewards(rewards_per_func, weights)?;
    let mut m = Metrics::new();
    for (f, name) in names.iter().enumerate() {
        let col: Vec<f64> = rewards_per_func.iter().map(|row| row[f]).collect();
        m.insert(format!("rewards/{name}/mean"), nanmean(&col));
        m.insert(format!("rewards/{name}/std"), nanstd(&col));
    }
    m.insert("reward".into(), nanmean(&rewards));
    m.insert("reward_std".into(), nanstd(&rewards));
    m.insert("frac_reward_zero_std".into(), frac_reward_zero_std);
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    const NAN: f64 = f64::NAN;

    #[test]
    fn none_rewards_count_as_zero_unless_every_function_returned_none() {
        let r = aggregate_rewards(&[vec![1.0, NAN], vec![NAN, NAN], vec![1.0, 2.0]], &[1.0, 0.5]).unwrap();
        assert_eq!(r[0], 1.0);
        assert!(r[1].is_nan());
        assert_eq!(r[2], 2.0);
    }

    #[test]
    fn group_advantages_are_zero_mean_per_group_and_zero_for_unscorable_rows() {
        let rows = vec![vec![1.0], vec![2.0], vec![NAN], vec![4.0], vec![0.0], vec![0.0]];
        let a = group_advantages(&rows, &[1.0], 3, ScaleRewards::None, RewardAggregation::default()).unwrap();
        assert_eq!(a.advantages[..3], [-0.5, 0.5, 0.0]);
        let sum: f64 = a.advantages[3..].iter().sum();
        assert!(sum.abs() < 1e-12);
        // A constant group has std 0 and counts in frac_reward_zero_std (per row).
        let c = group_advantages(
            &[vec![1.0], vec![1.0], vec![0.0], vec![2.0]],
            &[1.0],
            2,
            ScaleRewards::Group,
            RewardAggregation::default(),
        )
        .unwrap();
        assert_eq!(c.advantages[..2], [0.0, 0.0]);
        assert_eq!(c.frac_reward_zero_std, 0.5);
    }

    #[test]
    fn batch_scaling_uses_the_batch_std_and_the_group_mean() {
        let rows = vec![vec![0.0], vec![2.0], vec![10.0], vec![14.0]];
        let a = group_advantages(&rows, &[1.0], 2, ScaleRewards::Batch, RewardAggregation::default()).unwrap();
        let s = nanstd(&[0.0, 2.0, 10.0, 14.0]);
        assert!((a.advantages[0] + 1.0 / (s + 1e-4)).abs() < 1e-12);
        assert!((a.advantages[3] - 2.0 / (s + 1e-4)).abs() < 1e-12);
    }

    #[test]
    fn groups_must_be_whole() {
        let rows = vec![vec![0.0]; 5];
        assert!(matches!(
            group_advantages(&rows, &[1.0], 2, ScaleRewards::Group, RewardAggregation::default()),
            Err(RlError::Config { .. })
        ));
        assert!(aggregate_rewards(&[vec![1.0]], &[1.0, 2.0]).is_err());
    }
}
