use super::*;
use crate::nn::{layer_norm_composed, softmax_last_dim_composed};
use crate::rng::RngStream;
use candle_core::{Device, Var};

fn random(shape: &[usize], scale: f64, seed: u64) -> Tensor {
    let mut rng = RngStream::new(seed);
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|_| (scale * (2.0 * rng.uniform_f64() - 1.0)) as f32)
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

fn flat(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

fn close(name: &str, a: &[f32], b: &[f32], tol: f32) {
    assert_eq!(a.len(), b.len(), "{name}");
    let scale = b.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-6);
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!((x - y).abs() <= tol * scale, "{name}[{i}]: fused {x} vs composed {y}");
    }
}

/// Values and gradients of every input through `f` (fused) and `g` (composed), under a
/// random linear loss.
fn check(inputs: &[Tensor], f: &dyn Fn(&[Tensor]) -> Tensor, g: &dyn Fn(&[Tensor]) -> Tensor, tol: f32) {
    let run = |h: &dyn Fn(&[Tensor]) -> Tensor| {
        let vars: Vec<Var> = inputs.iter().map(|t| Var::from_tensor(t).unwrap()).collect();
        let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let y = h(&ts);
        let wts = random(y.dims(), 1.0, 99);
        let grads = (&y * &wts).unwrap().sum_all().unwrap().backward().unwrap();
        let gs: Vec<Vec<f32>> = vars.iter().map(|v| flat(grads.get(v.as_tensor()).unwrap())).collect();
        (flat(&y), gs)
    };
    let (a, b) = (run(f), run(g));
    close("value", &a.0, &b.0, tol);
    for (i, (x, y)) in a.1.iter().zip(&b.1).enumerate() {
        close(&format!("grad of input {i}"), x, y, tol);
    }
}

#[test]
fn layer_norm_matches_the_composed_oracle() {
    for (rows, h) in [(37, 128), (5, 19), (2, 768)] {
        let inputs = [
            (random(&[rows, h], 3.0, 1) + 0.5).unwrap(),
            random(&[h], 1.0, 2),
            random(&[h], 1.0, 3),
        ];
        check(
            &inputs,
            &|t| layer_norm(&t[0], &t[1], &t[2], 1e-5).unwrap(),
            &|t| layer_norm_composed(&t[0], &t[1], &t[2], 1e-5).unwrap(),
            2e-5,
        );
    }
}

#[test]
fn bias_add_matches_broadcast_add() {
    for (rows, n) in [(665, 384), (3, 5)] {
        let inputs = [random(&[rows, n], 2.0, 6), random(&[n], 1.0, 7)];
        check(
            &inputs,
            &|t| bias_add(&t[0], &t[1]).unwrap(),
            &|t| t[0].broadcast_add(&t[1]).unwrap(),
            1e-5,
        );
    }
}

#[test]
fn gelu_matches_candles_gelu() {
    let x = random(&[3, 7001], 6.0, 4);
    check(&[x], &|t| gelu_tanh(&t[0]).unwrap(), &|t| t[0].gelu().unwrap(), 2e-6);
}

#[test]
fn softmax_matches_the_composed_oracle_including_masked_entries() {
    let x = random(&[2, 3, 5, 41], 4.0, 5);
    let mask: Vec<f32> = (0..41).map(|k| if k % 3 == 0 { -1e9 } else { 0.0 }).collect();
    let mask = Tensor::from_vec(mask, 41, &Device::Cpu).unwrap();
    let x = x.broadcast_add(&mask).unwrap();
    check(
        &[x],
        &|t| softmax_last_dim(&t[0]).unwrap(),
        &|t| softmax_last_dim_composed(&t[0]).unwrap(),
        1e-6,
    );
}
