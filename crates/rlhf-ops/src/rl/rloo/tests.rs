//! Unit tests of RLOO: the leave-one-out baseline, the KL-folded reward and the loss's
//! gradient against central finite differences in f64.

use super::*;
use crate::rng::RngStream;
use candle_core::{Device, Var};

const NAN: f64 = f64::NAN;

#[test]
fn leave_one_out_baseline_is_the_mean_of_the_other_scorable_rows() {
    let rows = vec![vec![1.0], vec![2.0], vec![6.0], vec![NAN], vec![5.0], vec![3.0]];
    let cfg = RlooAdvantageConfig {
        num_generations: 3,
        beta: 0.0,
        ..RlooAdvantageConfig::default()
    };
    let a = rloo_advantages(&rows, &[1.0], None, &cfg).unwrap();
    // Group 1: 1 − (2+6)/2, 2 − (1+6)/2, 6 − (1+2)/2. Group 2: NaN row → 0; 5 − 3, 3 − 5.
    assert_eq!(a.advantages, vec![-3.0, -1.5, 4.5, 0.0, 2.0, -2.0]);
    assert!(a.rewards[3].is_nan());
}

#[test]
fn a_group_with_one_scorable_row_gives_zero_advantages() {
    let rows = vec![vec![1.0], vec![3.0], vec![2.0], vec![NAN]];
    let cfg = RlooAdvantageConfig {
        num_generations: 2,
        beta: 0.0,
        ..RlooAdvantageConfig::default()
    };
    let a = rloo_advantages(&rows, &[1.0], None, &cfg).unwrap();
    assert_eq!(a.advantages, vec![-2.0, 2.0, 0.0, 0.0]);
    // Group 2's std is NaN (one value), not 0.
    assert_eq!(a.frac_reward_zero_std, 0.0);
}

#[test]
fn kl_is_subtracted_after_clipping_and_normalisation_whitens_the_scorable_rows() {
    let rows = vec![vec![5.0], vec![-5.0], vec![0.5], vec![0.25]];
    let kl = [1.0, 2.0, -1.0, 0.0];
    let cfg = RlooAdvantageConfig {
        num_generations: 2,
        beta: 0.5,
        reward_clip_range: Some((-1.0, 1.0)),
        normalize_advantages: true,
    };
    let a = rloo_advantages(&rows, &[1.0], Some(&kl), &cfg).unwrap();
    assert_eq!(a.rewards, vec![0.5, -2.0, 1.0, 0.25]);
    assert!(nanmean(&a.advantages).abs() < 1e-12);
    assert!((nanstd(&a.advantages) - 1.0).abs() < 1e-3);
    let no_kl = RlooAdvantageConfig { beta: 0.05, ..cfg };
    assert!(matches!(
        rloo_advantages(&rows, &[1.0], None, &no_kl),
        Err(RlError::Config { field: "beta", .. })
    ));
}

fn loss_value(logps: &Tensor, mask: &Tensor, old: &Tensor, adv: &Tensor, eps_high: f64) -> RlooLoss {
    let inputs = RlooLossInputs {
        logps,
        mask,
        old_logps: old,
        advantages: adv,
        entropy: mask,
    };
    let cfg = RlooLossConfig {
        epsilon_low: 0.2,
        epsilon_high: eps_high,
    };
    rloo_loss(&inputs, &cfg).unwrap()
}

#[test]
fn loss_gradient_matches_finite_differences() {
    let (b, t) = (4, 3);
    let dev = &Device::Cpu;
    let mut rng = RngStream::new(11);
    let lp: Vec<f64> = (0..b * t).map(|_| -1.0 - rng.uniform_f64()).collect();
    let m: Vec<f64> = vec![1., 1., 1., 1., 1., 0., 1., 0., 0., 0., 0., 0.];
    let seq: Vec<f64> = (0..b)
        .map(|i| (0..t).map(|j| lp[i * t + j] * m[i * t + j]).sum())
        .collect();
    // Sequence ratios e^0.1 (inside), e^0.5 (above), e^-0.6 (below), 1 (empty row).
    let old: Vec<f64> = seq.iter().zip([-0.1, -0.5, 0.6, 0.0]).map(|(s, d)| s + d).collect();
    let mask = Tensor::from_vec(m.clone(), (b, t), dev).unwrap();
    let old = Tensor::from_vec(old, b, dev).unwrap();
    let adv = Tensor::new(&[0.7f64, 1.2, -0.4, 2.0], dev).unwrap();
    let var = Var::from_tensor(&Tensor::from_vec(lp.clone(), (b, t), dev).unwrap()).unwrap();
    let out = loss_value(var.as_tensor(), &mask, &old, &adv, 0.28);
    let g = out.loss.backward().unwrap();
    let g = g
        .get(var.as_tensor())
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    let h = 1e-6;
    for k in 0..b * t {
        let at = |d: f64| {
            let mut x = lp.clone();
            x[k] += d;
            let x = Tensor::from_vec(x, (b, t), dev).unwrap();
            loss_value(&x, &mask, &old, &adv, 0.28).loss.to_scalar::<f64>().unwrap()
        };
        let fd = (at(h) - at(-h)) / (2.0 * h);
        assert!(
            (g[k] - fd).abs() < 1e-8,
            "[{k}]: autograd {} vs finite difference {fd}",
            g[k]
        );
    }
    // Row 1 is above 1 + 0.28 with A > 0; row 2 below 0.8 with A < 0.
    assert_eq!(out.metrics["clip_ratio/high_mean"], 0.25);
    assert_eq!(out.metrics["clip_ratio/low_mean"], 0.25);
    assert_eq!(out.metrics["clip_ratio/region_mean"], 0.5);
    assert_eq!(out.metrics["clip_ratio/high_max"], 1.0);
    assert_eq!(out.metrics["clip_ratio/low_min"], 0.0);
}
