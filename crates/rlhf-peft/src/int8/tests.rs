use super::dequant::DequantMatMul;
use super::*;
use candle_core::Var;
use rand::{rngs::StdRng, Rng, SeedableRng};

/// Seeded standard-normal values (Box-Muller).
pub(crate) fn randn(rng: &mut StdRng, n: usize, scale: f32) -> Vec<f32> {
    (0..n)
        .map(|_| {
            let (u, v): (f32, f32) = (rng.random::<f32>().max(1e-7), rng.random());
            scale * (-2.0 * u.ln()).sqrt() * (std::f32::consts::TAU * v).cos()
        })
        .collect()
}

fn cpu(v: Vec<f32>, shape: &[usize]) -> Tensor {
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

fn vals(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

#[test]
fn dequant_constant_is_f32_of_one_over_127_and_mm_constant_is_not_its_square() {
    assert_eq!(DEQUANT_SCALE, (1.0f64 / 127.0) as f32);
    assert_ne!(MM_DEQUANT_SCALE, (1.0f64 / (127.0 * 127.0)) as f32);
}

#[test]
fn quantize_rounds_half_to_even_after_the_f16_cast() {
    // absmax 127 makes the scale exactly 1; 2.5 -> 2, 3.5 -> 4, -2.5 -> -2. The f32
    // 2.5000002 would round to 3, but its f16 is the tie 2.5, which rounds to 2.
    let w = cpu(vec![127.0, 2.5, 3.5, -2.5, 0.0, 2.500_000_2], &[1, 6]);
    let q = Int8Weight::quantize(&w).unwrap();
    assert_eq!(q.cb, vec![127, 2, 4, -2, 0, 2]);
    assert_eq!(q.scb, vec![127.0]);
}

#[test]
fn int8_matmul_through_f32_gemm_equals_i32_dot_products_exactly() {
    // k = 2500 spans three f32 chunks; values at the int8 extremes stress exactness.
    let (n, k, out) = (5, 2500, 9);
    let mut rng = StdRng::seed_from_u64(1);
    let mut draw = |len: usize| -> Vec<i8> {
        (0..len)
            .map(|i| match i % 7 {
                0 => 127,
                1 => -128,
                _ => rng.random::<i8>(),
            })
            .collect()
    };
    let (a, b) = (draw(n * k), draw(out * k));
    let acc = int8_matmul(&a, n, &b, out, k).unwrap();
    for r in 0..n {
        for o in 0..out {
            let expect = dot_i8(&a[r * k..(r + 1) * k], &b[o * k..(o + 1) * k]);
            assert_eq!(acc[r * out + o], expect);
        }
    }
}

#[test]
fn zero_rows_quantize_to_zero_and_give_the_bias() {
    let w = cpu(vec![0.0; 6], &[2, 3]);
    let b = cpu(vec![0.5, -1.0], &[2]);
    let lin = Int8Linear::from_dense(&w, Some(b), 6.0).unwrap();
    assert_eq!(lin.weight.cb, vec![0; 6]);
    let x = cpu(vec![1.0, 2.0, 3.0, 0.0, 0.0, 0.0], &[2, 3]);
    assert_eq!(vals(&lin.forward(&x).unwrap()), vec![0.5, -1.0, 0.5, -1.0]);
    assert_eq!(vals(&lin.forward_eval(&x).unwrap()), vec![0.5, -1.0, 0.5, -1.0]);
}

#[test]
fn a_wrong_input_width_or_bias_is_a_shape_error() {
    let w = cpu(vec![1.0; 6], &[2, 3]);
    let lin = Int8Linear::from_dense(&w, None, 0.0).unwrap();
    let x = cpu(vec![1.0; 4], &[1, 4]);
    assert!(matches!(lin.forward(&x), Err(QuantError::Shape { .. })));
    assert!(matches!(lin.forward_eval(&x), Err(QuantError::Shape { .. })));
    let bad_bias = Some(cpu(vec![0.0; 3], &[3]));
    assert!(Int8Linear::from_dense(&w, bad_bias, 0.0).is_err());
}

/// Worst-case bound of `|x (W - W')^T|` from per-element bounds `ex`, `ew` on
/// `|x - x'|` and `|W - W'|`, plus f32 accumulation slack.
fn product_bound(x: &[f32], w: &[f32], ex: &[f32], ew: &[f32], k: usize) -> Vec<f32> {
    let (n, out) = (x.len() / k, w.len() / k);
    let mut b = Vec::with_capacity(n * out);
    for r in 0..n {
        for o in 0..out {
            let s: f32 = (0..k)
                .map(|j| {
                    let (xi, wi) = (x[r * k + j].abs(), w[o * k + j].abs());
                    xi * ew[o * k + j] + wi * ex[r * k + j] + ex[r * k + j] * ew[o * k + j]
                })
                .sum();
            b.push(s * 1.001 + 1e-4);
        }
    }
    b
}

/// Exact f32 reference product `x W^T`, `(n, out)`.
fn reference(x: &Tensor, w: &Tensor) -> Vec<f32> {
    vals(&x.matmul(&w.t().unwrap()).unwrap())
}

#[test]
fn train_and_eval_forwards_stay_within_the_int8_rounding_bound_of_the_f32_product() {
    let (n, k, out) = (16, 96, 40);
    let mut rng = StdRng::seed_from_u64(7);
    let (xv, wv) = (randn(&mut rng, n * k, 1.0), randn(&mut rng, out * k, 0.05));
    let (x, w) = (cpu(xv.clone(), &[n, k]), cpu(wv.clone(), &[out, k]));
    let lin = Int8Linear::from_dense(&w, None, 0.0).unwrap();
    // |W - deq W| <= |W| 2^-11 (f16) + SCB / 254 (half an int8 step).
    let ew: Vec<f32> = (0..out * k)
        .map(|i| wv[i].abs() / 2048.0 + lin.weight.scb[i / k] / 254.0)
        .collect();
    let exact = reference(&x, &w);
    let bound = product_bound(&xv, &wv, &vec![0.0; n * k], &ew, k);
    let y = vals(&lin.forward(&x).unwrap());
    assert!(y.iter().zip(&exact).zip(&bound).all(|((a, e), b)| (a - e).abs() <= *b));
    // The eval path also rounds x: |x - deq x| <= |x| 2^-11 + SCA / 254.
    let act = quantize_activations(&x, 0.0).unwrap();
    let ex: Vec<f32> = (0..n * k)
        .map(|i| xv[i].abs() / 2048.0 + act.sca[i / k] / 254.0)
        .collect();
    let bound = product_bound(&xv, &wv, &ex, &ew, k);
    let y = vals(&lin.forward_eval(&x).unwrap());
    assert!(y.iter().zip(&exact).zip(&bound).all(|((a, e), b)| (a - e).abs() <= *b));
}

#[test]
fn custom_op_input_gradient_equals_plain_candle_matmul_on_the_dequantized_weight() {
    // in = 4096 gives panels of 64 rows: 150 rows run as 64 + 64 + 22.
    let (b, t, k, out) = (2, 3, 4096, 150);
    let mut rng = StdRng::seed_from_u64(11);
    let w = cpu(randn(&mut rng, out * k, 0.05), &[out, k]);
    let bias = Var::from_tensor(&cpu(randn(&mut rng, out, 0.1), &[out])).unwrap();
    let lin = Int8Linear::from_dense(&w, Some(bias.as_tensor().clone()), 6.0).unwrap();
    let x = Var::from_tensor(&cpu(randn(&mut rng, b * t * k, 1.0), &[b, t, k])).unwrap();
    let r = cpu(randn(&mut rng, b * t * out, 1.0), &[b, t, out]);
    let loss = (lin.forward(x.as_tensor()).unwrap() * &r).unwrap().sum_all().unwrap();
    let grads = loss.backward().unwrap();
    // The same loss with plain candle ops on the weight MatMul8bitFp multiplies by.
    let s = Tensor::from_vec(lin.weight.scb.clone(), (out, 1), &Device::Cpu).unwrap();
    let cb: Vec<f32> = lin.weight.cb.iter().map(|&c| c as f32).collect();
    let deq = cpu(cb, &[out, k]).broadcast_mul(&(s * DEQUANT_SCALE as f64).unwrap());
    let deq = deq.unwrap();
    let x2 = Var::from_tensor(x.as_tensor()).unwrap();
    let y2 = x2.as_tensor().broadcast_matmul(&deq.t().unwrap()).unwrap();
    let y2 = y2.broadcast_add(bias.as_tensor()).unwrap();
    let loss2 = (&y2 * &r).unwrap().sum_all().unwrap();
    let grads2 = loss2.backward().unwrap();
    let y1 = vals(&lin.forward(x.as_tensor()).unwrap());
    let d = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(p, q)| (p - q).abs()).fold(0.0, f32::max);
    assert!(d(&y1, &vals(&y2)) < 1e-5, "forward");
    let (g1, g2) = (grads.get(&x).unwrap(), grads2.get(&x2).unwrap());
    assert_eq!(g1.dims(), &[b, t, k]);
    assert!(d(&vals(g1), &vals(g2)) < 1e-5, "input gradient");
    let (gb1, gb2) = (grads.get(&bias).unwrap(), grads2.get(&bias).unwrap());
    assert!(d(&vals(gb1), &vals(gb2)) < 1e-5, "bias gradient");
}

#[test]
fn second_derivative_through_the_backward_op_is_the_forward_op() {
    // d/dx of sum(dX) where dX = g deq(W) (the backward op) is a constant: check that the
    // backward of the backward runs and gives g-shaped results equal to 1 deq(W)^T.
    let mut rng = StdRng::seed_from_u64(3);
    let w = cpu(randn(&mut rng, 5 * 7, 0.1), &[5, 7]);
    let q = QuantizedWeight::Int8(Arc::new(Int8Weight::quantize(&w).unwrap()));
    let g = Var::from_tensor(&cpu(randn(&mut rng, 2 * 5, 1.0), &[2, 5])).unwrap();
    let op = DequantMatMul {
        weight: q.clone(),
        transposed: true,
    };
    let dx = g.as_tensor().apply_op1(op).unwrap();
    let grads = dx.sum_all().unwrap().backward().unwrap();
    let ones = Tensor::ones((2, 7), DType::F32, &Device::Cpu).unwrap();
    let expect = dequant_matmul(&ones, &q).unwrap();
    assert_eq!(vals(grads.get(&g).unwrap()), vals(&expect));
}
