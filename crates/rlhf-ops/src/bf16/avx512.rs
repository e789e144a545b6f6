//! The AVX512-BF16 path: packing that rounds f32 to bf16 on the way, the register-blocked
//! `vdpbf16ps` microkernel, and the cache-blocked product of one block of C.
//!
//! Packed layouts (one 32-bit word holds two bf16 of consecutive `k`, the lower half the
//! even `k`, as `vdpbf16ps` multiplies pairs):
//! - a B panel is `NR` columns wide: word `p·NR + j` = `(B[2p][j], B[2p+1][j])`, so one
//!   512-bit load gives 16 columns × 2 consecutive `k`;
//! - an A panel is `MR` rows tall: word `p·MR + i` = `(A[i][2p], A[i][2p+1])`, broadcast
//!   to all lanes by the microkernel.
//!
//! Panels past the edge of the matrix are padded with zeros (rows, columns, and the odd
//! last `k`), so the microkernel always runs a full `MR × NR` tile and stores only the
//! valid part.

use std::arch::x86_64::*;

use super::{MatRef, KC, MC, MR, NC, NR};

/// A block of C, row-major with row stride `ldc`, written by one task only.
#[derive(Clone, Copy)]
pub(super) struct CBlock {
    pub ptr: *mut f32,
    pub ldc: usize,
}

/// Where a packed panel reads from: element `(t, j)` (`t` along `k`, `j` along the panel
/// width) is `src[base + t·ds + j·ps]`.
#[derive(Clone, Copy)]
struct PanelSrc<'a> {
    src: &'a [f32],
    base: usize,
    ds: usize,
    ps: usize,
}

/// Rounds 16 f32 (as bits) to bf16, round-to-nearest-even, NaN kept NaN (quiet bit set);
/// the bf16 lands in the upper 16 bits of each lane, the lower 16 bits are garbage.
/// The vector form of [`super::to_bf16_bits`].
#[inline]
#[target_feature(enable = "avx512f")]
fn round_hi(x: __m512i) -> __m512i {
    let lsb = _mm512_and_si512(_mm512_srli_epi32::<16>(x), _mm512_set1_epi32(1));
    let r = _mm512_add_epi32(x, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));
    let abs = _mm512_and_si512(x, _mm512_set1_epi32(0x7FFF_FFFF));
    let nan = _mm512_cmpgt_epi32_mask(abs, _mm512_set1_epi32(0x7F80_0000));
    _mm512_mask_or_epi32(r, nan, x, _mm512_set1_epi32(0x0040_0000))
}

/// The first `n` lanes (of 16) set.
#[inline]
pub(crate) fn lanes(n: usize) -> __mmask16 {
    if n >= 16 {
        0xFFFF
    } else {
        ((1u32 << n) - 1) as __mmask16
    }
}

/// Source rows further apart than this (in f32) are prefetched while packing.
const PREFETCH_ROW_GAP: usize = 256;
/// How far ahead along a source row to prefetch (in f32): eight cache lines.
const PREFETCH_AHEAD: usize = 128;

