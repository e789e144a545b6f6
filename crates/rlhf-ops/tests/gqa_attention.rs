//! Attention with grouped-query heads and a sliding window: the fused op equals the composed
//! oracle (values and gradients of q, k, v), reads strided inputs in place, agrees with
//! GPT-2's packed entry, equals a padded batch under the additive causal/padding/window
//! bias, and the composed ops' gradients equal f64 finite differences.

mod common;

use std::sync::Arc;

use candle_core::{DType, Device, Tensor, D};
use common::{close, flat, fused_equals_composed, gradients_match_finite_differences, random, value_and_grads};
use rlhf_ops::attention::{attention, attention_composed, packed_causal_attention, AttentionConfig, PackedAttention};
use rlhf_ops::nn::{causal_window_padding_bias, repeat_kv, softmax_last_dim_composed};
use rlhf_ops::rng::RngStream;

fn config(
    lens: &[usize],
    n_head: usize,
    n_kv_head: usize,
    d: usize,
    window: Option<usize>,
    dropout: Option<f64>,
) -> AttentionConfig {
    let mut rng = RngStream::new(3);
    AttentionConfig {
        lens: lens.to_vec(),
        n_head,
        n_kv_head,
        head_dim: d,
        scale: 1.0 / (d as f32).sqrt(),
        window,
        keep: dropout.map(|p| {
            Arc::new(AttentionConfig::dropout_keep(lens, n_head, p, &mut |k| {
                rng.uniform_vec(k)
            }))
        }),
        prefixes: Vec::new(),
    }
}

fn qkv(cfg: &AttentionConfig, seed: u64) -> [Tensor; 3] {
    let n: usize = cfg.lens.iter().sum();
    let d = cfg.head_dim;
    [
        random(&[n, cfg.n_head * d], 1.5, seed),
        random(&[n, cfg.n_kv_head * d], 1.5, seed + 1),
        random(&[n, cfg.n_kv_head * d], 1.5, seed + 2),
    ]
}

#[test]
fn gqa_attention_matches_the_composed_oracle() {
    // (lens, heads, kv heads, head_dim, window, dropout)
    type Case<'a> = (&'a [usize], usize, usize, usize, Option<usize>, Option<f64>);
    let cases: &[Case] = &[
        (&[5, 1, 9, 3], 4, 2, 8, None, None),
        (&[17, 40], 6, 2, 24, Some(5), None),
        (&[12], 4, 1, 16, Some(1), None),
        (&[6, 11], 3, 3, 20, Some(4), Some(0.2)),
        (&[9, 14], 4, 2, 16, Some(8), Some(0.1)),
        (&[33], 2, 1, 64, Some(40), None),
    ];
    for &(lens, nh, nkv, d, window, dropout) in cases {
        let cfg = config(lens, nh, nkv, d, window, dropout);
        fused_equals_composed(
            &qkv(&cfg, 10),
            &|t| attention(&t[0], &t[1], &t[2], &cfg).unwrap(),
            &|t| attention_composed(&t[0], &t[1], &t[2], &cfg).unwrap(),
            // f32, sums of at most T·d products in another order.
            2e-5,
        );
    }
}

#[test]
fn a_window_as_long_as_the_sequence_is_full_causal_attention() {
    let full = config(&[7, 12], 4, 2, 8, None, None);
    let wide = config(&[7, 12], 4, 2, 8, Some(12), None);
    let [q, k, v] = qkv(&full, 20);
    let a = flat(&attention(&q, &k, &v, &full).unwrap());
    let b = flat(&attention(&q, &k, &v, &wide).unwrap());
    assert_eq!(a, b);
    let narrow = config(&[7, 12], 4, 2, 8, Some(11), None);
    assert_ne!(a, flat(&attention(&q, &k, &v, &narrow).unwrap()));
}

#[test]
fn strided_inputs_are_read_in_place_and_get_their_gradients() {
    // q, k, v as narrows of one (N, (n_head + 2 n_kv_head) d) projection (llm.c's layout).
    let cfg = config(&[8, 5], 4, 2, 8, Some(3), None);
    let (wq, wkv) = (32, 16);
    let fused = random(&[13, wq + 2 * wkv], 1.5, 30);
    let split = |t: &Tensor| {
        [
            t.narrow(1, 0, wq).unwrap(),
            t.narrow(1, wq, wkv).unwrap(),
            t.narrow(1, wq + wkv, wkv).unwrap(),
        ]
    };
    let (a, ga) = value_and_grads(std::slice::from_ref(&fused), &|t| {
        let [q, k, v] = split(&t[0]);
        attention(&q, &k, &v, &cfg).unwrap()
    });
    let (b, gb) = value_and_grads(std::slice::from_ref(&fused), &|t| {
        let [q, k, v] = split(&t[0]);
        attention_composed(&q, &k, &v, &cfg).unwrap()
    });
    close("value", &a, &b, 2e-5);
    close("gradient", &ga[0], &gb[0], 2e-5);
}

