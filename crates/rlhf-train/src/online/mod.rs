//! What the online trainers (GRPO, RLOO) share: sampling groups of completions and scoring
//! them ([`rollout`]), the buffered generation batch and its log-probs ([`buffer`]), and the
//! loop that drives generation, optimisation, logging and checkpoints ([`run`]).

pub mod buffer;
pub mod rollout;
pub mod run;

use std::collections::BTreeMap;

use rlhf_models::Model;
use rlhf_ops::rl::Metrics;
use serde::{Deserialize, Serialize};

use crate::dist::{world, ReduceOp};
use crate::error::Result;
use buffer::Buffer;

/// The reference policy of a run with `beta != 0`.
pub enum Reference<'a> {
    /// No reference (`beta = 0`).
    None,
    /// The policy with its LoRA adapters disabled (PEFT's `disable_adapter()`).
    AdaptersDisabled,
    /// A frozen model.
    Frozen(&'a Model),
}

impl Reference<'_> {
    /// Per-token reference log-probs `(B, C)` of the buffer's completions, or `None`
    /// without a reference.
    pub fn logps(
        &self,
        policy: &Model,
        buffer: &Buffer,
        temperature: f64,
        chunk: usize,
    ) -> Result<Option<Vec<Vec<f32>>>> {
        Ok(match self {
            Self::None => None,
            Self::AdaptersDisabled => Some(buffer.logps_no_grad(policy, temperature, chunk, false)?),
            Self::Frozen(m) => Some(buffer.logps_no_grad(m, temperature, chunk, true)?),
        })
    }
}

/// TRL's metric log: every value appended under its name (generation metrics once per
/// generation batch, loss metrics once per micro-batch, `loss` once per optimizer step);
/// a logged value is the mean of what was appended since the last log.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct MetricLog {
    /// Sum and count per name.
    pub sums: BTreeMap<String, (f64, u64)>,
}

impl MetricLog {
    /// Appends every metric of `m`.
    pub fn extend(&mut self, m: &BTreeMap<String, f64>) {
        for (k, v) in m {
            self.push(k, *v);
        }
    }

    /// Appends one value.
    pub fn push(&mut self, k: &str, v: f64) {
        let e = self.sums.entry(k.to_string()).or_default();
        e.0 += v;
        e.1 += 1;
    }

    /// The means, clearing the log.
    pub fn take_means(&mut self) -> BTreeMap<String, f64> {
        std::mem::take(&mut self.sums)
            .into_iter()
            .map(|(k, (s, n))| (k, s / n.max(1) as f64))
            .collect()
    }
}

/// How a micro-batch metric of one rank's rows combines with the other ranks' into the
/// whole micro-batch's value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pool {
    /// A mean over completion tokens.
    Tokens,
    /// A mean over completions.
    Rows,
    /// The minimum, NaN ignored (`nanmin`).
    Min,
    /// The maximum, NaN ignored (`nanmax`).
    Max,
}

/// Turns this rank's micro-batch metrics `m` (over its `rows` completions holding `tokens`
/// completion tokens) into the whole micro-batch's, as one process holding every rank's rows
/// computes them (up to the order of sums). The identity on one process. A mean that is not
/// finite on a rank that holds rows is NaN everywhere; min/max skip NaN and are NaN when
/// every rank's is.
pub fn pool_metrics(m: &mut Metrics, rows: f64, tokens: f64, pool: &dyn Fn(&str) -> Pool) -> Result<()> {
    let dist = world();
    if dist.size() == 1 {
        return Ok(());
    }
    let keys = dist.all_keys(m)?;
    let n = keys.len();
    // sums: [Σ v·w, Σ w, non-finite count] per key; extremes: min, or −max, per key.
    let mut sums = vec![0.0; 3 * n];
    let mut extremes = vec![f64::INFINITY; n];
    for (i, k) in keys.iter().enumerate() {
        let Some(&v) = m.get(k) else { continue };
        match pool(k) {
            Pool::Min if !v.is_nan() => extremes[i] = v,
            Pool::Max if !v.is_nan() => extremes[i] = -v,
            Pool::Min | Pool::Max => {}
            kind => {
                let w = if kind == Pool::Tokens { tokens } else { rows };
                if w <= 0.0 {
                    continue;
                }
                if !v.is_finite() {
                    sums[2 * n + i] = 1.0;
                }
                sums[i] = v * w;
                sums[n + i] = w;
            }
        }
    }
    dist.all_reduce_f64(&mut sums, ReduceOp::Sum)?;
    dist.all_reduce_f64(&mut extremes, ReduceOp::Min)?;
    m.clear();
    for (i, k) in keys.into_iter().enumerate() {
        let extreme = |x: f64| if x.is_finite() { x } else { f64::NAN };
        let v = match pool(&k) {
            Pool::Min => extreme(extremes[i]),
            Pool::Max => -extreme(extremes[i]),
            _ if sums[2 * n + i] > 0.0 => f64::NAN,
            _ if sums[n + i] > 0.0 => sums[i] / sums[n + i],
            _ => f64::NAN,
        };
        m.insert(k, v);
    }
    Ok(())
}
