//! RMSNorm, `silu(gate)·up` and RoPE application: each fused kernel equals its composed
//! oracle (values and gradients, f32), the composed ops' gradients equal f64 finite
//! differences, bf16 runs the composed path, and the slice kernels of the decoder equal the
//! tensor ops.

mod common;

use candle_core::{DType, Device, Tensor, D};
use common::{close, flat, fused_equals_composed, gradients_match_finite_differences, random};
use rlhf_ops::kernels;
use rlhf_ops::nn::{rms_norm, rms_norm_composed, silu_mul, silu_mul_composed};
use rlhf_ops::rope::{apply_rope, apply_rope_composed, RopeConfig, RopeScaling};

/// cos/sin tables `(N, d)` of per-token positions under llama3 scaling (all three bands).
fn llama3_tables(positions: &[u32], d: usize) -> (Tensor, Tensor) {
    let cfg = RopeConfig {
        head_dim: d,
        rope_theta: 500_000.0,
        max_position_embeddings: 256,
        scaling: RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 64,
        },
    };
    cfg.frequencies().unwrap().cos_sin(positions, &Device::Cpu).unwrap()
}

#[test]
fn rms_norm_kernel_matches_the_composed_oracle() {
    for (rows, h) in [(37, 128), (5, 19), (2, 896), (6, 24)] {
        let inputs = [random(&[rows, h], 3.0, 1), (random(&[h], 0.5, 2) + 1.0).unwrap()];
        fused_equals_composed(
            &inputs,
            &|t| kernels::rms_norm(&t[0], &t[1], 1e-6).unwrap(),
            &|t| rms_norm_composed(&t[0], &t[1], 1e-6).unwrap(),
            2e-6,
        );
    }
}

#[test]
fn rms_norm_follows_transformers_order_by_hand() {
    // One row: mean(x²) = (1 + 4 + 9 + 16) / 4 = 7.5; y = w · x / sqrt(7.5 + eps).
    let x = Tensor::new(&[[1f32, -2., 3., 4.]], &Device::Cpu).unwrap();
    let w = Tensor::new(&[1f32, 0.5, 2., -1.], &Device::Cpu).unwrap();
    let y = flat(&rms_norm(&x, &w, 1e-5).unwrap());
    let r = 1.0 / (7.5f64 + 1e-5).sqrt();
    close("y", &y, &[r, -r, 6.0 * r, -4.0 * r], 1e-6);
}

#[test]
fn rms_norm_per_head_is_a_reshape() {
    // Qwen3's q_norm: (N, heads·hd) normalised per head over hd with one (hd) weight.
    let (n, heads, hd) = (5, 3, 24);
    let x = random(&[n, heads * hd], 2.0, 3);
    let w = (random(&[hd], 0.3, 4) + 1.0).unwrap();
    let y = rms_norm(&x.reshape((n, heads, hd)).unwrap(), &w, 1e-6)
        .unwrap()
        .reshape((n, heads * hd))
        .unwrap();
    for h in 0..heads {
        let xh = x.narrow(1, h * hd, hd).unwrap();
        let want = rms_norm_composed(&xh, &w, 1e-6).unwrap();
        close("head", &flat(&y.narrow(1, h * hd, hd).unwrap()), &flat(&want), 2e-6);
    }
}

#[test]
fn rms_norm_gradients_equal_finite_differences() {
    let inputs = [random(&[4, 9], 2.0, 5), (random(&[9], 0.5, 6) + 1.0).unwrap()];
    gradients_match_finite_differences(&inputs, &|t| rms_norm(&t[0], &t[1], 1e-6).unwrap(), 40, 1e-6);
}

#[test]
fn rms_norm_in_bf16_normalises_in_f32_and_casts_back_before_the_weight() {
    let x = random(&[3, 64], 4.0, 7).to_dtype(DType::BF16).unwrap();
    let w = (random(&[64], 0.5, 8) + 1.0).unwrap().to_dtype(DType::BF16).unwrap();
    let y = rms_norm(&x, &w, 1e-6).unwrap();
    assert_eq!(y.dtype(), DType::BF16);
    // The same order by hand: f32 normalisation, rounded to bf16, times the bf16 weight.
    let xf = x.to_dtype(DType::F32).unwrap();
    let ms = xf.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
    let xn = xf.broadcast_div(&(ms + 1e-6).unwrap().sqrt().unwrap()).unwrap();
    let want = xn.to_dtype(DType::BF16).unwrap().broadcast_mul(&w).unwrap();
    close("bf16", &flat(&y), &flat(&want), 8e-3);
}

