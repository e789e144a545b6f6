//! What the online trainers (GRPO, RLOO) share: sampling groups of completions and scoring
//! them ([`rollout`]), the buffered generation batch and its log-probs ([`buffer`]), and the
//! loop that drives generation, optimisation, logging and checkpoints ([`run`]).

pub mod buffer;
pub mod rollout;
pub mod run;

use std::collections::BTreeMap;

use rlhf_models::Model;
use serde::{Deserialize, Serialize};

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
