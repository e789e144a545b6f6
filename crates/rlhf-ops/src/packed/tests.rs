use super::*;
use crate::bf16::{bf16_round, to_bf16_bits};
use crate::rng::RngStream;

fn random(len: usize, seed: u64) -> Vec<f32> {
    let mut rng = RngStream::new(seed);
    rng.uniform_vec(len).into_iter().map(|u| 2.0 * u - 1.0).collect()
}

/// `Σ_t A[i][t]·B[t][j]` and `Σ|…|` in f64, operands rounded to bf16 when `bf16`.
fn reference(m: usize, k: usize, n: usize, a: &[f32], b: MatRef, bf16: bool) -> (Vec<f64>, Vec<f64>) {
    let r = |x: f32| if bf16 { bf16_round(x) as f64 } else { x as f64 };
    let (mut c, mut s) = (vec![0f64; m * n], vec![0f64; m * n]);
    for i in 0..m {
        for j in 0..n {
            for t in 0..k {
                let p = r(a[i * k + t]) * r(b.data[t * b.row_stride + j * b.col_stride]);
                c[i * n + j] += p;
                s[i * n + j] += p.abs();
            }
        }
    }
    (c, s)
}

fn assert_close(what: &str, got: &[f32], want: &[f64], scale: &[f64], tol: f64) {
    for (idx, ((&g, &w), &s)) in got.iter().zip(want).zip(scale).enumerate() {
        assert!(
            (g as f64 - w).abs() <= tol * s.max(1e-30),
            "{what}: element {idx}: {g} vs {w} (Σ|p| {s})"
        );
    }
}

const FORMATS: [PackedFormat; 2] = [PackedFormat::F32, PackedFormat::Bf16];

#[test]
fn products_match_the_f64_sum_for_every_shape_and_layout() {
    // Shapes straddle the tile (14 rows), the panel (32 columns) and the k block (128 steps
    // = 256 k in bf16), odd k included.
    for &(m, k, n) in &[
        (1, 1, 1),
        (2, 3, 5),
        (16, 64, 96),
        (15, 129, 33),
        (29, 257, 31),
        (16, 300, 70),
        (40, 17, 65),
    ] {
        let a = random(m * k, 1 + m as u64);
        let b = random(k * n, 2 + k as u64);
        for transposed in [false, true] {
            // B row-major (k, n), or the transpose of a row-major (n, k).
            let stored: Vec<f32> = match transposed {
                false => b.clone(),
                true => (0..n)
                    .flat_map(|j| (0..k).map(|t| b[t * n + j]).collect::<Vec<_>>())
                    .collect(),
            };
            let view = match transposed {
                false => MatRef::row_major(&stored, n),
                true => MatRef::row_major(&stored, k).t(),
            };
            for format in FORMATS {
                let p = PackedMatrix::new(view, k, n, format).unwrap();
                let mut c = vec![f32::NAN; m * n];
                p.matmul(MatRef::row_major(&a, k), m, &mut c, false).unwrap();
                let (want, scale) = reference(m, k, n, &a, MatRef::row_major(&b, n), format == PackedFormat::Bf16);
                assert_close(
                    &format!("{format:?} {m}x{k}x{n} t={transposed}"),
                    &c,
                    &want,
                    &scale,
                    1e-5,
                );
            }
        }
    }
}

#[test]
fn accumulating_adds_to_c_and_strided_a_is_read_in_place() {
    let (m, k, n) = (5, 40, 50);
    let a = random(m * k, 7);
    // A stored transposed: (k, m) row-major, read as an (m, k) view.
    let at: Vec<f32> = (0..k)
        .flat_map(|t| (0..m).map(|i| a[i * k + t]).collect::<Vec<_>>())
        .collect();
    let b = random(k * n, 8);
    let bias = random(m * n, 9);
    for format in FORMATS {
        let p = PackedMatrix::new(MatRef::row_major(&b, n), k, n, format).unwrap();
        let mut plain = vec![0f32; m * n];
        p.matmul(MatRef::row_major(&a, k), m, &mut plain, false).unwrap();
        let mut acc = bias.clone();
        p.matmul(MatRef::row_major(&at, m).t(), m, &mut acc, true).unwrap();
        for ((&x, &y), &z) in acc.iter().zip(&plain).zip(&bias) {
            assert_eq!(x, z + y, "{format:?}");
        }
    }
}

