//! Fused CPU kernels for the transformer body, each a candle custom op with its backward:
//! layer norm, RMSNorm, the tanh GELU, `silu(gate)·up`, RoPE and the last-dimension softmax,
//! in f32. One pass per row (or per element) forward and one backward, vectorised (see
//! [`crate::simd`]) and split over rayon, where the composed versions in [`crate::nn`] and
//! [`crate::rope`] run five to ten candle ops, each a pass over memory and an allocation,
//! and reduce gradients over broadcast dimensions.
//! The composed versions stay as the test oracles (values and gradients) and serve the
//! other dtypes.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::simd::{dispatched, exp_f32};

mod rms_norm;
mod rope;
mod swiglu;

pub use rms_norm::{rms_bwd_rows, rms_fwd_rows, rms_norm};
pub use rope::{apply_rope, rope_row, rope_row_in_place};
pub use swiglu::{silu_mul, silu_mul_bwd_row, silu_mul_row};

/// Elements per parallel task of the element-wise kernels.
const CHUNK: usize = 1 << 14;

pub(crate) fn slice<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> candle_core::Result<&'a [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, b))) => Ok(&v[a..b]),
        _ => candle_core::bail!("{op}: expected a contiguous f32 tensor"),
    }
}

thread_local! {
    /// Whether this thread may pick the fused CPU kernels (see [`set_fast_kernels`]).
    static FAST: std::cell::Cell<bool> = std::cell::Cell::new(
        std::env::var("RLHF_FAST_KERNELS").map_or(true, |v| v != "0"),
    );
}

/// Whether this thread picks the fused CPU kernels where they apply (default: yes; the
/// environment variable `RLHF_FAST_KERNELS=0` turns them off for every thread).
pub fn fast_kernels() -> bool {
    FAST.with(|f| f.get())
}

/// Restores the previous [`fast_kernels`] setting when dropped.
#[must_use = "the setting is restored when the guard is dropped"]
pub struct FastKernelsGuard {
    previous: bool,
}

impl Drop for FastKernelsGuard {
    fn drop(&mut self) {
        FAST.with(|f| f.set(self.previous));
    }
}

/// Switches this thread's fused kernels on or off until the guard is dropped. Off, every
/// op takes its composed path (plain candle ops, the path of other devices and dtypes):
/// the switch that keeps that path tested on the CPU.
pub fn set_fast_kernels(on: bool) -> FastKernelsGuard {
    let previous = FAST.with(|f| f.replace(on));
    FastKernelsGuard { previous }
}

/// Whether the fused kernels apply: f32 tensors on the CPU, with [`fast_kernels`] on.
pub fn applies(ts: &[&Tensor]) -> bool {
    fast_kernels() && ts.iter().all(|t| t.dtype() == DType::F32 && t.device().is_cpu())
}

/// Whether the fused kernels that also take f64 apply: f32 or f64 tensors on the CPU, with
/// [`fast_kernels`] on.
pub fn applies_f32_f64(ts: &[&Tensor]) -> bool {
    fast_kernels()
        && ts
            .iter()
            .all(|t| matches!(t.dtype(), DType::F32 | DType::F64) && t.device().is_cpu())
}

/// Rows per task for rows of `h` elements.
fn rows_per_task(h: usize) -> usize {
    (CHUNK / h.max(1)).max(1)
}

/// `f(x_block, y_block)` over blocks of whole rows of `row` elements, in parallel, into a
/// new output the size of `x` (`row` 1: element-wise).
fn par_rows(x: &[f32], row: usize, f: impl Fn(&[f32], &mut [f32]) + Sync) -> Vec<f32> {
    let c = rows_per_task(row) * row.max(1);
    let mut y = vec![0f32; x.len()];
    y.par_chunks_mut(c).zip(x.par_chunks(c)).for_each(|(y, x)| f(x, y));
    y
}

