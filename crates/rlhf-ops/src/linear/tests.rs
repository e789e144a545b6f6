use candle_core::{Device, Tensor, Var};

use super::*;
use crate::kernels::set_fast_kernels;
use crate::precision::with_matmul_precision;
use crate::rng::RngStream;

fn rand(rng: &mut RngStream, r: usize, c: usize) -> Tensor {
    let v: Vec<f32> = (0..r * c).map(|_| (2.0 * rng.uniform_f64() - 1.0) as f32).collect();
    Tensor::from_vec(v, (r, c), &Device::Cpu).unwrap()
}

fn flat(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

fn close(a: &Tensor, b: &Tensor, tol: f32, what: &str) {
    assert_eq!(a.dims(), b.dims(), "{what}");
    for (i, (x, y)) in flat(a).iter().zip(flat(b)).enumerate() {
        assert!((x - y).abs() <= tol * (1.0 + y.abs()), "{what}[{i}]: {x} vs {y}");
    }
}

/// Value, `∂x` and `∂W` of `sum(linear(x, W) · c)` with the op or the composed product.
fn run(fast: bool, bf16: bool, x: &Var, w: &Var, c: &Tensor) -> (Tensor, Tensor, Tensor) {
    let _k = set_fast_kernels(fast);
    let p = if bf16 {
        MatmulPrecision::Bf16
    } else {
        MatmulPrecision::Highest
    };
    with_matmul_precision(p, || {
        let y = linear(x.as_tensor(), w.as_tensor()).unwrap();
        let g = (&y * c).unwrap().sum_all().unwrap().backward().unwrap();
        (y, g.get(x).unwrap().clone(), g.get(w).unwrap().clone())
    })
}

#[test]
fn the_op_matches_the_composed_product_and_its_gradients() {
    let mut rng = RngStream::new(7);
    // Sizes off every tile boundary; k = 70 sums of products of magnitude ≤ 1.
    for (m, k, n) in [(1, 70, 3), (37, 70, 45), (64, 33, 130)] {
        let (x, w) = (
            Var::from_tensor(&rand(&mut rng, m, k)).unwrap(),
            Var::from_tensor(&rand(&mut rng, n, k)).unwrap(),
        );
        let c = rand(&mut rng, m, n);
        for bf16 in [false, true] {
            let (y0, dx0, dw0) = run(false, bf16, &x, &w, &c);
            let (y1, dx1, dw1) = run(true, bf16, &x, &w, &c);
            let what = format!("{m}x{k}x{n} bf16={bf16}");
            close(&y1, &y0, 1e-5, &format!("y {what}"));
            close(&dx1, &dx0, 1e-5, &format!("dx {what}"));
            close(&dw1, &dw0, 1e-5, &format!("dw {what}"));
            assert!(dw1.is_contiguous(), "∂W comes out in W's own layout");
        }
    }
}

#[test]
fn the_op_computes_no_gradient_for_a_frozen_weight() {
    let mut rng = RngStream::new(8);
    let x = Var::from_tensor(&rand(&mut rng, 5, 16)).unwrap();
    let w = rand(&mut rng, 7, 16);
    let _k = set_fast_kernels(true);
    let y = linear(x.as_tensor(), &w).unwrap();
    let g = y.sum_all().unwrap().backward().unwrap();
    assert!(g.get(&w).is_none(), "a frozen weight's gradient is never built");
    // ∂x of sum(x Wᵀ) is every row's column sums of W.
    let want = w
        .sum_keepdim(0)
        .unwrap()
        .broadcast_as((5, 16))
        .unwrap()
        .contiguous()
        .unwrap();
    close(g.get(&x).unwrap(), &want, 1e-6, "dx");
}

#[test]
fn untracked_products_take_the_plain_path() {
    let mut rng = RngStream::new(9);
    let (x, w) = (rand(&mut rng, 4, 300), rand(&mut rng, 1200, 300));
    let y = linear(&x, &w).unwrap();
    close(&y, &x.matmul(&w.t().unwrap()).unwrap(), 1e-5, "y");
    assert!(linear(&x, &rand(&mut rng, 3, 299)).is_err(), "inner sizes must agree");
}
