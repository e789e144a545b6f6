//! Fused causal self-attention over packed sequences, candle custom ops with their backward,
//! and the decoding kernels that read a KV cache.
//!
//! The inputs are sequences laid end to end (no padding); each sequence attends to itself
//! only. Per sequence and query head the op computes
//! `O = dropout(softmax(Q Kᵀ · scale + causal (+ window))) V` in one task — no head split or
//! merge copies, no `(B, heads, T, T)` score tensors, no padded rows — and writes `(N, heads·d)`
//! in the layout of merged heads. The backward recomputes the probabilities from `Q` and `K`
//! (so nothing of size `T²` outlives the forward); one task per sequence and kv head sums
//! dk and dv over the query heads that share it.
//!
//! Two entry points share the kernels:
//! - [`attention`] (Llama, Qwen2/3, Mistral, SmolLM2): separate q `(N, n_head·d)`, k and v
//!   `(N, n_kv_head·d)` — grouped-query heads, `head_dim` independent of the hidden size,
//!   optional sliding window ([`AttentionConfig`]).
//! - [`packed_causal_attention`] (GPT-2): the fused `(N, 3H)` output of `c_attn`, whose
//!   gradient comes back as one `(N, 3H)` buffer; the case `n_kv_head = n_head`, no window.
//!
//! The composed candle version (heads split, `repeat_kv`, `matmul`, additive mask, softmax,
//! dropout as a multiply, `matmul`, heads merged, [`attention_composed`]) is the test
//! oracle, values and gradients, and the path of other dtypes and devices.

mod cached;
mod gqa;
mod kernel;
#[cfg(test)]
mod tests;

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Shape, Tensor};

pub use cached::{cached_attention_row, cached_attention_row_range, sliding_window_keys, CACHED_KEY_BLOCK};
pub use gqa::{attention, attention_composed, AttentionConfig};
use kernel::Rows;

use crate::kernels::slice;

/// The shape of a packed GPT-2 attention call.
#[derive(Clone, Debug)]
pub struct PackedAttention {
    /// Length of every sequence, in packing order (they sum to `N`).
    pub lens: Vec<usize>,
    /// Attention heads; `H` is a multiple of it.
    pub n_head: usize,
    /// Factor of the scores (`1/sqrt(head_dim)`, and GPT-2's layer-index scaling).
    pub scale: f32,
    /// Dropout on the probabilities: per sequence, per head, a row-major `T × T` square of
    /// keep factors (`0` or `1/(1−p)`), concatenated in sequence order then head order.
    /// `None`: no dropout.
    pub keep: Option<Arc<Vec<f32>>>,
}

impl PackedAttention {
    /// Keep factors for dropout with probability `p`, from `uniform(n)` samples in `[0, 1)`
    /// (a sample below `p` drops), in the layout of [`PackedAttention::keep`].
    pub fn dropout_keep(lens: &[usize], n_head: usize, p: f64, uniform: &mut dyn FnMut(usize) -> Vec<f32>) -> Vec<f32> {
        AttentionConfig::dropout_keep(lens, n_head, p, uniform)
    }

    /// Validates the input layout; returns `(N, H)`.
    fn check(&self, l: &Layout) -> candle_core::Result<(usize, usize)> {
        let (n, c) = l.shape().dims2()?;
        let total: usize = self.lens.iter().sum();
        if total != n || c % 3 != 0 || self.n_head == 0 || (c / 3) % self.n_head != 0 {
            candle_core::bail!(
                "packed attention: input ({n}, {c}) does not fit {} sequences of {total} tokens with {} heads",
                self.lens.len(),
                self.n_head
            )
        }
        if let Some(k) = &self.keep {
            let want: usize = self.lens.iter().map(|t| self.n_head * t * t).sum();
            if k.len() != want {
                candle_core::bail!("packed attention: {} dropout factors, expected {want}", k.len())
            }
        }
        Ok((n, c / 3))
    }

    /// The general call for hidden size `h`: as many kv heads as heads, no window.
    fn general(&self, h: usize) -> AttentionConfig {
        AttentionConfig {
            lens: self.lens.clone(),
            n_head: self.n_head,
            n_kv_head: self.n_head,
            head_dim: h / self.n_head,
            scale: self.scale,
            window: None,
            keep: self.keep.clone(),
            prefixes: Vec::new(),
        }
    }
}

/// q, k and v of a fused `(N, 3H)` buffer.
fn fused_rows(qkv: &[f32], h: usize) -> (Rows<'_>, Rows<'_>, Rows<'_>) {
    let q = Rows {
        data: qkv,
        stride: 3 * h,
        off: 0,
    };
    (q, Rows { off: h, ..q }, Rows { off: 2 * h, ..q })
}

/// GPT-2's attention of packed sequences; see the module docs.
///
/// # Shapes
/// `qkv`: `(N, 3H)` f32 → `(N, H)`.
pub fn packed_causal_attention(qkv: &Tensor, cfg: PackedAttention) -> candle_core::Result<Tensor> {
    qkv.contiguous()?.apply_op1(cfg)
}

impl CustomOp1 for PackedAttention {
    fn name(&self) -> &'static str {
        "packed-causal-attention"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n, h) = self.check(l)?;
        let (q, k, v) = fused_rows(slice(s, l, "packed attention")?, h);
        let out = self.general(h).forward(q, k, v, n);
        Ok((CpuStorage::F32(out), Shape::from((n, h))))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(arg.apply_op2_no_bwd(
            &grad.contiguous()?,
            &PackedAttentionBwd(self.clone()),
        )?))
    }
}

struct PackedAttentionBwd(PackedAttention);

impl CustomOp2 for PackedAttentionBwd {
    fn name(&self) -> &'static str {
        "packed-causal-attention-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let cfg = &self.0;
        let (n, h) = cfg.check(l1)?;
        if l2.shape().dims() != [n, h] {
            candle_core::bail!(
                "packed attention: gradient {:?}, expected ({n}, {h})",
                l2.shape().dims()
            )
        }
        let (q, k, v) = fused_rows(slice(s1, l1, "packed attention")?, h);
        let g = Rows {
            data: slice(s2, l2, "packed attention")?,
            stride: h,
            off: 0,
        };
        // `[dq | dk | dv]` per row: the layout of the fused input.
        let out = cfg.general(h).backward(q, k, v, g, n);
        Ok((CpuStorage::F32(out), Shape::from((n, 3 * h))))
    }
}