#[test]
fn gpt2_packed_entry_equals_the_general_op_on_its_thirds() {
    let (lens, nh, d) = (vec![6usize, 2, 11], 2, 8);
    let h = nh * d;
    let mut rng = RngStream::new(7);
    let keep = Arc::new(PackedAttention::dropout_keep(&lens, nh, 0.3, &mut |k| {
        rng.uniform_vec(k)
    }));
    let packed = PackedAttention {
        lens: lens.clone(),
        n_head: nh,
        scale: 0.3,
        keep: Some(keep.clone()),
    };
    let general = AttentionConfig {
        lens,
        n_head: nh,
        n_kv_head: nh,
        head_dim: d,
        scale: 0.3,
        window: None,
        keep: Some(keep),
        prefixes: Vec::new(),
    };
    let x = random(&[19, 3 * h], 1.5, 40);
    let (a, ga) = value_and_grads(std::slice::from_ref(&x), &|t| {
        packed_causal_attention(&t[0], packed.clone()).unwrap()
    });
    let (b, gb) = value_and_grads(std::slice::from_ref(&x), &|t| {
        let p = |i: usize| t[0].narrow(1, i * h, h).unwrap();
        attention(&p(0), &p(1), &p(2), &general).unwrap()
    });
    // The same kernels in the same order.
    assert_eq!(a, b);
    assert_eq!(ga, gb);
}

#[test]
fn composed_gqa_attention_gradients_equal_finite_differences() {
    for window in [None, Some(2)] {
        let cfg = config(&[4, 5], 4, 2, 3, window, Some(0.25));
        gradients_match_finite_differences(
            &qkv(&cfg, 50),
            &|t| attention_composed(&t[0], &t[1], &t[2], &cfg).unwrap(),
            30,
            1e-6,
        );
    }
}

/// The padded-batch composed attention a model builds from the public pieces: heads split,
/// `repeat_kv`, scores, [`causal_window_padding_bias`], softmax, product, heads merged.
fn padded_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &[Vec<u32>],
    nh: usize,
    nkv: usize,
    window: Option<usize>,
) -> Tensor {
    let (b, t, _) = q.dims3().unwrap();
    let d = q.dim(D::Minus1).unwrap() / nh;
    let heads = |x: &Tensor, h: usize| {
        x.reshape((b, t, h, d))
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .contiguous()
            .unwrap()
    };
    let qh = heads(q, nh);
    let kh = repeat_kv(&heads(k, nkv), nh / nkv).unwrap();
    let vh = repeat_kv(&heads(v, nkv), nh / nkv).unwrap();
    let s = (qh.matmul(&kh.transpose(2, 3).unwrap()).unwrap() / (d as f64).sqrt()).unwrap();
    let bias = causal_window_padding_bias(mask, t, window, &Device::Cpu)
        .unwrap()
        .to_dtype(q.dtype())
        .unwrap();
    let p = softmax_last_dim_composed(&s.broadcast_add(&bias).unwrap()).unwrap();
    p.matmul(&vh)
        .unwrap()
        .transpose(1, 2)
        .unwrap()
        .reshape((b, t, nh * d))
        .unwrap()
}

#[test]
fn a_left_padded_batch_equals_packed_sequences_on_real_tokens() {
    let (nh, nkv, d, t) = (4, 2, 8, 9);
    let lens = [9usize, 4, 6];
    let mask: Vec<Vec<u32>> = lens
        .iter()
        .map(|&l| (0..t).map(|j| u32::from(j >= t - l)).collect())
        .collect();
    for window in [None, Some(3)] {
        let cfg = config(&lens, nh, nkv, d, window, None);
        let [q, k, v] = qkv(&cfg, 60);
        let packed = attention(&q, &k, &v, &cfg).unwrap();
        // The same tokens left-padded into (B, T, ·); pads get random values.
        let pad = |x: &Tensor, seed: u64| {
            let w = x.dim(1).unwrap();
            let (mut rows, mut r0) = (Vec::new(), 0);
            for (i, &l) in lens.iter().enumerate() {
                let fill = random(&[t - l, w], 1.0, seed + i as u64);
                rows.push(Tensor::cat(&[&fill, &x.narrow(0, r0, l).unwrap()], 0).unwrap());
                r0 += l;
            }
            Tensor::stack(&rows, 0).unwrap()
        };
        let out = padded_attention(&pad(&q, 70), &pad(&k, 80), &pad(&v, 90), &mask, nh, nkv, window);
        let mut r0 = 0;
        for (i, &l) in lens.iter().enumerate() {
            let real = out.get(i).unwrap().narrow(0, t - l, l).unwrap();
            close(
                &format!("row {i} window {window:?}"),
                &flat(&real),
                &flat(&packed.narrow(0, r0, l).unwrap()),
                2e-5,
            );
            r0 += l;
        }
        assert!(flat(&out).iter().all(|x| x.is_finite()));
    }
}

