//! Weight matrices packed once for many products with few rows: the projections of
//! incremental decoding, where every step multiplies a handful of rows (one token per
//! sequence) by every weight of the model.
//!
//! A general GEMM packs both operands on every call; with 16 rows, packing the weight costs
//! as much as the product itself, and reading it in place walks it with a stride. Here the
//! weight `B: (k, n)` is packed once into column panels of [`NR`] columns, each panel all of
//! `k` contiguous, so a product streams every panel once from memory while the few rows of
//! `A` stay in cache. Panels hold f32 ([`PackedFormat::F32`]) or bf16 pairs
//! ([`PackedFormat::Bf16`]: half the bytes to stream, and `vdpbf16ps` does twice the
//! multiply-adds of an f32 FMA).
//!
//! Layouts (panel `q` covers columns `32q..32q + 32`, zero-padded past `n`):
//! - f32: element `t·NR + j` of a panel is `B[t][32q + j]`;
//! - bf16: word `p·NR + j` is `(B[2p][32q + j], B[2p+1][32q + j])` rounded to bf16 (the lower
//!   half the even `k`; an odd last `k` pairs with zero), as in [`crate::bf16`].
//!
//! `C = A · B` sums in f32. In bf16 both operands are rounded to bf16 (round-to-nearest-even),
//! as [`crate::bf16::gemm`] does, and every product of two bf16 values is exact in f32.
//! On CPUs without AVX-512F an AVX2 + FMA kernel, and without those (or for bf16 without
//! AVX512-BF16) a portable loop over the same panels, computes the same sums in the same order (`vdpbf16ps` adds the odd product, then
//! the even one, to the accumulator; it treats bf16 subnormals as zero, the portable loop
//! keeps them).
//!
//! # Shapes
//! `A`: `(m, k)` any strides, `B`: `(k, n)`, `C`: row-major `(m, n)`.

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
#[cfg(test)]
mod tests;

use rayon::prelude::*;

use crate::bf16::{GemmError, MatRef};

/// Columns per panel (two 16-lane registers).
pub const NR: usize = 32;
/// Rows per register tile at most (2·MR accumulators, two panel registers and a broadcast
/// fill 31 of the 32 zmm registers).
const MR: usize = 14;
/// `k` steps per cache block of a panel: 128 steps of 32 columns are 16 KiB, which stay in
/// L1 while every row tile runs over them.
const KB: usize = 128;
/// Products with fewer multiply-adds than this run on the calling thread.
const PARALLEL_MACS: usize = 1 << 18;

/// The element type of the packed panels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PackedFormat {
    /// f32, the weight's own values.
    F32,
    /// bf16 pairs along `k` (the weight rounded to bf16; products also round `A`).
    Bf16,
}

/// A `(k, n)` matrix packed into column panels for [`PackedMatrix::matmul`].
#[derive(Clone, Debug)]
pub struct PackedMatrix {
    k: usize,
    n: usize,
    format: PackedFormat,
    /// Panels back to back, `panel_words` words each (f32 bits or bf16 pairs).
    data: Vec<u32>,
}

impl PackedMatrix {
    /// Packs `b`, a `k × n` view (any strides: a `Conv1D` weight `(in, out)` row-major, or
    /// a `Linear` weight `(out, in)` seen transposed), on the rayon pool.
    pub fn new(b: MatRef<'_>, k: usize, n: usize, format: PackedFormat) -> Result<Self, GemmError> {
        b.check("B", k, n)?;
        let mut me = Self {
            k,
            n,
            format,
            data: Vec::new(),
        };
        let words = me.panel_words();
        me.data = vec![0u32; words * n.div_ceil(NR)];
        if words == 0 {
            return Ok(me);
        }
        me.data.par_chunks_mut(words).enumerate().for_each(|(q, panel)| {
            let j0 = q * NR;
            let w = NR.min(n - j0);
            match format {
                PackedFormat::F32 => pack_f32(panel, b, k, j0, w),
                PackedFormat::Bf16 => pack_bf16(panel, b, k, j0, w),
            }
        });
        Ok(me)
    }

    /// Rows of `B` (the inner dimension of the product).
    pub fn k(&self) -> usize {
        self.k
    }

    /// Columns of `B` (of `C`).
    pub fn n(&self) -> usize {
        self.n
    }

    /// The element type of the panels.
    pub fn format(&self) -> PackedFormat {
        self.format
    }

    /// Bytes held by the panels.
    pub fn bytes(&self) -> usize {
        self.data.len() * 4
    }

    /// `k` steps per panel in its own unit: `k` for f32, pairs of `k` for bf16.
    fn steps(&self) -> usize {
        match self.format {
            PackedFormat::F32 => self.k,
            PackedFormat::Bf16 => self.k.div_ceil(2),
        }
    }

