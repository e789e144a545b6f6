//! Parity of `rlhf_ops::ppo` with TRL 0.11.4.
//!
//! Expected numbers: `fixtures/parity_tiny.json`, produced offline by the Python reference
//! stack named in its `meta` (trl 0.11.4, torch 2.5.1, float32, CPU; see
//! `fixtures/README.md`). Section `ppo_math` runs fixed tensors (B 3, T 6, V 7) through
//! `PPOTrainer.compute_rewards`, `compute_advantages`, `loss` and the `trl.core` helpers;
//! `reward_loss` holds one `RewardTrainer.compute_loss`; `ppo_step` the KL coefficient after
//! one `step()`.
//!
//! Tolerance: 1e-5 absolute, or 1e-4 relative where that is larger.

use candle_core::{DType, Device, Tensor};
use rlhf_ops::ppo::{
    bradley_terry_loss, compute_advantages, compute_rewards, entropy_from_logits, logprobs_from_logits, masked_mean,
    masked_var, masked_whiten, ppo_loss, KlController, KlPenalty, PpoLossConfig, PpoLossInputs,
};
use serde_json::Value;

const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../fixtures/parity_tiny.json");

fn fixture() -> Value {
    let text = std::fs::read_to_string(FIXTURE).expect("fixtures/parity_tiny.json is readable");
    serde_json::from_str(&text).expect("fixtures/parity_tiny.json is valid JSON")
}

/// A nested JSON array of numbers as a tensor of its shape.
fn tensor(v: &Value, dtype: DType) -> Tensor {
    fn walk(v: &Value, depth: usize, shape: &mut Vec<usize>, flat: &mut Vec<f64>) {
        match v {
            Value::Array(items) => {
                if shape.len() == depth {
                    shape.push(items.len());
                }
                assert_eq!(shape[depth], items.len(), "ragged array in fixture");
                for item in items {
                    walk(item, depth + 1, shape, flat);
                }
            }
            other => flat.push(other.as_f64().expect("fixture number")),
        }
    }
    let (mut shape, mut flat) = (Vec::new(), Vec::new());
    walk(v, 0, &mut shape, &mut flat);
    Tensor::from_vec(flat, shape, &Device::Cpu)
        .and_then(|t| t.to_dtype(dtype))
        .expect("fixture tensor")
}

fn f32s(v: &Value) -> Tensor {
    tensor(v, DType::F32)
}

fn num(v: &Value) -> f64 {
    v.as_f64().expect("fixture number")
}

fn close(got: f64, want: f64) -> bool {
    (got - want).abs() <= 1e-5f64.max(1e-4 * want.abs())
}

fn assert_scalar(name: &str, got: f64, want: f64) {
    assert!(close(got, want), "{name}: got {got}, TRL {want}");
}

fn assert_tensor(name: &str, got: &Tensor, want: &Value) {
    let want = tensor(want, DType::F64);
    assert_eq!(got.dims(), want.dims(), "{name}: shape");
    let got = got.to_dtype(DType::F64).unwrap().flatten_all().unwrap();
    let want = want.flatten_all().unwrap();
    let (got, want) = (got.to_vec1::<f64>().unwrap(), want.to_vec1::<f64>().unwrap());
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert!(close(*g, *w), "{name}[{i}] (flat): got {g}, TRL {w}");
    }
}

fn scalar(t: &Tensor) -> f64 {
    t.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap()
}

#[test]
fn compute_rewards_matches_trl() {
    let fx = fixture();
    let p = &fx["ppo_math"];
    let (inp, want) = (&p["inputs"], &p["compute_rewards"]);
    assert_eq!(p["config"]["kl_penalty"], "kl");
    let out = compute_rewards(
        &f32s(&inp["scores"]),
        &f32s(&inp["logprobs"]),
        &f32s(&inp["ref_logprobs"]),
        &f32s(&inp["masks"]),
        num(&p["kl_coef_used"]),
        KlPenalty::Kl,
    )
    .unwrap();
    assert_tensor("rewards", &out.rewards, &want["rewards"]);
    assert_tensor("non_score_rewards", &out.non_score_rewards, &want["non_score_rewards"]);
    assert_tensor("kls", &out.kls, &want["kls"]);
}

#[test]
fn compute_advantages_matches_trl() {
    let fx = fixture();
    let p = &fx["ppo_math"];
    let (cfg, inp, want) = (&p["config"], &p["inputs"], &p["compute_advantages"]);
    let out = compute_advantages(
        &f32s(&inp["values"]),
        &f32s(&p["compute_rewards"]["rewards"]),
        &f32s(&inp["masks"]),
        num(&cfg["gamma"]),
        num(&cfg["lam"]),
        cfg["whiten_rewards"].as_bool().unwrap(),
    )
    .unwrap();
    assert_tensor("values_masked", &out.values, &want["values_masked"]);
    assert_tensor("advantages", &out.advantages, &want["advantages"]);
    assert_tensor("returns", &out.returns, &want["returns"]);
}