/// Packs one panel where the panel width is contiguous (`ps == 1`): each word row interleaves
/// two source rows (`k = 2p` low, `2p + 1` high). Writes `kp·width` words.
///
/// # Safety
/// Every element `(t, j)`, `t < kc`, `j < w`, lies inside `s.src`; `out` holds
/// `ceil(kc/2)·width` words; the CPU has AVX-512F.
#[target_feature(enable = "avx512f")]
unsafe fn pack_rows_interleaved(s: PanelSrc, kc: usize, w: usize, width: usize, out: &mut [u32]) {
    let hi_mask = _mm512_set1_epi32(0xFFFF_0000u32 as i32);
    let src = s.src.as_ptr().wrapping_add(s.base);
    for p in 0..kc.div_ceil(2) {
        let r0 = src.wrapping_add(2 * p * s.ds);
        let second = 2 * p + 1 < kc;
        // A transposed A reads a few words from each of up to KC rows far apart, too many
        // streams for the hardware prefetcher: fetch the lines the next panels will read.
        if s.ds > PREFETCH_ROW_GAP {
            _mm_prefetch::<_MM_HINT_T0>(r0.wrapping_add(PREFETCH_AHEAD) as *const i8);
            _mm_prefetch::<_MM_HINT_T0>(r0.wrapping_add(s.ds + PREFETCH_AHEAD) as *const i8);
        }
        for j0 in (0..width).step_by(16) {
            let m_in = lanes(w.saturating_sub(j0));
            let x0 = _mm512_castps_si512(_mm512_maskz_loadu_ps(m_in, r0.wrapping_add(j0)));
            let x1 = match second {
                true => _mm512_castps_si512(_mm512_maskz_loadu_ps(m_in, r0.wrapping_add(s.ds + j0))),
                false => _mm512_setzero_si512(),
            };
            let word = _mm512_or_si512(
                _mm512_srli_epi32::<16>(round_hi(x0)),
                _mm512_and_si512(round_hi(x1), hi_mask),
            );
            let word = _mm512_maskz_mov_epi32(m_in, word);
            let o = out.as_mut_ptr().add(p * width + j0);
            _mm512_mask_storeu_epi32(o as *mut i32, lanes(width - j0), word);
        }
    }
}

/// Transposes a 16 × 16 matrix of 32-bit words held one row per register.
#[inline]
#[target_feature(enable = "avx512f")]
fn transpose16(r: &mut [__m512i; 16]) {
    // Within each 128-bit lane: 2×2 blocks of words, then of word pairs.
    let mut t = [_mm512_setzero_si512(); 16];
    for i in 0..8 {
        t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
    }
    for i in 0..4 {
        let (a, b, c, d) = (t[4 * i], t[4 * i + 1], t[4 * i + 2], t[4 * i + 3]);
        r[4 * i] = _mm512_unpacklo_epi64(a, c);
        r[4 * i + 1] = _mm512_unpackhi_epi64(a, c);
        r[4 * i + 2] = _mm512_unpacklo_epi64(b, d);
        r[4 * i + 3] = _mm512_unpackhi_epi64(b, d);
    }
    // Now lane L of r[4i + c] holds column 4L + c of rows 4i..4i+4: move the lanes.
    for c in 0..4 {
        let x0 = _mm512_shuffle_i32x4::<0x88>(r[c], r[c + 4]);
        let x1 = _mm512_shuffle_i32x4::<0xDD>(r[c], r[c + 4]);
        let y0 = _mm512_shuffle_i32x4::<0x88>(r[c + 8], r[c + 12]);
        let y1 = _mm512_shuffle_i32x4::<0xDD>(r[c + 8], r[c + 12]);
        t[c] = _mm512_shuffle_i32x4::<0x88>(x0, y0);
        t[c + 8] = _mm512_shuffle_i32x4::<0xDD>(x0, y0);
        t[c + 4] = _mm512_shuffle_i32x4::<0x88>(x1, y1);
        t[c + 12] = _mm512_shuffle_i32x4::<0xDD>(x1, y1);
    }
    *r = t;
}

