//! Fused rotary position embedding in the rotate-half convention (Su et al. 2021, RoFormer;
//! transformers' `apply_rotary_pos_emb`: `x·cos + rotate_half(x)·sin`), a custom op with its
//! backward for `x` and, when they are tracked, for the tables.
//!
//! Per head of `d` components (`h = d/2`), for `j < h`:
//! `y_j = x_j·cos_j − x_{j+h}·sin_j` and `y_{j+h} = x_{j+h}·cos_{j+h} + x_j·sin_{j+h}`: the
//! same products and sums, in the same order, as the composed form, so the two agree to the
//! bit in f32.

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor, D};
use rayon::prelude::*;

use super::{rows_per_task, slice};
use crate::simd::dispatched;

#[inline(always)]
fn rope_row_imp(x: &[f32], cos: &[f32], sin: &[f32], y: &mut [f32]) {
    let d = cos.len();
    let h = d / 2;
    for (x, y) in x.chunks_exact(d).zip(y.chunks_exact_mut(d)) {
        let (x1, x2) = x.split_at(h);
        let (y1, y2) = y.split_at_mut(h);
        for j in 0..h {
            y1[j] = x1[j] * cos[j] - x2[j] * sin[j];
            y2[j] = x2[j] * cos[h + j] + x1[j] * sin[h + j];
        }
    }
}

dispatched! {
    /// RoPE of one token's row `x` (`heads × d`, head-major) into `y`, every head rotated by
    /// the same `cos`, `sin` rows of `d` (transformers' tables: `cat(freqs, freqs)`, so each
    /// half repeats).
    pub fn rope_row(x: &[f32], cos: &[f32], sin: &[f32], y: &mut [f32]) = rope_row_imp;
}

#[inline(always)]
fn rope_row_in_place_imp(x: &mut [f32], cos: &[f32], sin: &[f32]) {
    let d = cos.len();
    let h = d / 2;
    for x in x.chunks_exact_mut(d) {
        let (x1, x2) = x.split_at_mut(h);
        for j in 0..h {
            let (a, b) = (x1[j], x2[j]);
            x1[j] = a * cos[j] - b * sin[j];
            x2[j] = b * cos[h + j] + a * sin[h + j];
        }
    }
}

dispatched! {
    /// [`rope_row`] in place (the decoder rotates q and k of the new token where the
    /// projection wrote them).
    pub fn rope_row_in_place(x: &mut [f32], cos: &[f32], sin: &[f32]) = rope_row_in_place_imp;
}

/// Backward of one token's row: `dx = g·cos + rotate_halfᵀ(g·sin)`, i.e. for `j < h`
/// `dx_j = g_j·cos_j + g_{j+h}·sin_{j+h}`, `dx_{j+h} = g_{j+h}·cos_{j+h} − g_j·sin_j`.
/// With `dtab`, also adds `Σ_heads g·x` to `dtab[..d]` (dcos) and `Σ_heads g·rotate_half(x)`
/// to `dtab[d..]` (dsin).
#[inline(always)]
fn rope_bwd_row_imp(x: &[f32], cos: &[f32], sin: &[f32], g: &[f32], dx: &mut [f32], dtab: Option<&mut [f32]>) {
    let d = cos.len();
    let h = d / 2;
    for (g, dx) in g.chunks_exact(d).zip(dx.chunks_exact_mut(d)) {
        let (g1, g2) = g.split_at(h);
        let (d1, d2) = dx.split_at_mut(h);
        for j in 0..h {
            d1[j] = g1[j] * cos[j] + g2[j] * sin[h + j];
            d2[j] = g2[j] * cos[h + j] - g1[j] * sin[j];
        }
    }
    if let Some(dtab) = dtab {
        let (dc, ds) = dtab.split_at_mut(d);
        for (x, g) in x.chunks_exact(d).zip(g.chunks_exact(d)) {
            for j in 0..h {
                dc[j] += g[j] * x[j];
                dc[h + j] += g[h + j] * x[h + j];
                ds[j] -= g[j] * x[h + j];
                ds[h + j] += g[h + j] * x[j];
            }
        }
    }
}

dispatched! {
    /// Backward of [`rope_row`] (see its formula in the source).
    fn rope_bwd_row(x: &[f32], cos: &[f32], sin: &[f32], g: &[f32], dx: &mut [f32], dtab: Option<&mut [f32]>) = rope_bwd_row_imp;
}

/// Rows and head size of an [`apply_rope`] call: `x` `(.., W)` as `rows × W`, tables of
/// `rows × d`, `W` a multiple of `d`, `d` even.
fn geometry(lx: &Layout, lc: &Layout, ls: &Layout) -> candle_core::Result<(usize, usize, usize)> {
    let w = lx.dims().last().copied().unwrap_or(0);
    let d = lc.dims().last().copied().unwrap_or(0);
    let rows = lx.shape().elem_count() / w.max(1);
    let ok = d > 0
        && d % 2 == 0
        && w % d == 0
        && lc.shape().elem_count() == rows * d
        && ls.shape().dims() == lc.shape().dims();
    if !ok {
        candle_core::bail!(
            "apply_rope: x {:?} with cos {:?} and sin {:?}: expected x (.., heads·d) and tables \
             (rows of x, d), d even (hint: tables come from rope::cos_sin for the same tokens)",
            lx.dims(),
            lc.dims(),
            ls.dims()
        )
    }
    Ok((rows, w, d))
}

