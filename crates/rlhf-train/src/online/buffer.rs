//! One generation batch as the optimisation reads it (TRL 1.16's `_buffered_inputs`):
//! the padded prompt and completion ids, the completion (= loss and attention) mask, the
//! advantages and the log-probs taken at generation time, and the per-token log-probs of a
//! forward pass over any of its rows.
//!
//! Layout as TRL's `_generate_and_score_completions` builds it: prompts left-padded to the
//! longest prompt of the batch, completions right-padded to the longest kept completion; the
//! scoring forward runs over `[prompt; completion]` with attention mask
//! `[prompt_mask; completion_mask]` and **no position ids**, so transformers numbers the
//! positions `0..P+C` over the padding too (`arange`), which `forward_at` reproduces. The
//! pass runs packed where it can ([`PackedRows`]): the real tokens at those positions, a
//! prompt's rows computed once for its group of completions.

use candle_core::{DType, Device, Tensor};
use rlhf_models::{Fwd, Model};
use rlhf_ops::rl::completions::Completions;
use rlhf_ops::rl::logprobs::tempered_lm_head_logprobs_and_entropy;
use rlhf_ops::sink::GradSink;
use serde::{Deserialize, Serialize};

use crate::config_values::setting_of;
use crate::error::Result;

/// A scored generation batch of `B` completions (host data, saved in checkpoints so that a
/// run resumed inside a generation batch reuses it exactly).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Buffer {
    /// Prompt ids `(B, P)`, left-padded with the pad id.
    pub prompt_ids: Vec<Vec<u32>>,
    /// 1 on prompt tokens, 0 on padding `(B, P)`.
    pub prompt_mask: Vec<Vec<u32>>,
    /// Completion ids `(B, C)` through the first EOS, right-padded with the pad id.
    pub completion_ids: Vec<Vec<u32>>,
    /// Completion mask `(B, C)`: 1 up to and including the first EOS; all 0 on truncated
    /// rows under `mask_truncated_completions`. The loss mask and the completion half of the
    /// attention mask.
    pub completion_mask: Vec<Vec<f32>>,
    /// One advantage per completion.
    pub advantages: Vec<f64>,
    /// Per-token log-probs of the sampling policy `(B, C)`, when the algorithm needs them.
    pub old_logps: Option<Vec<Vec<f32>>>,
    /// Per-token log-probs of the reference `(B, C)`, when `beta != 0`.
    pub ref_logps: Option<Vec<Vec<f32>>>,
    /// `num_items_in_batch`: the completion mask's sum over the batch.
    pub num_items: f64,
    /// Row order of the micro-batches (TRL shuffles the buffer before splitting it).
    pub order: Vec<usize>,
}

/// The tensors of some rows of a [`Buffer`].
pub struct RowTensors {
    /// `[prompt; completion]` ids `(b, P + C)`.
    pub ids: Tensor,
    /// `[prompt_mask; completion_mask]` `(b, P + C)`.
    pub attention: Tensor,
    /// `arange(P + C)` per row, row-major (`b·(P + C)`).
    pub positions: Vec<u32>,
    /// Completion ids `(b, C)`.
    pub labels: Tensor,
    /// Completion mask `(b, C)`, f32.
    pub mask: Tensor,
    /// Prompt width `P`.
    pub prompt_width: usize,
    /// The same rows without padding, for the packed pass ([`completion_logps`]); `None`
    /// where a row's masks are not a left-padded prompt and a prefix of completion tokens.
    pub packed: Option<PackedRows>,
}

/// Rows of a [`Buffer`] as packed sequences of their real tokens: the prompt's (the first
/// at position `a`, its left padding, as the padded pass's `arange` numbers it) then the
/// completion's through its mask. Rows of one prompt share its rows in the pass.
pub struct PackedRows {
    /// Real tokens of each row.
    seqs: Vec<Vec<u32>>,
    /// Position of each row's first token.
    offsets: Vec<usize>,
    /// For each row and completion position `t`, `(b·C)`: the packed row (every sequence
    /// in full) whose hidden state predicts completion token `t`, or the total row count
    /// for a position outside the attention mask (a zero row; masked out of every result).
    index: Vec<u32>,
}

impl PackedRows {
    /// The packed layout of `rows`, or `None` for masks of another shape.
    fn new(buf: &Buffer, rows: &[usize]) -> Option<Self> {
        let (p, c) = (buf.prompt_ids[0].len(), buf.completion_ids[0].len());
        let (mut seqs, mut offsets) = (Vec::new(), Vec::new());
        for &r in rows {
            let pm = &buf.prompt_mask[r];
            let a = pm.iter().take_while(|&&m| m == 0).count();
            let kept = buf.completion_mask[r].iter().take_while(|&&m| m != 0.0).count();
            if a == p || pm[a..].iter().any(|&m| m != 1) || buf.completion_mask[r][kept..].iter().any(|&m| m != 0.0) {
                return None;
            }
            let mut seq = buf.prompt_ids[r][a..].to_vec();
            seq.extend_from_slice(&buf.completion_ids[r][..kept]);
            offsets.push(a);
            seqs.push(seq);
        }
        let total: usize = seqs.iter().map(Vec::len).sum();
        let mut index = Vec::with_capacity(rows.len() * c);
        let mut start = 0;
        for (seq, &a) in seqs.iter().zip(&offsets) {
            // Position P − 1 + t predicts completion token t: index P − 1 + t − a.
            let (first, len) = (p - 1 - a, seq.len());
            index.extend((0..c).map(|t| {
                if first + t < len {
                    (start + first + t) as u32
                } else {
                    total as u32
                }
            }));
            start += len;
        }
        Some(Self { seqs, offsets, index })
    }

