//! Parity of `rlhf_ops::rl::{dpo, dpo_data}` with TRL 1.16's `DPOTrainer`.
//!
//! Expected numbers: `fixtures/algorithms/dpo.json` (made by `algo_fixtures.py`, trl
//! 1.16.0, float32, CPU; README next to it). Checked: the EOS appended as text, the
//! prompt/completion split, the collator's batches for every `max_length` /
//! `truncation_mode` (exact), the summed log-probs (1e-4), and for **every case** (bar
//! options `rl::dpo` does not implement, see `unsupported`; none in the public file) the
//! loss (1e-4 relative, 1e-6 absolute) and the logged metrics (1e-4 relative; counts
//! exactly). `entropy` and `mean_token_accuracy` need the model's per-token entropy and
//! argmax, which the file does not dump; their formulas are unit-tested in `rl::dpo`.

mod rl_fixture;

use candle_core::{DType, Device};
use rl_fixture::*;
use rlhf_ops::rl::dpo::{
    dpo_loss, dpo_token_metrics, DpoLossConfig, DpoLossInputs, DpoLossType, DpoReference, DpoTokenOutputs,
};
use rlhf_ops::rl::dpo_data::{
    append_eos, collate_preference, keeps_completion_tokens, split_preference, PreferenceIds, TruncationMode,
};
use rlhf_ops::rl::logprobs::masked_sequence_sum;
use serde_json::Value;

fn u32s(v: &Value) -> Vec<u32> {
    f64s(v).into_iter().map(|x| x as u32).collect()
}

fn examples(fx: &Value) -> Vec<PreferenceIds> {
    fx["tokenized"]
        .as_array()
        .expect("tokenized")
        .iter()
        .map(|t| PreferenceIds {
            prompt_ids: u32s(&t["prompt_ids"]),
            chosen_ids: u32s(&t["chosen_ids"]),
            rejected_ids: u32s(&t["rejected_ids"]),
        })
        .collect()
}

/// The model's EOS token text (`special_tokens_map.json`), if the model directory is there.
fn eos_text(fx: &Value) -> Option<String> {
    let map = model_file(fx, "special_tokens_map.json")?;
    let eos = &map["eos_token"];
    eos.as_str().or_else(|| eos["content"].as_str()).map(str::to_string)
}

#[test]
fn eos_is_appended_as_text_and_the_prompt_is_the_common_prefix() {
    let fx = load("dpo");
    let tokenized = fx["tokenized"].as_array().unwrap();
    if let Some(eos) = eos_text(&fx) {
        for (row, t) in fx["rows"].as_array().unwrap().iter().zip(tokenized) {
            for key in ["chosen", "rejected"] {
                assert_eq!(append_eos(row[key].as_str().unwrap(), &eos), t[key].as_str().unwrap());
            }
        }
    }
    for ex in examples(&fx) {
        let pc = [ex.prompt_ids.clone(), ex.chosen_ids.clone()].concat();
        let pr = [ex.prompt_ids.clone(), ex.rejected_ids.clone()].concat();
        assert_eq!(split_preference(&ex.prompt_ids, &pc, &pr), ex);
    }
    assert!(!tokenized.is_empty());
}

/// `(max_length, truncation_mode)` of every batch, from the cases that use it.
fn batch_settings(fx: &Value) -> Vec<(String, Option<usize>, TruncationMode)> {
    let mut out: Vec<(String, Option<usize>, TruncationMode)> = Vec::new();
    for case in fx["cases"].as_array().unwrap() {
        let key = case["batch"].as_str().unwrap().to_string();
        if out.iter().any(|(k, _, _)| *k == key) {
            continue;
        }
        let c = &case["config"];
        let max_length = c["max_length"].as_u64().map(|m| m as usize);
        let mode = TruncationMode::from_trl_name(c["truncation_mode"].as_str().unwrap()).expect("truncation_mode");
        out.push((key, max_length, mode));
    }
    out
}

#[test]
fn the_collator_builds_trls_batches() {
    let fx = load("dpo");
    let pad = fx["collator"]["pad_token_id"].as_u64().expect("pad_token_id") as u32;
    let settings = batch_settings(&fx);
    for (key, max_length, mode) in &settings {
        let kept: Vec<PreferenceIds> = examples(&fx)
            .into_iter()
            .filter(|e| keeps_completion_tokens(e, *max_length, *mode))
            .collect();
        let batch = collate_preference(&kept, pad, *max_length, *mode, None).unwrap();
        let want = &fx["batches"][key.as_str()];
        assert_eq!(batch.input_ids, ids(&want["input_ids"]), "{key}: input_ids");
        assert_eq!(
            batch.attention_mask,
            ids(&want["attention_mask"]),
            "{key}: attention_mask"
        );
        assert_eq!(
            batch.completion_mask,
            ids(&want["completion_mask"]),
            "{key}: completion_mask"
        );

        // The summed completion log-probs are the masked sums of the per-token ones.
        let (_, _, cmask) = batch.to_tensors(&Device::Cpu).unwrap();
        let cols = cmask.dim(1).unwrap() - 1;
        let shift = cmask.narrow(1, 1, cols).unwrap();
        for who in ["policy", "ref"] {
            let per_token = tensor(&want[format!("{who}_per_token_logps").as_str()], DType::F32);
            let sums = masked_sequence_sum(&per_token, &shift).unwrap();
            let sums = sums.to_dtype(DType::F64).unwrap().to_vec1::<f64>().unwrap();
            let n = sums.len() / 2;
            assert_all(
                key,
                "chosen",
                &sums[..n],
                &f64s(&want[format!("{who}_logps_chosen").as_str()]),
                1e-6,
                1e-4,
            );
            assert_all(
                key,
                "rejected",
                &sums[n..],
                &f64s(&want[format!("{who}_logps_rejected").as_str()]),
                1e-6,
                1e-4,
            );
        }
    }
    assert!(!settings.is_empty());
}

