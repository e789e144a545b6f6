//! Mixed-precision matrix products on the CPU, as PyTorch's CPU autocast computes them:
//! f32 tensors in, both operands rounded to bf16 (round-to-nearest-even), products
//! accumulated in f32, f32 out.
//!
//! `C = round(A) · round(B)`, `C_ij = Σ_k round(A_ik)·round(B_kj)`. A product of two bf16
//! values (8-bit significands) is exact in f32, so the only rounding after the inputs'
//! is the f32 summation.
//!
//! On CPUs with AVX512-BF16 ([`has_bf16_dot`]) the product runs on `vdpbf16ps`, which
//! multiplies 32 bf16 pairs per instruction: twice the multiply-adds of an f32 FMA of the
//! same width. The GEMM is blocked the usual BLIS way (pack B panels, pack A panels, a
//! register-blocked microkernel; see the `avx512` submodule); packing reads any strides, so
//! transposed views need no copy, and rounds to bf16 on the way. Elsewhere
//! [`gemm_fallback`] rounds both operands to bf16-valued f32 and calls candle's f32 matmul:
//! the same values, summed in another order.
//!
//! Deviations, all within f32 summation error of each other:
//! - `vdpbf16ps` treats bf16 subnormals (|x| < 2⁻¹²⁶ ≈ 1.2e-38) as zero and flushes
//!   subnormal sums to zero; the fallback keeps them.
//! - The summation order depends on the block sizes and, for products with a long `k` and a
//!   small C (an LM head's input gradient), on the number of rayon threads, which split
//!   `k` and add the partial results.
//!
//! # Shapes
//! `A`: `(m, k)`, `B`: `(k, n)` → `C`: `(m, n)`; a linear layer's forward is `x · Wᵀ`
//! with `x: (B·T, H)` and `W: (V, H)` row-major, so `B = Wᵀ` is a transposed view.

// The blocking and threading serve the x86-64 kernel only.
#![cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx512;
#[cfg(test)]
mod tests;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

// Block sizes, measured on Zen 4 (32 KiB L1d, 1 MiB L2 per core) with one and two threads:
// KC 512 ran ~5% faster than 256 (half the passes over C); MC 6·MR and NC 2048 were a few
// per cent ahead of 12·MR and 4096 with two threads.

/// Rows of the microkernel's tile (one broadcast A word per row per `k` pair; 2·MR
/// accumulators and two B registers fill 30 of the 32 zmm registers).
const MR: usize = 14;
/// Columns of the microkernel's tile (two 16-lane registers).
const NR: usize = 32;
/// `k` per packed block: a `KC × NR` B panel is 32 KiB of bf16.
const KC: usize = 512;
/// Rows per packed A block (`MC × KC` bf16, 84 KiB, in L2).
const MC: usize = 6 * MR;
/// Columns per packed B block (`KC × NC` bf16, 2 MiB, in L3).
const NC: usize = 2048;

/// The bits of the bf16 nearest to `x`, ties to even. NaN stays NaN (a quiet NaN with the
/// sign and upper payload of `x`), infinities stay infinite, finite values above the
/// largest bf16 (`3.3895e38` plus half an ulp) round to infinity, subnormals round to
/// bf16 subnormals.
pub fn to_bf16_bits(x: f32) -> u16 {
    let b = x.to_bits();
    if x.is_nan() {
        return ((b >> 16) | 0x0040) as u16;
    }
    // Adding 0x7FFF (+1 when the kept lowest bit is odd) carries into the kept bits exactly
    // when the dropped half is above the midpoint (or at it, with an odd kept part). The sum
    // cannot overflow: the largest non-NaN pattern is 0xFF80_0000.
    ((b + 0x7FFF + ((b >> 16) & 1)) >> 16) as u16
}

/// The f32 value of the bf16 nearest to `x` (see [`to_bf16_bits`]).
pub fn bf16_round(x: f32) -> f32 {
    f32::from_bits((to_bf16_bits(x) as u32) << 16)
}

/// A read-only strided matrix view over f32: element `(i, j)` is
/// `data[i·row_stride + j·col_stride]`. A row-major `(r, c)` matrix has strides `(c, 1)`;
/// its transpose the same data with strides `(1, c)`.
#[derive(Clone, Copy, Debug)]
pub struct MatRef<'a> {
    /// The elements, starting at element `(0, 0)`.
    pub data: &'a [f32],
    /// Distance between rows.
    pub row_stride: usize,
    /// Distance between columns.
    pub col_stride: usize,
}

impl<'a> MatRef<'a> {
    /// A row-major matrix with `cols` columns.
    pub fn row_major(data: &'a [f32], cols: usize) -> Self {
        Self {
            data,
            row_stride: cols,
            col_stride: 1,
        }
    }

