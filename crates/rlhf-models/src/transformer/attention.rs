//! Causal self-attention, written once for every family: fused or split q/k/v projections,
//! grouped-query heads (query head `h` reads key/value head `h / (nh / nkv)`, transformers'
//! `repeat_kv` order), RoPE on q and k, Qwen3's per-head q/k norms, and an optional sliding
//! window (transformers' rule: key `j` is visible to query `i` iff `i - W < j ≤ i`).
//!
//! Two layouts: a padded `(B, T)` batch with an additive bias (and a KV cache), and packed
//! sequences. Packed f32 rows on the CPU go through the fused kernel of
//! [`rlhf_ops::attention`]; everything else through composed candle ops, which are the
//! kernel's oracle.

use candle_core::{Device, Tensor, D};
use rlhf_ops::attention::{packed_causal_attention, PackedAttention};
use rlhf_ops::nn::{causal_padding_bias, softmax_last_dim};
use rlhf_peft::Proj;

use super::pieces::Norm;
use super::{Fwd, Layer, Transformer};
use crate::cache::KvCache;
use crate::error::{ModelError, Result};

/// The attention input projections.
#[derive(Clone, Debug)]
pub enum Qkv {
    /// One projection to `[q; k; v]` (GPT-2's `c_attn`), `(nh·hd + 2·nkv·hd, H)`.
    Fused(Proj),
    /// Separate projections: q `(nh·hd, H)`, k and v `(nkv·hd, H)`.
    Split {
        /// Queries.
        q: Proj,
        /// Keys.
        k: Proj,
        /// Values.
        v: Proj,
    },
}

/// Self-attention weights of one block.
#[derive(Clone, Debug)]
pub struct Attention {
    /// q, k, v.
    pub qkv: Qkv,
    /// Output projection `(H, nh·hd)`.
    pub o_proj: Proj,
    /// Per-head RMSNorm of the queries over `hd` (Qwen3).
    pub q_norm: Option<Norm>,
    /// Per-head RMSNorm of the keys (Qwen3).
    pub k_norm: Option<Norm>,
}

