use candle_core::{Device, Tensor};

use super::*;

fn ones(dims: &[usize]) -> Tensor {
    Tensor::ones(dims, candle_core::DType::F32, &Device::Cpu).unwrap()
}

fn flat(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

/// Sequences of 3 and 5 tokens, ids 11 and 4, with 6 features.
const LENS: [usize; 2] = [3, 5];
const IDS: [u64; 2] = [11, 4];
const F: usize = 6;

#[test]
fn packed_left_and_right_padded_passes_drop_the_same_units() {
    let mut packed = DropoutKeys::new(7, IDS.to_vec());
    packed.set_packed(&LENS).unwrap();
    let want = flat(&packed.tokens(&ones(&[8, F]), 0.3).unwrap());
    for left in [false, true] {
        let t = 6;
        let mask: Vec<Vec<u32>> = LENS
            .iter()
            .map(|&l| {
                (0..t)
                    .map(|c| u32::from(if left { c >= t - l } else { c < l }))
                    .collect()
            })
            .collect();
        let mut padded = DropoutKeys::new(7, IDS.to_vec());
        padded.set_padded(&mask, t).unwrap();
        let got = flat(&padded.tokens(&ones(&[2, t, F]), 0.3).unwrap());
        let mut row = 0;
        for (i, m) in mask.iter().enumerate() {
            for (c, &on) in m.iter().enumerate() {
                let at = (i * t + c) * F;
                match on {
                    1 => {
                        assert_eq!(
                            got[at..at + F],
                            want[row * F..(row + 1) * F],
                            "left={left} seq {i} col {c}"
                        );
                        row += 1;
                    }
                    _ => assert!(got[at..at + F].iter().all(|&v| v > 1.0), "padding is kept"),
                }
            }
        }
    }
}

#[test]
fn a_sequence_drops_the_same_units_whatever_shares_its_batch() {
    let mut both = DropoutKeys::new(7, IDS.to_vec());
    both.set_packed(&LENS).unwrap();
    let mut alone = DropoutKeys::new(7, vec![IDS[1]]);
    alone.set_packed(&LENS[1..]).unwrap();
    for _site in 0..3 {
        let a = flat(&both.tokens(&ones(&[8, F]), 0.5).unwrap());
        let b = flat(&alone.tokens(&ones(&[5, F]), 0.5).unwrap());
        assert_eq!(a[3 * F..], b[..]);
    }
    // Another pass key, example or site draws other masks.
    let mut other = DropoutKeys::new(8, vec![IDS[1]]);
    other.set_packed(&LENS[1..]).unwrap();
    let mut first = DropoutKeys::new(7, vec![IDS[1]]);
    first.set_packed(&LENS[1..]).unwrap();
    let x = ones(&[5, F]);
    let (a, b) = (first.tokens(&x, 0.5).unwrap(), other.tokens(&x, 0.5).unwrap());
    assert_ne!(flat(&a), flat(&b));
    assert_ne!(
        flat(&a),
        flat(&first.tokens(&x, 0.5).unwrap()),
        "the next site draws anew"
    );
}

#[test]
fn padded_attention_drops_the_pairs_the_packed_kernel_drops() {
    let nh = 2;
    let mut packed = DropoutKeys::new(3, IDS.to_vec());
    packed.set_packed(&LENS).unwrap();
    let keep = packed.attention_keep(nh, 0.25).unwrap();
    assert_eq!(keep.len(), nh * (9 + 25));
    let t = 5;
    let mask: Vec<Vec<u32>> = vec![vec![0, 0, 1, 1, 1], vec![1; 5]];
    let mut padded = DropoutKeys::new(3, IDS.to_vec());
    padded.set_padded(&mask, t).unwrap();
    let got = flat(&padded.attention(&ones(&[2, nh, t, t]), 0.25).unwrap());
    let mut at = 0;
    for (i, m) in mask.iter().enumerate() {
        let cols: Vec<usize> = (0..t).filter(|&c| m[c] == 1).collect();
        for h in 0..nh {
            for &q in &cols {
                for &k in &cols {
                    assert_eq!(
                        got[((i * nh + h) * t + q) * t + k],
                        keep[at],
                        "seq {i} head {h} ({q}, {k})"
                    );
                    at += 1;
                }
            }
        }
    }
}

#[test]
fn the_drop_rate_is_p_and_kept_units_are_rescaled() {
    let mut d = DropoutKeys::new(1, vec![0]);
    d.set_packed(&[1000]).unwrap();
    let v = flat(&d.tokens(&ones(&[1000, 20]), 0.2).unwrap());
    let dropped = v.iter().filter(|&&x| x == 0.0).count() as f64 / v.len() as f64;
    // 20 000 Bernoulli(0.2) draws: standard deviation 0.0028.
    assert!((dropped - 0.2).abs() < 0.015, "{dropped}");
    assert!(v.iter().all(|&x| x == 0.0 || (x - 1.25).abs() < 1e-6));
    assert_eq!(
        flat(&d.tokens(&ones(&[1000, 2]), 0.0).unwrap()),
        vec![1.0; 2000],
        "p = 0 is the identity"
    );
}

#[test]
fn mismatched_layouts_are_errors() {
    let mut d = DropoutKeys::new(1, vec![0, 1]);
    let x = ones(&[4, 3]);
    assert!(d.tokens(&x, 0.5).unwrap_err().to_string().contains("did not say"));
    assert!(d.set_packed(&[4]).unwrap_err().to_string().contains("2 examples"));
    d.set_packed(&[1, 2]).unwrap();
    assert!(d.tokens(&x, 0.5).unwrap_err().to_string().contains("4 rows"));
    assert!(d.attention(&ones(&[2, 1, 2, 2]), 0.5).is_err());
    d.set_padded(&[vec![1, 1], vec![0, 1]], 2).unwrap();
    assert!(d.attention_keep(1, 0.5).is_err());
    assert!(d.set_padded(&[vec![1], vec![0, 1]], 2).is_err());
}
