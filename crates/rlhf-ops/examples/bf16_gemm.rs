//! GFLOP/s of candle's f32 matmul against `rlhf_ops::bf16::matmul` (f32 in, bf16-rounded
//! operands, f32 accumulation) on the products of a GPT-2-small layer (1000 tokens), their
//! backward products, and a 50,257-way LM head on 128 rows, with the operand views training
//! uses (transposed views read in place). Prints one JSON line per shape: medians over
//! alternating runs.
//!
//! `cargo run --release -p rlhf-ops --example bf16_gemm [-- FILTER [SECONDS]]`

use std::time::Instant;

use candle_core::{Device, Tensor};
use rlhf_ops::bf16;
use rlhf_ops::rng::RngStream;

/// A product `A (m×k) · B (k×n)`; a transposed operand is stored as its transpose,
/// row-major, and used as the view `.t()`.
struct Case {
    name: &'static str,
    m: usize,
    k: usize,
    n: usize,
    a_t: bool,
    b_t: bool,
}

const fn case(name: &'static str, m: usize, k: usize, n: usize, a_t: bool, b_t: bool) -> Case {
    Case {
        name,
        m,
        k,
        n,
        a_t,
        b_t,
    }
}

/// The layer products as `y = x·W` with `W: (k, n)` row-major: `∂x = g·Wᵀ` (B a view),
/// `∂W = xᵀ·g` (A a view, `k` = the 1000 rows).
const CASES: &[Case] = &[
    case("square", 1024, 1024, 1024, false, false),
    case("tall", 4096, 768, 768, false, false),
    case("qkv", 1000, 768, 2304, false, false),
    case("qkv dx", 1000, 2304, 768, false, true),
    case("qkv dw", 768, 1000, 2304, true, false),
    case("attn-proj", 1000, 768, 768, false, false),
    case("attn-proj dx", 1000, 768, 768, false, true),
    case("attn-proj dw", 768, 1000, 768, true, false),
    case("mlp-up", 1000, 768, 3072, false, false),
    case("mlp-up dx", 1000, 3072, 768, false, true),
    case("mlp-up dw", 768, 1000, 3072, true, false),
    case("mlp-down", 1000, 3072, 768, false, false),
    case("mlp-down dx", 1000, 768, 3072, false, true),
    case("mlp-down dw", 3072, 1000, 768, true, false),
    // LM head, W: (50257, 128) row-major: logits = h·Wᵀ, ∂h = g·W, ∂W = gᵀ·h.
    case("lm-head logits", 128, 128, 50257, false, true),
    case("lm-head dh", 128, 50257, 128, false, false),
    case("lm-head dw", 50257, 128, 128, true, false),
];

fn operand(rows: usize, cols: usize, transposed: bool, rng: &mut RngStream) -> candle_core::Result<Tensor> {
    let v: Vec<f32> = (0..rows * cols).map(|_| 2.0 * rng.uniform_f32() - 1.0).collect();
    match transposed {
        false => Tensor::from_vec(v, (rows, cols), &Device::Cpu),
        true => Tensor::from_vec(v, (cols, rows), &Device::Cpu)?.t(),
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> candle_core::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let filter = args.get(1).cloned().unwrap_or_default();
    let budget: f64 = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(3.0);
    let mut rng = RngStream::new(0);
    for c in CASES.iter().filter(|c| c.name.contains(filter.as_str())) {
        let a = operand(c.m, c.k, c.a_t, &mut rng)?;
        let b = operand(c.k, c.n, c.b_t, &mut rng)?;
        let time = |f: &dyn Fn() -> candle_core::Result<Tensor>| -> candle_core::Result<f64> {
            let t0 = Instant::now();
            f()?;
            Ok(t0.elapsed().as_secs_f64())
        };
        let f32_run = || a.matmul(&b);
        let bf16_run = || bf16::matmul(&a, &b);
        for _ in 0..2 {
            time(&f32_run)?;
            time(&bf16_run)?;
        }
        let (mut t32, mut t16) = (Vec::new(), Vec::new());
        let start = Instant::now();
        while t32.len() < 5 || (start.elapsed().as_secs_f64() < budget && t32.len() < 200) {
            t32.push(time(&f32_run)?);
            t16.push(time(&bf16_run)?);
        }
        let flop = 2.0 * (c.m * c.k * c.n) as f64;
        let (g32, g16) = (flop / median(t32.clone()) / 1e9, flop / median(t16.clone()) / 1e9);
        println!(
            "{{\"case\": \"{}\", \"shape\": \"{}x{}x{}\", \"a_view\": \"{}\", \"b_view\": \"{}\", \"runs\": {}, \
             \"f32_candle_gflops\": {:.1}, \"bf16_gflops\": {:.1}, \"ratio\": {:.2}, \"bf16_dot\": {}}}",
            c.name,
            c.m,
            c.k,
            c.n,
            if c.a_t { "transposed" } else { "row-major" },
            if c.b_t { "transposed" } else { "row-major" },
            t32.len(),
            g32,
            g16,
            g16 / g32,
            bf16::has_bf16_dot(),
        );
    }
    Ok(())
}