/// The DPOConfig options `rl::dpo` does not implement, when a case sets one.
fn unsupported(c: &Value) -> Option<&'static str> {
    let set = |key: &str| c.get(key).is_some_and(|v| !v.is_null() && *v != Value::Bool(false));
    if c.get("f_divergence_type")
        .and_then(Value::as_str)
        .is_some_and(|f| f != "reverse_kl")
    {
        Some("f_divergence_type other than reverse_kl")
    } else if set("use_weighting") {
        Some("use_weighting")
    } else if set("ld_alpha") {
        Some("ld_alpha")
    } else {
        None
    }
}

fn loss_config(c: &Value) -> DpoLossConfig {
    let loss_types = c["loss_type"]
        .as_array()
        .expect("loss_type list")
        .iter()
        .map(|t| DpoLossType::from_trl_name(t.as_str().unwrap()).unwrap_or_else(|| panic!("loss type {t}")))
        .collect();
    DpoLossConfig {
        loss_types,
        loss_weights: c["loss_weights"].as_array().map(|w| w.iter().map(num).collect()),
        beta: num(&c["beta"]),
        label_smoothing: num(&c["label_smoothing"]),
        discopop_tau: c.get("discopop_tau").map_or(0.05, num),
    }
}

#[test]
fn every_dpo_case_matches_trl() {
    let fx = load("dpo");
    let cases = fx["cases"].as_array().expect("cases");
    let mut worst_loss = 0f64;
    let (mut checked, mut skipped) = (0, 0);
    for case in cases {
        let id = case["id"].as_str().expect("id");
        if let Some(reason) = unsupported(&case["config"]) {
            eprintln!("{id}: skipped ({reason} is not implemented)");
            skipped += 1;
            continue;
        }
        let batch = &fx["batches"][case["batch"].as_str().unwrap()];
        let f32t = |v: &Value| tensor(v, DType::F32);
        let policy = f32t(&batch["policy_per_token_logps"]);
        let ref_tokens = f32t(&batch["ref_per_token_logps"]);
        let cmask = f32t(&batch["completion_mask"]);
        let pre = &case["precomputed_ref"];
        let (pre_c, pre_r);
        let reference = match case["config"]["ref"].as_str().unwrap() {
            "ref_model" => DpoReference::PerToken(&ref_tokens),
            "precomputed" => {
                pre_c = f32t(&pre["ref_chosen_logps"]);
                pre_r = f32t(&pre["ref_rejected_logps"]);
                DpoReference::Summed {
                    chosen: &pre_c,
                    rejected: &pre_r,
                }
            }
            other => panic!("{id}: unknown ref {other}"),
        };
        let inputs = DpoLossInputs {
            policy_logps: &policy,
            reference,
            completion_mask: &cmask,
        };
        let out = dpo_loss(&inputs, &loss_config(&case["config"])).unwrap_or_else(|e| panic!("{id}: {e}"));
        let (got, want) = (scalar(&out.loss), num(&case["loss"]));
        assert!(close(got, want, 1e-4, 1e-6), "{id}: loss {got}, TRL {want}");
        worst_loss = worst_loss.max((got - want).abs() / want.abs().max(1e-2));

        // Token metrics: logits/* and num_tokens from the dump; entropy and
        // mean_token_accuracy need the model (zeros stand in and are not compared).
        let zeros = policy.zeros_like().unwrap();
        let token = dpo_token_metrics(
            &DpoTokenOutputs {
                entropy: &zeros,
                mean_logits: &f32t(&batch["policy_per_token_mean_logits"]),
                is_top1: &zeros,
                completion_mask: &cmask,
                attention_mask: &f32t(&batch["attention_mask"]),
            },
            0.0,
        )
        .unwrap();
        let mut metrics = out.metrics;
        metrics.extend(token);
        let mut logged = case["logged"].clone();
        for unavailable in ["entropy", "mean_token_accuracy"] {
            metrics.remove(unavailable);
            logged.as_object_mut().unwrap().remove(unavailable);
        }
        assert_logged(id, &metrics, &logged);
        checked += 1;
    }
    assert_eq!(checked + skipped, cases.len());
    eprintln!("dpo: {checked} cases ({skipped} skipped), worst loss error {worst_loss:.1e} (relative; absolute / 1e-2 near 0)");
    assert!(checked > 0, "no cases in dpo.json");
}
