//! The AVX2 + FMA f32 tile kernel: up to 3 rows × 32 columns of accumulators in 12 ymm
//! registers, per step one broadcast of packed A per row and the panel's four 8-lane loads
//! shared by the rows. Every accumulator takes `acc = fma(a, b, acc)` over the steps in
//! order, the portable loop's sums exactly; 12 independent chains keep both FMA pipes busy,
//! where the portable loop's one row at a time leaves four.

use std::arch::x86_64::*;

use super::{Tile, NR};

/// Rows `r0..r0 + R` of the tile.
///
/// # Safety
/// As [`super::Kernel::run`], with `r0 + R <= t.rows`; the CPU has AVX2 and FMA.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn f32_rows<const R: usize>(t: Tile, r0: usize) {
    let mut acc = [[_mm256_setzero_ps(); 4]; R];
    let (a, b) = (t.a as *const f32, t.b as *const f32);
    for s in 0..t.steps {
        let bp = b.add(s * NR);
        let ap = a.add(s * t.rows + r0);
        for (i, acc) in acc.iter_mut().enumerate() {
            let ai = _mm256_set1_ps(*ap.add(i));
            for (j, acc) in acc.iter_mut().enumerate() {
                *acc = _mm256_fmadd_ps(ai, _mm256_loadu_ps(bp.add(8 * j)), *acc);
            }
        }
    }
    for (i, acc) in acc.iter().enumerate() {
        let row = t.c.add((r0 + i) * t.ldc);
        if t.cols == NR {
            for (j, &v) in acc.iter().enumerate() {
                let v = if t.add {
                    _mm256_add_ps(v, _mm256_loadu_ps(row.add(8 * j)))
                } else {
                    v
                };
                _mm256_storeu_ps(row.add(8 * j), v);
            }
        } else {
            let mut tmp = [0f32; NR];
            for (j, &v) in acc.iter().enumerate() {
                _mm256_storeu_ps(tmp.as_mut_ptr().add(8 * j), v);
            }
            for (j, &x) in tmp.iter().enumerate().take(t.cols) {
                let c = row.add(j);
                *c = if t.add { *c + x } else { x };
            }
        }
    }
}

/// An f32 tile, in groups of 3 rows (then 2 or 1).
///
/// # Safety
/// As [`super::Kernel::run`]; the CPU has AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn tile_f32(t: Tile) {
    let mut r = 0;
    while r < t.rows {
        match t.rows - r {
            1 => f32_rows::<1>(t, r),
            2 => f32_rows::<2>(t, r),
            _ => f32_rows::<3>(t, r),
        }
        r += (t.rows - r).min(3);
    }
}