    /// The transposed view (no copy).
    pub fn t(self) -> Self {
        Self {
            data: self.data,
            row_stride: self.col_stride,
            col_stride: self.row_stride,
        }
    }

    /// The element `(i, j)`.
    fn at(&self, i: usize, j: usize) -> f32 {
        self.data[i * self.row_stride + j * self.col_stride]
    }

    /// The view starting at element `(i, j)`; `(i, j)` must be in bounds.
    fn offset(self, i: usize, j: usize) -> Self {
        let o = i * self.row_stride + j * self.col_stride;
        Self {
            data: &self.data[o..],
            ..self
        }
    }

    /// Checks that every element of a `rows × cols` view lies in `data`.
    pub(crate) fn check(&self, name: &'static str, rows: usize, cols: usize) -> Result<(), GemmError> {
        if rows == 0 || cols == 0 {
            return Ok(());
        }
        let last = (rows - 1)
            .checked_mul(self.row_stride)
            .and_then(|r| (cols - 1).checked_mul(self.col_stride).and_then(|c| r.checked_add(c)));
        match last {
            Some(last) if last < self.data.len() => Ok(()),
            _ => Err(GemmError::OutOfBounds {
                operand: name,
                rows,
                cols,
                row_stride: self.row_stride,
                col_stride: self.col_stride,
                len: self.data.len(),
            }),
        }
    }
}

/// What can go wrong in [`gemm`].
#[derive(Debug, thiserror::Error)]
pub enum GemmError {
    /// A view reaches past the end of its data.
    #[error(
        "bf16 gemm: {operand} is a {rows}x{cols} view with strides ({row_stride}, {col_stride}) \
         over only {len} elements\nhint: check m, k, n and the strides against the buffer"
    )]
    OutOfBounds {
        /// `"A"` or `"B"`.
        operand: &'static str,
        /// Rows of the view.
        rows: usize,
        /// Columns of the view.
        cols: usize,
        /// Distance between rows.
        row_stride: usize,
        /// Distance between columns.
        col_stride: usize,
        /// Elements in the data.
        len: usize,
    },
    /// The output buffer does not hold `m·n` elements.
    #[error("bf16 gemm: C has {len} elements, expected m·n = {m}·{n}")]
    OutputSize {
        /// Rows of C.
        m: usize,
        /// Columns of C.
        n: usize,
        /// Elements given.
        len: usize,
    },
    /// candle's matmul failed (fallback path).
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

fn check(m: usize, k: usize, n: usize, a: &MatRef, b: &MatRef, c: &[f32]) -> Result<(), GemmError> {
    a.check("A", m, k)?;
    b.check("B", k, n)?;
    match c.len() == m * n {
        true => Ok(()),
        false => Err(GemmError::OutputSize { m, n, len: c.len() }),
    }
}

/// Whether this CPU runs the AVX512-BF16 kernel (else [`gemm`] takes the fallback).
pub fn has_bf16_dot() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `C = round(A) · round(B)` with f32 accumulation (see the module docs): `A` is `m × k`,
/// `B` is `k × n`, `C` is row-major `m × n` and is overwritten. Runs on the rayon pool.
pub fn gemm(m: usize, k: usize, n: usize, a: MatRef<'_>, b: MatRef<'_>, c: &mut [f32]) -> Result<(), GemmError> {
    check(m, k, n, &a, &b, c)?;
    #[cfg(target_arch = "x86_64")]
    if has_bf16_dot() {
        // SAFETY: the views and C were checked just above; the CPU has the features.
        unsafe { gemm_bf16_dot(m, k, n, a, b, c.as_mut_ptr()) };
        return Ok(());
    }
    gemm_fallback(m, k, n, a, b, c)
}

/// [`gemm`] without the AVX512-BF16 kernel: both operands rounded to bf16-valued f32, then
/// candle's f32 matmul. Products of bf16 values are exact in f32, so this differs from the
/// kernel only in the summation order (and in keeping subnormals).
pub fn gemm_fallback(
    m: usize,
    k: usize,
    n: usize,
    a: MatRef<'_>,
    b: MatRef<'_>,
    c: &mut [f32],
) -> Result<(), GemmError> {
    check(m, k, n, &a, &b, c)?;
    if m == 0 || n == 0 || k == 0 {
        c.fill(0.0);
        return Ok(());
    }
    let dev = candle_core::Device::Cpu;
    let rounded = |v: MatRef, rows: usize, cols: usize| -> Vec<f32> {
        (0..rows)
            .flat_map(|i| (0..cols).map(move |j| bf16_round(v.at(i, j))))
            .collect()
    };
    let (ra, rb) = (rounded(a, m, k), rounded(b, k, n));
    let ta = Tensor::from_vec(ra, (m, k), &dev)?;
    let tb = Tensor::from_vec(rb, (k, n), &dev)?;
    c.copy_from_slice(&ta.matmul(&tb)?.flatten_all()?.to_vec1::<f32>()?);
    Ok(())
}