#[test]
fn silu_mul_kernel_matches_the_composed_oracle() {
    for shape in [vec![7, 333], vec![2, 3, 64], vec![1]] {
        let inputs = [random(&shape, 12.0, 9), random(&shape, 2.0, 10)];
        fused_equals_composed(
            &inputs,
            &|t| kernels::silu_mul(&t[0], &t[1]).unwrap(),
            &|t| silu_mul_composed(&t[0], &t[1]).unwrap(),
            2e-6,
        );
    }
}

#[test]
fn silu_mul_survives_extreme_gates() {
    let g = Tensor::new(&[-1000f32, -90., 0., 90., 1000.], &Device::Cpu).unwrap();
    let u = Tensor::new(&[2f32, 2., 2., 2., 2.], &Device::Cpu).unwrap();
    let y = flat(&silu_mul(&g, &u).unwrap());
    close("silu", &y, &[0.0, 0.0, 0.0, 180.0, 2000.0], 1e-6);
}

#[test]
fn silu_mul_gradients_equal_finite_differences() {
    let inputs = [random(&[3, 11], 5.0, 11), random(&[3, 11], 2.0, 12)];
    gradients_match_finite_differences(&inputs, &|t| silu_mul(&t[0], &t[1]).unwrap(), 33, 1e-6);
}

#[test]
fn silu_mul_in_bf16_runs_the_composed_path() {
    let g = random(&[4, 40], 6.0, 13).to_dtype(DType::BF16).unwrap();
    let u = random(&[4, 40], 2.0, 14).to_dtype(DType::BF16).unwrap();
    let y = silu_mul(&g, &u).unwrap();
    assert_eq!(y.dtype(), DType::BF16);
    close("bf16", &flat(&y), &flat(&silu_mul_composed(&g, &u).unwrap()), 0.0);
}

#[test]
fn rope_kernel_matches_the_composed_oracle_including_table_gradients() {
    // (tokens, heads, head_dim): GQA k (2 heads), Qwen3's head_dim 24, one token.
    for (n, heads, d) in [(9, 4, 16), (7, 2, 24), (1, 3, 64)] {
        let positions: Vec<u32> = (0..n as u32).map(|i| (i * 37) % 300).collect();
        let (cos, sin) = llama3_tables(&positions, d);
        let x = random(&[n, heads * d], 2.0, 15);
        // Bit-for-bit: the kernel does the composed products and sums in the same order.
        fused_equals_composed(
            &[x.clone(), cos.clone(), sin.clone()],
            &|t| kernels::apply_rope(&t[0], &t[1], &t[2]).unwrap(),
            &|t| apply_rope_composed(&t[0], &t[1], &t[2]).unwrap(),
            1e-6,
        );
        let fused = flat(&kernels::apply_rope(&x, &cos, &sin).unwrap());
        let composed = flat(&apply_rope_composed(&x, &cos, &sin).unwrap());
        assert_eq!(fused, composed);
    }
}

#[test]
fn rope_accepts_batched_rows_and_rotates_pairs_by_their_angle() {
    // (B, T, heads·d) with per-row positions: every (j, j + d/2) pair turns by pos · inv_freq_j.
    let (b, t, heads, d) = (2, 3, 2, 8);
    let positions = [0u32, 1, 2, 5, 6, 7];
    let (cos, sin) = llama3_tables(&positions, d);
    let x = random(&[b, t, heads * d], 1.0, 16);
    let y = apply_rope(&x, &cos, &sin).unwrap();
    assert_eq!(y.dims(), &[b, t, heads * d]);
    let (xv, yv, cv, sv) = (flat(&x), flat(&y), flat(&cos), flat(&sin));
    for r in 0..b * t {
        for h in 0..heads {
            for j in 0..d / 2 {
                let (a, bb) = (xv[r * heads * d + h * d + j], xv[r * heads * d + h * d + j + d / 2]);
                let (c, s) = (cv[r * d + j], sv[r * d + j]);
                let want = [a * c - bb * s, bb * c + a * s];
                let got = [yv[r * heads * d + h * d + j], yv[r * heads * d + h * d + j + d / 2]];
                close("pair", &got, &want, 1e-6);
            }
        }
    }
}

