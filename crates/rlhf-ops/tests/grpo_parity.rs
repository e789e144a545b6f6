//! Parity of `rlhf_ops::rl` (completions, rewards, grpo) with TRL 1.16's `GRPOTrainer`.
//!
//! Expected numbers: `fixtures/algorithms/grpo.json`, made by `algo_fixtures.py` (trl
//! 1.16.0, torch 2.15.0, float32, CPU) from the trainer's own methods; the README next to
//! it defines every field. Every case in the file is checked (a case setting an option
//! `rl::grpo` does not implement, see `unsupported`, is counted as skipped; the public file
//! has none), from the dumped per-token log-probs: the loss (1e-4 relative, 1e-6 absolute
//! near 0) and every logged metric (1e-4 relative; counts exactly). Advantages to 1e-5
//! absolute, rewards and stds to 1e-6.

mod rl_fixture;

use candle_core::{DType, Device};
use rl_fixture::*;
use rlhf_ops::rl::completions::Completions;
use rlhf_ops::rl::grpo::{grpo_loss, GrpoLossConfig, GrpoLossInputs, GrpoLossType, ImportanceSamplingLevel};
use rlhf_ops::rl::rewards::{group_advantages, reward_metrics, RewardAggregation, ScaleRewards};
use rlhf_ops::rl::Metrics;
use serde_json::Value;

fn names(batch: &Value) -> Vec<String> {
    batch["reward_func_names"]
        .as_array()
        .expect("reward_func_names")
        .iter()
        .map(|v| v.as_str().expect("name").to_string())
        .collect()
}

/// The completions as TRL saw them: the raw generated ids after the padded prompt.
fn completions(fx: &Value) -> Completions {
    let batch = &fx["batch"];
    let width = batch["prompt_ids"][0].as_array().expect("prompt_ids").len();
    let generated: Vec<Vec<u32>> = ids(&batch["generate_output_ids"])
        .into_iter()
        .map(|row| row[width..].to_vec())
        .collect();
    let (eos, pad) = eos_and_pad(fx, batch);
    Completions::from_ids(&generated, &eos, pad).expect("completion ids")
}

/// The generation-time metrics: lengths and rewards.
fn generation_metrics(fx: &Value, frac_reward_zero_std: f64) -> Metrics {
    let batch = &fx["batch"];
    let prompt_lengths: Vec<usize> = ids(&batch["prompt_ids_unpadded"]).iter().map(Vec::len).collect();
    let mut m = completions(fx)
        .metrics(&prompt_lengths, 0.0)
        .expect("completion metrics");
    let names = names(batch);
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let rewards = rows(&batch["rewards_per_func"]);
    let weights = f64s(&batch["reward_weights"]);
    m.extend(reward_metrics(&rewards, &weights, &names, frac_reward_zero_std).expect("reward metrics"));
    m
}

/// `scale_rewards` as TRL accepts it: a name, or `True` / `False`.
fn scale_rewards(v: &Value) -> ScaleRewards {
    match v {
        Value::Bool(true) => ScaleRewards::Group,
        Value::Bool(false) => ScaleRewards::None,
        other => ScaleRewards::from_trl_name(other.as_str().expect("scale_rewards")).expect("scale_rewards name"),
    }
}

fn num_generations(fx: &Value) -> usize {
    fx["num_generations"].as_u64().expect("num_generations") as usize
}

#[test]
fn completion_masks_and_truncation_match_trl() {
    let fx = load("grpo");
    let batch = &fx["batch"];
    let c = completions(&fx);
    let truncated: Vec<bool> = f64s(&batch["is_truncated"]).iter().map(|&x| x != 0.0).collect();
    assert_eq!(c.is_truncated, truncated);
    let want = rows(&batch["completion_mask"]);
    let got: Vec<Vec<f64>> = c
        .mask_rows(false)
        .iter()
        .map(|r| r.iter().map(|&x| f64::from(x)).collect())
        .collect();
    assert_eq!(got, want);
    assert_eq!(c.num_items(false) as f64, num(&batch["num_items_in_batch"]));
    let mut checked = 0;
    for (key, entry) in fx["logps"].as_object().expect("logps") {
        let mtc = entry["mask_truncated_completions"]
            .as_bool()
            .expect("mask_truncated_completions");
        let got: Vec<Vec<f64>> = c
            .mask_rows(mtc)
            .iter()
            .map(|r| r.iter().map(|&x| f64::from(x)).collect())
            .collect();
        assert_eq!(got, rows(&entry["completion_mask"]), "{key}: completion_mask");
        assert_eq!(c.num_items(mtc) as f64, num(&entry["num_items_in_batch"]), "{key}");
        checked += 1;
    }
    assert_eq!(checked, fx["logps"].as_object().unwrap().len());
}