/// How the product is split over threads: into blocks of rows or of columns of C (each
/// task packs all of the other operand), or into ranges of `k` whose partial products are
/// added at the end.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Split {
    Rows,
    Cols,
    Depth,
}

/// Packing one element costs about as much as this many multiply-adds (it reads f32 from
/// wherever the operand lives; the microkernel reads packed bf16 from L1/L2).
const PACK_COST: f64 = 24.0;

/// The split with the least work on the slowest task for `threads` threads, and the
/// extent of each part (a multiple of the tile, or even for `k`); `None` for one task.
fn plan(m: usize, k: usize, n: usize, threads: usize) -> Option<(Split, usize)> {
    let (mf, kf, nf) = (m as f64, k as f64, n as f64);
    if threads < 2 || mf * kf * nf < (1 << 18) as f64 {
        return None;
    }
    let part = |len: usize, unit: usize| len.div_ceil(threads).div_ceil(unit) * unit;
    let candidates = [
        (Split::Rows, part(m, MR), m),
        (Split::Cols, part(n, NR), n),
        (Split::Depth, part(k, KC), k),
    ];
    let cost = |s: Split, size: usize, len: usize| {
        let p = len.div_ceil(size) as f64;
        let macs = mf * kf * nf / p;
        match s {
            Split::Rows => macs + PACK_COST * (kf * nf + mf * kf / p),
            Split::Cols => macs + PACK_COST * (mf * kf + kf * nf / p),
            Split::Depth => macs + PACK_COST * ((mf + nf) * kf / p + p * mf * nf),
        }
    };
    candidates
        .into_iter()
        .filter(|&(_, size, len)| len > size)
        .map(|(s, size, len)| (cost(s, size, len), s, size))
        .min_by(|x, y| x.0.total_cmp(&y.0))
        .map(|(_, s, size)| (s, size))
}

/// The output pointer shared by tasks that write disjoint blocks of C.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
struct SharedC(*mut f32);
// SAFETY: every task writes only its own block of C (disjoint row or column ranges).
#[cfg(target_arch = "x86_64")]
unsafe impl Send for SharedC {}
#[cfg(target_arch = "x86_64")]
unsafe impl Sync for SharedC {}

#[cfg(target_arch = "x86_64")]
thread_local! {
    static PACKED: std::cell::RefCell<avx512::Packed> = std::cell::RefCell::default();
}

/// One block on the current thread, with this thread's packing buffers.
///
/// # Safety
/// `a`, `b` checked for `m × k`, `k × n`; `c` addresses `m × n` with row stride `ldc` and no
/// other thread writes there; the CPU has AVX-512F/BW and AVX512-BF16.
#[cfg(target_arch = "x86_64")]
unsafe fn block(m: usize, k: usize, n: usize, a: MatRef, b: MatRef, c: *mut f32, ldc: usize) {
    PACKED.with_borrow_mut(|buf| avx512::gemm_block(m, k, n, a, b, avx512::CBlock { ptr: c, ldc }, buf))
}

/// The kernel path of [`gemm`]: writes every element of the row-major `m × n` C at `c`,
/// never reading one before writing it (so `c` may be uninitialised).
///
/// # Safety
/// `a` and `b` are checked views of `m × k` and `k × n`; `c` is valid for writes of `m·n`
/// f32; the CPU has AVX-512F/BW and AVX512-BF16 ([`has_bf16_dot`]).
#[cfg(target_arch = "x86_64")]
unsafe fn gemm_bf16_dot(m: usize, k: usize, n: usize, a: MatRef, b: MatRef, c: *mut f32) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        std::ptr::write_bytes(c, 0, m * n);
        return;
    }
    // In every arm the sub-views are in bounds (the full views were checked) and each
    // task's block of C is its own.
    let shared = SharedC(c);
    match plan(m, k, n, rayon::current_num_threads()) {
        None => block(m, k, n, a, b, c, n),
        Some((Split::Rows, size)) => (0..m).into_par_iter().step_by(size).for_each(|i0| {
            let c = shared;
            block(size.min(m - i0), k, n, a.offset(i0, 0), b, c.0.add(i0 * n), n)
        }),
        Some((Split::Cols, size)) => (0..n).into_par_iter().step_by(size).for_each(|j0| {
            let c = shared;
            block(m, k, size.min(n - j0), a, b.offset(0, j0), c.0.add(j0), n)
        }),
        Some((Split::Depth, size)) => {
            // The first range writes C, the others their own buffers, added afterwards.
            let parts = k.div_ceil(size);
            let mut partial = vec![0f32; (parts - 1) * m * n];
            let rest = SharedC(partial.as_mut_ptr());
            (0..parts).into_par_iter().for_each(|t| {
                let (c, rest) = (shared, rest);
                let out = match t {
                    0 => c.0,
                    _ => rest.0.add((t - 1) * m * n),
                };
                let k0 = t * size;
                block(m, size.min(k - k0), n, a.offset(0, k0), b.offset(k0, 0), out, n)
            });
            let c = std::slice::from_raw_parts_mut(c, m * n);
            for p in partial.chunks_exact(m * n) {
                c.par_chunks_mut(1 << 14)
                    .zip(p.par_chunks(1 << 14))
                    .for_each(|(c, p)| c.iter_mut().zip(p).for_each(|(c, p)| *c += p));
            }
        }
    }
}