#[test]
fn rope_gradients_equal_finite_differences_with_llama3_tables() {
    let positions = [0u32, 3, 17, 100, 255];
    let (cos, sin) = llama3_tables(&positions, 16);
    let inputs = [random(&[5, 2 * 16], 2.0, 17), cos, sin];
    gradients_match_finite_differences(&inputs, &|t| apply_rope(&t[0], &t[1], &t[2]).unwrap(), 60, 1e-6);
}

#[test]
fn rope_in_bf16_runs_the_composed_path_with_tables_cast_to_bf16() {
    let positions: Vec<u32> = (0..6).collect();
    let (cos, sin) = llama3_tables(&positions, 16);
    let x = random(&[6, 64], 2.0, 18).to_dtype(DType::BF16).unwrap();
    let y = apply_rope(&x, &cos, &sin).unwrap();
    assert_eq!(y.dtype(), DType::BF16);
    let want = apply_rope_composed(&x.to_dtype(DType::F32).unwrap(), &cos, &sin).unwrap();
    close("bf16", &flat(&y), &flat(&want), 2e-2);
}

#[test]
fn rope_refuses_tables_that_do_not_fit() {
    let x = random(&[4, 32], 1.0, 19);
    let (cos, sin) = llama3_tables(&[0, 1, 2], 16);
    let err = apply_rope(&x, &cos, &sin).unwrap_err().to_string();
    assert!(err.contains("apply_rope") && err.contains("[4, 32]"), "{err}");
    let (cos, sin) = llama3_tables(&[0, 1, 2, 3], 16);
    assert!(apply_rope(&random(&[4, 24], 1.0, 20), &cos, &sin).is_err());
}

#[test]
fn decoder_row_kernels_equal_the_tensor_ops() {
    let (heads, d, h) = (3, 16, 40);
    let positions = [41u32];
    let (cos, sin) = llama3_tables(&positions, d);
    let (c, s) = (flat(&cos), flat(&sin));
    let (cf, sf): (Vec<f32>, Vec<f32>) = (
        c.iter().map(|&v| v as f32).collect(),
        s.iter().map(|&v| v as f32).collect(),
    );
    let x = random(&[1, heads * d], 2.0, 21);
    let xv: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
    let mut y = vec![0f32; xv.len()];
    kernels::rope_row(&xv, &cf, &sf, &mut y);
    let want = flat(&apply_rope(&x, &cos, &sin).unwrap());
    close("rope_row", &y.iter().map(|&v| v as f64).collect::<Vec<_>>(), &want, 0.0);
    let mut z = xv.clone();
    kernels::rope_row_in_place(&mut z, &cf, &sf);
    assert_eq!(y, z);

    let xn = random(&[2, h], 3.0, 22);
    let w = (random(&[h], 0.5, 23) + 1.0).unwrap();
    let (xs, ws): (Vec<f32>, Vec<f32>) = (xn.flatten_all().unwrap().to_vec1().unwrap(), w.to_vec1().unwrap());
    let mut out = vec![0f32; 2 * h];
    kernels::rms_fwd_rows(&xs, &ws, 1e-5, &mut out);
    let want = flat(&rms_norm(&xn, &w, 1e-5).unwrap());
    close(
        "rms_fwd_rows",
        &out.iter().map(|&v| v as f64).collect::<Vec<_>>(),
        &want,
        0.0,
    );

    let (g, u) = (random(&[h], 8.0, 24), random(&[h], 2.0, 25));
    let (gs, us): (Vec<f32>, Vec<f32>) = (g.to_vec1().unwrap(), u.to_vec1().unwrap());
    let mut out = vec![0f32; h];
    kernels::silu_mul_row(&gs, &us, &mut out);
    let want = flat(&silu_mul(&g, &u).unwrap());
    close(
        "silu_mul_row",
        &out.iter().map(|&v| v as f64).collect::<Vec<_>>(),
        &want,
        0.0,
    );
}
