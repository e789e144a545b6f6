//! Stage 1 of an online step: prompts → `G` completions each → rewards of every reward
//! function (TRL 1.16 `_generate_and_score_completions` up to the advantages).
//!
//! Generation is behind [`Sampler`] so that tests can feed fixed completions (as the TRL
//! fixtures replace `model.generate`) through the same scoring, advantage and loss path.
//! Sampling draws from one random stream per completion ([`completion_streams`]), derived
//! from the seed and the completion's index in the run, so a completion does not depend on
//! the batch it was generated in and a resumed run samples exactly what it would have.

use rlhf_models::{GenerationConfig, Model};
use rlhf_ops::rng::RngStream;

use crate::data::PromptRow;
use crate::error::Result;
use crate::reward_fns::{rewards_per_completion, RewardBatch, RewardFuncs};

/// Where completions come from.
pub enum Sampler<'a> {
    /// The policy samples them ([`Model::generate_groups`]).
    Policy(&'a GenerationConfig),
    /// Fixed completion ids, one per row (tests; kept through the first EOS).
    Fixed(&'a [Vec<u32>]),
}

/// A generation batch before scoring: one entry per completion, a prompt's `G`
/// completions consecutive.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Rollout {
    /// Unpadded prompt ids of each completion's prompt.
    pub prompt_ids: Vec<Vec<u32>>,
    /// Completion ids through the first EOS (inclusive).
    pub completion_ids: Vec<Vec<u32>>,
    /// Completion texts, special tokens skipped (what reward functions read).
    pub texts: Vec<String>,
}

impl Rollout {
    /// Every rank's rollout in rank order: the generation batch as one process holding all
    /// of it would see it (`self` on one process).
    pub fn gather(self) -> Result<Self> {
        let dist = crate::dist::world();
        if dist.size() == 1 {
            return Ok(self);
        }
        let json = serde_json::to_vec(&self.texts).map_err(|e| crate::TrainError::Dist(e.to_string()))?;
        let mut texts = Vec::new();
        for bytes in dist.all_gather_bytes(&json)? {
            let part: Vec<String> =
                serde_json::from_slice(&bytes).map_err(|e| crate::TrainError::Dist(e.to_string()))?;
            texts.extend(part);
        }
        Ok(Self {
            prompt_ids: dist.all_gather_seqs(&self.prompt_ids)?,
            completion_ids: dist.all_gather_seqs(&self.completion_ids)?,
            texts,
        })
    }
}

/// Every rank's rows of a reward table of `cols` functions, in rank order.
pub fn gather_table(table: &[Vec<f64>], cols: usize) -> Result<Vec<Vec<f64>>> {
    let dist = crate::dist::world();
    if dist.size() == 1 {
        return Ok(table.to_vec());
    }
    let flat: Vec<f64> = table.iter().flatten().copied().collect();
    Ok(dist
        .all_gather_f64(&flat)?
        .chunks(cols.max(1))
        .map(<[f64]>::to_vec)
        .collect())
}

/// One stream per completion of generation batch `generation` (`rows` completions): stream
/// `j` is determined by `(seed, generation, j)` alone.
pub fn completion_streams(seed: u64, generation: u64, rows: usize) -> Vec<RngStream> {
    (0..rows)
        .map(|j| {
            let mut base = RngStream {
                seed: seed ^ 0x4752_504F_5F47_454E,
                counter: generation.wrapping_mul(1 << 20).wrapping_add(j as u64),
            };
            RngStream::new(base.next_u64())
        })
        .collect()
}

/// Generates `g` completions of each prompt (ids `prompts`), cuts each after its first EOS
/// and decodes the texts.
pub fn generate(
    model: &Model,
    prompts: &[Vec<u32>],
    g: usize,
    sampler: &Sampler<'_>,
    streams: &mut [RngStream],
) -> Result<Rollout> {
    let tok = model.tokenizer()?;
    let eos = model.eos_token_ids();
    let raw = match sampler {
        Sampler::Policy(cfg) => model.generate_groups(prompts, g, cfg, streams)?.response_ids,
        Sampler::Fixed(ids) => ids.to_vec(),
    };
    let mut completion_ids = Vec::with_capacity(raw.len());
    let mut texts = Vec::with_capacity(raw.len());
    for mut r in raw {
        crate::collate::cut_after_eos(&mut r, &eos);
        texts.push(tok.decode(&r, true)?);
        completion_ids.push(r);
    }
    Ok(Rollout {
        prompt_ids: prompts.iter().flat_map(|p| std::iter::repeat_n(p.clone(), g)).collect(),
        completion_ids,
        texts,
    })
}

/// The `B × K` reward table (completion × function, NaN for `None`) of a rollout of the
/// prompt `rows`.
pub fn score(funcs: &mut RewardFuncs, rows: &[&PromptRow], g: usize, rollout: &Rollout) -> Result<Vec<Vec<f64>>> {
    let batch = RewardBatch::new(rows, g, rollout.texts.clone(), rollout.completion_ids.clone())?;
    Ok(rewards_per_completion(&funcs.score(&batch)?))
}
