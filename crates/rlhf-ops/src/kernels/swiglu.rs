//! Fused `silu(gate) · up`, the gated activation of the SwiGLU MLP (Shazeer 2020, "GLU
//! Variants Improve Transformer"; transformers' `LlamaMLP`:
//! `down_proj(act_fn(gate_proj(x)) * up_proj(x))` with `act_fn = silu`), a custom op with its
//! backward for both inputs.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::{par_rows2, slice, CHUNK};
use crate::simd::{dispatched, exp_f32};

/// `σ(g) = 1 / (1 + e^{−g})` from the polynomial `exp` (0 below −88.7, where `e^{−g}` is
/// infinite).
#[inline(always)]
fn sigmoid(g: f32) -> f32 {
    1.0 / (1.0 + exp_f32(-g))
}

#[inline(always)]
fn silu_mul_imp(gate: &[f32], up: &[f32], out: &mut [f32]) {
    for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
        *o = g * sigmoid(g) * u;
    }
}

dispatched! {
    /// `out = silu(gate) · up = gate · σ(gate) · up`, element by element over the common
    /// length (the decoder's MLP row kernel).
    pub fn silu_mul_row(gate: &[f32], up: &[f32], out: &mut [f32]) = silu_mul_imp;
}

#[inline(always)]
fn silu_mul_bwd_imp(gate: &[f32], up: &[f32], grad: &[f32], dgate: &mut [f32], dup: &mut [f32]) {
    for i in 0..dgate.len().min(dup.len()).min(gate.len()).min(up.len()).min(grad.len()) {
        let (g, s) = (gate[i], sigmoid(gate[i]));
        // d silu / dg = σ (1 + g (1 − σ)).
        dgate[i] = grad[i] * up[i] * (s * (1.0 + g * (1.0 - s)));
        dup[i] = grad[i] * g * s;
    }
}

dispatched! {
    /// Backward of [`silu_mul_row`]: `dgate = grad · up · σ (1 + gate (1 − σ))`,
    /// `dup = grad · silu(gate)`.
    pub fn silu_mul_bwd_row(gate: &[f32], up: &[f32], grad: &[f32], dgate: &mut [f32], dup: &mut [f32]) = silu_mul_bwd_imp;
}

/// `silu(gate) · up` element-wise, f32 only; equal to [`crate::nn::silu_mul_composed`] to
/// f32 rounding.
///
/// # Shapes
/// `gate`, `up`: the same shape → that shape.
pub fn silu_mul(gate: &Tensor, up: &Tensor) -> candle_core::Result<Tensor> {
    gate.contiguous()?.apply_op2(&up.contiguous()?, SiluMul)
}

struct SiluMul;

impl CustomOp2 for SiluMul {
    fn name(&self) -> &'static str {
        "fused-silu-mul"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        if l1.dims() != l2.dims() {
            candle_core::bail!("silu_mul: gate {:?} and up {:?} differ in shape", l1.dims(), l2.dims())
        }
        let (g, u) = (slice(s1, l1, "silu_mul")?, slice(s2, l2, "silu_mul")?);
        Ok((CpuStorage::F32(par_rows2(g, u, 1, silu_mul_row)), l1.shape().clone()))
    }

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        // `out` is `(2, n)`: dgate, then dup.
        let out = gate.apply_op3_no_bwd(up, &grad.contiguous()?, &SiluMulBwd)?;
        let dg = out.get(0)?.reshape(gate.shape())?;
        let du = out.get(1)?.reshape(up.shape())?;
        Ok((gate.track_op().then_some(dg), up.track_op().then_some(du)))
    }
}

struct SiluMulBwd;

impl CustomOp3 for SiluMulBwd {
    fn name(&self) -> &'static str {
        "fused-silu-mul-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (g, u, gr) = (
            slice(s1, l1, "silu_mul")?,
            slice(s2, l2, "silu_mul")?,
            slice(s3, l3, "silu_mul")?,
        );
        let n = g.len();
        let mut out = vec![0f32; 2 * n];
        let (dg, du) = out.split_at_mut(n);
        dg.par_chunks_mut(CHUNK)
            .zip(du.par_chunks_mut(CHUNK))
            .enumerate()
            .for_each(|(c, (dg, du))| {
                let r = c * CHUNK..c * CHUNK + dg.len();
                silu_mul_bwd_row(&g[r.clone()], &u[r.clone()], &gr[r], dg, du)
            });
        Ok((CpuStorage::F32(out), Shape::from((2, n))))
    }
}
