use super::*;
use crate::nn::{causal_padding_bias, softmax_last_dim_composed};
use crate::rng::RngStream;
use candle_core::{Device, Var};

/// The composed oracle: each sequence on its own, heads split, scores, mask, softmax,
/// dropout as a multiply by the same keep factors, product, heads merged.
fn composed(qkv: &Tensor, cfg: &PackedAttention) -> Tensor {
    let h = qkv.dim(1).unwrap() / 3;
    let (nh, d) = (cfg.n_head, h / cfg.n_head);
    let (mut outs, mut row, mut k0) = (Vec::new(), 0, 0);
    for &t in &cfg.lens {
        let x = qkv.narrow(0, row, t).unwrap();
        let heads = |i: usize| {
            x.narrow(1, i * h, h)
                .unwrap()
                .reshape((t, nh, d))
                .unwrap()
                .transpose(0, 1)
                .unwrap()
                .contiguous()
                .unwrap()
        };
        let (q, k, v) = (heads(0), heads(1), heads(2));
        let s = (q.matmul(&k.t().unwrap()).unwrap() * cfg.scale as f64).unwrap();
        let bias = causal_padding_bias(&[vec![1; t]], t, &Device::Cpu)
            .unwrap()
            .squeeze(0)
            .unwrap();
        let mut p = softmax_last_dim_composed(&s.broadcast_add(&bias).unwrap()).unwrap();
        if let Some(keep) = &cfg.keep {
            let m = Tensor::from_vec(keep[k0..k0 + nh * t * t].to_vec(), (nh, t, t), &Device::Cpu).unwrap();
            p = (p * m).unwrap();
        }
        k0 += nh * t * t;
        let o = p.matmul(&v).unwrap().transpose(0, 1).unwrap().reshape((t, h)).unwrap();
        outs.push(o);
        row += t;
    }
    Tensor::cat(&outs, 0).unwrap()
}