    fn panel_words(&self) -> usize {
        self.steps() * NR
    }

    /// `C = A · B`, or `C += A · B` when `accumulate` (e.g. over a bias already in `C`), for
    /// `A` an `m × k` view; `C` is row-major `m × n`. Runs on the rayon pool, each task a
    /// range of panels (columns of C).
    pub fn matmul(&self, a: MatRef<'_>, m: usize, c: &mut [f32], accumulate: bool) -> Result<(), GemmError> {
        self.matmul_with(Kernel::for_format(self.format), a, m, c, accumulate)
    }

    /// [`PackedMatrix::matmul`] on the given tile kernel.
    fn matmul_with(
        &self,
        kernel: Kernel,
        a: MatRef<'_>,
        m: usize,
        c: &mut [f32],
        accumulate: bool,
    ) -> Result<(), GemmError> {
        a.check("A", m, self.k)?;
        if c.len() != m * self.n {
            return Err(GemmError::OutputSize {
                m,
                n: self.n,
                len: c.len(),
            });
        }
        if m == 0 || self.n == 0 {
            return Ok(());
        }
        if self.k == 0 {
            if !accumulate {
                c.fill(0.0);
            }
            return Ok(());
        }
        let tiles = row_tiles(m, kernel.max_rows());
        let packed_a = self.pack_a(a, &tiles);
        let panels = self.n.div_ceil(NR);
        let run = |q0: usize, q1: usize, c: SharedC| {
            // SAFETY: `packed_a` was packed for these tiles and steps, the panels exist, and
            // each task writes only columns 32·q0..32·q1 of C.
            unsafe { self.panels(kernel, q0, q1, &packed_a, &tiles, c, accumulate) }
        };
        let shared = SharedC(c.as_mut_ptr());
        let threads = rayon::current_num_threads();
        if threads < 2 || m * self.k * self.n < PARALLEL_MACS || panels < 2 {
            run(0, panels, shared);
            return Ok(());
        }
        // A few tasks per thread even out panels that take longer (cache misses, the ragged
        // last panel).
        let per_task = panels.div_ceil(threads * 4).max(1);
        (0..panels.div_ceil(per_task)).into_par_iter().for_each(|t| {
            let q0 = t * per_task;
            run(q0, (q0 + per_task).min(panels), shared)
        });
        Ok(())
    }

    /// `A` in the register tiles' layout: per tile of `r` rows, step `s` of row `i` at word
    /// `s·r + i` (an f32, or a bf16 pair along `k`).
    fn pack_a(&self, a: MatRef, tiles: &[(usize, usize)]) -> Vec<u32> {
        let steps = self.steps();
        let mut out = vec![0u32; tiles.iter().map(|&(_, r)| r * steps).sum()];
        let mut base = 0;
        for &(i0, r) in tiles {
            let tile = &mut out[base..base + r * steps];
            for i in 0..r {
                let row = (i0 + i) * a.row_stride;
                if a.col_stride == 1 {
                    let x = &a.data[row..row + self.k];
                    match self.format {
                        PackedFormat::F32 => pack_row_f32(x, r, &mut tile[i..]),
                        PackedFormat::Bf16 => pack_row_bf16(x, r, &mut tile[i..]),
                    }
                } else {
                    let x: Vec<f32> = (0..self.k).map(|t| a.data[row + t * a.col_stride]).collect();
                    match self.format {
                        PackedFormat::F32 => pack_row_f32(&x, r, &mut tile[i..]),
                        PackedFormat::Bf16 => pack_row_bf16(&x, r, &mut tile[i..]),
                    }
                }
            }
            base += r * steps;
        }
        out
    }

    /// Panels `q0..q1` of the product: per panel, per block of [`KB`] steps, every row tile.
    ///
    /// # Safety
    /// `a` was packed by [`PackedMatrix::pack_a`] for `tiles`; `c` addresses the row-major
    /// `m × n` C and no other thread writes its columns `NR·q0..NR·q1`.
    #[allow(clippy::too_many_arguments)]
    unsafe fn panels(
        &self,
        kernel: Kernel,
        q0: usize,
        q1: usize,
        a: &[u32],
        tiles: &[(usize, usize)],
        c: SharedC,
        accumulate: bool,
    ) {
        let steps = self.steps();
        let words = self.panel_words();
        for q in q0..q1 {
            let j0 = q * NR;
            let nr = NR.min(self.n - j0);
            let panel = &self.data[q * words..(q + 1) * words];
            for s0 in (0..steps).step_by(KB) {
                let len = KB.min(steps - s0);
                let mut a_off = 0;
                for (ti, &(i0, r)) in tiles.iter().enumerate() {
                    let tile = Tile {
                        a: a[a_off + s0 * r..].as_ptr(),
                        b: panel[s0 * NR..].as_ptr(),
                        c: c.0.add(i0 * self.n + j0),
                        ldc: self.n,
                        rows: r,
                        cols: nr,
                        steps: len,
                        add: accumulate || s0 > 0,
                    };
                    kernel.run(tile, (ti, tiles.len()));
                    a_off += r * steps;
                }
            }
        }
    }
}