/// [`par_rows`] over two aligned inputs.
fn par_rows2(a: &[f32], b: &[f32], row: usize, f: impl Fn(&[f32], &[f32], &mut [f32]) + Sync) -> Vec<f32> {
    let c = rows_per_task(row) * row.max(1);
    let mut y = vec![0f32; a.len()];
    y.par_chunks_mut(c)
        .zip(a.par_chunks(c).zip(b.par_chunks(c)))
        .for_each(|(y, (a, b))| f(a, b, y));
    y
}

/// The length of the last dimension (rows of a row-wise kernel).
fn last_dim(l: &Layout) -> usize {
    l.dims().last().copied().unwrap_or(1).max(1)
}

// ---------------------------------------------------------------- layer norm

/// `y = (x − mean) / sqrt(var + eps) · w + b` over the last dimension (biased variance),
/// f32 only; equal to [`crate::nn::layer_norm_composed`] to f32 rounding.
///
/// # Shapes
/// `x`: `(.., H)`, `w`, `b`: `(H)` → `(.., H)`.
pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    x.contiguous()?
        .apply_op3(&w.contiguous()?, &b.contiguous()?, LayerNorm { eps: eps as f32 })
}

struct LayerNorm {
    eps: f32,
}

#[inline(always)]
fn ln_stats(x: &[f32], eps: f32) -> (f32, f32) {
    let h = x.len() as f32;
    let mut acc = [0f32; 16];
    let chunks = x.chunks_exact(16);
    let rest = chunks.remainder();
    for c in chunks {
        for i in 0..16 {
            acc[i] += c[i];
        }
    }
    let mean = (acc.iter().sum::<f32>() + rest.iter().sum::<f32>()) / h;
    let mut acc = [0f32; 16];
    let chunks = x.chunks_exact(16);
    let rest = chunks.remainder();
    for c in chunks {
        for i in 0..16 {
            let d = c[i] - mean;
            acc[i] += d * d;
        }
    }
    let var = (acc.iter().sum::<f32>() + rest.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>()) / h;
    (mean, 1.0 / (var + eps).sqrt())
}

#[inline(always)]
fn ln_fwd_rows_imp(x: &[f32], w: &[f32], b: &[f32], eps: f32, y: &mut [f32]) {
    let h = w.len();
    for (x, y) in x.chunks_exact(h).zip(y.chunks_exact_mut(h)) {
        let (mean, rstd) = ln_stats(x, eps);
        for i in 0..h {
            y[i] = (x[i] - mean) * rstd * w[i] + b[i];
        }
    }
}

dispatched! {
    /// Layer norm of whole rows of `x` into `y`.
    pub fn ln_fwd_rows(x: &[f32], w: &[f32], b: &[f32], eps: f32, y: &mut [f32]) = ln_fwd_rows_imp;
}

/// Backward of rows: writes `dx`, adds to `dw`, `db`.
#[inline(always)]
fn ln_bwd_rows_imp(x: &[f32], w: &[f32], g: &[f32], eps: f32, dx: &mut [f32], dw: &mut [f32], db: &mut [f32]) {
    let h = w.len();
    let hf = h as f32;
    for ((x, g), dx) in x.chunks_exact(h).zip(g.chunks_exact(h)).zip(dx.chunks_exact_mut(h)) {
        let (mean, rstd) = ln_stats(x, eps);
        let (mut c1, mut c2) = (0f32, 0f32);
        for i in 0..h {
            let xn = (x[i] - mean) * rstd;
            let gw = g[i] * w[i];
            c1 += gw;
            c2 += gw * xn;
            dw[i] += g[i] * xn;
            db[i] += g[i];
        }
        let (c1, c2) = (c1 / hf, c2 / hf);
        for i in 0..h {
            let xn = (x[i] - mean) * rstd;
            dx[i] = rstd * (g[i] * w[i] - c1 - xn * c2);
        }
    }
}

