//! Decoding products of GPT-2-small (16 rows times every weight of a layer and the
//! 50,257-way LM head): the packed f32 and bf16 panels of `rlhf_ops::packed` against the
//! unpacked product `rlhf_ops::precision::matmul` (candle's GEMM, walking the weight in
//! place). Prints one JSON line per shape: medians of the timed runs, GFLOP/s and the
//! weight bytes streamed per second.
//!
//! `cargo run --release -p rlhf-ops --example packed_decode [-- ROWS]`

use std::time::Instant;

use candle_core::{Device, Tensor};
use rlhf_ops::bf16::MatRef;
use rlhf_ops::packed::{PackedFormat, PackedMatrix};
use rlhf_ops::rng::RngStream;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The median of 15 timed runs after one warm-up, and the fastest.
fn time_min(mut f: impl FnMut()) -> (f64, f64) {
    f();
    let runs: Vec<f64> = (0..15)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .collect();
    let min = runs.iter().cloned().fold(f64::INFINITY, f64::min);
    (median(runs), min)
}

fn time(f: impl FnMut()) -> f64 {
    time_min(f).0
}

fn main() -> candle_core::Result<()> {
    let m: usize = std::env::args()
        .nth(1)
        .map_or(16, |s| s.parse().expect("ROWS is a number"));
    let mut rng = RngStream::new(1);
    // (name, k, n, weight stored transposed as (n, k) like the LM head)
    let shapes = [
        ("c_attn", 768, 2304, false),
        ("attn_c_proj", 768, 768, false),
        ("c_fc", 768, 3072, false),
        ("mlp_c_proj", 3072, 768, false),
        ("lm_head", 768, 50257, true),
    ];
    for (name, k, n, transposed) in shapes {
        let w: Vec<f32> = rng.uniform_vec(k * n);
        let a: Vec<f32> = rng.uniform_vec(m * k);
        let dev = Device::Cpu;
        let at = Tensor::from_vec(a.clone(), (m, k), &dev)?;
        let (wt, view) = match transposed {
            false => (Tensor::from_vec(w.clone(), (k, n), &dev)?, MatRef::row_major(&w, n)),
            true => (
                Tensor::from_vec(w.clone(), (n, k), &dev)?.t()?,
                MatRef::row_major(&w, k).t(),
            ),
        };
        let flops = 2.0 * (m * k * n) as f64;
        let unpacked = time(|| {
            rlhf_ops::precision::matmul(&at, &wt).expect("product");
        });
        let mut line = format!(
            "{{\"shape\": \"{name}\", \"m\": {m}, \"k\": {k}, \"n\": {n}, \"unpacked_gflops\": {:.1}",
            flops / unpacked / 1e9
        );
        for format in [PackedFormat::F32, PackedFormat::Bf16] {
            let t0 = Instant::now();
            let p = PackedMatrix::new(view, k, n, format).expect("pack");
            let pack_s = t0.elapsed().as_secs_f64();
            let mut c = vec![0f32; m * n];
            let s = time(|| p.matmul(MatRef::row_major(&a, k), m, &mut c, false).expect("product"));
            line += &format!(
                ", \"{format:?}_gflops\": {:.1}, \"{format:?}_gb_per_s\": {:.1}, \"{format:?}_pack_ms\": {:.1}",
                flops / s / 1e9,
                p.bytes() as f64 / s / 1e9,
                pack_s * 1e3
            );
        }
        println!("{line}}}");
    }
    // A decoding step's products as they run: every weight of 12 layers and the LM head
    // once, streamed from memory (far more than the caches hold).
    let layer_shapes = [(768, 2304), (768, 768), (768, 3072), (3072, 768)];
    for format in [PackedFormat::F32, PackedFormat::Bf16] {
        let mut mats = Vec::new();
        for _ in 0..12 {
            for &(k, n) in &layer_shapes {
                let w = rng.uniform_vec(k * n);
                mats.push(PackedMatrix::new(MatRef::row_major(&w, n), k, n, format).expect("pack"));
            }
        }
        let head = rng.uniform_vec(768 * 50257);
        mats.push(PackedMatrix::new(MatRef::row_major(&head, 768).t(), 768, 50257, format).expect("pack"));
        let a = rng.uniform_vec(m * 3072);
        let mut c = vec![0f32; m * 50257];
        let (s, min) = time_min(|| {
            for p in &mats {
                p.matmul(MatRef::row_major(&a[..m * p.k()], p.k()), m, &mut c[..m * p.n()], false)
                    .expect("product");
            }
        });
        let bytes: usize = mats.iter().map(PackedMatrix::bytes).sum();
        let macs: usize = mats.iter().map(|p| m * p.k() * p.n()).sum();
        println!(
            "{{\"shape\": \"step\", \"format\": \"{format:?}\", \"m\": {m}, \"ms\": {:.2}, \"min_ms\": {:.2}, \"gflops\": {:.1}, \"gb_per_s\": {:.1}}}",
            s * 1e3,
            min * 1e3,
            2.0 * macs as f64 / s / 1e9,
            bytes as f64 / s / 1e9
        );
    }
    Ok(())
}