/// Row tiles `(first row, rows)` of at most `max` rows, as even as possible (16 rows in
/// tiles of at most 14 are two tiles of 8, not 14 and 2).
fn row_tiles(m: usize, max: usize) -> Vec<(usize, usize)> {
    let count = m.div_ceil(max);
    let (base, extra) = (m / count, m % count);
    let mut i0 = 0;
    (0..count)
        .map(|t| {
            let r = base + usize::from(t < extra);
            let tile = (i0, r);
            i0 += r;
            tile
        })
        .collect()
}

/// [`crate::bf16::to_bf16_bits`] without a branch (NaN by a select), so that loops over it vectorise.
#[inline(always)]
fn bf16_bits(x: f32) -> u32 {
    let b = x.to_bits();
    let rounded = (b.wrapping_add(0x7FFF + ((b >> 16) & 1))) >> 16;
    let nan = (b & 0x7FFF_FFFF) > 0x7F80_0000;
    if nan {
        (b >> 16) | 0x0040
    } else {
        rounded
    }
}

/// `out[j] = (bf16(lo[j]), bf16(hi[j]))` as one word, `lo` in the lower half.
#[inline(always)]
fn pair_rows_imp(lo: &[f32], hi: &[f32], out: &mut [u32]) {
    for ((o, &l), &h) in out.iter_mut().zip(lo).zip(hi) {
        *o = bf16_bits(l) | (bf16_bits(h) << 16);
    }
}

crate::simd::dispatched! {
    /// Packs two rows of `k` into bf16 pair words.
    fn pair_rows(lo: &[f32], hi: &[f32], out: &mut [u32]) = pair_rows_imp;
}

/// One row of A into its tile: step `s` at `out[s·r]`.
fn pack_row_f32(x: &[f32], r: usize, out: &mut [u32]) {
    for (s, &v) in x.iter().enumerate() {
        out[s * r] = v.to_bits();
    }
}

/// One row of A into its tile as bf16 pairs: pair `s` at `out[s·r]` (an odd last `k` pairs
/// with zero).
fn pack_row_bf16(x: &[f32], r: usize, out: &mut [u32]) {
    let pairs = x.chunks_exact(2);
    let last = pairs.remainder().first().map(|&v| bf16_bits(v));
    let full = x.len() / 2;
    for (s, p) in pairs.enumerate() {
        out[s * r] = bf16_bits(p[0]) | (bf16_bits(p[1]) << 16);
    }
    if let Some(lo) = last {
        out[full * r] = lo;
    }
}

/// Packs one f32 panel from columns `j0..j0 + w` of `b` (zero-padded to [`NR`]).
fn pack_f32(panel: &mut [u32], b: MatRef, k: usize, j0: usize, w: usize) {
    if b.col_stride == 1 {
        // Rows of B are contiguous: one copy of `w` elements per `k`.
        for (t, out) in panel.chunks_exact_mut(NR).take(k).enumerate() {
            let row = &b.data[t * b.row_stride + j0..][..w];
            out[..w].iter_mut().zip(row).for_each(|(o, x)| *o = x.to_bits());
        }
    } else {
        // Columns of B are contiguous (a transposed view): each column fills a stride.
        for j in 0..w {
            let col = j0 + j;
            for t in 0..k {
                panel[t * NR + j] = b.data[t * b.row_stride + col * b.col_stride].to_bits();
            }
        }
    }
}

/// Packs one bf16 panel from columns `j0..j0 + w` of `b` (zero-padded to [`NR`], and along an
/// odd `k`).
fn pack_bf16(panel: &mut [u32], b: MatRef, k: usize, j0: usize, w: usize) {
    if b.col_stride == 1 {
        let zeros = [0f32; NR];
        for (p, out) in panel.chunks_exact_mut(NR).enumerate() {
            let row = |t: usize| &b.data[t * b.row_stride + j0..][..w];
            let hi = if 2 * p + 1 < k { row(2 * p + 1) } else { &zeros[..w] };
            pair_rows(row(2 * p), hi, &mut out[..w]);
        }
    } else {
        for j in 0..w {
            let col = j0 + j;
            let at = |t: usize| b.data[t * b.row_stride + col * b.col_stride];
            for p in 0..k / 2 {
                panel[p * NR + j] = bf16_bits(at(2 * p)) | (bf16_bits(at(2 * p + 1)) << 16);
            }
            if k % 2 == 1 {
                panel[(k / 2) * NR + j] = bf16_bits(at(k - 1));
            }
        }
    }
}

