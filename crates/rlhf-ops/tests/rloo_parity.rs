//! Parity of `rlhf_ops::rl::rloo` with TRL 1.16's `RLOOTrainer`.
//!
//! Expected numbers: `fixtures/algorithms/rloo.json` (made by `algo_fixtures.py`, trl
//! 1.16.0, float32, CPU; README next to it). Every case is checked from the dumped
//! per-token log-probs: the per-sequence KL and KL-folded rewards (1e-5), leave-one-out
//! advantages (1e-5 absolute), `old_logps` (1e-4), the loss (1e-4 relative, 1e-6 absolute)
//! and every logged metric (1e-4 relative; counts exactly). The `entropy` metric needs
//! per-token entropies, which `rloo.json` does not dump: they are taken from the
//! `grpo.json` rows with the same prompt and completion (the files share their batch), and
//! the metric is skipped for a row `grpo.json` lacks.

mod rl_fixture;

use candle_core::{DType, Device, Tensor};
use rl_fixture::*;
use rlhf_ops::rl::completions::Completions;
use rlhf_ops::rl::logprobs::masked_sequence_sum;
use rlhf_ops::rl::rewards::reward_metrics;
use rlhf_ops::rl::rloo::{
    kl_metric, rloo_advantages, rloo_loss, sequence_kl, RlooAdvantageConfig, RlooLossConfig, RlooLossInputs,
};
use serde_json::Value;

/// The `grpo.json` per-token entropies for this batch's rows (same prompt ids and
/// completion ids), at the batch's temperature and truncation masking.
fn entropy_from_grpo(grpo: &Value, batch: &Value, temperature: f64, mtc: bool, current: bool) -> Option<Tensor> {
    let gb = &grpo["batch"];
    let (gp, gc) = (ids(&gb["prompt_ids"]), ids(&gb["completion_ids"]));
    let entry = grpo["logps"]
        .as_object()?
        .values()
        .find(|e| num(&e["temperature"]) == temperature && e["mask_truncated_completions"].as_bool() == Some(mtc))?;
    let h = rows(&entry[if current { "entropy_current" } else { "entropy_old" }]);
    let picked: Option<Vec<Vec<f64>>> = ids(&batch["prompt_ids"])
        .iter()
        .zip(ids(&batch["completion_ids"]))
        .map(|(p, c)| (0..gp.len()).find(|&i| &gp[i] == p && gc[i] == c).map(|i| h[i].clone()))
        .collect();
    let picked = picked?;
    let (b, t) = (picked.len(), picked[0].len());
    Tensor::from_vec(picked.concat(), (b, t), &Device::Cpu)
        .ok()?
        .to_dtype(DType::F32)
        .ok()
}

