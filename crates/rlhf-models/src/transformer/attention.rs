//! Causal self-attention, written once for every family: fused or split q/k/v projections,
//! grouped-query heads (query head `h` reads key/value head `h / (nh / nkv)`, transformers'
//! `repeat_kv` order), RoPE on q and k, Qwen3's per-head q/k norms, and an optional sliding
//! window (transformers' rule: key `j` is visible to query `i` iff `i - W < j ≤ i`).
//!
//! Two layouts: a padded `(B, T)` batch with an additive bias (and a KV cache), and packed
//! sequences. Packed f32 rows on the CPU go through the fused kernel of
//! [`rlhf_ops::attention`]; everything else through composed candle ops, which are the
//! kernel's oracle.

use candle_core::Tensor;
use rlhf_ops::attention::AttentionConfig;
use rlhf_ops::nn::{repeat_kv, softmax_last_dim};
use rlhf_peft::Proj;

use super::packing::Packing;
use super::pieces::Norm;
use super::{Fwd, Layer, Transformer};
use crate::cache::KvCache;
use crate::error::Result;

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
        let (q, k, v) = match &l.attn.qkv {
            Qkv::Fused(p) => {
                let qkv = p.forward(x, &mut fwd.proj())?;
                let last = qkv.rank() - 1;
                (
                    qkv.narrow(last, 0, qw)?,
                    qkv.narrow(last, qw, kvw)?,
                    qkv.narrow(last, qw + kvw, kvw)?,
                )
            }
            Qkv::Split { q, k, v } => (
                q.forward(x, &mut fwd.proj())?,
                k.forward(x, &mut fwd.proj())?,
                v.forward(x, &mut fwd.proj())?,
            ),
        };
        let q = head_norm(l.attn.q_norm.as_ref(), &q, nh, hd, fwd)?;
        let k = head_norm(l.attn.k_norm.as_ref(), &k, nkv, hd, fwd)?;
        let (q, k) = match rope {
            Some((cos, sin)) => (
                rlhf_ops::rope::apply_rope(&q, cos, sin)?,
                rlhf_ops::rope::apply_rope(&k, cos, sin)?,
            ),
            None => (q, k),
        };
        // Packed rows: one attention op over the sequences (fused on the CPU in f32, composed
        // candle ops elsewhere); q, k and v may be views of GPT-2's fused projection.
        if let Attend::Packed(p) = attend {
            let keep = match fwd.dropout.as_deref_mut() {
                Some(keys) if cfg.attn_pdrop > 0.0 => {
                    Some(std::sync::Arc::new(keys.attention_keep(nh, cfg.attn_pdrop)?))
                }
                _ => None,
            };
            let acfg = AttentionConfig {
                lens: p.lens.clone(),
                n_head: nh,
                n_kv_head: nkv,
                head_dim: hd,
                scale: scale as f32,
                window,
                keep,
                prefixes: p.prefixes.clone(),
            };
            let out = rlhf_ops::attention::attention(&q, &k, &v, &acfg)?;
            return Ok(l.attn.o_proj.forward(&out, &mut fwd.proj())?);
        }
        let Attend::Padded { bias, b, t } = attend else {
            unreachable!("invariant: packed rows returned above")
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
        let probs = fwd.dropout_attention(&probs, cfg.attn_pdrop)?;
        let out = probs.matmul(&v)?.transpose(1, 2)?.reshape((b, t, qw))?;
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
