use super::*;
use crate::rng::RngStream;
use candle_core::{Device, Var};

/// Allowed error of an entry, relative to `Σ_k |round(a_ik)·round(b_kj)|`. Products of bf16
/// values are exact in f32, so the only error left is the f32 summation: at most about
/// `k·2⁻²⁴` of that sum in the worst case (1.8e-5 at k = 300), and for products of mixed
/// signs it grows like `√k·2⁻²⁴` (1e-6 at k = 300). 1e-5 leaves a margin of ten over the
/// typical error, while an unrounded, truncated, dropped or repeated product shows up as
/// an error of 1e-4 or more (2⁻⁹ per product, at least `2⁻⁹/√k` of the sum).
const TOL: f64 = 1e-5;

const SIZES: [usize; 10] = [1, 2, 3, 15, 17, 31, 33, 64, 129, 300];

fn random(len: usize, seed: u64) -> Vec<f32> {
    let mut rng = RngStream::new(seed);
    // Mixed magnitudes so that the rounding touches every exponent range the kernel sees.
    (0..len)
        .map(|i| (2.0 * rng.uniform_f32() - 1.0) * [1.0, 0.01, 30.0][i % 3])
        .collect()
}

/// A `rows × cols` matrix stored row-major, or stored as its transpose (`cols × rows`
/// row-major) and viewed through swapped strides.
fn stored(x: &[f32], rows: usize, cols: usize, transposed: bool) -> Vec<f32> {
    match transposed {
        false => x.to_vec(),
        true => (0..rows * cols).map(|t| x[(t % rows) * cols + t / rows]).collect(),
    }
}

fn view(data: &[f32], rows: usize, cols: usize, transposed: bool) -> MatRef<'_> {
    match transposed {
        false => MatRef::row_major(data, cols),
        true => MatRef::row_major(data, rows).t(),
    }
}

/// `(Σ round(a)·round(b), Σ |round(a)·round(b)|)` in f64, `a` and `b` row-major.
fn reference(m: usize, k: usize, n: usize, a: &[f32], b: &[f32]) -> (Vec<f64>, Vec<f64>) {
    let ra: Vec<f64> = a.iter().map(|&x| bf16_round(x) as f64).collect();
    let rb: Vec<f64> = b.iter().map(|&x| bf16_round(x) as f64).collect();
    let (mut c, mut s) = (vec![0f64; m * n], vec![0f64; m * n]);
    for i in 0..m {
        for p in 0..k {
            let x = ra[i * k + p];
            for j in 0..n {
                let v = x * rb[p * n + j];
                c[i * n + j] += v;
                s[i * n + j] += v.abs();
            }
        }
    }
    (c, s)
}

fn assert_close(what: &str, got: &[f32], want: &[f64], scale: &[f64]) {
    assert_eq!(got.len(), want.len(), "{what}");
    for (i, ((&g, &w), &s)) in got.iter().zip(want).zip(scale).enumerate() {
        let err = (g as f64 - w).abs();
        assert!(
            err <= TOL * s,
            "{what}[{i}]: {g} vs {w} (error {err:e}, Σ|products| {s:e})"
        );
    }
}

#[test]
fn gemm_matches_the_f64_product_of_rounded_inputs_for_every_view() {
    for (&m, &k, &n) in SIZES
        .iter()
        .flat_map(|m| SIZES.iter().flat_map(move |k| SIZES.iter().map(move |n| (m, k, n))))
    {
        let (a, b) = (
            random(m * k, (m * 1000 + k) as u64),
            random(k * n, (k * 1000 + n + 7) as u64),
        );
        let (want, scale) = reference(m, k, n, &a, &b);
        for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
            let (sa, sb) = (stored(&a, m, k, ta), stored(&b, k, n, tb));
            let mut c = vec![f32::NAN; m * n];
            gemm(m, k, n, view(&sa, m, k, ta), view(&sb, k, n, tb), &mut c).unwrap();
            assert_close(&format!("{m}x{k}x{n} A^T {ta} B^T {tb}"), &c, &want, &scale);
        }
    }
}

