//! Stage 3 of DPO: one micro-batch's loss and metrics (TRL 1.16 `DPOTrainer.compute_loss`).
//!
//! The `2N` rows of the collator (chosen, then rejected; [`collate_preference`]) run as one
//! packed forward without padding ([`Model::forward_packed`]: the same hidden states as the
//! right-padded batch, whose positions count from 0 in every row). The LM head runs only at
//! the positions whose next token is a completion token (`completion_mask[:, t + 1]`), the
//! only ones DPO reads; the per-token log-probs are then laid out `(2N, L − 1)` with zeros
//! elsewhere, as TRL's, and go to [`dpo_loss`]. The reference's summed log-probs come from
//! a frozen model, the policy with adapters disabled, or the precomputed columns.

use std::collections::BTreeMap;

use candle_core::{DType, Tensor};
use rlhf_models::{Fwd, Model};
use rlhf_ops::rl::dpo::{
    dpo_loss, dpo_token_metrics, mean_logits_from_hidden, top1_matches, DpoLossInputs, DpoReference, DpoTokenOutputs,
};
use rlhf_ops::rl::dpo_data::{collate_preference, PreferenceBatch, PreferenceIds};
use rlhf_ops::rl::logprobs::tempered_lm_head_logprobs_and_entropy;

use super::data::DpoExample;
use crate::config_values::setting_of;
use crate::dpo_config::DpoPlan;
use crate::error::{Result, TrainError};

/// Where a batch's reference log-probs come from.
#[derive(Clone, Copy, Debug)]
pub enum RefSource<'a> {
    /// A forward pass of `model` (eval mode, no gradients); `adapters: false` disables its
    /// LoRA adapters (PEFT's `disable_adapter()`, the reference under `use_peft`).
    Forward {
        /// The model.
        model: &'a Model,
        /// Whether its adapters apply.
        adapters: bool,
    },
    /// Each example's [`DpoExample::ref_logps`] (`precompute_ref_log_probs`).
    Precomputed,
}

/// A collated batch and where its scored positions sit in the packed forward.
pub struct PackedBatch {
    /// The collator's right-padded batch (`2N` rows).
    pub batch: PreferenceBatch,
    /// Each row without padding.
    seqs: Vec<Vec<u32>>,
    /// Packed row of every scored position (`completion_mask[r][t + 1] = 1`), row-major.
    selected: Vec<u32>,
    /// The token each scored position predicts.
    labels: Vec<u32>,
    /// For each `(r, t)` of the `(2N, L − 1)` layout: its scored position, or `M` (a zero).
    layout: Vec<u32>,
    /// How many scored positions belong to chosen rows (they come first).
    chosen_positions: usize,
    rows: usize,
    cols: usize,
}

impl PackedBatch {
    /// Collates `examples` as TRL's `DataCollatorForPreference` and indexes the packed rows.
    pub fn new(examples: &[&PreferenceIds], pad_token_id: u32, plan: &DpoPlan) -> Result<Self> {
        let owned: Vec<PreferenceIds> = examples.iter().map(|e| (*e).clone()).collect();
        let batch = collate_preference(
            &owned,
            pad_token_id,
            plan.max_length,
            plan.truncation_mode,
            plan.pad_to_multiple_of,
        )
        .map_err(setting_of)?;
        let rows = batch.input_ids.len();
        let width = batch.input_ids.first().map_or(0, Vec::len);
        let cols = width.saturating_sub(1);
        let n = rows / 2;
        let (mut seqs, mut selected, mut labels) = (Vec::with_capacity(rows), Vec::new(), Vec::new());
        let mut layout = Vec::with_capacity(rows * cols);
        let (mut offset, mut chosen_positions) = (0usize, 0usize);
        for r in 0..rows {
            let len = batch.attention_mask[r].iter().filter(|&&a| a != 0).count();
            seqs.push(batch.input_ids[r][..len].to_vec());
            for t in 0..cols {
                if batch.completion_mask[r][t + 1] != 0 {
                    layout.push(selected.len() as u32);
                    selected.push((offset + t) as u32);
                    labels.push(batch.input_ids[r][t + 1]);
                    if r < n {
                        chosen_positions += 1;
                    }
                } else {
                    layout.push(u32::MAX);
                }
            }
            offset += len;
        }
        let m = selected.len() as u32;
        layout.iter_mut().filter(|i| **i == u32::MAX).for_each(|i| *i = m);
        Ok(Self {
            batch,
            seqs,
            selected,
            labels,
            layout,
            chosen_positions,
            rows,
            cols,
        })
    }

    /// Scored positions `(M)` laid out as `(2N, L − 1)`, zero elsewhere; differentiable.
    fn spread(&self, values: &Tensor) -> Result<Tensor> {
        let dev = values.device();
        let zero = Tensor::zeros(1, values.dtype(), dev)?;
        let padded = Tensor::cat(&[values, &zero], 0)?;
        let idx = Tensor::from_slice(&self.layout, self.layout.len(), dev)?;
        Ok(padded.index_select(&idx, 0)?.reshape((self.rows, self.cols))?)
    }