/// The output pointer shared by tasks that write disjoint columns of C.
#[derive(Clone, Copy)]
struct SharedC(*mut f32);
// SAFETY: every task writes only its own columns of C.
unsafe impl Send for SharedC {}
unsafe impl Sync for SharedC {}

/// One register tile: `C[0..rows, 0..cols] (+)= A_tile · B_panel` over `steps` steps.
#[derive(Clone, Copy)]
struct Tile {
    /// `steps · rows` words of packed A (step-major).
    a: *const u32,
    /// `steps · NR` words of the panel.
    b: *const u32,
    /// C at the tile's first element, row stride `ldc`.
    c: *mut f32,
    ldc: usize,
    rows: usize,
    cols: usize,
    steps: usize,
    /// Add to C instead of overwriting it.
    add: bool,
}

/// The tile kernel for this CPU and format.
#[derive(Clone, Copy)]
enum Kernel {
    #[cfg(target_arch = "x86_64")]
    Avx512F32,
    #[cfg(target_arch = "x86_64")]
    Avx512Bf16,
    /// The AVX2 + FMA tile ([`avx2`]): the same fused products as the portable loop (so
    /// the same sums), several rows at a time, in hardware instead of libm's software `fmaf`.
    #[cfg(target_arch = "x86_64")]
    Avx2FmaF32,
    PortableF32,
    PortableBf16,
}

impl Kernel {
    fn for_format(format: PackedFormat) -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            let f = std::arch::is_x86_feature_detected!("avx512f");
            match format {
                PackedFormat::F32 if f => return Self::Avx512F32,
                PackedFormat::Bf16 if crate::bf16::has_bf16_dot() => return Self::Avx512Bf16,
                PackedFormat::F32
                    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") =>
                {
                    return Self::Avx2FmaF32
                }
                _ => {}
            }
        }
        match format {
            PackedFormat::F32 => Self::PortableF32,
            PackedFormat::Bf16 => Self::PortableBf16,
        }
    }

    /// Rows per register tile at most.
    fn max_rows(self) -> usize {
        match self {
            #[cfg(target_arch = "x86_64")]
            Self::Avx2FmaF32 => avx2::MAX_ROWS,
            _ => MR,
        }
    }

    /// `tile`: this tile's index and the number of row tiles over this block of steps
    /// (the AVX2 kernel spreads the prefetch of the next block over them).
    ///
    /// # Safety
    /// The tile's pointers address what [`Tile`] says and it has at most
    /// [`Kernel::max_rows`] rows; the kernel's features were detected.
    unsafe fn run(self, t: Tile, tile: (usize, usize)) {
        match self {
            #[cfg(target_arch = "x86_64")]
            Self::Avx512F32 => avx512::tile_f32(t),
            #[cfg(target_arch = "x86_64")]
            Self::Avx512Bf16 => avx512::tile_bf16(t),
            #[cfg(target_arch = "x86_64")]
            Self::Avx2FmaF32 => avx2::tile_f32(t, tile),
            Self::PortableF32 => portable_tile(t, fused_step),
            Self::PortableBf16 => portable_tile(t, |acc, a, b| {
                let (a0, a1) = (f32::from_bits(a << 16), f32::from_bits(a & 0xFFFF_0000));
                let (b0, b1) = (f32::from_bits(b << 16), f32::from_bits(b & 0xFFFF_0000));
                // Products of bf16 values are exact in f32; the odd one is added first, as
                // `vdpbf16ps` does.
                (acc + a1 * b1) + a0 * b0
            }),
        }
    }
}

/// One f32 step of the portable loop: `acc + a·b`, fused.
#[inline(always)]
fn fused_step(acc: f32, a: u32, b: u32) -> f32 {
    f32::from_bits(a).mul_add(f32::from_bits(b), acc)
}

/// The portable tile loop: `step(acc, a_word, b_word)` adds one step's product.
///
/// # Safety
/// As [`Kernel::run`].
#[inline(always)]
unsafe fn portable_tile(t: Tile, step: impl Fn(f32, u32, u32) -> f32) {
    for i in 0..t.rows {
        let mut acc = [0f32; NR];
        for s in 0..t.steps {
            let a = *t.a.add(s * t.rows + i);
            let b = std::slice::from_raw_parts(t.b.add(s * NR), NR);
            for (acc, &b) in acc.iter_mut().zip(b) {
                *acc = step(*acc, a, b);
            }
        }
        let row = std::slice::from_raw_parts_mut(t.c.add(i * t.ldc), t.cols);
        for (c, acc) in row.iter_mut().zip(acc) {
            *c = if t.add { *c + acc } else { acc };
        }
    }
}