fn check(lens: Vec<usize>, n_head: usize, d: usize, dropout: Option<f64>) {
    let h = n_head * d;
    let n: usize = lens.iter().sum();
    let mut rng = RngStream::new(7);
    let x: Vec<f32> = (0..n * 3 * h).map(|_| (2.0 * rng.uniform_f64() - 1.0) as f32).collect();
    let keep = dropout.map(|p| {
        Arc::new(PackedAttention::dropout_keep(&lens, n_head, p, &mut |k| {
            rng.uniform_vec(k)
        }))
    });
    let cfg = PackedAttention {
        lens,
        n_head,
        scale: 1.0 / (d as f32).sqrt(),
        keep,
    };
    let w: Vec<f32> = (0..n * h).map(|_| (2.0 * rng.uniform_f64() - 1.0) as f32).collect();
    let w = Tensor::from_vec(w, (n, h), &Device::Cpu).unwrap();
    let run = |f: &dyn Fn(&Tensor) -> Tensor| {
        let v = Var::from_tensor(&Tensor::from_vec(x.clone(), (n, 3 * h), &Device::Cpu).unwrap()).unwrap();
        let y = f(v.as_tensor());
        let g = (&y * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let gx = g
            .get(v.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        (y.flatten_all().unwrap().to_vec1::<f32>().unwrap(), gx)
    };
    let fused = run(&|t| packed_causal_attention(t, cfg.clone()).unwrap());
    let oracle = run(&|t| composed(t, &cfg));
    for (name, a, b) in [("value", &fused.0, &oracle.0), ("gradient", &fused.1, &oracle.1)] {
        let scale = b.iter().fold(1e-6f32, |m, x| m.max(x.abs()));
        for (i, (x, y)) in a.iter().zip(b.iter()).enumerate() {
            // f32, sums of at most T·d products in another order.
            assert!((x - y).abs() <= 2e-5 * scale, "{name}[{i}]: fused {x} vs composed {y}");
        }
    }
}

#[test]
fn packed_attention_matches_the_composed_ops() {
    check(vec![5, 1, 9, 3], 2, 4, None);
    check(vec![17, 40], 4, 32, None);
}

#[test]
fn packed_attention_with_dropout_matches_the_composed_ops() {
    check(vec![6, 2, 11], 2, 8, Some(0.3));
    check(vec![33], 3, 20, Some(0.1));
}

#[test]
fn packed_attention_refuses_a_mismatched_input() {
    let x = Tensor::zeros((5, 12), candle_core::DType::F32, &Device::Cpu).unwrap();
    let cfg = PackedAttention {
        lens: vec![2, 2],
        n_head: 2,
        scale: 1.0,
        keep: None,
    };
    let err = packed_causal_attention(&x, cfg).unwrap_err().to_string();
    assert!(err.contains("2 sequences of 4 tokens"), "{err}");
}

#[test]
fn cached_attention_row_matches_the_f64_softmax() {
    let (d, cap) = (24, 48);
    let mut rng = RngStream::new(17);
    let mut u = |n: usize| -> Vec<f32> { rng.uniform_vec(n).into_iter().map(|x| 3.0 * x - 1.5).collect() };
    let (q, keys, v) = (u(d), u(cap * d), u(cap * d));
    // Keys in blocks of 16, component-major (cap is a multiple of 16).
    let mut kt = vec![f32::NAN; d * cap];
    for j in 0..cap {
        for c in 0..d {
            kt[(j / 16) * 16 * d + c * 16 + j % 16] = keys[j * d + c];
        }
    }
    let scale = 0.3f32;
    for len in [1usize, 2, 15, 16, 17, 40, 48] {
        let mut p = vec![0f32; cap];
        let mut out = vec![f32::NAN; d];
        // Keys past `len` in the last block are read and ignored: make them large.
        let mut kt = kt.clone();
        for j in len..len.div_ceil(16) * 16 {
            (0..d).for_each(|c| kt[(j / 16) * 16 * d + c * 16 + j % 16] = 1e30);
        }
        cached_attention_row(&q, &kt, &v[..len * d], len, scale, &mut p, &mut out);
        let s: Vec<f64> = (0..len)
            .map(|j| (0..d).map(|c| q[c] as f64 * keys[j * d + c] as f64).sum::<f64>() * scale as f64)
            .collect();
        let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
        let z: f64 = e.iter().sum();
        for c in 0..d {
            let want: f64 = (0..len).map(|j| e[j] / z * v[j * d + c] as f64).sum();
            assert!(
                (out[c] as f64 - want).abs() < 1e-5,
                "len {len} c {c}: {} vs {want}",
                out[c]
            );
        }
    }
}

#[test]
fn cached_attention_row_window_attends_to_the_last_window_positions() {
    let (d, cap) = (20, 64);
    let mut rng = RngStream::new(19);
    let mut u = |n: usize| -> Vec<f32> { rng.uniform_vec(n).into_iter().map(|x| 3.0 * x - 1.5).collect() };
    let (q, keys, v) = (u(d), u(cap * d), u(cap * d));
    let mut kt = vec![0f32; d * cap];
    for j in 0..cap {
        for c in 0..d {
            kt[(j / 16) * 16 * d + c * 16 + j % 16] = keys[j * d + c];
        }
    }
    let scale = 0.4f32;
    for (len, window) in [
        (1usize, 1usize),
        (5, 8),
        (20, 8),
        (33, 16),
        (33, 17),
        (64, 5),
        (64, 64),
        (40, 100),
    ] {
        let mut p = vec![f32::NAN; window + 32];
        let mut out = vec![f32::NAN; d];
        let range = sliding_window_keys(len, Some(window));
        let start = range.start;
        cached_attention_row_range(&q, &kt, &v, range, scale, &mut p, &mut out);
        let s: Vec<f64> = (start..len)
            .map(|j| (0..d).map(|c| q[c] as f64 * keys[j * d + c] as f64).sum::<f64>() * scale as f64)
            .collect();
        let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
        let z: f64 = e.iter().sum();
        for c in 0..d {
            let want: f64 = (start..len).map(|j| e[j - start] / z * v[j * d + c] as f64).sum();
            assert!(
                (out[c] as f64 - want).abs() < 1e-5,
                "len {len} window {window} c {c}: {} vs {want}",
                out[c]
            );
        }
        assert_eq!(sliding_window_keys(len, None), 0..len);
        // A window covering everything is the full row.
        if window >= len {
            let mut full = vec![0f32; d];
            cached_attention_row(&q, &kt, &v, len, scale, &mut p, &mut full);
            assert_eq!(full, out);
        }
    }
}