#[test]
fn the_kernel_equals_the_fallback() {
    for (t, (&m, &k, &n)) in SIZES
        .iter()
        .flat_map(|m| SIZES.iter().flat_map(move |k| SIZES.iter().map(move |n| (m, k, n))))
        .enumerate()
        .filter(|(t, _)| t % 7 == 0)
    {
        let (ta, tb) = (t % 2 == 1, t % 3 == 0);
        let (a, b) = (random(m * k, t as u64), random(k * n, t as u64 + 1));
        let (sa, sb) = (stored(&a, m, k, ta), stored(&b, k, n, tb));
        let (va, vb) = (view(&sa, m, k, ta), view(&sb, k, n, tb));
        let (mut c1, mut c2) = (vec![0f32; m * n], vec![0f32; m * n]);
        gemm(m, k, n, va, vb, &mut c1).unwrap();
        gemm_fallback(m, k, n, va, vb, &mut c2).unwrap();
        let (_, scale) = reference(m, k, n, &a, &b);
        let c2: Vec<f64> = c2.iter().map(|&x| x as f64).collect();
        assert_close(&format!("{m}x{k}x{n}"), &c1, &c2, &scale);
    }
}

#[test]
fn padded_and_fully_strided_views_read_the_right_elements() {
    let (m, k, n) = (33, 65, 47);
    let (a, b) = (random(m * k, 11), random(k * n, 12));
    let (want, scale) = reference(m, k, n, &a, &b);
    // A with a row stride past its width; B with no unit stride at all (every other
    // element of a buffer twice as long, columns spaced by 2·k + 1).
    let mut pa = vec![f32::NAN; m * (k + 5)];
    for i in 0..m {
        pa[i * (k + 5)..i * (k + 5) + k].copy_from_slice(&a[i * k..(i + 1) * k]);
    }
    let mut pb = vec![f32::NAN; n * (2 * k + 1)];
    for p in 0..k {
        for j in 0..n {
            pb[j * (2 * k + 1) + 2 * p] = b[p * n + j];
        }
    }
    let va = MatRef {
        data: &pa,
        row_stride: k + 5,
        col_stride: 1,
    };
    let vb = MatRef {
        data: &pb,
        row_stride: 2,
        col_stride: 2 * k + 1,
    };
    let mut c = vec![0f32; m * n];
    gemm(m, k, n, va, vb, &mut c).unwrap();
    assert_close("padded A, strided B", &c, &want, &scale);
    gemm(n, k, m, vb.t(), va.t(), &mut c).unwrap();
    let (want_t, scale_t) = reference(n, k, m, &stored(&b, k, n, true), &stored(&a, m, k, true));
    assert_close("transposed product", &c, &want_t, &scale_t);
}

#[test]
fn every_split_over_threads_gives_the_same_product() {
    // Shapes past every block size (MC, KC, NC) and that pick each split: many rows, many
    // columns, a long k with a small C.
    let shapes = [(700, 41, 90), (30, 70, 2500), (20, 3001, 19), (170, 1025, 2100)];
    let expected = [Some(Split::Rows), Some(Split::Cols), Some(Split::Depth), None];
    for (&(m, k, n), want_split) in shapes.iter().zip(expected) {
        if let Some(s) = want_split {
            assert_eq!(plan(m, k, n, 3).map(|p| p.0), Some(s), "{m}x{k}x{n}");
        }
        let (a, b) = (random(m * k, 21), random(k * n, 22));
        let (want, scale) = reference(m, k, n, &a, &b);
        // Two threads read both operands through transposed views.
        let (sa, sb) = (stored(&a, m, k, true), stored(&b, k, n, true));
        for threads in [1, 2, 3] {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            let (va, vb) = match threads {
                2 => (view(&sa, m, k, true), view(&sb, k, n, true)),
                _ => (MatRef::row_major(&a, k), MatRef::row_major(&b, n)),
            };
            let mut c = vec![0f32; m * n];
            pool.install(|| gemm(m, k, n, va, vb, &mut c)).unwrap();
            assert_close(&format!("{m}x{k}x{n}, {threads} threads"), &c, &want, &scale);
        }
    }
}

#[test]
fn the_lm_head_products_split_where_the_work_is() {
    // logits = h·Wᵀ (many columns), ∂h = G·W (long k), ∂W = Gᵀ·h (many rows).
    assert_eq!(plan(128, 128, 50257, 2).map(|p| p.0), Some(Split::Cols));
    assert_eq!(plan(128, 50257, 128, 2).map(|p| p.0), Some(Split::Depth));
    assert_eq!(plan(50257, 128, 128, 2).map(|p| p.0), Some(Split::Rows));
    assert_eq!(plan(4, 4, 4, 2), None);
}

