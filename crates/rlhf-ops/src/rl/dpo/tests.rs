//! Unit tests of the DPO losses: hand-computed values, the precomputed-reference path and
//! gradients against central finite differences in f64.

use super::*;
use crate::rng::RngStream;
use candle_core::{Device, Var};

const ALL: [DpoLossType; 15] = [
    DpoLossType::Sigmoid,
    DpoLossType::Hinge,
    DpoLossType::Ipo,
    DpoLossType::ExoPair,
    DpoLossType::NcaPair,
    DpoLossType::Robust,
    DpoLossType::BcoPair,
    DpoLossType::SppoHard,
    DpoLossType::Aot,
    DpoLossType::AotUnpaired,
    DpoLossType::ApoZero,
    DpoLossType::ApoDown,
    DpoLossType::Discopop,
    DpoLossType::Sft,
    DpoLossType::SigmoidNorm,
];

/// 2N = 6 rows of L = 6 tokens; row r's completion starts at column 1 + r % 3.
fn batch(seed: u64) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let (rows, l) = (6, 6);
    let mut rng = RngStream::new(seed);
    let policy: Vec<f64> = (0..rows * (l - 1)).map(|_| -2.0 - 3.0 * rng.uniform_f64()).collect();
    let reference: Vec<f64> = policy.iter().map(|p| p + 1.5 * (rng.uniform_f64() - 0.5)).collect();
    let mask: Vec<f64> = (0..rows * l)
        .map(|k| f64::from(u8::from(k % l > (k / l) % 3)))
        .collect();
    (policy, reference, mask)
}

fn loss_of(policy: &Tensor, reference: &[f64], mask: &[f64], cfg: &DpoLossConfig) -> DpoLoss {
    let dev = &Device::Cpu;
    let r = Tensor::from_vec(reference.to_vec(), (6, 5), dev).unwrap();
    let m = Tensor::from_vec(mask.to_vec(), (6, 6), dev).unwrap();
    let inputs = DpoLossInputs {
        policy_logps: policy,
        reference: DpoReference::PerToken(&r),
        completion_mask: &m,
    };
    dpo_loss(&inputs, cfg).unwrap()
}

fn cfg(ty: DpoLossType) -> DpoLossConfig {
    DpoLossConfig {
        loss_types: vec![ty],
        beta: 0.3,
        label_smoothing: 0.1,
        discopop_tau: 0.5,
        ..DpoLossConfig::default()
    }
}