/// What attention runs over.
#[derive(Clone, Copy)]
pub(crate) enum Attend<'a> {
    /// A padded `(B, T)` batch with its additive bias `(B, 1, T, S)`.
    Padded { bias: &'a Tensor, b: usize, t: usize },
    /// Packed rows.
    Packed(&'a Packing),
}

impl Transformer {
    /// Attention of block `layer` on normed input `x`.
    ///
    /// # Shapes
    /// `x`: `(B, T, H)` with [`Attend::Padded`] → `(B, T, H)`; `(N, H)` packed rows with
    /// [`Attend::Packed`] → `(N, H)`.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn attention(
        &self,
        l: &Layer,
        layer: usize,
        x: &Tensor,
        attend: Attend,
        rope: Option<&(Tensor, Tensor)>,
        cache: Option<(&mut KvCache, usize)>,
        fwd: &mut Fwd,
    ) -> Result<Tensor> {
        let cfg = &self.cfg;
        let (nh, nkv, hd) = (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim);
        let (qw, kvw) = cfg.qkv_widths();
        let scale = self.attention_scale(layer);
        let window = cfg.layer_window(layer);
        let (q, k, v, fused) = match &l.attn.qkv {
            Qkv::Fused(p) => {
                let qkv = p.forward(x, &mut fwd.proj())?;
                let last = qkv.rank() - 1;
                (
                    qkv.narrow(last, 0, qw)?,
                    qkv.narrow(last, qw, kvw)?,
                    qkv.narrow(last, qw + kvw, kvw)?,
                    Some(qkv),
                )
            }
            Qkv::Split { q, k, v } => (
                q.forward(x, &mut fwd.proj())?,
                k.forward(x, &mut fwd.proj())?,
                v.forward(x, &mut fwd.proj())?,
                None,
            ),
        };
        // GPT-2's packed rows: the fused kernel on the `(N, 3H)` projection as it is.
        if let (Attend::Packed(p), Some(qkv), None, None) = (attend, &fused, rope, window) {
            if nkv == nh && l.attn.q_norm.is_none() && rlhf_ops::kernels::applies(&[qkv]) {
                let keep = match fwd.dropout.as_deref_mut() {
                    Some(rng) if cfg.attn_pdrop > 0.0 => Some(std::sync::Arc::new(PackedAttention::dropout_keep(
                        &p.lens,
                        nh,
                        cfg.attn_pdrop,
                        &mut |n| rng.uniform_vec(n),
                    ))),
                    _ => None,
                };
                let kcfg = PackedAttention {
                    lens: p.lens.clone(),
                    n_head: nh,
                    scale: scale as f32,
                    keep,
                };
                let out = packed_causal_attention(&qkv.contiguous()?, kcfg)?;
                return Ok(l.attn.o_proj.forward(&out, &mut fwd.proj())?);
            }
        }
        let q = head_norm(l.attn.q_norm.as_ref(), &q, nh, hd, fwd)?;
        let k = head_norm(l.attn.k_norm.as_ref(), &k, nkv, hd, fwd)?;
        let (q, k) = match rope {
            Some((cos, sin)) => (
                crate::rope::apply(&q, cos, sin, nh, hd)?,
                crate::rope::apply(&k, cos, sin, nkv, hd)?,
            ),
            None => (q, k),
        };
        let (q, k, v, bias_owned, b, t) = match attend {
            Attend::Packed(p) => (
                p.unpack(&q)?,
                p.unpack(&k)?,
                p.unpack(&v)?,
                Some(p.bias(window)?),
                p.lens.len(),
                p.t,
            ),
            Attend::Padded { b, t, .. } => (q, k, v, None, b, t),
        };
        let bias = match (&bias_owned, attend) {
            (Some(bias), _) => bias,
            (None, Attend::Padded { bias, .. }) => bias,
            (None, Attend::Packed(_)) => unreachable!("invariant: packed attention builds its bias"),
        };
        let heads =
            |x: Tensor, n: usize| -> Result<Tensor> { Ok(x.reshape((b, t, n, hd))?.transpose(1, 2)?.contiguous()?) };
        let (q, k, v) = (heads(q, nh)?, heads(k, nkv)?, heads(v, nkv)?);
        let (k, v) = match cache {
            Some((c, i)) => c.append(i, &k, &v)?,
            None => (k, v),
        };
        let (k, v) = (repeat_kv(&k, nh / nkv)?, repeat_kv(&v, nh / nkv)?);
        let dtype = q.dtype();
        let up = rlhf_ops::nn::compute_dtype(dtype);
        let scores = if cfg.reorder_and_upcast_attn || up != dtype {
            // Upcast before the product, scale first (transformers' `_upcast_and_reordered_attn`).
            (q.to_dtype(up)? * scale)?.matmul(&k.to_dtype(up)?.t()?)?
        } else {
            (q.matmul(&k.t()?)? * scale)?
        };
        let probs = softmax_last_dim(&scores.broadcast_add(&bias.to_dtype(scores.dtype())?)?)?.to_dtype(dtype)?;
        let probs = fwd.dropout(&probs, cfg.attn_pdrop)?;
        let out = probs.matmul(&v)?.transpose(1, 2)?.reshape((b, t, qw))?;
        let out = match attend {
            Attend::Packed(p) => p.pack(&out)?,
            Attend::Padded { .. } => out,
        };
        Ok(l.attn.o_proj.forward(&out, &mut fwd.proj())?)
    }
}

/// Qwen3's per-head RMSNorm over `hd` (identity without a norm).
///
/// # Shapes
/// `x`: `(.., n·hd)` → the same.
fn head_norm(norm: Option<&Norm>, x: &Tensor, n: usize, hd: usize, fwd: &Fwd) -> Result<Tensor> {
    let Some(norm) = norm else { return Ok(x.clone()) };
    let dims = x.dims().to_vec();
    let rows = x.elem_count() / (n * hd).max(1);
    let y = norm.forward(&x.reshape((rows * n, hd))?, fwd)?;
    Ok(y.reshape(dims)?)
}

/// transformers' `repeat_kv`: `(B, nkv, S, hd)` → `(B, nkv·rep, S, hd)`, each key/value
/// head repeated `rep` times in place (query head `h` reads head `h / rep`).
pub(crate) fn repeat_kv(x: &Tensor, rep: usize) -> Result<Tensor> {
    if rep == 1 {
        return Ok(x.clone());
    }
    let (b, nkv, s, hd) = x.dims4()?;
    Ok(x.unsqueeze(2)?
        .broadcast_as((b, nkv, rep, s, hd))?
        .contiguous()?
        .reshape((b, nkv * rep, s, hd))?)
}

/// The causal + padding bias `(B, 1, T, S)` of [`causal_padding_bias`] with a sliding
/// window as well: key `j` (cache index) is visible to query `i` only if `j > i - window`.
pub(crate) fn window_bias(mask: &[Vec<u32>], t: usize, window: usize, device: &Device) -> Result<Tensor> {
    let b = mask.len();
    let s = mask.first().map_or(0, Vec::len);
    let past = s.saturating_sub(t);
    let mut bias = vec![0f32; b * t * s];
    for (bi, row) in mask.iter().enumerate() {
        for q in 0..t {
            let i = past + q;
            let out = &mut bias[(bi * t + q) * s..(bi * t + q + 1) * s];
            let mut visible = false;
            for (k, o) in out.iter_mut().enumerate() {
                if k > i || k + window <= i || row[k] == 0 {
                    *o = -1e9;
                } else {
                    visible = true;
                }
            }
            if !visible {
                out[i] = 0.0;
            }
        }
    }
    Ok(Tensor::from_vec(bias, (b, 1, t, s), device)?)
}