dispatched! {
    /// Layer-norm backward of whole rows.
    pub fn ln_bwd_rows(x: &[f32], w: &[f32], g: &[f32], eps: f32, dx: &mut [f32], dw: &mut [f32], db: &mut [f32])
        = ln_bwd_rows_imp;
}

impl CustomOp3 for LayerNorm {
    fn name(&self) -> &'static str {
        "fused-layer-norm"
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
        let (x, w, b) = (
            slice(s1, l1, "layer_norm")?,
            slice(s2, l2, "layer_norm")?,
            slice(s3, l3, "layer_norm")?,
        );
        let h = w.len();
        if h == 0 || b.len() != h || l1.dims().last() != Some(&h) {
            candle_core::bail!(
                "layer_norm: x {:?}, w {:?}, b {:?} do not fit",
                l1.dims(),
                l2.dims(),
                l3.dims()
            )
        }
        let y = par_rows(x, h, |x, y| ln_fwd_rows(x, w, b, self.eps, y));
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let h = w.elem_count();
        let out = x.apply_op3_no_bwd(w, &grad.contiguous()?, &LayerNormBwd { eps: self.eps })?;
        // `out` is `(rows + 2, H)`: dx, then dw and db.
        let rows = out.dim(0)? - 2;
        let dx = out.narrow(0, 0, rows)?.reshape(x.shape())?;
        let dw = out.narrow(0, rows, 1)?.reshape(h)?;
        let db = out.narrow(0, rows + 1, 1)?.reshape(h)?;
        Ok((
            x.track_op().then_some(dx),
            w.track_op().then_some(dw),
            b.track_op().then_some(db),
        ))
    }
}

struct LayerNormBwd {
    eps: f32,
}

impl CustomOp3 for LayerNormBwd {
    fn name(&self) -> &'static str {
        "fused-layer-norm-bwd"
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
            slice(s1, l1, "layer_norm")?,
            slice(s2, l2, "layer_norm")?,
            slice(s3, l3, "layer_norm")?,
        );
        let h = w.len();
        let rows = x.len() / h.max(1);
        let mut out = vec![0f32; x.len() + 2 * h];
        let (dx, _) = out.split_at_mut(x.len());
        let n = rows_per_task(h) * h;
        // Per-task partial sums of dw and db, added in task order (deterministic).
        let partial: Vec<Vec<f32>> = dx
            .par_chunks_mut(n)
            .zip(x.par_chunks(n).zip(g.par_chunks(n)))
            .map(|(dx, (x, g))| {
                let mut p = vec![0f32; 2 * h];
                let (dw, db) = p.split_at_mut(h);
                ln_bwd_rows(x, w, g, self.eps, dx, dw, db);
                p
            })
            .collect();
        let tail = &mut out[x.len()..];
        for p in partial {
            tail.iter_mut().zip(&p).for_each(|(a, b)| *a += b);
        }
        Ok((CpuStorage::F32(out), Shape::from((rows + 2, h))))
    }
}

// ---------------------------------------------------------------- GELU (tanh)

const SQRT_2_OVER_PI: f32 = 0.797_884_6;
const GELU_C: f32 = 0.044_715;

/// `tanh` from the polynomial `exp`: `1 − 2 / (e^{2u} + 1)` (absolute error ~1e-7).
#[inline(always)]
fn tanh_f32(u: f32) -> f32 {
    let u = u.clamp(-20.0, 20.0);
    1.0 - 2.0 / (exp_f32(2.0 * u) + 1.0)
}

#[inline(always)]
fn gelu_fwd_imp(x: &[f32], y: &mut [f32]) {
    for (y, &x) in y.iter_mut().zip(x) {
        let t = tanh_f32(SQRT_2_OVER_PI * (x + GELU_C * x * x * x));
        *y = 0.5 * x * (1.0 + t);
    }
}