#[test]
fn every_loss_type_has_the_finite_difference_gradient() {
    let (policy, reference, mask) = batch(21);
    let dev = &Device::Cpu;
    for ty in ALL {
        let c = cfg(ty);
        let var = Var::from_tensor(&Tensor::from_vec(policy.clone(), (6, 5), dev).unwrap()).unwrap();
        let g = loss_of(var.as_tensor(), &reference, &mask, &c).loss.backward().unwrap();
        let g = g
            .get(var.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        let h = 1e-6;
        for k in 0..policy.len() {
            let at = |d: f64| {
                let mut x = policy.clone();
                x[k] += d;
                let x = Tensor::from_vec(x, (6, 5), dev).unwrap();
                loss_of(&x, &reference, &mask, &c).loss.to_scalar::<f64>().unwrap()
            };
            let fd = (at(h) - at(-h)) / (2.0 * h);
            assert!(
                (g[k] - fd).abs() < 1e-7 + 1e-6 * fd.abs(),
                "{ty:?}[{k}]: autograd {} vs fd {fd}",
                g[k]
            );
            // Column t scores token t + 1: no gradient where that token is not a completion token.
            if mask[(k / 5) * 6 + k % 5 + 1] == 0.0 {
                assert_eq!(g[k], 0.0, "{ty:?}: prompt position {k} got a gradient");
            }
        }
    }
}

#[test]
fn sigmoid_at_equal_policy_and_reference_is_ln_2_with_zero_rewards() {
    let (policy, _, mask) = batch(3);
    let p = Tensor::from_vec(policy.clone(), (6, 5), &Device::Cpu).unwrap();
    let out = loss_of(&p, &policy, &mask, &DpoLossConfig::default());
    assert!((out.loss.to_scalar::<f64>().unwrap() - 2f64.ln()).abs() < 1e-15);
    assert_eq!(out.metrics["rewards/margins"], 0.0);
    assert_eq!(out.metrics["rewards/accuracies"], 0.0); // strict comparison
}

#[test]
fn weighted_lists_add_and_precomputed_sums_equal_the_per_token_reference() {
    let (policy, reference, mask) = batch(4);
    let dev = &Device::Cpu;
    let p = Tensor::from_vec(policy, (6, 5), dev).unwrap();
    let value = |c: &DpoLossConfig| loss_of(&p, &reference, &mask, c).loss.to_scalar::<f64>().unwrap();
    let both = DpoLossConfig {
        loss_types: vec![DpoLossType::Sigmoid, DpoLossType::Sft],
        loss_weights: Some(vec![1.0, 0.5]),
        ..DpoLossConfig::default()
    };
    let want = value(&cfg(DpoLossType::Sigmoid).clone_with_beta(0.1)) + 0.5 * value(&cfg(DpoLossType::Sft));
    assert!((value(&both) - want).abs() < 1e-12);

    let r = Tensor::from_vec(reference.clone(), (6, 5), dev).unwrap();
    let m = Tensor::from_vec(mask.clone(), (6, 6), dev).unwrap();
    let sums = r.mul(&m.narrow(1, 1, 5).unwrap()).unwrap().sum(1).unwrap();
    let (c, rj) = (sums.narrow(0, 0, 3).unwrap(), sums.narrow(0, 3, 3).unwrap());
    let inputs = DpoLossInputs {
        policy_logps: &p,
        reference: DpoReference::Summed {
            chosen: &c,
            rejected: &rj,
        },
        completion_mask: &m,
    };
    let pre = dpo_loss(&inputs, &cfg(DpoLossType::Ipo)).unwrap();
    let per_token = loss_of(&p, &reference, &mask, &cfg(DpoLossType::Ipo));
    assert_eq!(
        pre.loss.to_scalar::<f64>().unwrap(),
        per_token.loss.to_scalar::<f64>().unwrap()
    );
    assert_eq!(pre.metrics, per_token.metrics);
}

#[test]
fn invalid_configurations_name_the_field() {
    let exo = DpoLossConfig {
        label_smoothing: 0.0,
        ..cfg(DpoLossType::ExoPair)
    };
    assert!(matches!(
        exo.weighted_types(),
        Err(RlError::Config {
            field: "label_smoothing",
            ..
        })
    ));
    let robust = DpoLossConfig {
        label_smoothing: 0.5,
        ..cfg(DpoLossType::Robust)
    };
    assert!(robust.weighted_types().is_err());
    let weights = DpoLossConfig {
        loss_weights: Some(vec![1.0, 2.0]),
        ..DpoLossConfig::default()
    };
    assert!(matches!(
        weights.weighted_types(),
        Err(RlError::Config {
            field: "loss_weights",
            ..
        })
    ));
}

#[test]
fn token_metrics_are_token_weighted_over_each_half() {
    let dev = &Device::Cpu;
    // 2 rows of L = 3: chosen completion at tokens 1, 2; rejected at token 2 only.
    let cm = Tensor::new(&[[0f32, 1., 1.], [0., 0., 1.]], dev).unwrap();
    let am = Tensor::new(&[[1f32, 1., 1.], [1., 1., 0.]], dev).unwrap();
    let h = Tensor::new(&[[1f32, 3.], [5., 7.]], dev).unwrap();
    let logits = Tensor::new(&[[0.5f32, 1.5], [9., 2.]], dev).unwrap();
    let top1 = Tensor::new(&[[1u8, 0], [1, 1]], dev).unwrap();
    let m = dpo_token_metrics(
        &DpoTokenOutputs {
            entropy: &h,
            mean_logits: &logits,
            is_top1: &top1,
            completion_mask: &cm,
            attention_mask: &am,
        },
        100.0,
    )
    .unwrap();
    assert_eq!(m["entropy"], (1.0 + 3.0 + 7.0) / 3.0);
    assert_eq!(m["num_tokens"], 105.0);
    assert_eq!(m["logits/chosen"], 1.0);
    assert_eq!(m["logits/rejected"], 2.0);
    assert_eq!(m["mean_token_accuracy"], 0.5);
}

#[test]
fn mean_logits_from_hidden_and_top1_match_the_logits() {
    let dev = &Device::Cpu;
    let hidden = Tensor::new(&[[[0.2f64, -1.0], [1.5, 0.3]]], dev).unwrap();
    let w = Tensor::new(&[[1.0f64, 0.0], [0.5, 2.0], [-1.0, 1.0]], dev).unwrap();
    let logits = hidden.broadcast_matmul(&w.t().unwrap()).unwrap();
    let want = logits.mean(2).unwrap().to_vec2::<f64>().unwrap();
    let got = mean_logits_from_hidden(&hidden, &w).unwrap().to_vec2::<f64>().unwrap();
    for (g, w) in got[0].iter().zip(&want[0]) {
        assert!((g - w).abs() < 1e-15);
    }
    // Logits row 0: 0.2, -1.9, -1.2 → argmax 0; row 1: 1.5, 1.35, -1.2 → argmax 0.
    let labels = Tensor::new(&[[0u32, 1]], dev).unwrap();
    let top1 = top1_matches(&logits, &labels).unwrap().to_vec2::<u8>().unwrap();
    assert_eq!(top1, vec![vec![1, 0]]);
}

impl DpoLossConfig {
    fn clone_with_beta(&self, beta: f64) -> Self {
        Self { beta, ..self.clone() }
    }
}