/// Where the rows of a packed batch sit in the right-padded layout the composed attention
/// runs in.
pub(crate) struct Packing {
    /// `(N)` token ids, sequences end to end.
    pub ids: Tensor,
    /// `N` positions, from 0 in every sequence.
    pub positions_host: Vec<u32>,
    /// `(B·T)`: the packed row of each padded slot (padding slots read row 0; attention
    /// masks them as keys and their outputs are dropped).
    gather: Tensor,
    /// `(N)`: the padded slot of each packed row.
    scatter: Tensor,
    /// Sequence lengths (`B` of them).
    pub lens: Vec<usize>,
    /// The longest.
    pub t: usize,
}

impl Packing {
    pub(crate) fn new(seqs: &[&[u32]], cfg: &crate::ModelConfig, device: &Device) -> Result<Self> {
        let max_positions = cfg.max_position_embeddings;
        let (b, t) = (seqs.len(), seqs.iter().map(|s| s.len()).max().unwrap_or(0));
        if b == 0 {
            return Err(ModelError::Input("an empty batch: no sequences to run".into()));
        }
        let n: usize = seqs.iter().map(|s| s.len()).sum();
        let (mut ids, mut positions, mut scatter) =
            (Vec::with_capacity(n), Vec::with_capacity(n), Vec::with_capacity(n));
        let mut gather = vec![0u32; b * t];
        for (i, s) in seqs.iter().enumerate() {
            if s.is_empty() {
                return Err(ModelError::Input(format!("sequence {i} of the batch has no tokens")));
            }
            if s.len() > max_positions {
                return Err(ModelError::Input(format!(
                    "sequence {i} has {} tokens, more than the model's {} ({max_positions})\n\
                     hint: lower max_length",
                    s.len(),
                    cfg.max_positions_key()
                )));
            }
            for (j, &id) in s.iter().enumerate() {
                gather[i * t + j] = ids.len() as u32;
                scatter.push((i * t + j) as u32);
                ids.push(id);
                positions.push(j as u32);
            }
        }
        Ok(Self {
            ids: Tensor::from_vec(ids, n, device)?,
            positions_host: positions,
            gather: Tensor::from_vec(gather, b * t, device)?,
            scatter: Tensor::from_vec(scatter, n, device)?,
            lens: seqs.iter().map(|s| s.len()).collect(),
            t,
        })
    }

    /// The causal (+ window) bias of the right-padded layout, `(B, 1, T, T)`.
    fn bias(&self, window: Option<usize>) -> Result<Tensor> {
        let mask: Vec<Vec<u32>> = self
            .lens
            .iter()
            .map(|&n| (0..self.t).map(|j| u32::from(j < n)).collect())
            .collect();
        match window {
            Some(w) => window_bias(&mask, self.t, w, self.gather.device()),
            None => Ok(causal_padding_bias(&mask, self.t, self.gather.device())?),
        }
    }

    /// `(N, C)` packed rows → `(B, T, C)` padded.
    fn unpack(&self, x: &Tensor) -> Result<Tensor> {
        let c = x.dim(D::Minus1)?;
        Ok(x.contiguous()?
            .index_select(&self.gather, 0)?
            .reshape((self.lens.len(), self.t, c))?)
    }

    /// `(B, T, C)` padded → `(N, C)` packed rows.
    fn pack(&self, x: &Tensor) -> Result<Tensor> {
        let c = x.dim(2)?;
        Ok(x.reshape((self.lens.len() * self.t, c))?
            .index_select(&self.scatter, 0)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_window_keeps_the_w_most_recent_keys_including_the_query() {
        let mask = vec![vec![1u32; 5]];
        let bias = window_bias(&mask, 5, 2, &Device::Cpu).unwrap();
        let v = bias.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let allowed: Vec<u8> = v.iter().map(|x| u8::from(*x == 0.0)).collect();
        #[rustfmt::skip]
        let want = [1, 0, 0, 0, 0,
                    1, 1, 0, 0, 0,
                    0, 1, 1, 0, 0,
                    0, 0, 1, 1, 0,
                    0, 0, 0, 1, 1];
        assert_eq!(allowed, want);
    }

    #[test]
    fn repeat_kv_repeats_each_head_in_place() {
        let x = Tensor::arange(0f32, 4., &Device::Cpu)
            .unwrap()
            .reshape((1, 2, 2, 1))
            .unwrap();
        let y = repeat_kv(&x, 2)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(y, vec![0., 1., 0., 1., 2., 3., 2., 3.]);
    }
}