/// RoPE of `x` by per-token tables, f32 only; equal to [`crate::rope::apply_rope_composed`]
/// to the bit.
///
/// # Shapes
/// `x`: `(.., heads·d)` with `N` rows (tokens), `cos`, `sin`: `(N, d)` → the shape of `x`.
pub fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
    x.contiguous()?.apply_op3(&cos.contiguous()?, &sin.contiguous()?, Rope)
}

struct Rope;

impl CustomOp3 for Rope {
    fn name(&self) -> &'static str {
        "fused-rope"
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
        let (_, w, d) = geometry(l1, l2, l3)?;
        let (x, c, s) = (
            slice(s1, l1, "apply_rope")?,
            slice(s2, l2, "apply_rope")?,
            slice(s3, l3, "apply_rope")?,
        );
        let per = rows_per_task(w);
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(per * w)
            .zip(x.par_chunks(per * w))
            .enumerate()
            .for_each(|(t, (y, x))| {
                for (i, (x, y)) in x.chunks_exact(w).zip(y.chunks_exact_mut(w)).enumerate() {
                    let r = (t * per + i) * d;
                    rope_row(x, &c[r..r + d], &s[r..r + d], y);
                }
            });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let tables = cos.track_op() || sin.track_op();
        // cos and sin side by side, so that the backward is one three-input op.
        let cs = Tensor::cat(&[cos, sin], D::Minus1)?;
        let out = x.apply_op3_no_bwd(&cs, &grad.contiguous()?, &RopeBwd { tables })?;
        let n = x.elem_count();
        let dx = out.narrow(0, 0, n)?.reshape(x.shape())?;
        let (dc, ds) = match tables {
            true => {
                let m = cos.elem_count();
                (
                    Some(out.narrow(0, n, m)?.reshape(cos.shape())?),
                    Some(out.narrow(0, n + m, m)?.reshape(sin.shape())?),
                )
            }
            false => (None, None),
        };
        Ok((
            x.track_op().then_some(dx),
            dc.filter(|_| cos.track_op()),
            ds.filter(|_| sin.track_op()),
        ))
    }
}

/// The backward: `(x, [cos | sin], grad)` → `dx` then, with `tables`, `dcos`, `dsin`, flat.
struct RopeBwd {
    tables: bool,
}

impl CustomOp3 for RopeBwd {
    fn name(&self) -> &'static str {
        "fused-rope-bwd"
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
        let (x, cs, g) = (
            slice(s1, l1, "apply_rope")?,
            slice(s2, l2, "apply_rope")?,
            slice(s3, l3, "apply_rope")?,
        );
        let w = l1.dims().last().copied().unwrap_or(0);
        let d2 = l2.dims().last().copied().unwrap_or(0);
        let rows = x.len() / w.max(1);
        if g.len() != x.len() || cs.len() != rows * d2 || d2 == 0 {
            candle_core::bail!("apply_rope: gradient {:?} does not fit x {:?}", l3.dims(), l1.dims())
        }
        let d = d2 / 2;
        let per = rows_per_task(w);
        let tab = if self.tables { 2 * rows * d } else { 0 };
        let mut out = vec![0f32; x.len() + tab];
        let (dx, dtab) = out.split_at_mut(x.len());
        let body = |t: usize, dx: &mut [f32], mut dtab: Option<&mut [f32]>| {
            for (i, dx) in dx.chunks_exact_mut(w).enumerate() {
                let r = t * per + i;
                let (c, s) = cs[r * d2..(r + 1) * d2].split_at(d);
                let row = r * w..(r + 1) * w;
                let dt = dtab.as_deref_mut().map(|t| &mut t[i * d2..(i + 1) * d2]);
                rope_bwd_row(&x[row.clone()], c, s, &g[row], dx, dt);
            }
        };
        if self.tables {
            // Per-row table gradients, `[dcos_r | dsin_r]`, rearranged below.
            let mut rows_tab = vec![0f32; 2 * rows * d];
            dx.par_chunks_mut(per * w)
                .zip(rows_tab.par_chunks_mut(per * d2))
                .enumerate()
                .for_each(|(t, (dx, dt))| body(t, dx, Some(dt)));
            let (dc, ds) = dtab.split_at_mut(rows * d);
            for (r, t) in rows_tab.chunks_exact(d2).enumerate() {
                dc[r * d..(r + 1) * d].copy_from_slice(&t[..d]);
                ds[r * d..(r + 1) * d].copy_from_slice(&t[d..]);
            }
        } else {
            dx.par_chunks_mut(per * w)
                .enumerate()
                .for_each(|(t, dx)| body(t, dx, None));
        }
        let len = out.len();
        Ok((CpuStorage::F32(out), Shape::from(len)))
    }
}