    /// Hidden states `(b, C, H)` at the positions that predict the completion tokens,
    /// zero outside the attention mask.
    fn completion_hidden(&self, model: &Model, c: usize, fwd: &mut Fwd) -> Result<Tensor> {
        let seqs: Vec<&[u32]> = self.seqs.iter().map(Vec::as_slice).collect();
        let hidden = model.forward_packed_from(&seqs, &self.offsets, fwd)?;
        let zero = Tensor::zeros((1, hidden.dim(1)?), hidden.dtype(), hidden.device())?;
        let idx = Tensor::from_slice(&self.index, self.index.len(), hidden.device())?;
        let h = Tensor::cat(&[&hidden, &zero], 0)?.index_select(&idx, 0)?;
        Ok(h.reshape((self.seqs.len(), c, ()))?)
    }
}

impl Buffer {
    /// The buffer of a rollout (prompt and completion ids, cut at the policy's EOS ids and
    /// padded with its pad id) and the completions' metrics (`num_tokens`, `completions/*`),
    /// as both online trainers start their `prepare`.
    pub fn from_rollout(
        policy: &Model,
        rollout: &crate::online::rollout::Rollout,
        num_tokens_seen: f64,
        mask_truncated_completions: bool,
    ) -> Result<(Self, rlhf_ops::rl::Metrics)> {
        let pad = policy.tokenizer()?.pad_token_id;
        let eos = policy.eos_token_ids();
        let (buf, info) = Self::new(
            &rollout.prompt_ids,
            &rollout.completion_ids,
            &eos,
            pad,
            mask_truncated_completions,
        )?;
        let prompt_lengths: Vec<usize> = rollout.prompt_ids.iter().map(Vec::len).collect();
        let metrics = info.metrics(&prompt_lengths, num_tokens_seen).map_err(setting_of)?;
        Ok((buf, metrics))
    }

    /// Pads the unpadded prompts and kept completions of a generation batch (one prompt
    /// per completion) and reads the masks; the advantages and log-probs are filled later.
    ///
    /// # Errors
    /// [`crate::TrainError::Config`] when a completion is empty or the lists differ in length.
    pub fn new(
        prompts: &[Vec<u32>],
        completions: &[Vec<u32>],
        eos: &[u32],
        pad: u32,
        mask_truncated_completions: bool,
    ) -> Result<(Self, Completions)> {
        let p = prompts.iter().map(Vec::len).max().unwrap_or(0);
        let c = completions.iter().map(Vec::len).max().unwrap_or(0);
        let right = |r: &Vec<u32>| {
            let mut r = r.clone();
            r.resize(c, pad);
            r
        };
        let completion_ids: Vec<Vec<u32>> = completions.iter().map(right).collect();
        let info = Completions::from_ids(&completion_ids, eos, pad).map_err(setting_of)?;
        let completion_mask = info.mask_rows(mask_truncated_completions);
        let b = prompts.len();
        Ok((
            Self {
                prompt_ids: prompts
                    .iter()
                    .map(|r| std::iter::repeat_n(pad, p - r.len()).chain(r.iter().copied()).collect())
                    .collect(),
                prompt_mask: prompts
                    .iter()
                    .map(|r| {
                        std::iter::repeat_n(0, p - r.len())
                            .chain(std::iter::repeat_n(1, r.len()))
                            .collect()
                    })
                    .collect(),
                completion_ids,
                completion_mask,
                advantages: vec![0.0; b],
                old_logps: None,
                ref_logps: None,
                num_items: info.num_items(mask_truncated_completions) as f64,
                order: (0..b).collect(),
            },
            info,
        ))
    }

    /// Number of completions `B`.
    pub fn len(&self) -> usize {
        self.completion_ids.len()
    }

    /// Whether the buffer holds no completion.
    pub fn is_empty(&self) -> bool {
        self.completion_ids.is_empty()
    }

    /// Completion tokens in the loss of `rows` (their completion masks' sum).
    pub fn tokens(&self, rows: &[usize]) -> f64 {
        rows.iter()
            .map(|&r| self.completion_mask[r].iter().map(|&m| f64::from(m)).sum::<f64>())
            .sum()
    }

    /// The rows of micro-batch `slice` (of `bs` rows each) in the buffer's order.
    pub fn slice_rows(&self, slice: usize, bs: usize) -> Vec<usize> {
        let start = (slice * bs).min(self.len());
        self.order[start..(start + bs).min(self.len())].to_vec()
    }