/// [`gemm`] into a new row-major `m × n` vector (on the kernel path without zeroing it
/// first).
fn gemm_new(m: usize, k: usize, n: usize, a: MatRef<'_>, b: MatRef<'_>) -> Result<Vec<f32>, GemmError> {
    #[cfg(target_arch = "x86_64")]
    if has_bf16_dot() {
        a.check("A", m, k)?;
        b.check("B", k, n)?;
        let mut c = Vec::with_capacity(m * n);
        // SAFETY: views checked, the CPU has the features, the capacity holds m·n f32 and
        // gemm_bf16_dot writes all of them.
        unsafe {
            gemm_bf16_dot(m, k, n, a, b, c.as_mut_ptr());
            c.set_len(m * n);
        }
        return Ok(c);
    }
    let mut c = vec![0f32; m * n];
    gemm_fallback(m, k, n, a, b, &mut c)?;
    Ok(c)
}

// ---------------------------------------------------------------- candle op

/// `round(a) · round(b)` with f32 accumulation ([`gemm`]) as a candle op with backward:
/// `∂a = round(g) · round(b)ᵀ`, `∂b = round(a)ᵀ · round(g)`, the same mixed-precision
/// product again (on transposed views, without copies). Any strides are read in place, so
/// `matmul(&x, &w.t()?)` needs no `contiguous()`.
///
/// Other dtypes or devices go to candle's `matmul` unchanged.
///
/// # Shapes
/// `a`: `(m, k)`, `b`: `(k, n)` → `(m, n)`.
pub fn matmul(a: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    let (_, k) = a.dims2()?;
    let (k2, _) = b.dims2()?;
    if k != k2 {
        candle_core::bail!(
            "bf16::matmul: a is {:?} and b is {:?}; the inner sizes differ",
            a.dims(),
            b.dims()
        )
    }
    let f32_cpu = |t: &Tensor| t.dtype() == DType::F32 && t.device().is_cpu();
    match f32_cpu(a) && f32_cpu(b) {
        true => a.apply_op2(b, Bf16Matmul),
        false => a.matmul(b),
    }
}

pub(crate) struct Bf16Matmul;

/// The strided view of a 2-D f32 tensor's storage.
fn view<'a>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<(MatRef<'a>, usize, usize)> {
    let (CpuStorage::F32(v), [r, c], [rs, cs]) = (s, l.dims(), l.stride()) else {
        candle_core::bail!(
            "bf16::matmul: expected 2-D f32 tensors, got {:?} {:?}",
            s.dtype(),
            l.dims()
        )
    };
    let data = v.get(l.start_offset()..).unwrap_or_default();
    Ok((
        MatRef {
            data,
            row_stride: *rs,
            col_stride: *cs,
        },
        *r,
        *c,
    ))
}

impl CustomOp2 for Bf16Matmul {
    fn name(&self) -> &'static str {
        "bf16-matmul"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let ((a, m, k), (b, _, n)) = (view(s1, l1)?, view(s2, l2)?);
        let c = gemm_new(m, k, n, a, b).map_err(candle_core::Error::wrap)?;
        Ok((CpuStorage::F32(c), Shape::from((m, n))))
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let ga = match a.track_op() {
            true => Some(grad.apply_op2_no_bwd(&b.t()?, &Bf16Matmul)?),
            false => None,
        };
        let gb = match b.track_op() {
            true => Some(a.t()?.apply_op2_no_bwd(grad, &Bf16Matmul)?),
            false => None,
        };
        Ok((ga, gb))
    }
}
