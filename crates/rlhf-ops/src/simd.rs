//! Vectorisable row kernels for the fused ops: a polynomial `exp`, lane-parallel max and
//! sums, each compiled for AVX-512 and AVX2 too and picked at run time by the CPU's
//! features (the crate itself is built for the baseline x86-64).
//!
//! The loops are written over fixed-width lane arrays so that the compiler may vectorise
//! reductions (a plain `iter().sum()` of floats must keep its sequential order).

/// Lanes of the reduction accumulators (one AVX-512 register of f32).
pub const LANES: usize = 16;

/// `e^x` for f32 to about 2 ulp, vectorisable: `x = n·ln2 + r`, `|r| ≤ ln2/2`, a degree-6
/// polynomial for `e^r` (Cephes `expf` coefficients) and `2^n` built in the exponent bits.
/// Inputs below −87.3 (where `e^x` leaves the normal range) give 0, above 88.7 `+inf`;
/// NaN gives NaN.
#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let xc = x.clamp(-87.336_55, 88.722_83);
    // Round to nearest by adding 1.5·2²³ (`f32::round` is a libm call without SSE4.1,
    // which would stop vectorisation).
    const MAGIC: f32 = 12_582_912.0;
    let n = (xc * LOG2E + MAGIC) - MAGIC;
    let r = xc - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4f32;
    p = p.mul_add(r, 1.398_199_9e-3);
    p = p.mul_add(r, 8.333_452e-3);
    p = p.mul_add(r, 4.166_579_6e-2);
    p = p.mul_add(r, 0.166_666_65);
    p = p.mul_add(r, 0.5);
    let e = (p * r).mul_add(r, r) + 1.0;
    // n ∈ [-126, 128]; 2^128 overflows the exponent field, so scale in two halves.
    let n = n as i32;
    let half = n >> 1;
    let s1 = f32::from_bits(((half + 127) as u32) << 23);
    let s2 = f32::from_bits(((n - half + 127) as u32) << 23);
    let y = e * s1 * s2;
    if x.is_nan() {
        x
    } else if x > 88.722_83 {
        f32::INFINITY
    } else if x < -87.336_55 {
        0.0
    } else {
        y
    }
}