/// Packs one panel where `k` is contiguous (`ds == 1`): each word is two neighbouring
/// source elements. Blocks of 16 panel columns × 32 `k` are rounded one column per
/// register and transposed in registers into 16 rows of the panel.
///
/// # Safety
/// As [`pack_rows_interleaved`], with AVX-512BW too.
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn pack_pairs(s: PanelSrc, kc: usize, w: usize, width: usize, out: &mut [u32]) {
    // The upper halves (the rounded bf16) of the 32 lanes of two registers, in order.
    let odd = _mm512_set_epi16(
        63, 61, 59, 57, 55, 53, 51, 49, 47, 45, 43, 41, 39, 37, 35, 33, 31, 29, 27, 25, 23, 21, 19, 17, 15, 13, 11, 9,
        7, 5, 3, 1,
    );
    let mut r = [_mm512_setzero_si512(); 16];
    for j0 in (0..width).step_by(16) {
        let valid = w.saturating_sub(j0).min(16);
        let m_out = lanes(width - j0);
        for t0 in (0..kc).step_by(32) {
            let n = kc - t0;
            for (q, r) in r.iter_mut().enumerate() {
                *r = match q < valid {
                    true => {
                        let row = s.src.as_ptr().wrapping_add(s.base + (j0 + q) * s.ps + t0);
                        let x0 = _mm512_castps_si512(_mm512_maskz_loadu_ps(lanes(n), row));
                        let x1 = _mm512_castps_si512(_mm512_maskz_loadu_ps(
                            lanes(n.saturating_sub(16)),
                            row.wrapping_add(16),
                        ));
                        _mm512_permutex2var_epi16(round_hi(x0), odd, round_hi(x1))
                    }
                    false => _mm512_setzero_si512(),
                };
            }
            transpose16(&mut r);
            for (q, r) in r.iter().enumerate().take(n.div_ceil(2).min(16)) {
                let o = out.as_mut_ptr().add((t0 / 2 + q) * width + j0);
                _mm512_mask_storeu_epi32(o as *mut i32, m_out, *r);
            }
        }
    }
}

/// Packs one panel from any strides, one element at a time.
fn pack_strided(s: PanelSrc, kc: usize, w: usize, width: usize, out: &mut [u32]) {
    let at = |t: usize, j: usize| -> u32 {
        match t < kc && j < w {
            true => super::to_bf16_bits(s.src[s.base + t * s.ds + j * s.ps]) as u32,
            false => 0,
        }
    };
    for p in 0..kc.div_ceil(2) {
        for j in 0..width {
            out[p * width + j] = at(2 * p, j) | (at(2 * p + 1, j) << 16);
        }
    }
}

/// Packs `w ≤ width` valid columns of a panel, choosing the vector path by the strides.
///
/// # Safety
/// Every element `(t, j)`, `t < kc`, `j < w`, lies inside `s.src`; the CPU has AVX-512F/BW.
unsafe fn pack_panel(s: PanelSrc, kc: usize, w: usize, width: usize, out: &mut [u32]) {
    debug_assert!(out.len() >= kc.div_ceil(2) * width);
    if s.ps == 1 {
        pack_rows_interleaved(s, kc, w, width, out)
    } else if s.ds == 1 {
        pack_pairs(s, kc, w, width, out)
    } else {
        pack_strided(s, kc, w, width, out)
    }
}

/// `C[0..mr, 0..nr] (+)= Apanel · Bpanel` over `kp` pairs of `k`: `MR × 32` accumulators in
/// 2·MR zmm registers, one broadcast A word and two B loads per pair.
///
/// # Safety
/// `a` holds `kp·MR` words, `b` `kp·NR` words; `c` addresses an `mr × nr` block
/// (`mr ≤ MR`, `nr ≤ NR`); the CPU has AVX-512F and AVX512-BF16.
#[inline]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn microkernel(kp: usize, a: *const u32, b: *const u32, c: CBlock, mr: usize, nr: usize, add: bool) {
    let mut acc = [[_mm512_setzero_ps(); 2]; MR];
    for p in 0..kp {
        let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(b.add(p * NR) as *const _));
        let b1: __m512bh = std::mem::transmute(_mm512_loadu_si512(b.add(p * NR + 16) as *const _));
        let ap = a.add(p * MR);
        for (i, acc) in acc.iter_mut().enumerate() {
            let ai: __m512bh = std::mem::transmute(_mm512_set1_epi32(*ap.add(i) as i32));
            acc[0] = _mm512_dpbf16_ps(acc[0], ai, b0);
            acc[1] = _mm512_dpbf16_ps(acc[1], ai, b1);
        }
    }
    let (m0, m1) = (lanes(nr), lanes(nr.saturating_sub(16)));
    for (i, acc) in acc.iter().enumerate().take(mr) {
        let row = c.ptr.add(i * c.ldc);
        let (mut v0, mut v1) = (acc[0], acc[1]);
        if add {
            v0 = _mm512_add_ps(v0, _mm512_maskz_loadu_ps(m0, row));
            v1 = _mm512_add_ps(v1, _mm512_maskz_loadu_ps(m1, row.wrapping_add(16)));
        }
        _mm512_mask_storeu_ps(row, m0, v0);
        _mm512_mask_storeu_ps(row.wrapping_add(16), m1, v1);
    }
}

