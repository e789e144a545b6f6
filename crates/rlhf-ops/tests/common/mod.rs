//! Helpers of the Llama-family op tests: random inputs, fused-vs-composed comparison and
//! f64 finite differences.
#![allow(dead_code)]

use candle_core::{DType, Device, Tensor, Var};
use rlhf_ops::rng::RngStream;

/// A tensor of uniform values in `[-scale, scale)` (f32, or `dtype`).
pub fn random(shape: &[usize], scale: f64, seed: u64) -> Tensor {
    let mut rng = RngStream::new(seed);
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|_| (scale * (2.0 * rng.uniform_f64() - 1.0)) as f32)
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

pub fn flat(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// `|a − b| ≤ tol · max|b|` element-wise.
pub fn close(name: &str, a: &[f64], b: &[f64], tol: f64) {
    assert_eq!(a.len(), b.len(), "{name}: lengths");
    let scale = b.iter().fold(0f64, |m, x| m.max(x.abs())).max(1e-12);
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!((x - y).abs() <= tol * scale, "{name}[{i}]: {x} vs {y} (scale {scale})");
    }
}

/// Values and gradients of every input of `f` under the loss `Σ y · w` (`w` random, fixed).
pub fn value_and_grads(inputs: &[Tensor], f: &dyn Fn(&[Tensor]) -> Tensor) -> (Vec<f64>, Vec<Vec<f64>>) {
    let vars: Vec<Var> = inputs.iter().map(|t| Var::from_tensor(t).unwrap()).collect();
    let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let y = f(&ts);
    let w = random(y.dims(), 1.0, 99).to_dtype(y.dtype()).unwrap();
    let grads = (&y * &w).unwrap().sum_all().unwrap().backward().unwrap();
    let gs = vars
        .iter()
        .map(|v| match grads.get(v.as_tensor()) {
            Some(g) => flat(g),
            None => vec![0.0; v.elem_count()],
        })
        .collect();
    (flat(&y), gs)
}

/// `fused` and `composed` agree in value and in the gradient of every input, to `tol`
/// relative to the largest magnitude.
pub fn fused_equals_composed(
    inputs: &[Tensor],
    fused: &dyn Fn(&[Tensor]) -> Tensor,
    composed: &dyn Fn(&[Tensor]) -> Tensor,
    tol: f64,
) {
    let (a, b) = (value_and_grads(inputs, fused), value_and_grads(inputs, composed));
    close("value", &a.0, &b.0, tol);
    for (i, (x, y)) in a.1.iter().zip(&b.1).enumerate() {
        close(&format!("gradient of input {i}"), x, y, tol);
    }
}

/// The analytic gradients of `f` (run in f64) equal central finite differences
/// (`h = 1e-6`) of the loss `Σ y · w`, for up to `per_input` elements of each input.
pub fn gradients_match_finite_differences(
    inputs: &[Tensor],
    f: &dyn Fn(&[Tensor]) -> Tensor,
    per_input: usize,
    tol: f64,
) {
    let inputs: Vec<Tensor> = inputs.iter().map(|t| t.to_dtype(DType::F64).unwrap()).collect();
    let (y, grads) = value_and_grads(&inputs, f);
    let w = flat(&random(&[y.len()], 1.0, 99));
    let loss = |ts: &[Tensor]| -> f64 { flat(&f(ts)).iter().zip(&w).map(|(a, b)| a * b).sum() };
    let h = 1e-6;
    let mut rng = RngStream::new(5);
    for (i, x) in inputs.iter().enumerate() {
        let base = flat(x);
        let picks: Vec<usize> = if base.len() <= per_input {
            (0..base.len()).collect()
        } else {
            (0..per_input).map(|_| rng.below(base.len())).collect()
        };
        let scale = grads[i].iter().fold(1e-3f64, |m, g| m.max(g.abs()));
        for &e in &picks {
            let at = |delta: f64| {
                let mut v = base.clone();
                v[e] += delta;
                let mut ts = inputs.clone();
                ts[i] = Tensor::from_vec(v, x.shape(), &Device::Cpu).unwrap();
                loss(&ts)
            };
            let fd = (at(h) - at(-h)) / (2.0 * h);
            let g = grads[i][e];
            assert!(
                (fd - g).abs() <= tol * scale,
                "input {i} element {e}: analytic {g} vs finite difference {fd} (scale {scale})"
            );
        }
    }
}