    /// The tensors of `rows`.
    pub fn tensors(&self, rows: &[usize], device: &Device) -> Result<RowTensors> {
        let b = rows.len();
        let (p, c) = (self.prompt_ids[0].len(), self.completion_ids[0].len());
        let t = p + c;
        let (mut ids, mut att, mut labels, mut mask) = (
            Vec::with_capacity(b * t),
            Vec::with_capacity(b * t),
            Vec::with_capacity(b * c),
            Vec::with_capacity(b * c),
        );
        for &r in rows {
            ids.extend_from_slice(&self.prompt_ids[r]);
            ids.extend_from_slice(&self.completion_ids[r]);
            att.extend_from_slice(&self.prompt_mask[r]);
            att.extend(self.completion_mask[r].iter().map(|&m| m as u32));
            labels.extend_from_slice(&self.completion_ids[r]);
            mask.extend_from_slice(&self.completion_mask[r]);
        }
        Ok(RowTensors {
            ids: Tensor::from_vec(ids, (b, t), device)?,
            attention: Tensor::from_vec(att, (b, t), device)?,
            positions: (0..b).flat_map(|_| 0..t as u32).collect(),
            labels: Tensor::from_vec(labels, (b, c), device)?,
            mask: Tensor::from_vec(mask, (b, c), device)?,
            prompt_width: p,
            packed: PackedRows::new(self, rows),
        })
    }

    /// `rows` of a per-token table `(B, C)` as a tensor `(b, C)`.
    pub fn rows_of(table: &[Vec<f32>], rows: &[usize], device: &Device) -> Result<Tensor> {
        let c = table.first().map_or(0, Vec::len);
        let flat: Vec<f32> = rows.iter().flat_map(|&r| table[r].iter().copied()).collect();
        Ok(Tensor::from_vec(flat, (rows.len(), c), device)?)
    }

    /// The advantages of `rows` `(b)`.
    pub fn advantages_of(&self, rows: &[usize], device: &Device) -> Result<Tensor> {
        let a: Vec<f32> = rows.iter().map(|&r| self.advantages[r] as f32).collect();
        Ok(Tensor::from_vec(a, rows.len(), device)?)
    }

    /// Per-token log-probs `(B, C)` of every row without gradients, in chunks of `chunk`
    /// rows (TRL scores the buffer in micro-batches); `adapters = false` is the reference
    /// of a LoRA policy. With several ranks each computes a contiguous part of the rows
    /// and every rank gets all of them.
    pub fn logps_no_grad(
        &self,
        model: &Model,
        temperature: f64,
        chunk: usize,
        adapters: bool,
    ) -> Result<Vec<Vec<f32>>> {
        let dist = crate::dist::world();
        let mine: Vec<usize> = crate::dist::split(self.len(), dist.rank(), dist.size()).collect();
        let mut out = Vec::with_capacity(self.len());
        for rows in mine.chunks(chunk.max(1)) {
            let x = self.tensors(rows, model.device())?;
            let mut fwd = if adapters {
                Fwd::eval()
            } else {
                Fwd::eval().without_adapters()
            };
            let (lp, _) = completion_logps(model, &x, temperature, &mut fwd)?;
            out.extend(lp.to_dtype(DType::F32)?.to_vec2::<f32>()?);
        }
        if dist.size() == 1 {
            return Ok(out);
        }
        let c = self.completion_ids.first().map_or(0, Vec::len);
        let flat: Vec<f32> = out.into_iter().flatten().collect();
        Ok(dist
            .all_gather_f32(&flat)?
            .chunks(c.max(1))
            .map(<[f32]>::to_vec)
            .collect())
    }
}

/// Per-token log-probs and entropies `(b, C)` of the completion tokens of `x` at
/// `temperature` (TRL `_get_per_token_logps_and_entropies`), 0 outside the completion mask;
/// differentiable when `fwd.grad` (the LM head's weight gradient goes to `fwd.sink` when
/// it has one).
pub fn completion_logps(model: &Model, x: &RowTensors, temperature: f64, fwd: &mut Fwd) -> Result<(Tensor, Tensor)> {
    let c = x.labels.dim(1)?;
    let h = match &x.packed {
        // The real tokens only, each prompt's rows once for all its completions (unless the
        // pass draws dropout); the same hidden states wherever the attention mask is 1, and
        // the same dropout masks (drawn per sequence in its own token order).
        Some(p) => p.completion_hidden(model, c, fwd)?,
        None => {
            let hidden = model.forward_at(&x.ids, &x.attention, &x.positions, fwd)?;
            // Position P−1+t predicts completion token t.
            hidden.narrow(1, x.prompt_width - 1, c)?
        }
    };
    let w = model.lm_head_weight(fwd.grad)?;
    let sink: Option<&GradSink> = fwd.sink;
    let (lp, ent) = tempered_lm_head_logprobs_and_entropy(&h, w, &x.labels, temperature, sink).map_err(setting_of)?;
    let m = x.mask.to_dtype(lp.dtype())?;
    Ok(((lp * &m)?, (ent * m)?))
}