#[test]
fn the_kernels_equal_the_portable_loop() {
    let (m, k, n) = (16, 300, 100);
    let a = random(m * k, 11);
    let b = random(k * n, 12);
    for format in FORMATS {
        let p = PackedMatrix::new(MatRef::row_major(&b, n), k, n, format).unwrap();
        let portable = match format {
            PackedFormat::F32 => Kernel::PortableF32,
            PackedFormat::Bf16 => Kernel::PortableBf16,
        };
        let (mut fast, mut slow) = (vec![0f32; m * n], vec![0f32; m * n]);
        p.matmul(MatRef::row_major(&a, k), m, &mut fast, false).unwrap();
        p.matmul_with(portable, MatRef::row_major(&a, k), m, &mut slow, false)
            .unwrap();
        // The same steps in the same order: equal up to how the hardware rounds the two
        // additions of a bf16 pair.
        for (x, y) in fast.iter().zip(&slow) {
            assert!((x - y).abs() <= 1e-6 * (1.0 + x.abs()), "{format:?}: {x} vs {y}");
        }
    }
}

#[test]
fn threads_do_not_change_the_product() {
    let (m, k, n) = (16, 768, 2304);
    let a = random(m * k, 21);
    let b = random(k * n, 22);
    for format in FORMATS {
        let p = PackedMatrix::new(MatRef::row_major(&b, n), k, n, format).unwrap();
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            let mut c = vec![0f32; m * n];
            pool.install(|| p.matmul(MatRef::row_major(&a, k), m, &mut c, false).unwrap());
            c
        };
        assert_eq!(run(1), run(3), "{format:?}");
    }
}

#[test]
fn bad_shapes_are_errors() {
    let b = vec![0f32; 12];
    assert!(PackedMatrix::new(MatRef::row_major(&b, 4), 4, 4, PackedFormat::F32).is_err());
    let p = PackedMatrix::new(MatRef::row_major(&b, 4), 3, 4, PackedFormat::Bf16).unwrap();
    let a = vec![0f32; 6];
    let mut c = vec![0f32; 8];
    assert!(p.matmul(MatRef::row_major(&a, 3), 3, &mut c, false).is_err());
    assert!(p.matmul(MatRef::row_major(&a, 3), 2, &mut c[..7], false).is_err());
    p.matmul(MatRef::row_major(&a, 3), 2, &mut c, false).unwrap();
    assert_eq!(p.bytes(), 2 * 32 * 4);
}

#[test]
fn branchless_rounding_equals_to_bf16_bits() {
    let mut specials = vec![
        0.0f32,
        -0.0,
        1.0,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        -f32::NAN,
        f32::from_bits(0x7F80_0001),
        f32::from_bits(0xFFC1_2345),
        f32::MAX,
        f32::MIN_POSITIVE,
        f32::from_bits(1),
        f32::from_bits(0x3F80_8000), // a tie, even kept part: stays
        f32::from_bits(0x3F81_8000), // a tie, odd kept part: rounds up
        f32::from_bits(0x7F7F_FFFF),
    ];
    specials.extend(random(1000, 5).into_iter().map(|x| x * 1e3));
    for x in specials {
        assert_eq!(bf16_bits(x), u32::from(to_bf16_bits(x)), "{x} ({:#x})", x.to_bits());
    }
}

/// The AVX2 tile (used where AVX-512 is missing) against the portable loop, bit for bit:
/// every row count of a tile (1 to 6) and splits into several tiles, a ragged last panel
/// narrower and wider than one 16-column half, several `k` blocks, and accumulation into C.
#[cfg(target_arch = "x86_64")]
#[test]
fn the_avx2_tile_equals_the_portable_loop_bit_for_bit() {
    if !(std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")) {
        eprintln!("SKIPPED: this CPU has no AVX2 + FMA");
        return;
    }
    for n in [100, 120] {
        avx2_against_portable(300, n);
    }
}

#[cfg(target_arch = "x86_64")]
fn avx2_against_portable(k: usize, n: usize) {
    let b = random(k * n, 21);
    let p = PackedMatrix::new(MatRef::row_major(&b, n), k, n, PackedFormat::F32).unwrap();
    for m in [1, 2, 3, 4, 5, 6, 7, 13, 14, 15, 16, 29] {
        let a = random(m * k, 22 + m as u64);
        for accumulate in [false, true] {
            let start = random(m * n, 5);
            let (mut fast, mut slow) = (start.clone(), start);
            p.matmul_with(Kernel::Avx2FmaF32, MatRef::row_major(&a, k), m, &mut fast, accumulate)
                .unwrap();
            p.matmul_with(Kernel::PortableF32, MatRef::row_major(&a, k), m, &mut slow, accumulate)
                .unwrap();
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&fast), bits(&slow), "m {m}, n {n}, accumulate {accumulate}");
        }
    }
}