#[test]
fn padded_gqa_attention_with_a_window_has_finite_difference_gradients() {
    let (nh, nkv, d, t) = (2, 1, 3, 5);
    // A fully padded row too: its queries see only themselves, nothing is NaN.
    let mask = vec![vec![0, 0, 1, 1, 1], vec![1, 1, 1, 1, 1], vec![0, 0, 0, 0, 0]];
    let inputs = [
        random(&[3, t, nh * d], 1.5, 100),
        random(&[3, t, nkv * d], 1.5, 101),
        random(&[3, t, nkv * d], 1.5, 102),
    ];
    gradients_match_finite_differences(
        &inputs,
        &|x| padded_attention(&x[0], &x[1], &x[2], &mask, nh, nkv, Some(2)),
        40,
        1e-6,
    );
}

#[test]
fn window_bias_keeps_the_w_most_recent_keys_including_itself() {
    // transformers: kv_idx > q_idx − W. W = 2: query 3 sees keys 2 and 3 (candle's rule
    // `j + W < i` would also let it see key 1).
    let bias = causal_window_padding_bias(&[vec![1; 5]], 5, Some(2), &Device::Cpu).unwrap();
    let allowed: Vec<bool> = flat(&bias).iter().map(|x| *x == 0.0).collect();
    #[rustfmt::skip]
    let want = [
        true,  false, false, false, false,
        true,  true,  false, false, false,
        false, true,  true,  false, false,
        false, false, true,  true,  false,
        false, false, false, true,  true,
    ];
    assert_eq!(allowed, want);
    // With a cached past: 2 new queries at absolute 3 and 4 of 5 keys, left padding at 0.
    let bias = causal_window_padding_bias(&[vec![0, 1, 1, 1, 1]], 2, Some(3), &Device::Cpu).unwrap();
    let allowed: Vec<bool> = flat(&bias).iter().map(|x| *x == 0.0).collect();
    assert_eq!(
        allowed,
        [false, true, true, true, false, false, false, true, true, true]
    );
    // Masked entries are finite.
    assert!(flat(&bias).iter().all(|x| x.is_finite()));
}

#[test]
fn attention_in_bf16_runs_the_composed_path() {
    let cfg = config(&[7, 5], 4, 2, 16, Some(4), None);
    let [q, k, v] = qkv(&cfg, 110);
    let bf = |x: &Tensor| x.to_dtype(DType::BF16).unwrap();
    let y = attention(&bf(&q), &bf(&k), &bf(&v), &cfg).unwrap();
    assert_eq!(y.dtype(), DType::BF16);
    let want = attention(&q, &k, &v, &cfg).unwrap();
    close("bf16", &flat(&y), &flat(&want), 3e-2);
}

#[test]
fn bad_attention_shapes_are_errors() {
    let cfg = config(&[3, 2], 4, 3, 8, None, None);
    let [q, k, v] = qkv(&config(&[3, 2], 4, 1, 8, None, None), 1);
    let err = attention(&q, &k, &v, &cfg).unwrap_err().to_string();
    assert!(err.contains("multiple of n_kv_head"), "{err}");
    let cfg = config(&[3, 3], 4, 1, 8, None, None);
    let err = attention(&q, &k, &v, &cfg).unwrap_err().to_string();
    assert!(err.contains("6 tokens"), "{err}");
    let cfg = config(&[3, 2], 4, 1, 8, Some(0), None);
    assert!(attention(&q, &k, &v, &cfg)
        .unwrap_err()
        .to_string()
        .contains("window of 0"));
    assert!(attention_composed(&q, &k, &v, &config(&[3, 3], 4, 1, 8, None, None)).is_err());
}