#[test]
fn every_rloo_case_matches_trl() {
    let fx = load("rloo");
    let grpo = load("grpo");
    let cases = fx["cases"].as_array().expect("cases");
    let mut worst_loss = 0f64;
    let (mut checked, mut entropy_checked) = (0, 0);
    for case in cases {
        let id = case["id"].as_str().expect("id");
        let c = &case["config"];
        let batch = &fx["batches"][case["batch"].as_str().expect("batch key")];
        assert!(batch.is_object(), "{id}: missing batch");
        let f32t = |name: &str| tensor(&batch[name], DType::F32);
        let (old, reference, mask) = (
            f32t("per_token_logps_old"),
            f32t("per_token_logps_ref"),
            f32t("completion_mask"),
        );
        let beta = num(&c["beta"]);
        let mtc = c["mask_truncated_completions"].as_bool().unwrap();

        // Masks from the completion ids.
        let (eos, pad) = eos_and_pad(&fx, batch);
        let completions = Completions::from_ids(&ids(&batch["completion_ids"]), &eos, pad).unwrap();
        let want_mask = rows(&batch["completion_mask"]);
        let got_mask: Vec<Vec<f64>> = completions
            .mask_rows(mtc)
            .iter()
            .map(|r| r.iter().map(|&x| f64::from(x)).collect())
            .collect();
        assert_eq!(got_mask, want_mask, "{id}: completion_mask");

        // 1. Rewards with the KL folded in, leave-one-out advantages.
        let kl = sequence_kl(&old, &reference, &mask)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        if beta != 0.0 {
            assert_all(id, "kl_per_sequence", &kl, &f64s(&case["kl_per_sequence"]), 1e-5, 1e-5);
        }
        let rewards = rows(&batch["rewards_per_func"]);
        let weights = f64s(&batch["reward_weights"]);
        let clip = c["reward_clip_range"].as_array().map(|r| (num(&r[0]), num(&r[1])));
        let cfg = RlooAdvantageConfig {
            num_generations: c["num_generations"].as_u64().unwrap() as usize,
            beta,
            reward_clip_range: clip,
            normalize_advantages: c["normalize_advantages"].as_bool().unwrap(),
        };
        let adv = rloo_advantages(&rewards, &weights, Some(&kl), &cfg).unwrap_or_else(|e| panic!("{id}: {e}"));
        assert_all(
            id,
            "rewards_after_kl",
            &adv.rewards,
            &f64s(&case["rewards_after_kl"]),
            1e-5,
            1e-5,
        );
        assert_all(id, "advantages", &adv.advantages, &f64s(&case["advantages"]), 0.0, 1e-5);

        // 2. The loss.
        let old_logps = masked_sequence_sum(&old, &mask).unwrap();
        let got_old = old_logps.to_dtype(DType::F64).unwrap().to_vec1::<f64>().unwrap();
        assert_all(id, "old_logps", &got_old, &f64s(&case["old_logps"]), 1e-5, 1e-4);
        let current = c["state"].as_str() == Some("off_policy");
        let logps = if current {
            f32t("per_token_logps_current")
        } else {
            old.clone()
        };
        let temperature = num(&c["temperature"]);
        let entropy = entropy_from_grpo(&grpo, batch, temperature, mtc, current);
        let advantages = Tensor::from_vec(adv.advantages.clone(), adv.advantages.len(), &Device::Cpu)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        let eps = num(&c["epsilon"]);
        let loss_cfg = RlooLossConfig {
            epsilon_low: eps,
            epsilon_high: if c["epsilon_high"].is_null() {
                eps
            } else {
                num(&c["epsilon_high"])
            },
        };
        let zeros = mask.zeros_like().unwrap();
        let inputs = RlooLossInputs {
            logps: &logps,
            mask: &mask,
            old_logps: &old_logps,
            advantages: &advantages,
            entropy: entropy.as_ref().unwrap_or(&zeros),
        };
        let out = rloo_loss(&inputs, &loss_cfg).unwrap();
        let (got, want) = (scalar(&out.loss), num(&case["loss"]));
        assert!(close(got, want, 1e-4, 1e-6), "{id}: loss {got}, TRL {want}");
        worst_loss = worst_loss.max((got - want).abs() / want.abs().max(1e-2));

        // 3. Every logged metric.
        let prompt_lengths: Vec<usize> = rows(&batch["prompt_mask"])
            .iter()
            .map(|r| r.iter().sum::<f64>() as usize)
            .collect();
        let mut metrics = completions.metrics(&prompt_lengths, 0.0).unwrap();
        // rloo.json shares grpo.json's reward functions and does not repeat their names.
        let name_list = batch
            .get("reward_func_names")
            .unwrap_or(&grpo["batch"]["reward_func_names"]);
        let names: Vec<String> = name_list
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_string())
            .collect();
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        metrics.extend(reward_metrics(&rewards, &weights, &names, adv.frac_reward_zero_std).unwrap());
        if beta != 0.0 {
            metrics.insert("kl".into(), kl_metric(&old, &reference, &mask).unwrap());
        }
        metrics.extend(out.metrics);
        let mut logged = case["logged"].clone();
        if entropy.is_some() {
            entropy_checked += 1;
        } else {
            metrics.remove("entropy");
            logged.as_object_mut().unwrap().remove("entropy");
        }
        assert_logged(id, &metrics, &logged);
        checked += 1;
    }
    assert_eq!(checked, cases.len());
    eprintln!("rloo: {checked} cases, worst loss error {worst_loss:.1e} (relative; absolute / 1e-2 near 0)");
    assert!(checked > 0, "no cases in rloo.json");
    eprintln!("rloo: entropy metric (from grpo.json) checked in {entropy_checked} cases");
}
