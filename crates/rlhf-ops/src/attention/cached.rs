//! One query of incremental decoding against a KV cache, over all cached positions or a
//! range of them (the last `window` under a sliding window).

use std::ops::Range;

use crate::simd::dispatched;

/// Keys scored per block (one register of f32 lanes) and value components per block (four
/// registers), in [`cached_attention_row`].
const KEY_BLOCK: usize = 16;
/// Keys per block of the key cache that [`cached_attention_row`] reads.
pub const CACHED_KEY_BLOCK: usize = KEY_BLOCK;
const VALUE_BLOCK: usize = 64;

/// Attention of one query over cached positions `start..len`; see
/// [`cached_attention_row_range`].
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn cached_row_imp(
    q: &[f32],
    kt: &[f32],
    v: &[f32],
    start: usize,
    len: usize,
    scale: f32,
    p: &mut [f32],
    out: &mut [f32],
) {
    let d = q.len();
    out.iter_mut().for_each(|x| *x = 0.0);
    if start >= len {
        return;
    }
    // Scores, a block of keys at a time with the block's sums in registers; the block's
    // keys are stored component-major, so it is one contiguous read.
    let (b0, b1) = (start / KEY_BLOCK, len.div_ceil(KEY_BLOCK));
    let s = &mut p[..(b1 - b0) * KEY_BLOCK];
    let kt = &kt[b0 * KEY_BLOCK * d..b1 * KEY_BLOCK * d];
    for (sb, kb) in s.chunks_exact_mut(KEY_BLOCK).zip(kt.chunks_exact(d * KEY_BLOCK)) {
        let mut acc = [0f32; KEY_BLOCK];
        for (&qc, kc) in q.iter().zip(kb.chunks_exact(KEY_BLOCK)) {
            for i in 0..KEY_BLOCK {
                acc[i] = qc.mul_add(kc[i], acc[i]);
            }
        }
        for (x, a) in sb.iter_mut().zip(acc) {
            *x = a * scale;
        }
    }
    let s = &mut s[start - b0 * KEY_BLOCK..len - b0 * KEY_BLOCK];
    let m = crate::simd::max_f32_imp(s);
    let z = crate::simd::exp_shift_in_place_f32_imp(s, m);
    let inv = (1.0 / z) as f32;
    let v = &v[start * d..len * d];
    // Weighted values, a block of components at a time with the block in registers.
    for (b, ob) in out.chunks_mut(VALUE_BLOCK).enumerate() {
        let c0 = b * VALUE_BLOCK;
        let mut acc = [0f32; VALUE_BLOCK];
        if ob.len() == VALUE_BLOCK {
            for (j, &e) in s.iter().enumerate() {
                let (pj, vj) = (e * inv, &v[j * d + c0..j * d + c0 + VALUE_BLOCK]);
                for i in 0..VALUE_BLOCK {
                    acc[i] = pj.mul_add(vj[i], acc[i]);
                }
            }
        } else {
            for (j, &e) in s.iter().enumerate() {
                let (pj, vj) = (e * inv, &v[j * d + c0..j * d + c0 + ob.len()]);
                for (a, &x) in acc.iter_mut().zip(vj) {
                    *a = pj.mul_add(x, *a);
                }
            }
        }
        ob.copy_from_slice(&acc[..ob.len()]);
    }
}

#[inline(always)]
fn cached_full_imp(q: &[f32], kt: &[f32], v: &[f32], len: usize, scale: f32, p: &mut [f32], out: &mut [f32]) {
    cached_row_imp(q, kt, v, 0, len, scale, p, out)
}

#[inline(always)]
fn cached_range_imp(q: &[f32], kt: &[f32], v: &[f32], keys: Range<usize>, scale: f32, p: &mut [f32], out: &mut [f32]) {
    cached_row_imp(q, kt, v, keys.start, keys.end, scale, p, out)
}

/// The cached positions a query at index `len − 1` sees under a sliding window of `window`
/// keys (transformers' `kv_idx > q_idx − window`: the `window` most recent, itself included),
/// all `len` without one; the `keys` of [`cached_attention_row_range`].
pub fn sliding_window_keys(len: usize, window: Option<usize>) -> Range<usize> {
    window.map_or(0, |w| len.saturating_sub(w))..len
}

dispatched! {
    /// One query of incremental decoding against a KV cache:
    /// `out = softmax(q·Kᵀ · scale) V` over the first `len` cached positions (the query's own
    /// key and value already appended).
    ///
    /// The keys are stored in blocks of [`CACHED_KEY_BLOCK`] keys, each block
    /// component-major: component `c` of key `j` at
    /// `kt[(j / 16)·16·d + c·16 + j % 16]`, `d = q.len()`, so one block's scores are one
    /// contiguous read with the sums in registers. `kt` holds whole blocks
    /// (`ceil(len / 16)·16·d` elements; keys past `len` are scored and ignored). Value `j`
    /// is row `j` of `v` (rows of `d`). `p` is scratch of at least `ceil(len / 16)·16`
    /// elements; `out` has `d`.
    ///
    /// Grouped-query heads: the caller passes the cache of kv head `h / (n_head / n_kv_head)`
    /// for query head `h`.
    pub fn cached_attention_row(q: &[f32], kt: &[f32], v: &[f32], len: usize, scale: f32, p: &mut [f32], out: &mut [f32]) = cached_full_imp;
}

dispatched! {
    /// [`cached_attention_row`] over the cached positions `keys` only (a sliding window:
    /// [`sliding_window_keys`]). The cache layout is the same; blocks wholly before
    /// `keys.start` are not read, `kt` holds the blocks up to `ceil(keys.end / 16)`, and `p`
    /// needs `ceil(keys.end / 16)·16 − floor(keys.start / 16)·16` elements at least
    /// (`keys.len() + 32` always suffices). An empty range gives zeros.
    pub fn cached_attention_row_range(q: &[f32], kt: &[f32], v: &[f32], keys: Range<usize>, scale: f32, p: &mut [f32], out: &mut [f32]) = cached_range_imp;
}