#[test]
fn advantages_and_reward_metrics_match_every_variant() {
    let fx = load("grpo");
    let batch = &fx["batch"];
    let rewards = rows(&batch["rewards_per_func"]);
    let weights = f64s(&batch["reward_weights"]);
    let g = num_generations(&fx);
    let variants = fx["advantages"].as_object().expect("advantages");
    for (key, v) in variants {
        let scale = scale_rewards(&v["scale_rewards"]);
        let agg = RewardAggregation::from_trl_name(v["multi_objective_aggregation"].as_str().unwrap())
            .expect("multi_objective_aggregation");
        let a = group_advantages(&rewards, &weights, g, scale, agg).expect("advantages");
        assert_all(key, "advantages", &a.advantages, &f64s(&v["advantages"]), 0.0, 1e-5);
        match agg {
            RewardAggregation::SumThenNormalize => {
                assert_all(key, "rewards", &a.rewards, &f64s(&v["rewards"]), 0.0, 1e-6);
                let std_want = match &v["std_used"] {
                    Value::Array(per_group) => per_group.iter().flat_map(|s| vec![num(s); g]).collect(),
                    s => vec![num(s); a.std.len()],
                };
                assert_all(key, "std_used", &a.std, &std_want, 0.0, 1e-6);
            }
            RewardAggregation::NormalizeThenSum => {
                assert_all(
                    key,
                    "rewards_aggregated",
                    &a.rewards,
                    &f64s(&v["rewards_aggregated"]),
                    0.0,
                    1e-6,
                );
                let s = num(&v["batch_std_used"]);
                assert_all(key, "batch_std_used", &a.std, &vec![s; a.std.len()], 0.0, 1e-6);
            }
        }
        assert_logged(key, &generation_metrics(&fx, a.frac_reward_zero_std), &v["logged"]);
    }
    assert!(!variants.is_empty(), "no advantage variants in grpo.json");
}

/// The GRPOConfig options `rl::grpo` does not implement, when a case sets one.
fn unsupported(c: &Value) -> Option<&'static str> {
    let num_or = |key: &str, default: f64| c.get(key).filter(|v| !v.is_null()).map_or(default, num);
    if num_or("entropy_coef", 0.0) != 0.0 || c.get("use_adaptive_entropy").and_then(Value::as_bool) == Some(true) {
        Some("the entropy bonus")
    } else if num_or("top_entropy_quantile", 1.0) < 1.0 {
        Some("top_entropy_quantile")
    } else if c.get("off_policy_mask_threshold").is_some_and(|v| !v.is_null()) {
        Some("off_policy_mask_threshold")
    } else {
        None
    }
}

/// The loss configuration of a case, from its `config` and the file's settings.
fn loss_config(fx: &Value, c: &Value) -> GrpoLossConfig {
    let eps = num(&c["epsilon"]);
    let mut cfg = GrpoLossConfig {
        loss_type: GrpoLossType::from_trl_name(c["loss_type"].as_str().unwrap()).expect("loss_type"),
        beta: num(&c["beta"]),
        epsilon_low: eps,
        epsilon_high: if c["epsilon_high"].is_null() {
            eps
        } else {
            num(&c["epsilon_high"])
        },
        delta: c.get("delta").filter(|d| !d.is_null()).map(num),
        importance_sampling_level: ImportanceSamplingLevel::from_trl_name(
            c["importance_sampling_level"].as_str().unwrap(),
        )
        .expect("importance_sampling_level"),
        use_bias_correction_kl: c.get("use_bias_correction_kl").and_then(Value::as_bool).unwrap_or(true),
        max_completion_length: fx["max_completion_length"].as_u64().expect("max_completion_length") as usize,
        ..GrpoLossConfig::default()
    };
    // Fields the public cases leave at TRL's defaults, read when a case sets them.
    let opt = |key: &str, default: f64| c.get(key).filter(|v| !v.is_null()).map_or(default, num);
    cfg.sapo_temperature_pos = opt("sapo_temperature_pos", cfg.sapo_temperature_pos);
    cfg.sapo_temperature_neg = opt("sapo_temperature_neg", cfg.sapo_temperature_neg);
    cfg.vespo_k_pos = opt("vespo_k_pos", cfg.vespo_k_pos);
    cfg.vespo_lambda_pos = opt("vespo_lambda_pos", cfg.vespo_lambda_pos);
    cfg.vespo_k_neg = opt("vespo_k_neg", cfg.vespo_k_neg);
    cfg.vespo_lambda_neg = opt("vespo_lambda_neg", cfg.vespo_lambda_neg);
    cfg
}