/// Buffers for the packed panels, kept per thread between calls.
#[derive(Default)]
pub(super) struct Packed {
    a: Vec<u32>,
    b: Vec<u32>,
}

/// `C = A · B` for `A: (m × k)`, `B: (k × n)` into the block `c`, blocked BLIS-style: for each
/// `NC` columns and `KC` of `k`, pack B; for each `MC` rows, pack A; run the microkernel over
/// the `MR × NR` tiles. The first `k` block overwrites C, the others add to it.
///
/// # Safety
/// `a` and `b` are checked views of `m × k` and `k × n` (every element in bounds); `c`
/// addresses `m × n` elements with row stride `c.ldc` that no other thread touches; the CPU
/// has AVX-512F/BW and AVX512-BF16.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
pub(super) unsafe fn gemm_block(m: usize, k: usize, n: usize, a: MatRef, b: MatRef, c: CBlock, buf: &mut Packed) {
    let kc_max = KC.min(k.max(1));
    let mc_max = MC.min(m.div_ceil(MR) * MR);
    let nc_max = NC.min(n.div_ceil(NR) * NR);
    buf.a.resize(mc_max * kc_max.div_ceil(2), 0);
    buf.b.resize(nc_max * kc_max.div_ceil(2), 0);
    for jc in (0..n).step_by(NC) {
        let nc = NC.min(n - jc);
        for pc in (0..k).step_by(KC) {
            let kc = KC.min(k - pc);
            let kp = kc.div_ceil(2);
            for (q, out) in buf.b.chunks_exact_mut(kp * NR).take(nc.div_ceil(NR)).enumerate() {
                let j0 = jc + q * NR;
                let src = PanelSrc {
                    src: b.data,
                    base: pc * b.row_stride + j0 * b.col_stride,
                    ds: b.row_stride,
                    ps: b.col_stride,
                };
                pack_panel(src, kc, NR.min(jc + nc - j0), NR, out);
            }
            for ic in (0..m).step_by(MC) {
                let mc = MC.min(m - ic);
                for (q, out) in buf.a.chunks_exact_mut(kp * MR).take(mc.div_ceil(MR)).enumerate() {
                    let i0 = ic + q * MR;
                    let src = PanelSrc {
                        src: a.data,
                        base: i0 * a.row_stride + pc * a.col_stride,
                        ds: a.col_stride,
                        ps: a.row_stride,
                    };
                    pack_panel(src, kc, MR.min(ic + mc - i0), MR, out);
                }
                for (jq, bp) in buf.b.chunks_exact(kp * NR).take(nc.div_ceil(NR)).enumerate() {
                    let j0 = jc + jq * NR;
                    let nr = NR.min(n - j0);
                    for (iq, ap) in buf.a.chunks_exact(kp * MR).take(mc.div_ceil(MR)).enumerate() {
                        let i0 = ic + iq * MR;
                        let mr = MR.min(m - i0);
                        let tile = CBlock {
                            ptr: c.ptr.add(i0 * c.ldc + j0),
                            ldc: c.ldc,
                        };
                        microkernel(kp, ap.as_ptr(), bp.as_ptr(), tile, mr, nr, pc > 0);
                    }
                }
            }
        }
    }
}