#[test]
fn empty_and_k_zero_products_are_zero_and_bad_views_are_errors() {
    for f in [gemm, gemm_fallback] {
        let mut c = vec![f32::NAN; 6];
        f(2, 0, 3, MatRef::row_major(&[], 0), MatRef::row_major(&[], 3), &mut c).unwrap();
        assert_eq!(c, [0.0; 6]);
        let (a, b) = (MatRef::row_major(&[], 4), MatRef::row_major(&[0.0; 12], 3));
        f(0, 4, 3, a, b, &mut []).unwrap();
    }
    let short = [1.0f32; 5];
    let err = gemm(
        2,
        3,
        1,
        MatRef::row_major(&short, 3),
        MatRef::row_major(&[1.0; 3], 1),
        &mut [0.0; 2],
    );
    assert!(
        matches!(err, Err(GemmError::OutOfBounds { operand: "A", .. })),
        "{err:?}"
    );
    let err = gemm(
        1,
        1,
        1,
        MatRef::row_major(&[1.0], 1),
        MatRef::row_major(&[1.0], 1),
        &mut [0.0; 2],
    );
    assert!(matches!(err, Err(GemmError::OutputSize { .. })), "{err:?}");
}

#[test]
fn rounding_is_to_nearest_even() {
    let r = |bits: u32| to_bf16_bits(f32::from_bits(bits));
    assert_eq!(r(0x3F80_0000), 0x3F80); // 1.0 is exact
    assert_eq!(r(0x3F80_8000), 0x3F80); // halfway, kept part even: down
    assert_eq!(r(0x3F81_8000), 0x3F82); // halfway, kept part odd: up
    assert_eq!(r(0x3F80_8001), 0x3F81); // just above halfway
    assert_eq!(r(0x3F80_7FFF), 0x3F80); // just below halfway
    assert_eq!(r(0xBF81_8000), 0xBF82); // negative ties too
    assert_eq!(r(0x3FFF_8000), 0x4000); // the carry moves into the exponent
    assert_eq!(to_bf16_bits(-0.0), 0x8000);
    assert_eq!(bf16_round(0.1).to_bits(), 0x3DCD_0000); // 0.10009765625
}

#[test]
fn rounding_keeps_nan_inf_and_subnormals() {
    let r = |bits: u32| to_bf16_bits(f32::from_bits(bits));
    assert_eq!(to_bf16_bits(f32::INFINITY), 0x7F80);
    assert_eq!(to_bf16_bits(f32::NEG_INFINITY), 0xFF80);
    for nan in [f32::NAN.to_bits(), 0x7F80_0001, 0xFF80_FFFF, 0x7FFF_FFFF] {
        assert!(bf16_round(f32::from_bits(nan)).is_nan(), "{nan:#x}");
    }
    assert_eq!(r(0x7F7F_FFFF), 0x7F80); // f32::MAX rounds to inf
    assert_eq!(r(0x7F7F_8000), 0x7F80); // halfway above the largest bf16 (odd): inf
    assert_eq!(r(0x7F7F_7FFF), 0x7F7F); // just below: the largest bf16
    assert_eq!(r(0x0001_0000), 0x0001); // a bf16 subnormal is exact
    assert_eq!(r(0x0000_C000), 0x0001); // above half the smallest subnormal
    assert_eq!(r(0x0000_8000), 0x0000); // halfway to zero, even
    assert_eq!(r(0x0001_8000), 0x0002); // halfway, odd: up
    assert_eq!(r(0x8000_0001), 0x8000); // the smallest f32 subnormal: -0
}

#[test]
fn the_kernel_rounds_like_to_bf16_bits() {
    // round(A)·I = round(A) exactly: products with 1 and sums with 0 are exact.
    let specials: Vec<f32> = [
        0x3F80_8000u32,
        0x3F81_8000,
        0x3F80_8001,
        0x3F80_7FFF,
        0xBF81_8000,
        0x3FFF_8000,
        0x7F7F_7FFF,
        0x0080_8000,
        0x4049_0FDB,
    ]
    .iter()
    .map(|&b| f32::from_bits(b))
    .collect();
    let (m, k) = (specials.len(), specials.len());
    let a: Vec<f32> = (0..m * k).map(|t| specials[(t + t / k) % k]).collect();
    let eye: Vec<f32> = (0..k * k).map(|t| (t % (k + 1) == 0) as u32 as f32).collect();
    for ta in [false, true] {
        let sa = stored(&a, m, k, ta);
        let mut c = vec![0f32; m * k];
        gemm(m, k, k, view(&sa, m, k, ta), MatRef::row_major(&eye, k), &mut c).unwrap();
        let want: Vec<f32> = a.iter().map(|&x| bf16_round(x)).collect();
        assert_eq!(c, want, "A^T {ta}");
    }
    let mut c = [0f32; 2];
    gemm(
        2,
        1,
        1,
        MatRef::row_major(&[f32::NAN, f32::INFINITY], 1),
        MatRef::row_major(&[2.0], 1),
        &mut c,
    )
    .unwrap();
    assert!(c[0].is_nan() && c[1] == f32::INFINITY, "{c:?}");
}

