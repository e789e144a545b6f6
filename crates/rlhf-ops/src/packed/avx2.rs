//! The AVX2 + FMA f32 tile kernel. A tile of at most [`MAX_ROWS`] rows runs over the panel's
//! two 16-column halves in turn: 6 rows × 2 registers of accumulators, the half's two
//! 8-lane loads shared by the rows and one broadcast of packed A per row fill 15 of the 16
//! ymm registers, so nothing spills inside the loop (3 rows × 32 columns needed 17 and
//! spilled). Every accumulator takes `acc = fma(a, b, acc)` over the steps in order, the
//! portable loop's sums exactly; up to 12 independent chains keep both FMA pipes busy, where
//! the portable loop's one row at a time leaves four.
//!
//! The panel streams from memory once per product. While the row tiles run over a block of
//! steps (in L1), they prefetch the words that follow it (the panel's next block, or the
//! next panel) into L2, spread evenly over all their passes, so the memory reads overlap the
//! arithmetic instead of stalling the first pass over each block.

use std::arch::x86_64::*;

use super::{Tile, NR};

/// Rows per tile at most: `2·MAX_ROWS` accumulators, two panel registers and a broadcast.
pub(super) const MAX_ROWS: usize = 6;

/// Cache lines prefetched together, every `BURST` lines' share of a pass's steps (one
/// line at a time, before every step or two, measured slower: the loop's bookkeeping).
const BURST: usize = 4;

/// Cache lines (16 words) to prefetch during one pass: `count` lines from `first`, in bursts
/// of [`BURST`] every `every` steps.
#[derive(Clone, Copy)]
struct Prefetch {
    first: *const f32,
    count: usize,
    every: usize,
}

/// Rows of the tile, columns `h·16..h·16 + 16` of the panel, prefetching as `pf` says.
///
/// # Safety
/// As [`super::Kernel::run`], with `R == t.rows` and `h < 2`; the CPU has AVX2 and FMA.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn f32_rows<const R: usize>(t: Tile, h: usize, pf: Prefetch) {
    let mut acc = [[_mm256_setzero_ps(); 2]; R];
    let (a, b) = (t.a as *const f32, (t.b as *const f32).add(16 * h));
    let mut s0 = 0;
    let mut line = 0;
    while s0 < t.steps {
        if line < pf.count {
            for l in line..line + BURST {
                // Never faults, whatever the address (past the last panel it fetches nothing).
                _mm_prefetch::<_MM_HINT_T1>(pf.first.wrapping_add(16 * l) as *const i8);
            }
            line += BURST;
        }
        let s1 = (s0 + pf.every).min(t.steps);
        for s in s0..s1 {
            let bp = b.add(s * NR);
            let (b0, b1) = (_mm256_loadu_ps(bp), _mm256_loadu_ps(bp.add(8)));
            let ap = a.add(s * R);
            for (i, acc) in acc.iter_mut().enumerate() {
                let ai = _mm256_set1_ps(*ap.add(i));
                acc[0] = _mm256_fmadd_ps(ai, b0, acc[0]);
                acc[1] = _mm256_fmadd_ps(ai, b1, acc[1]);
            }
        }
        s0 = s1;
    }
    let (j0, cols) = (16 * h, t.cols.saturating_sub(16 * h).min(16));
    for (i, acc) in acc.iter().enumerate() {
        let row = t.c.add(i * t.ldc + j0);
        if cols == 16 {
            for (j, &v) in acc.iter().enumerate() {
                let v = if t.add {
                    _mm256_add_ps(v, _mm256_loadu_ps(row.add(8 * j)))
                } else {
                    v
                };
                _mm256_storeu_ps(row.add(8 * j), v);
            }
        } else {
            let mut tmp = [0f32; 16];
            for (j, &v) in acc.iter().enumerate() {
                _mm256_storeu_ps(tmp.as_mut_ptr().add(8 * j), v);
            }
            for (j, &x) in tmp.iter().enumerate().take(cols) {
                let c = row.add(j);
                *c = if t.add { *c + x } else { x };
            }
        }
    }
}

/// An f32 tile of at most [`MAX_ROWS`] rows, over each half of the panel that holds
/// columns of the tile; `(index, tiles)`: its place among the row tiles over this block,
/// which share the prefetch of the block's `2·steps` following lines, two passes each.
///
/// # Safety
/// As [`super::Kernel::run`], with `t.rows <= MAX_ROWS`; the CPU has AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn tile_f32(t: Tile, (index, tiles): (usize, usize)) {
    let next = (t.b as *const f32).wrapping_add(t.steps * NR);
    let passes = 2 * tiles.max(1);
    let per_pass = (2 * t.steps).div_ceil(passes);
    let every = (BURST * t.steps / per_pass.max(1)).max(1);
    for h in 0..t.cols.div_ceil(16) {
        let pf = Prefetch {
            first: next.wrapping_add(16 * per_pass * (2 * index + h)),
            count: per_pass,
            every,
        };
        match t.rows {
            1 => f32_rows::<1>(t, h, pf),
            2 => f32_rows::<2>(t, h, pf),
            3 => f32_rows::<3>(t, h, pf),
            4 => f32_rows::<4>(t, h, pf),
            5 => f32_rows::<5>(t, h, pf),
            _ => f32_rows::<6>(t, h, pf),
        }
    }
}