#[test]
fn every_loss_case_matches_trl() {
    let fx = load("grpo");
    let batch = &fx["batch"];
    let rewards = rows(&batch["rewards_per_func"]);
    let weights = f64s(&batch["reward_weights"]);
    let g = num_generations(&fx);
    let cases = fx["cases"].as_array().expect("cases");
    let mut worst_loss = 0f64;
    let (mut checked, mut skipped) = (0, 0);
    for case in cases {
        let id = case["id"].as_str().expect("id");
        let c = &case["config"];
        if let Some(reason) = unsupported(c) {
            eprintln!("{id}: skipped ({reason} is not implemented)");
            skipped += 1;
            continue;
        }
        let cfg = loss_config(&fx, c);
        let scale = scale_rewards(&c["scale_rewards"]);
        let aggregation = c
            .get("multi_objective_aggregation")
            .and_then(Value::as_str)
            .map_or(RewardAggregation::SumThenNormalize, |a| {
                RewardAggregation::from_trl_name(a).expect("multi_objective_aggregation")
            });
        let adv = group_advantages(&rewards, &weights, g, scale, aggregation).unwrap();

        let mtc = c["mask_truncated_completions"].as_bool().unwrap();
        let temperature = num(&c["temperature"]);
        let lp = fx["logps"]
            .as_object()
            .expect("logps")
            .values()
            .find(|e| num(&e["temperature"]) == temperature && e["mask_truncated_completions"].as_bool() == Some(mtc))
            .unwrap_or_else(|| panic!("{id}: no logps at T = {temperature}, mask_truncated = {mtc}"));
        let f32t = |name: &str| tensor(&lp[name], DType::F32);
        let off_policy = match c["state"].as_str().unwrap() {
            "off_policy" => true,
            "on_policy" => false,
            other => panic!("{id}: unknown state {other}"),
        };
        let (logps, entropy) = if off_policy {
            (f32t("current"), f32t("entropy_current"))
        } else {
            (f32t("old"), f32t("entropy_old"))
        };
        let old = f32t("old");
        let reference = f32t("ref");
        let advantages = candle_core::Tensor::from_vec(adv.advantages.clone(), adv.advantages.len(), &Device::Cpu)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        let mask = f32t("completion_mask");
        let inputs = GrpoLossInputs {
            logps: &logps,
            old_logps: off_policy.then_some(&old),
            ref_logps: (cfg.beta != 0.0).then_some(&reference),
            advantages: &advantages,
            mask: &mask,
            entropy: &entropy,
            num_items_in_batch: num(&lp["num_items_in_batch"]),
        };
        let out = grpo_loss(&inputs, &cfg).unwrap_or_else(|e| panic!("{id}: {e}"));
        let (got, want) = (scalar(&out.loss), num(&case["loss"]));
        assert!(close(got, want, 1e-4, 1e-6), "{id}: loss {got}, TRL {want}");
        worst_loss = worst_loss.max((got - want).abs() / want.abs().max(1e-2));
        assert!(
            close(got, num(&case["logged"]["loss"]), 1e-4, 1e-6),
            "{id}: logged loss"
        );

        let mut metrics = generation_metrics(&fx, adv.frac_reward_zero_std);
        metrics.extend(out.metrics);
        assert_logged(id, &metrics, &case["logged"]);
        checked += 1;
    }
    assert_eq!(checked + skipped, cases.len());
    eprintln!("grpo: {checked} cases ({skipped} skipped), worst loss error {worst_loss:.1e} (relative; absolute / 1e-2 near 0)");
    assert!(checked > 0, "no loss cases in grpo.json");
}