#[inline(always)]
fn gelu_bwd_imp(x: &[f32], g: &[f32], dx: &mut [f32]) {
    for ((dx, &x), &g) in dx.iter_mut().zip(x).zip(g) {
        let t = tanh_f32(SQRT_2_OVER_PI * (x + GELU_C * x * x * x));
        let du = SQRT_2_OVER_PI * (1.0 + 3.0 * GELU_C * x * x);
        *dx = g * (0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * du);
    }
}

dispatched! {
    /// `gelu_new` of a slice.
    pub fn gelu_fwd(x: &[f32], y: &mut [f32]) = gelu_fwd_imp;
}

dispatched! {
    /// `g · gelu_new'(x)` of a slice.
    pub fn gelu_bwd(x: &[f32], g: &[f32], dx: &mut [f32]) = gelu_bwd_imp;
}

/// The tanh GELU (`gelu_new`), `0.5 x (1 + tanh(√(2/π)(x + 0.044715 x³)))`, f32 only;
/// equal to candle's `gelu` to ~1e-6.
pub fn gelu_tanh(x: &Tensor) -> candle_core::Result<Tensor> {
    x.contiguous()?.apply_op1(GeluTanh)
}

struct GeluTanh;

impl CustomOp1 for GeluTanh {
    fn name(&self) -> &'static str {
        "fused-gelu-tanh"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = slice(s, l, "gelu")?;
        Ok((CpuStorage::F32(par_rows(x, 1, gelu_fwd)), l.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(arg.apply_op2_no_bwd(&grad.contiguous()?, &GeluTanhBwd)?))
    }
}

struct GeluTanhBwd;

impl CustomOp2 for GeluTanhBwd {
    fn name(&self) -> &'static str {
        "fused-gelu-tanh-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, g) = (slice(s1, l1, "gelu")?, slice(s2, l2, "gelu")?);
        Ok((CpuStorage::F32(par_rows2(x, g, 1, gelu_bwd)), l1.shape().clone()))
    }
}

// ---------------------------------------------------------------- softmax

#[inline(always)]
fn softmax_rows_imp(x: &[f32], n: usize, y: &mut [f32]) {
    for (x, y) in x.chunks_exact(n).zip(y.chunks_exact_mut(n)) {
        let m = crate::simd::max_f32_imp(x);
        y.copy_from_slice(x);
        let inv = (1.0 / crate::simd::exp_shift_in_place_f32_imp(y, m)) as f32;
        for y in y.iter_mut() {
            *y *= inv;
        }
    }
}

#[inline(always)]
fn softmax_bwd_rows_imp(y: &[f32], g: &[f32], n: usize, dx: &mut [f32]) {
    use crate::simd::LANES;
    for ((y, g), dx) in y.chunks_exact(n).zip(g.chunks_exact(n)).zip(dx.chunks_exact_mut(n)) {
        let mut lanes = [0f32; LANES];
        let (yc, gc) = (y.chunks_exact(LANES), g.chunks_exact(LANES));
        let (yr, gr) = (yc.remainder(), gc.remainder());
        for (y, g) in yc.zip(gc) {
            for i in 0..LANES {
                lanes[i] += y[i] * g[i];
            }
        }
        let mut dot: f32 = lanes.iter().sum();
        for (y, g) in yr.iter().zip(gr) {
            dot += y * g;
        }
        for i in 0..n {
            dx[i] = y[i] * (g[i] - dot);
        }
    }
}

dispatched! {
    /// Softmax of whole rows of length `n`.
    pub fn softmax_rows(x: &[f32], n: usize, y: &mut [f32]) = softmax_rows_imp;
}

dispatched! {
    /// Softmax backward of whole rows: `dx = y (g − Σ g y)`.
    pub fn softmax_bwd_rows(y: &[f32], g: &[f32], n: usize, dx: &mut [f32]) = softmax_bwd_rows_imp;
}

/// Softmax over the last dimension, f32 only; equal to
/// [`crate::nn::softmax_last_dim_composed`] to f32 rounding.
pub fn softmax_last_dim(x: &Tensor) -> candle_core::Result<Tensor> {
    x.contiguous()?.apply_op1(Softmax)
}

