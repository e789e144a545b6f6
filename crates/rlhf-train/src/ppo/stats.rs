//! PPO's statistics under TRL 0.11's names: `record_step_stats` and `log_stats`.

use std::collections::BTreeMap;

use candle_core::{DType, Tensor, D};
use rlhf_ops::ppo::masked_mean;

use crate::error::Result;

/// Statistics of one `step()`: scalars and per-sample/per-token tensors, TRL's names.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Stats {
    /// Scalar statistics (`objective/kl`, `ppo/loss/policy`, `time/ppo/total`, ...).
    pub scalars: BTreeMap<String, f64>,
    /// Tensor statistics, flattened (`objective/kl_dist`, `ppo/policy/advantages`, ...).
    pub tensors: BTreeMap<String, Vec<f32>>,
}

/// Mean and unbiased std (`torch.std`).
pub(super) fn mean_std(v: &[f32]) -> (f64, f64) {
    let n = v.len() as f64;
    let m = v.iter().map(|&x| x as f64).sum::<f64>() / n;
    let var = v.iter().map(|&x| (x as f64 - m).powi(2)).sum::<f64>() / (n - 1.0).max(1.0);
    (m, if v.len() > 1 { var.sqrt() } else { f64::NAN })
}

/// TRL's `record_step_stats` (before the minibatch statistics are added).
pub(super) fn step_stats(
    logprobs: &Tensor,
    ref_logprobs: &Tensor,
    masks: &Tensor,
    non_score: &Tensor,
    scores: &[f32],
    kl_coef: f64,
) -> Result<Stats> {
    let kl_list: Vec<f32> = ((logprobs - ref_logprobs)? * masks)?.sum(D::Minus1)?.to_vec1()?;
    let entropy: Vec<f32> = (logprobs.neg()? * masks)?.sum(D::Minus1)?.to_vec1()?;
    let mean = |v: &[f32]| v.iter().map(|&x| x as f64).sum::<f64>() / v.len().max(1) as f64;
    let mut s = Stats::default();
    s.scalars.insert("objective/kl".into(), mean(&kl_list));
    s.scalars.insert("objective/kl_coef".into(), kl_coef);
    s.scalars.insert("objective/entropy".into(), mean(&entropy));
    let nsr = masked_mean(non_score, masks, None)?
        .to_dtype(DType::F64)?
        .to_scalar::<f64>()?;
    s.scalars.insert("ppo/mean_non_score_reward".into(), nsr);
    let (m, sd) = mean_std(scores);
    s.scalars.insert("ppo/mean_scores".into(), m);
    s.scalars.insert("ppo/std_scores".into(), sd);
    s.tensors.insert("objective/kl_dist".into(), kl_list);
    Ok(s)
}

/// TRL's `log_stats`: adds `env/reward_mean`, `env/reward_std` and `env/reward_dist` to the
/// step's statistics and returns the scalar record (with `step`) for `metrics.jsonl`.
pub fn log_stats(stats: &mut Stats, rewards: &[f32], step: u64) -> serde_json::Value {
    let (m, s) = mean_std(rewards);
    stats.scalars.insert("env/reward_mean".into(), m);
    stats.scalars.insert("env/reward_std".into(), s);
    stats.tensors.insert("env/reward_dist".into(), rewards.to_vec());
    let mut obj = serde_json::Map::new();
    obj.insert("step".into(), step.into());
    for (k, v) in &stats.scalars {
        obj.insert(k.clone(), serde_json::json!(v));
    }
    serde_json::Value::Object(obj)
}
