//! Unit tests of the GRPO loss: hand-checked values, invariants and gradients against
//! central finite differences in f64.

use super::*;
use crate::rng::RngStream;
use candle_core::{Device, Var};

const B: usize = 4;
const T: usize = 5;

struct Batch {
    logps: Vec<f64>,
    old: Vec<f64>,
    reference: Vec<f64>,
    adv: Vec<f64>,
    mask: Vec<f64>,
}

fn batch(seed: u64) -> Batch {
    let mut rng = RngStream::new(seed);
    let mut u = |lo: f64, hi: f64| lo + (hi - lo) * rng.uniform_f64();
    let logps: Vec<f64> = (0..B * T).map(|_| u(-3.0, -0.5)).collect();
    let old = logps.iter().map(|l| l + u(-0.4, 0.4)).collect();
    let reference = logps.iter().map(|l| l + u(-0.3, 0.3)).collect();
    let adv = (0..B).map(|_| u(-1.5, 1.5)).collect();
    // Row lengths 5, 3, 1, 0 (an all-masked row, as under mask_truncated_completions).
    let lens = [5usize, 3, 1, 0];
    let mask = (0..B * T).map(|k| f64::from(u8::from(k % T < lens[k / T]))).collect();
    Batch {
        logps,
        old,
        reference,
        adv,
        mask,
    }
}

fn t2(x: &[f64]) -> Tensor {
    Tensor::from_vec(x.to_vec(), (B, T), &Device::Cpu).unwrap()
}

fn loss_at(bt: &Batch, logps: &Tensor, cfg: &GrpoLossConfig, on_policy: bool) -> GrpoLoss {
    let (old, reference, mask) = (t2(&bt.old), t2(&bt.reference), t2(&bt.mask));
    let adv = Tensor::from_vec(bt.adv.clone(), B, &Device::Cpu).unwrap();
    let entropy = Tensor::ones((B, T), DType::F64, &Device::Cpu).unwrap();
    let inputs = GrpoLossInputs {
        logps,
        old_logps: if on_policy { None } else { Some(&old) },
        ref_logps: Some(&reference),
        advantages: &adv,
        mask: &mask,
        entropy: &entropy,
        num_items_in_batch: bt.mask.iter().sum::<f64>() + 3.0,
    };
    grpo_loss(&inputs, cfg).unwrap()
}

fn value(t: &Tensor) -> f64 {
    t.to_scalar::<f64>().unwrap()
}

/// The autograd gradient w.r.t. the log-probs against central differences.
fn check_gradient(cfg: &GrpoLossConfig, seed: u64) {
    let bt = batch(seed);
    let var = Var::from_tensor(&t2(&bt.logps)).unwrap();
    let out = loss_at(&bt, var.as_tensor(), cfg, false);
    let grads = out.loss.backward().unwrap();
    let g = grads
        .get(var.as_tensor())
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    let h = 1e-6;
    for k in 0..B * T {
        let mut plus = bt.logps.clone();
        plus[k] += h;
        let mut minus = bt.logps.clone();
        minus[k] -= h;
        let fd = (value(&loss_at(&bt, &t2(&plus), cfg, false).loss)
            - value(&loss_at(&bt, &t2(&minus), cfg, false).loss))
            / (2.0 * h);
        assert!(
            (g[k] - fd).abs() < 1e-7 + 1e-6 * fd.abs(),
            "{:?}/{:?}: d loss / d logp[{k}] autograd {} vs finite difference {fd}",
            cfg.loss_type,
            cfg.importance_sampling_level,
            g[k]
        );
        if bt.mask[k] == 0.0 {
            assert_eq!(g[k], 0.0, "masked position {k} got a gradient");
        }
    }
}

#[test]
fn every_differentiable_loss_type_has_the_finite_difference_gradient() {
    use GrpoLossType::*;
    let mut seed = 1;
    for loss_type in [Dapo, Grpo, Bnpo, DrGrpo, Luspo, Sapo] {
        for level in [ImportanceSamplingLevel::Token, ImportanceSamplingLevel::Sequence] {
            for (beta, bias) in [(0.0, true), (0.3, true), (0.3, false)] {
                let cfg = GrpoLossConfig {
                    loss_type,
                    importance_sampling_level: level,
                    beta,
                    use_bias_correction_kl: bias,
                    epsilon_high: 0.28,
                    delta: if loss_type == Dapo { Some(1.1) } else { None },
                    max_completion_length: 7,
                    gradient_accumulation_steps: 2,
                    steps_per_generation: 3,
                    ..GrpoLossConfig::default()
                };
                check_gradient(&cfg, seed);
                seed += 1;
            }
        }
    }
}