/// `loss.call` in the fixture: `loss(old_logprobs=logprobs, values=values_masked, logits,
/// vpreds, logprobs=new_logprobs, mask=masks, advantages, returns)`.
#[test]
fn ppo_loss_matches_trl_including_every_stat() {
    let fx = fixture();
    let p = &fx["ppo_math"];
    let (cfg, inp, want) = (&p["config"], &p["inputs"], &p["loss"]);
    let adv = &p["compute_advantages"];
    let (old_logprobs, values, logits) = (
        f32s(&inp["logprobs"]),
        f32s(&adv["values_masked"]),
        f32s(&inp["logits"]),
    );
    let (vpreds, logprobs, mask) = (f32s(&inp["vpreds"]), f32s(&inp["new_logprobs"]), f32s(&inp["masks"]));
    let (advantages, returns) = (f32s(&adv["advantages"]), f32s(&adv["returns"]));
    let inputs = PpoLossInputs {
        old_logprobs: &old_logprobs,
        values: &values,
        entropy: &rlhf_ops::ppo::entropy_from_logits(&logits).unwrap(),
        vpreds: &vpreds,
        logprobs: &logprobs,
        mask: &mask,
        advantages: &advantages,
        returns: &returns,
    };
    let config = PpoLossConfig {
        cliprange: num(&cfg["cliprange"]),
        cliprange_value: num(&cfg["cliprange_value"]),
        vf_coef: num(&cfg["vf_coef"]),
        ratio_threshold: num(&cfg["ratio_threshold"]),
    };
    let out = ppo_loss(&inputs, &config).unwrap();
    assert_scalar("pg_loss", scalar(&out.pg_loss), num(&want["pg_loss"]));
    assert_scalar(
        "vf_loss * vf_coef",
        scalar(&out.vf_loss),
        num(&want["vf_loss_times_vf_coef"]),
    );

    let stats = &want["stats"];
    let scalars = out.stats.scalars();
    for (name, got) in scalars {
        assert_scalar(name, got, num(&stats[name]));
    }
    assert_tensor(
        "policy/advantages",
        &out.stats.policy_advantages,
        &stats["policy/advantages"],
    );
    assert_tensor("policy/ratio", &out.stats.policy_ratio, &stats["policy/ratio"]);
    // Every stat TRL logged is covered: the scalars plus the two tensors.
    let names: Vec<&str> = scalars.iter().map(|(n, _)| *n).collect();
    for key in stats.as_object().unwrap().keys() {
        let is_tensor = key == "policy/advantages" || key == "policy/ratio";
        assert!(is_tensor || names.contains(&key.as_str()), "stat {key} not produced");
    }
    assert!(!out.stats.ratio_threshold_exceeded);
}

#[test]
fn masked_statistics_match_trl_core() {
    let fx = fixture();
    let p = &fx["ppo_math"];
    let (inp, want) = (&p["inputs"], &p["core"]);
    let (values, mask) = (f32s(&inp["values"]), f32s(&inp["masks"]));
    assert_scalar(
        "masked_mean",
        scalar(&masked_mean(&values, &mask, None).unwrap()),
        num(&want["masked_mean_values"]),
    );
    assert_scalar(
        "masked_var (unbiased)",
        scalar(&masked_var(&values, &mask, true).unwrap()),
        num(&want["masked_var_values_unbiased"]),
    );
    assert_tensor(
        "masked_whiten",
        &masked_whiten(&values, &mask, true).unwrap(),
        &want["masked_whiten_values"],
    );
    assert_tensor(
        "masked_whiten (shift_mean=False)",
        &masked_whiten(&values, &mask, false).unwrap(),
        &want["masked_whiten_values_no_shift"],
    );
}

#[test]
fn entropy_and_logprobs_from_logits_match_trl_core() {
    let fx = fixture();
    let p = &fx["ppo_math"];
    let (inp, want) = (&p["inputs"], &p["core"]);
    let logits = f32s(&inp["logits"]);
    let labels = tensor(&inp["labels"], DType::U32);
    assert_tensor(
        "entropy_from_logits",
        &entropy_from_logits(&logits).unwrap(),
        &want["entropy_from_logits"],
    );
    assert_tensor(
        "logprobs_from_logits",
        &logprobs_from_logits(&logits, &labels).unwrap(),
        &want["logprobs_from_logits(logits, labels)"],
    );
}

#[test]
fn bradley_terry_loss_matches_trl_reward_trainer() {
    let fx = fixture();
    let r = &fx["reward_loss"];
    let loss = bradley_terry_loss(&f32s(&r["rewards_chosen"]), &f32s(&r["rewards_rejected"]), None, None).unwrap();
    assert_scalar("reward loss", scalar(&loss), num(&r["loss"]));
}

/// `ppo_step`: two samples with zero KL (policy = reference before the update), TRL
/// defaults `init_kl_coef` 0.2, target 6, horizon 10000: the error clips to -0.2.
#[test]
fn adaptive_kl_controller_matches_trl_after_one_step() {
    let fx = fixture();
    let s = &fx["ppo_step"];
    let mut ctl = KlController::adaptive(0.2, 6.0, 10_000.0);
    let n_steps = s["config"]["batch_size"].as_u64().unwrap() as usize;
    ctl.update(num(&s["stats"]["objective/kl"]), n_steps);
    assert!((ctl.value() - num(&s["kl_coef_after"])).abs() < 1e-12);
}