// ---------------------------------------------------------------- candle op

fn tensor(v: Vec<f32>, shape: (usize, usize)) -> Tensor {
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

fn rounded(t: &Tensor) -> Tensor {
    let v: Vec<f32> = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    tensor(v.into_iter().map(bf16_round).collect(), t.dims2().unwrap())
}

fn flat64(t: &Tensor) -> Vec<f64> {
    t.flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .into_iter()
        .map(f64::from)
        .collect()
}

/// `got` against `x·y` of (already rounded) candle tensors, scaled by `|x|·|y|`.
fn assert_product(what: &str, got: &Tensor, x: &Tensor, y: &Tensor) {
    let want = flat64(&x.matmul(y).unwrap());
    let scale = flat64(&x.abs().unwrap().matmul(&y.abs().unwrap()).unwrap());
    let got: Vec<f32> = got.flatten_all().unwrap().to_vec1().unwrap();
    assert_close(what, &got, &want, &scale);
}

#[test]
fn the_op_and_its_gradients_are_products_of_rounded_operands() {
    // x: (m, k), w: (n, k) row-major as a linear layer stores it, used as the view wᵀ.
    let (m, k, n) = (37, 129, 70);
    let x = Var::from_tensor(&tensor(random(m * k, 31), (m, k))).unwrap();
    let w = Var::from_tensor(&tensor(random(n * k, 32), (n, k))).unwrap();
    // The upstream gradient is bf16-valued, so the composed graph below sees the same g.
    let g = rounded(&tensor(random(m * n, 33), (m, n)));
    let y = matmul(x.as_tensor(), &w.as_tensor().t().unwrap()).unwrap();
    let grads = (&y * &g).unwrap().sum_all().unwrap().backward().unwrap();
    let (gx, gw) = (grads.get(x.as_tensor()).unwrap(), grads.get(w.as_tensor()).unwrap());

    // The composed graph on rounded values: y = xr·wrᵀ, ∂xr = g·wr, ∂wr = gᵀ·xr.
    let xr = Var::from_tensor(&rounded(x.as_tensor())).unwrap();
    let wr = Var::from_tensor(&rounded(w.as_tensor())).unwrap();
    let yr = xr.as_tensor().matmul(&wr.as_tensor().t().unwrap()).unwrap();
    let grads_r = (&yr * &g).unwrap().sum_all().unwrap().backward().unwrap();
    let (gxr, gwr) = (
        grads_r.get(xr.as_tensor()).unwrap(),
        grads_r.get(wr.as_tensor()).unwrap(),
    );

    let wrt = wr.as_tensor().t().unwrap();
    assert_product("forward", &y, xr.as_tensor(), &wrt);
    assert_product("grad x", gx, &g, wr.as_tensor());
    assert_product("grad w", gw, &g.t().unwrap(), xr.as_tensor());
    // And the composed graph's own gradients agree (the same products, candle's order).
    assert_product("composed grad x", gxr, &g, wr.as_tensor());
    assert_product("composed grad w", gwr, &g.t().unwrap(), xr.as_tensor());
}

#[test]
fn the_op_skips_gradients_of_constants_and_leaves_other_dtypes_to_candle() {
    let x = Var::from_tensor(&tensor(random(6, 41), (2, 3))).unwrap();
    let w = tensor(random(12, 42), (3, 4));
    let grads = matmul(x.as_tensor(), &w)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    assert!(grads.get(x.as_tensor()).is_some() && grads.get(&w).is_none());

    let (a, b) = (
        tensor(random(6, 43), (2, 3)).to_dtype(DType::F64).unwrap(),
        tensor(random(12, 44), (3, 4)).to_dtype(DType::F64).unwrap(),
    );
    let got: Vec<f64> = matmul(&a, &b).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    let want: Vec<f64> = a.matmul(&b).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    assert_eq!(got, want);
    assert!(matmul(&a, &a).is_err());
}