    /// Summed completion log-probs per row `(2N)`: the `(2N, L − 1)` layout summed over
    /// its columns, the reduction `dpo_loss` applies to the policy (so that a reference equal
    /// to the policy gives exactly zero rewards).
    fn row_sums(&self, logps: &Tensor) -> Result<Vec<f32>> {
        Ok(self.spread(logps)?.sum(1)?.to_dtype(DType::F32)?.to_vec1()?)
    }
}

/// What one forward pass gives at the scored positions.
struct Scored {
    /// Log-probs of the labels `(M)` (differentiable when the forward recorded a graph).
    logps: Tensor,
    /// Entropy of the next-token distribution `(M)`.
    entropy: Tensor,
    /// Final hidden states `(M, H)`.
    hidden: Tensor,
}

/// A forward pass of `model` over the packed rows, then the LM head at the scored positions
/// (the fused log-prob kernel on the CPU: no `(M, V)` logits are kept).
fn score(model: &Model, packed: &PackedBatch, fwd: &mut Fwd) -> Result<Scored> {
    let seqs: Vec<&[u32]> = packed.seqs.iter().map(Vec::as_slice).collect();
    let hidden = model.forward_packed(&seqs, fwd)?;
    let dev = hidden.device().clone();
    let sel = Tensor::from_slice(&packed.selected, packed.selected.len(), &dev)?;
    let hidden = hidden.index_select(&sel, 0)?;
    let labels = Tensor::from_slice(&packed.labels, packed.labels.len(), &dev)?;
    let w = model.lm_head_weight(fwd.grad)?;
    let (logps, entropy) =
        tempered_lm_head_logprobs_and_entropy(&hidden, w, &labels, 1.0, fwd.sink).map_err(setting_of)?;
    Ok(Scored { logps, entropy, hidden })
}

/// Summed reference log-probs `(chosen, rejected)` of each example, `batch` pairs per
/// forward (TRL's `compute_ref_log_probs`, used by `precompute_ref_log_probs`).
pub fn reference_logps(
    model: &Model,
    adapters: bool,
    examples: &[&PreferenceIds],
    plan: &DpoPlan,
    batch: usize,
) -> Result<Vec<(f32, f32)>> {
    let pad = pad_id(model)?;
    let mut out = Vec::with_capacity(examples.len());
    for chunk in examples.chunks(batch.max(1)) {
        let packed = PackedBatch::new(chunk, pad, plan)?;
        let mut fwd = if adapters {
            Fwd::eval()
        } else {
            Fwd::eval().without_adapters()
        };
        let sums = packed.row_sums(&score(model, &packed, &mut fwd)?.logps)?;
        let n = chunk.len();
        out.extend((0..n).map(|i| (sums[i], sums[n + i])));
    }
    Ok(out)
}

/// The pad id batches are padded with (the model's, else EOS as TRL sets it).
pub fn pad_id(model: &Model) -> Result<u32> {
    model.pad_token_id().ok_or_else(|| {
        TrainError::Config(
            "the model has neither a pad token nor an EOS token to pad preference rows with\n\
             hint: set `pad_token_id` in the model's config.json"
                .into(),
        )
    })
}

/// A batch's reference log-probs, owned.
enum Ref {
    /// `(2N, L − 1)`.
    PerToken(Tensor),
    /// `(N)` chosen and `(N)` rejected sums.
    Summed(Tensor, Tensor),
}

/// One micro-batch's loss and TRL-named metrics.
pub struct DpoBatchOutput {
    /// `Σ_types weight · mean_rows(per-row loss)`, scalar; differentiable when `fwd` records.
    pub loss: Tensor,
    /// `loss`, `rewards/*`, `logps/*`, `logits/*`, `entropy`, `mean_token_accuracy` (no
    /// `num_tokens`: the trainer keeps that running total).
    pub metrics: BTreeMap<String, f64>,
    /// Real (unpadded) tokens of the batch (its attention-mask sum).
    pub tokens: usize,
}