struct Softmax;

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "fused-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = slice(s, l, "softmax")?;
        let n = last_dim(l);
        let y = par_rows(x, n, |x, y| softmax_rows(x, n, y));
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(res.apply_op2_no_bwd(&grad.contiguous()?, &SoftmaxBwd)?))
    }
}

struct SoftmaxBwd;

impl CustomOp2 for SoftmaxBwd {
    fn name(&self) -> &'static str {
        "fused-softmax-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (y, g) = (slice(s1, l1, "softmax")?, slice(s2, l2, "softmax")?);
        let n = last_dim(l1);
        let dx = par_rows2(y, g, n, |y, g, dx| softmax_bwd_rows(y, g, n, dx));
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }
}

// ---------------------------------------------------------------- bias add

/// `y = x + b` with `b` broadcast over the rows of `x`, f32 only. The backward passes the
/// gradient through to `x` untouched and sums it over rows for `b` in one vectorised pass
/// (candle's broadcast backward reduces over the leading dimensions with a strided loop).
///
/// # Shapes
/// `x`: `(.., N)`, `b`: `(N)` → `(.., N)`.
pub fn bias_add(x: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    x.contiguous()?.apply_op2(&b.contiguous()?, BiasAdd)
}

struct BiasAdd;

#[inline(always)]
fn bias_add_rows_imp(x: &[f32], b: &[f32], y: &mut [f32]) {
    let n = b.len();
    for (x, y) in x.chunks_exact(n).zip(y.chunks_exact_mut(n)) {
        for i in 0..n {
            y[i] = x[i] + b[i];
        }
    }
}

#[inline(always)]
fn column_sums_imp(g: &[f32], acc: &mut [f32]) {
    let n = acc.len();
    for g in g.chunks_exact(n) {
        for i in 0..n {
            acc[i] += g[i];
        }
    }
}

dispatched! {
    /// `y = x + b` row by row.
    pub fn bias_add_rows(x: &[f32], b: &[f32], y: &mut [f32]) = bias_add_rows_imp;
}

dispatched! {
    /// `acc += Σ_rows g`.
    pub fn column_sums(g: &[f32], acc: &mut [f32]) = column_sums_imp;
}

impl CustomOp2 for BiasAdd {
    fn name(&self) -> &'static str {
        "fused-bias-add"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, b) = (slice(s1, l1, "bias_add")?, slice(s2, l2, "bias_add")?);
        let n = b.len();
        if n == 0 || l1.dims().last() != Some(&n) {
            candle_core::bail!("bias_add: x {:?} does not end in the bias size {n}", l1.dims())
        }
        let y = par_rows(x, n, |x, y| bias_add_rows(x, b, y));
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let db = match b.track_op() {
            true => Some(grad.contiguous()?.apply_op1_no_bwd(&ColumnSums { n: b.elem_count() })?),
            false => None,
        };
        Ok((x.track_op().then(|| grad.clone()), db))
    }
}

struct ColumnSums {
    n: usize,
}

impl CustomOp1 for ColumnSums {
    fn name(&self) -> &'static str {
        "fused-column-sums"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let g = slice(s, l, "bias_add")?;
        let n = self.n.max(1);
        let c = rows_per_task(n) * n;
        // Per-task partial sums, added in task order (deterministic).
        let partial: Vec<Vec<f32>> = g
            .par_chunks(c)
            .map(|g| {
                let mut acc = vec![0f32; n];
                column_sums(g, &mut acc);
                acc
            })
            .collect();
        let mut out = vec![0f32; n];
        for p in partial {
            out.iter_mut().zip(&p).for_each(|(a, b)| *a += b);
        }
        Ok((CpuStorage::F32(out), Shape::from(n)))
    }
}

#[cfg(test)]
mod tests;