#[test]
fn cispo_and_vespo_weights_are_constants_in_the_gradient() {
    // d/dlogp of −c·A·logp with c detached is −c·A (per token, over the normaliser).
    let bt = batch(7);
    let n = bt.mask.iter().sum::<f64>() + 3.0;
    for loss_type in [GrpoLossType::Cispo, GrpoLossType::Vespo] {
        let cfg = GrpoLossConfig {
            loss_type,
            epsilon_high: 1.05,
            ..GrpoLossConfig::default()
        };
        let var = Var::from_tensor(&t2(&bt.logps)).unwrap();
        let g = loss_at(&bt, var.as_tensor(), &cfg, false).loss.backward().unwrap();
        let g = g
            .get(var.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        for (k, got) in g.iter().enumerate() {
            let (i, a) = (k / T, bt.adv[k / T]);
            let c = match loss_type {
                GrpoLossType::Cispo => (bt.logps[k] - bt.old[k]).exp().min(1.05),
                _ => {
                    let lw: f64 = (0..T)
                        .map(|j| (bt.logps[i * T + j] - bt.old[i * T + j]) * bt.mask[i * T + j])
                        .sum();
                    let (kk, l) = if a >= 0.0 { (2.0, 3.0) } else { (3.0, 2.0) };
                    (l + kk * lw - l * lw.exp()).exp()
                }
            };
            let want = -c * a * bt.mask[k] / n;
            assert!((got - want).abs() < 1e-12, "{loss_type:?}[{k}]: {got} vs {want}");
        }
    }
}

#[test]
fn on_policy_matches_an_explicit_detached_old_policy() {
    let bt = batch(3);
    let logps = t2(&bt.logps);
    let old_is_logps = Batch {
        old: bt.logps.clone(),
        ..batch(3)
    };
    for loss_type in [GrpoLossType::Dapo, GrpoLossType::Grpo, GrpoLossType::Sapo] {
        let cfg = GrpoLossConfig {
            loss_type,
            beta: 0.1,
            ..GrpoLossConfig::default()
        };
        let a = loss_at(&bt, &logps, &cfg, true);
        let b = loss_at(&old_is_logps, &logps, &cfg, false);
        assert!((value(&a.loss) - value(&b.loss)).abs() < 1e-14);
        assert_eq!(a.metrics, b.metrics);
    }
}

#[test]
fn on_policy_dapo_is_minus_the_token_weighted_mean_advantage() {
    let bt = batch(5);
    let out = loss_at(&bt, &t2(&bt.logps), &GrpoLossConfig::default(), true);
    let n = bt.mask.iter().sum::<f64>() + 3.0;
    let want: f64 = -(0..B * T).map(|k| bt.adv[k / T] * bt.mask[k]).sum::<f64>() / n;
    assert!((value(&out.loss) - want).abs() < 1e-14);
    for key in ["clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean"] {
        assert_eq!(out.metrics[key], 0.0);
    }
    assert_eq!(out.metrics["entropy"], 1.0);
    assert!(!out.metrics.contains_key("kl"));
}

#[test]
fn clip_metrics_count_tokens_outside_the_trust_region() {
    // One row, ratios e^0.5 (high, A > 0) and e^-0.5 (not low: A > 0) and 1.
    let dev = &Device::Cpu;
    let logps = Tensor::new(&[[0.5f64, -0.5, 0.0, 9.0]], dev).unwrap();
    let old = Tensor::zeros((1, 4), DType::F64, dev).unwrap();
    let mask = Tensor::new(&[[1.0f64, 1.0, 1.0, 0.0]], dev).unwrap();
    let adv = Tensor::new(&[1.0f64], dev).unwrap();
    let inputs = GrpoLossInputs {
        logps: &logps,
        old_logps: Some(&old),
        ref_logps: None,
        advantages: &adv,
        mask: &mask,
        entropy: &old,
        num_items_in_batch: 3.0,
    };
    let out = grpo_loss(&inputs, &GrpoLossConfig::default()).unwrap();
    assert!((out.metrics["clip_ratio/high_mean"] - 1.0 / 3.0).abs() < 1e-15);
    assert_eq!(out.metrics["clip_ratio/low_mean"], 0.0);
    assert_eq!(out.metrics["clip_ratio/high_max"], 1.0 / 3.0);
    // L = −min(w A, clip(w) A): 1.2, e^-0.5, 1 → mean.
    let want = -(1.2 + (-0.5f64).exp() + 1.0) / 3.0;
    assert!((value(&out.loss) - want).abs() < 1e-12);
}

#[test]
fn a_missing_reference_with_beta_is_a_config_error() {
    let dev = &Device::Cpu;
    let z = Tensor::zeros((1, 2), DType::F32, dev).unwrap();
    let adv = Tensor::zeros(1, DType::F32, dev).unwrap();
    let inputs = GrpoLossInputs {
        logps: &z,
        old_logps: None,
        ref_logps: None,
        advantages: &adv,
        mask: &z,
        entropy: &z,
        num_items_in_batch: 1.0,
    };
    let cfg = GrpoLossConfig {
        beta: 0.04,
        ..GrpoLossConfig::default()
    };
    assert!(matches!(
        grpo_loss(&inputs, &cfg),
        Err(RlError::Config { field: "beta", .. })
    ));
    let bad_adv = Tensor::zeros(2, DType::F32, dev).unwrap();
    let inputs = GrpoLossInputs {
        advantages: &bad_adv,
        ..inputs
    };
    assert!(matches!(
        grpo_loss(&inputs, &GrpoLossConfig::default()),
        Err(RlError::Shape { .. })
    ));
}