/// The DPO loss and metrics of `examples` (TRL's `compute_loss`): one policy forward over
/// `[chosen; rejected]`, the reference per `reference`.
///
/// # Errors
/// A precomputed reference missing from an example; tensor errors.
pub fn batch_loss(
    policy: &Model,
    reference: RefSource<'_>,
    examples: &[&DpoExample],
    plan: &DpoPlan,
    fwd: &mut Fwd,
) -> Result<DpoBatchOutput> {
    let ids: Vec<&PreferenceIds> = examples.iter().map(|e| &e.ids).collect();
    let packed = PackedBatch::new(&ids, pad_id(policy)?, plan)?;
    let n = examples.len();
    let dev = policy.device().clone();

    // The reference: per-token log-probs (2N, L − 1), or the precomputed sums (N) each.
    let reference = match reference {
        RefSource::Forward { model, adapters } => {
            let mut rf = if adapters {
                Fwd::eval()
            } else {
                Fwd::eval().without_adapters()
            };
            Ref::PerToken(packed.spread(&score(model, &packed, &mut rf)?.logps)?)
        }
        RefSource::Precomputed => {
            let (c, r): (Vec<f32>, Vec<f32>) = examples
                .iter()
                .map(|e| {
                    e.ref_logps.ok_or_else(|| {
                        TrainError::Config("internal: precompute_ref_log_probs is set but an example has none".into())
                    })
                })
                .collect::<Result<Vec<_>>>()?
                .into_iter()
                .unzip();
            Ref::Summed(Tensor::from_vec(c, n, &dev)?, Tensor::from_vec(r, n, &dev)?)
        }
    };

    // The policy: per-token log-probs (2N, L − 1), zero outside the completions.
    let scored = score(policy, &packed, fwd)?;
    let policy_logps = packed.spread(&scored.logps)?;
    let (_, attn, cmask) = packed.batch.to_tensors(&dev).map_err(setting_of)?;
    let dt = policy_logps.dtype();
    let (ref_tokens, ref_c, ref_r);
    let reference = match reference {
        Ref::PerToken(t) => {
            ref_tokens = t.to_dtype(dt)?;
            DpoReference::PerToken(&ref_tokens)
        }
        Ref::Summed(c, r) => {
            (ref_c, ref_r) = (c.to_dtype(dt)?, r.to_dtype(dt)?);
            DpoReference::Summed {
                chosen: &ref_c,
                rejected: &ref_r,
            }
        }
    };
    let out = dpo_loss(
        &DpoLossInputs {
            policy_logps: &policy_logps,
            reference,
            completion_mask: &cmask,
        },
        &plan.loss,
    )
    .map_err(setting_of)?;

    // Token metrics: entropy, vocabulary-mean logits, argmax accuracy on chosen completions.
    let w = policy.lm_head_weight(false)?;
    let h = scored.hidden.detach();
    let mean_logits = mean_logits_from_hidden(&h, w).map_err(setting_of)?;
    let chosen = packed.chosen_positions;
    let top1 = if chosen > 0 {
        let logits = policy.lm_logits(&h.narrow(0, 0, chosen)?, false)?;
        let labels = Tensor::from_slice(&packed.labels[..chosen], chosen, &dev)?;
        let hits = top1_matches(&logits, &labels).map_err(setting_of)?.to_dtype(dt)?;
        let rest = Tensor::zeros(packed.labels.len() - chosen, dt, &dev)?;
        Tensor::cat(&[&hits, &rest], 0)?
    } else {
        Tensor::zeros(packed.labels.len(), dt, &dev)?
    };
    let spread = |t: &Tensor| -> Result<Tensor> { packed.spread(&t.detach().to_dtype(dt)?) };
    let token = dpo_token_metrics(
        &DpoTokenOutputs {
            entropy: &spread(&scored.entropy)?,
            mean_logits: &spread(&mean_logits)?,
            is_top1: &spread(&top1)?,
            completion_mask: &cmask,
            attention_mask: &attn,
        },
        0.0,
    )
    .map_err(setting_of)?;
    let mut metrics: BTreeMap<String, f64> = out.metrics.into_iter().collect();
    metrics.extend(token.into_iter().filter(|(k, _)| k != "num_tokens"));
    metrics.insert("loss".into(), out.loss.to_dtype(DType::F64)?.to_scalar::<f64>()?);
    let tokens = packed.seqs.iter().map(Vec::len).sum();
    Ok(DpoBatchOutput {
        loss: out.loss,
        metrics,
        tokens,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn ex(p: &[u32], c: &[u32], r: &[u32]) -> PreferenceIds {
        PreferenceIds {
            prompt_ids: p.to_vec(),
            chosen_ids: c.to_vec(),
            rejected_ids: r.to_vec(),
        }
    }

    #[test]
    fn scored_positions_are_the_completion_tokens_shifted_by_one() {
        let plan = crate::dpo_config::DpoConfig::default().plan(1).unwrap();
        let (a, b) = (ex(&[1, 2, 3], &[4, 5], &[6]), ex(&[7, 8], &[9], &[10, 11]));
        let packed = PackedBatch::new(&[&a, &b], 0, &plan).unwrap();
        // Rows: [1 2 3 4 5], [7 8 9], [1 2 3 6], [7 8 10 11] packed end to end.
        assert_eq!(packed.labels, [4, 5, 9, 6, 10, 11]);
        assert_eq!(packed.selected, [2, 3, 6, 10, 13, 14]);
        assert_eq!(packed.chosen_positions, 3);
        let values = Tensor::new(&[1f32, 2., 3., 4., 5., 6.], &Device::Cpu).unwrap();
        let spread = packed.spread(&values).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(
            spread,
            [[0., 0., 1., 2.], [0., 3., 0., 0.], [0., 0., 4., 0.], [0., 5., 6., 0.]]
        );
        assert_eq!(packed.row_sums(&values).unwrap(), [3., 3., 4., 11.]);
    }
}
