//! The AVX-512 tile kernels: `R × 32` accumulators in `2R` zmm registers, per step two panel
//! loads and `R` broadcasts of packed A; f32 on `vfmadd231ps`, bf16 pairs on `vdpbf16ps`.

use std::arch::x86_64::*;

use super::{Tile, NR};
use crate::bf16::avx512::lanes;

/// How far ahead of the current step the panel is prefetched, in words: 8 KiB, 64 steps
/// (the panels stream from memory once per product; prefetching hid a few per cent of a
/// decoding step's products on Zen 4).
const AHEAD: usize = 2048;

/// Prefetches the two cache lines of one panel step.
#[inline(always)]
fn prefetch(p: *const u32) {
    // SAFETY: prefetching never faults, whatever the address.
    unsafe {
        _mm_prefetch::<_MM_HINT_T0>(p as *const i8);
        _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(16) as *const i8);
    }
}

/// Stores (or adds) the `t.rows × t.cols` valid part of the accumulators.
///
/// # Safety
/// `t.c` addresses `t.rows` rows of `t.cols` elements with stride `t.ldc`.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn store<const R: usize>(acc: &[[__m512; 2]; R], t: Tile) {
    let (m0, m1) = (lanes(t.cols), lanes(t.cols.saturating_sub(16)));
    for (i, acc) in acc.iter().enumerate().take(t.rows) {
        let row = t.c.add(i * t.ldc);
        let (mut v0, mut v1) = (acc[0], acc[1]);
        if t.add {
            v0 = _mm512_add_ps(v0, _mm512_maskz_loadu_ps(m0, row));
            v1 = _mm512_add_ps(v1, _mm512_maskz_loadu_ps(m1, row.wrapping_add(16)));
        }
        _mm512_mask_storeu_ps(row, m0, v0);
        _mm512_mask_storeu_ps(row.wrapping_add(16), m1, v1);
    }
}

/// # Safety
/// As [`super::Kernel::run`], with `t.rows == R`; the CPU has AVX-512F.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn f32_rows<const R: usize>(t: Tile) {
    let mut acc = [[_mm512_setzero_ps(); 2]; R];
    let (a, b) = (t.a as *const f32, t.b as *const f32);
    for s in 0..t.steps {
        prefetch(t.b.wrapping_add(s * NR + AHEAD));
        let b0 = _mm512_loadu_ps(b.add(s * NR));
        let b1 = _mm512_loadu_ps(b.add(s * NR + 16));
        let ap = a.add(s * R);
        for (i, acc) in acc.iter_mut().enumerate() {
            let ai = _mm512_set1_ps(*ap.add(i));
            acc[0] = _mm512_fmadd_ps(ai, b0, acc[0]);
            acc[1] = _mm512_fmadd_ps(ai, b1, acc[1]);
        }
    }
    store(&acc, t)
}

/// # Safety
/// As [`super::Kernel::run`], with `t.rows == R`; the CPU has AVX-512F and AVX512-BF16.
#[inline]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn bf16_rows<const R: usize>(t: Tile) {
    let mut acc = [[_mm512_setzero_ps(); 2]; R];
    for s in 0..t.steps {
        prefetch(t.b.wrapping_add(s * NR + AHEAD));
        let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(t.b.add(s * NR) as *const _));
        let b1: __m512bh = std::mem::transmute(_mm512_loadu_si512(t.b.add(s * NR + 16) as *const _));
        let ap = t.a.add(s * R);
        for (i, acc) in acc.iter_mut().enumerate() {
            let ai: __m512bh = std::mem::transmute(_mm512_set1_epi32(*ap.add(i) as i32));
            acc[0] = _mm512_dpbf16_ps(acc[0], ai, b0);
            acc[1] = _mm512_dpbf16_ps(acc[1], ai, b1);
        }
    }
    store(&acc, t)
}

/// Calls `$f::<R>($t)` for `R = $t.rows` (1 to 14).
macro_rules! by_rows {
    ($f:ident, $t:expr) => {{
        debug_assert!((1..=14).contains(&$t.rows));
        match $t.rows {
            1 => $f::<1>($t),
            2 => $f::<2>($t),
            3 => $f::<3>($t),
            4 => $f::<4>($t),
            5 => $f::<5>($t),
            6 => $f::<6>($t),
            7 => $f::<7>($t),
            8 => $f::<8>($t),
            9 => $f::<9>($t),
            10 => $f::<10>($t),
            11 => $f::<11>($t),
            12 => $f::<12>($t),
            13 => $f::<13>($t),
            // `row_tiles` makes tiles of at most `MR` = 14 rows.
            _ => $f::<14>($t),
        }
    }};
}

/// An f32 tile.
///
/// # Safety
/// As [`super::Kernel::run`]; the CPU has AVX-512F.
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn tile_f32(t: Tile) {
    by_rows!(f32_rows, t)
}

/// A bf16 tile.
///
/// # Safety
/// As [`super::Kernel::run`]; the CPU has AVX-512F and AVX512-BF16.
#[target_feature(enable = "avx512f,avx512bf16")]
pub(super) unsafe fn tile_bf16(t: Tile) {
    by_rows!(bf16_rows, t)
}
