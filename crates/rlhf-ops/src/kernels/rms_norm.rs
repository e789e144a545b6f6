//! Fused RMSNorm (Zhang & Sennrich 2019; transformers' `LlamaRMSNorm`), a custom op with its
//! backward for `x` and the weight.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::{par_rows, rows_per_task, slice};
use crate::simd::{dispatched, LANES};

/// `1 / sqrt(mean(x²) + eps)` of one row, the squares summed in f32 lanes.
#[inline(always)]
fn rms_rstd(x: &[f32], eps: f32) -> f32 {
    let mut acc = [0f32; LANES];
    let chunks = x.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for i in 0..LANES {
            acc[i] = c[i].mul_add(c[i], acc[i]);
        }
    }
    let ss = acc.iter().sum::<f32>() + rest.iter().map(|v| v * v).sum::<f32>();
    1.0 / (ss / x.len() as f32 + eps).sqrt()
}

#[inline(always)]
fn rms_fwd_rows_imp(x: &[f32], w: &[f32], eps: f32, y: &mut [f32]) {
    let h = w.len();
    for (x, y) in x.chunks_exact(h).zip(y.chunks_exact_mut(h)) {
        let r = rms_rstd(x, eps);
        for i in 0..h {
            // transformers' order: the normalised row first, then the weight.
            y[i] = w[i] * (x[i] * r);
        }
    }
}

dispatched! {
    /// RMSNorm of whole rows of `x` (rows of `w.len()`) into `y`:
    /// `y = w · (x / sqrt(mean(x²) + eps))`.
    pub fn rms_fwd_rows(x: &[f32], w: &[f32], eps: f32, y: &mut [f32]) = rms_fwd_rows_imp;
}

/// Backward of rows: writes `dx`, adds to `dw`. With `r = 1/sqrt(mean(x²) + eps)` and
/// `n = x·r`: `dw += g·n`, `dx = r (g·w − n · mean(g·w·n))`.
#[inline(always)]
fn rms_bwd_rows_imp(x: &[f32], w: &[f32], g: &[f32], eps: f32, dx: &mut [f32], dw: &mut [f32]) {
    let h = w.len();
    let hf = h as f32;
    for ((x, g), dx) in x.chunks_exact(h).zip(g.chunks_exact(h)).zip(dx.chunks_exact_mut(h)) {
        let r = rms_rstd(x, eps);
        let mut c = 0f32;
        for i in 0..h {
            let n = x[i] * r;
            c += g[i] * w[i] * n;
            dw[i] += g[i] * n;
        }
        let c = c / hf;
        for i in 0..h {
            dx[i] = r * (g[i] * w[i] - x[i] * r * c);
        }
    }
}

dispatched! {
    /// RMSNorm backward of whole rows: writes `dx`, adds to `dw`.
    pub fn rms_bwd_rows(x: &[f32], w: &[f32], g: &[f32], eps: f32, dx: &mut [f32], dw: &mut [f32]) = rms_bwd_rows_imp;
}

/// RMSNorm over the last dimension, f32 only; equal to [`crate::nn::rms_norm_composed`] to
/// f32 rounding.
///
/// # Shapes
/// `x`: `(.., H)`, `w`: `(H)` → `(.., H)`.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    x.contiguous()?.apply_op2(&w.contiguous()?, RmsNorm { eps: eps as f32 })
}

struct RmsNorm {
    eps: f32,
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "fused-rms-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, w) = (slice(s1, l1, "rms_norm")?, slice(s2, l2, "rms_norm")?);
        let h = w.len();
        if h == 0 || l1.dims().last() != Some(&h) {
            candle_core::bail!(
                "rms_norm: x {:?} does not end in the weight's size {:?}",
                l1.dims(),
                l2.dims()
            )
        }
        let y = par_rows(x, h, |x, y| rms_fwd_rows(x, w, self.eps, y));
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let h = w.elem_count();
        let out = x.apply_op3_no_bwd(w, &grad.contiguous()?, &RmsNormBwd { eps: self.eps })?;
        // `out` is `(rows + 1, H)`: dx, then dw.
        let rows = out.dim(0)? - 1;
        let dx = out.narrow(0, 0, rows)?.reshape(x.shape())?;
        let dw = out.narrow(0, rows, 1)?.reshape(h)?;
        Ok((x.track_op().then_some(dx), w.track_op().then_some(dw)))
    }
}

struct RmsNormBwd {
    eps: f32,
}

impl CustomOp3 for RmsNormBwd {
    fn name(&self) -> &'static str {
        "fused-rms-norm-bwd"
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
        let (x, w, g) = (
            slice(s1, l1, "rms_norm")?,
            slice(s2, l2, "rms_norm")?,
            slice(s3, l3, "rms_norm")?,
        );
        let h = w.len();
        let rows = x.len() / h.max(1);
        let mut out = vec![0f32; x.len() + h];
        let (dx, _) = out.split_at_mut(x.len());
        let n = rows_per_task(h) * h;
        // Per-task partial sums of dw, added in task order (deterministic).
        let partial: Vec<Vec<f32>> = dx
            .par_chunks_mut(n)
            .zip(x.par_chunks(n).zip(g.par_chunks(n)))
            .map(|(dx, (x, g))| {
                let mut dw = vec![0f32; h];
                rms_bwd_rows(x, w, g, self.eps, dx, &mut dw);
                dw
            })
            .collect();
        let tail = &mut out[x.len()..];
        for p in partial {
            tail.iter_mut().zip(&p).for_each(|(a, b)| *a += b);
        }
        Ok((CpuStorage::F32(out), Shape::from((rows + 1, h))))
    }
}