/// Defines `pub fn $name` that runs the `#[inline(always)]` function `$imp` compiled for the
/// best instruction set this CPU has: AVX-512F, then AVX2+FMA, then the baseline. The
/// variants compute the same thing (the loops keep their lane order; `mul_add` is a fused
/// multiply-add everywhere), only faster.
macro_rules! dispatched {
    ($(#[$doc:meta])* $vis:vis fn $name:ident($($a:ident : $t:ty),* $(,)?) $(-> $r:ty)? = $imp:ident;) => {
        $(#[$doc])*
        $vis fn $name($($a: $t),*) $(-> $r)? {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx2,fma")]
                fn v4($($a: $t),*) $(-> $r)? {
                    $imp($($a),*)
                }
                #[target_feature(enable = "avx2,fma")]
                fn v3($($a: $t),*) $(-> $r)? {
                    $imp($($a),*)
                }
                if std::arch::is_x86_feature_detected!("avx512f") {
                    // SAFETY: the CPU has AVX-512F (checked just above).
                    return unsafe { v4($($a),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                    // SAFETY: the CPU has AVX2 and FMA (checked just above).
                    return unsafe { v3($($a),*) };
                }
            }
            $imp($($a),*)
        }
    };
}
pub(crate) use dispatched;

dispatched! {
    /// Maximum of a row (`-inf` for an empty row; NaN-propagation is not guaranteed).
    pub fn max_f32(x: &[f32]) -> f32 = max_f32_imp;
}

dispatched! {
    /// `(Σ e^(x−m), Σ e^(x−m)·(x−m))` over a row, accumulated in f32 lanes, summed in f64.
    pub fn exp_sums_f32(x: &[f32], m: f32) -> (f64, f64) = exp_sums_f32_imp;
}

dispatched! {
    /// `out_j = e^(x_j − lse) · (g_h·(mean_x − x_j) − g_lp)`: the gradient of
    /// `g_lp·logprob + g_h·entropy` without the label's `+g_lp` (see `ppo::fused`).
    pub fn logprob_entropy_grad_f32(x: &[f32], out: &mut [f32], lse: f32, mean_x: f32, g_lp: f32, g_h: f32)
        = logprob_entropy_grad_f32_imp;
}

dispatched! {
    /// `x ← e^(x − m)` in place; returns the sum (f32 lanes, summed in f64).
    pub fn exp_shift_in_place_f32(x: &mut [f32], m: f32) -> f64 = exp_shift_in_place_f32_imp;
}

#[inline(always)]
pub(crate) fn exp_shift_in_place_f32_imp(x: &mut [f32], m: f32) -> f64 {
    let mut s = [0f32; LANES];
    let mut chunks = x.chunks_exact_mut(LANES);
    for c in &mut chunks {
        for i in 0..LANES {
            c[i] = exp_f32(c[i] - m);
            s[i] += c[i];
        }
    }
    let mut total: f64 = s.iter().map(|&v| v as f64).sum();
    for v in chunks.into_remainder() {
        *v = exp_f32(*v - m);
        total += *v as f64;
    }
    total
}

dispatched! {
    /// `Σ x²` in f64 (f64 lanes; the order of the sum is fixed by the lane count, so every
    /// instruction set gives the same result).
    pub fn sum_squares_f64(x: &[f32]) -> f64 = sum_squares_f64_imp;
}

#[inline(always)]
fn sum_squares_f64_imp(x: &[f32]) -> f64 {
    const L: usize = 8;
    let mut acc = [0f64; L];
    let chunks = x.chunks_exact(L);
    let rest = chunks.remainder();
    for c in chunks {
        for i in 0..L {
            let v = c[i] as f64;
            acc[i] += v * v;
        }
    }
    let mut total: f64 = acc.iter().sum();
    for &v in rest {
        total += v as f64 * v as f64;
    }
    total
}

dispatched! {
    /// `x ← x · c`.
    pub fn scale_in_place_f32(x: &mut [f32], c: f32) = scale_in_place_f32_imp;
}

#[inline(always)]
fn scale_in_place_f32_imp(x: &mut [f32], c: f32) {
    x.iter_mut().for_each(|v| *v *= c);
}

dispatched! {
    /// `acc ← acc + x` over the common length.
    pub fn add_in_place_f32(acc: &mut [f32], x: &[f32]) = add_in_place_f32_imp;
}

#[inline(always)]
fn add_in_place_f32_imp(acc: &mut [f32], x: &[f32]) {
    acc.iter_mut().zip(x).for_each(|(a, b)| *a += b);
}

/// The per-step constants of torch's AdamW element update (see [`adamw_f32`]).
#[derive(Clone, Copy, Debug)]
pub struct AdamStep {
    /// β₁.
    pub b1: f32,
    /// β₂.
    pub b2: f32,
    /// ε.
    pub eps: f32,
    /// `lr / (1 − β₁ᵗ)`.
    pub step_size: f32,
    /// `1 / sqrt(1 − β₂ᵗ)`.
    pub inv_bc2: f32,
    /// `1 − lr·wd` for decaying parameters, else 1.
    pub decay: f32,
}

dispatched! {
    /// torch's AdamW update of aligned slices, in place:
    /// `m ← β₁m + (1−β₁)g`, `v ← β₂v + (1−β₂)g²`,
    /// `p ← p·decay − step_size · m / (sqrt(v)·inv_bc2 + ε)`. Only exactly rounded
    /// operations (no fused multiply-add), so every instruction set gives the same bits.
    pub fn adamw_f32(p: &mut [f32], m: &mut [f32], v: &mut [f32], g: &[f32], k: &AdamStep) = adamw_f32_imp;
}

#[inline(always)]
fn adamw_f32_imp(p: &mut [f32], m: &mut [f32], v: &mut [f32], g: &[f32], k: &AdamStep) {
    let n = p.len().min(m.len()).min(v.len()).min(g.len());
    let (p, m, v, g) = (&mut p[..n], &mut m[..n], &mut v[..n], &g[..n]);
    let (b1, b2, eps, step_size, inv_bc2, decay) = (k.b1, k.b2, k.eps, k.step_size, k.inv_bc2, k.decay);
    for i in 0..n {
        let gi = g[i];
        m[i] = b1 * m[i] + (1.0 - b1) * gi;
        v[i] = b2 * v[i] + (1.0 - b2) * gi * gi;
        let denom = v[i].sqrt() * inv_bc2 + eps;
        p[i] = p[i] * decay - step_size * m[i] / denom;
    }
}

#[inline(always)]
fn logprob_entropy_grad_f32_imp(x: &[f32], out: &mut [f32], lse: f32, mean_x: f32, g_lp: f32, g_h: f32) {
    for (o, &xj) in out.iter_mut().zip(x) {
        let p = exp_f32(xj - lse);
        *o = p * (g_h * (mean_x - xj) - g_lp);
    }
}

#[inline(always)]
pub(crate) fn max_f32_imp(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let chunks = x.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for i in 0..LANES {
            acc[i] = if c[i] > acc[i] { c[i] } else { acc[i] };
        }
    }
    let mut m = f32::NEG_INFINITY;
    for &a in acc.iter().chain(rest) {
        m = if a > m { a } else { m };
    }
    m
}

#[inline(always)]
fn exp_sums_f32_imp(x: &[f32], m: f32) -> (f64, f64) {
    let mut s = [0f32; LANES];
    let mut sx = [0f32; LANES];
    let chunks = x.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for i in 0..LANES {
            let d = c[i] - m;
            let e = exp_f32(d);
            s[i] += e;
            sx[i] += e * d;
        }
    }
    let (mut s_tot, mut sx_tot) = (0f64, 0f64);
    for i in 0..LANES {
        s_tot += s[i] as f64;
        sx_tot += sx[i] as f64;
    }
    for &v in rest {
        let d = v - m;
        let e = exp_f32(d);
        s_tot += e as f64;
        sx_tot += (e * d) as f64;
    }
    (s_tot, sx_tot)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_within_three_ulp_of_libm_over_the_softmax_range() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let (a, b) = (exp_f32(x) as f64, (x as f64).exp());
            worst = worst.max(((a - b) / b).abs());
            x += 0.001_37;
        }
        assert!(worst < 3.0 * f32::EPSILON as f64, "worst relative error {worst:e}");
    }

    #[test]
    fn exp_handles_the_edges() {
        assert_eq!(exp_f32(0.0), 1.0);
        assert_eq!(exp_f32(-1000.0), 0.0);
        assert_eq!(exp_f32(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_f32(100.0), f32::INFINITY);
        assert_eq!(exp_f32(f32::INFINITY), f32::INFINITY);
        assert!(exp_f32(f32::NAN).is_nan());
        assert!(exp_f32(88.7) > 3.0e38);
    }

    #[test]
    fn reductions_match_sequential_ones() {
        let x: Vec<f32> = (0..1003).map(|i| ((i * 7919) % 1000) as f32 / 100.0 - 5.0).collect();
        let m = max_f32(&x);
        assert_eq!(m, x.iter().cloned().fold(f32::NEG_INFINITY, f32::max));
        let (s, sx) = exp_sums_f32(&x, m);
        let s_ref: f64 = x.iter().map(|&v| ((v - m) as f64).exp()).sum();
        let sx_ref: f64 = x.iter().map(|&v| ((v - m) as f64).exp() * (v - m) as f64).sum();
        assert!((s - s_ref).abs() / s_ref < 1e-6);
        assert!((sx - sx_ref).abs() / sx_ref.abs() < 1e-6);
        let mut y = x.clone();
        let z = exp_shift_in_place_f32(&mut y, m);
        assert!((z - s_ref).abs() / s_ref < 1e-6);
        for (a, b) in y.iter().zip(&x) {
            assert!((*a as f64 - ((b - m) as f64).exp()).abs() < 1e-6);
        }
    }
}
