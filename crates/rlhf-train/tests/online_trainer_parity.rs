//! The trainers' own path — fixed completions through `online::rollout::generate`, then
//! `grpo::prepare` / `rloo::prepare` (masks, old and reference log-probs from forward passes
//! of `fixtures/tiny-gpt2`, advantages) and `grpo::micro_loss` / `rloo::micro_loss` with
//! `backward` — against TRL 1.16's `GRPOTrainer` / `RLOOTrainer` on the same batch.
//!
//! Expected numbers: `fixtures/algorithms/{grpo,rloo}.json` (made by `algo_fixtures.py`, trl
//! 1.16.0, float32, CPU; README beside them), with the policy's `ln_f` set to the `old` /
//! `current` vectors of `model_states.json` and the reference the unchanged file. Each case
//! checked (40 of GRPO's 114, all 20 of RLOO's): advantages to 1e-5 (absolute), the loss to
//! 1e-4 (relative; 1e-6 absolute near 0, 1e-5 for RLOO's sequence ratios), the gradient norm
//! to 1e-3 (relative) and every logged metric to 1e-4 (relative; 1e-6 absolute). The
//! `e2e_train` runs (two AdamW steps on one buffered batch) are checked the same way.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use rlhf_models::{Fwd, LoadOptions, Model};
use rlhf_ops::sink::GradSink;
use rlhf_train::grpo_config::GrpoConfig;
use rlhf_train::online::buffer::Buffer;
use rlhf_train::online::rollout::{generate, Sampler};
use rlhf_train::online::Reference;
use rlhf_train::optim::{AdamConfig, AdamW, Grads};
use rlhf_train::rloo_config::RlooConfig;
use rlhf_train::trainer::trainable_params;
use serde_json::Value;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn load(name: &str) -> Value {
    let p = repo().join("fixtures/algorithms").join(format!("{name}.json"));
    serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap()
}

fn num(v: &Value) -> f64 {
    v.as_f64().unwrap_or(f64::NAN)
}

fn rows(v: &Value) -> Vec<Vec<f64>> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_array().unwrap().iter().map(num).collect())
        .collect()
}

fn ids(v: &Value) -> Vec<Vec<u32>> {
    rows(v)
        .into_iter()
        .map(|r| r.into_iter().map(|x| x as u32).collect())
        .collect()
}

fn close(got: f64, want: f64, rel: f64, abs: f64) -> bool {
    (got.is_nan() && want.is_nan()) || (got - want).abs() <= abs.max(rel * want.abs())
}

/// tiny-gpt2 with `ln_f` in weight state `state` (`ref`, `old`, `current`), dropout off,
/// every weight trainable.
fn tiny(state: &str) -> Model {
    let mut m = Model::load(&repo().join("fixtures/tiny-gpt2"), &LoadOptions::default()).unwrap();
    m.disable_dropout();
    m.set_trainable(true).unwrap();
    set_state(&mut m, state);
    m
}

fn set_state(m: &mut Model, state: &str) {
    let states = load("model_states");
    let s = &states["states"][state];
    let vec = |k: &str| -> candle_core::Tensor {
        let v: Vec<f32> = s[k]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap() as f32)
            .collect();
        let n = v.len();
        candle_core::Tensor::from_vec(v, n, &candle_core::Device::Cpu).unwrap()
    };
    let norm = &mut m.backbone_mut().norm;
    norm.weight.assign(&vec("transformer.ln_f.weight")).unwrap();
    norm.bias
        .as_mut()
        .unwrap()
        .assign(&vec("transformer.ln_f.bias"))
        .unwrap();
}

/// Loss value, gradient norm and the loss metrics of micro-batch `0..B` (one micro-batch,
/// no accumulation, as the fixtures).
fn loss_and_grad(
    policy: &Model,
    buf: &Buffer,
    f: impl Fn(&Model, &Buffer, &[usize], &mut Fwd) -> (candle_core::Tensor, BTreeMap<String, f64>),
) -> (f64, f64, BTreeMap<String, f64>) {
    let (loss, norm, metrics, _) = loss_and_grads(policy, buf, f);
    (loss, norm, metrics)
}

/// [`loss_and_grad`] and the gradients.
fn loss_and_grads(
    policy: &Model,
    buf: &Buffer,
    f: impl Fn(&Model, &Buffer, &[usize], &mut Fwd) -> (candle_core::Tensor, BTreeMap<String, f64>),
) -> (f64, f64, BTreeMap<String, f64>, Grads) {
    let params = trainable_params(policy);
    let vars: Vec<_> = params.iter().map(|(_, v)| v).collect();
    let sink = GradSink::new();
    let mut fwd = Fwd::eval_grad().with_sink(&sink);
    let rows: Vec<usize> = (0..buf.len()).collect();
    let (loss, metrics) = f(policy, buf, &rows, &mut fwd);
    let mut grads = Grads::new(vars.len());
    grads.add(&vars, &loss.backward().unwrap()).unwrap();
    grads.add_sink(&vars, sink.take()).unwrap();
    let norm = grads.norm();
    (loss.to_scalar::<f32>().unwrap() as f64, norm, metrics, grads)
}

fn check_logged(id: &str, got: &BTreeMap<String, f64>, logged: &Value) {
    for (k, v) in logged.as_object().unwrap() {
        if matches!(k.as_str(), "epoch" | "step" | "learning_rate") {
            continue;
        }
        let g = *got.get(k).unwrap_or_else(|| panic!("{id}: metric {k} not computed"));
        let tol = if k == "grad_norm" { 1e-3 } else { 1e-4 };
        // `loss` is checked by the caller with its own absolute tolerance.
        let abs = if k == "loss" { 1e-5 } else { 1e-6 };
        assert!(close(g, num(v), tol, abs), "{id}: {k} = {g}, TRL {}", num(v));
    }
    for k in got.keys() {
        assert!(logged.get(k).is_some(), "{id}: {k} is not a TRL metric");
    }
}

#[test]
fn the_grpo_trainer_path_matches_trl_on_every_case() {
    let fx = load("grpo");
    let batch = &fx["batch"];
    let g = fx["num_generations"].as_u64().unwrap() as usize;
    let unpadded = ids(&batch["prompt_ids_unpadded"]);
    let prompts: Vec<Vec<u32>> = unpadded.iter().step_by(g).cloned().collect();
    let width = batch["prompt_ids"][0].as_array().unwrap().len();
    let generated: Vec<Vec<u32>> = ids(&batch["generate_output_ids"])
        .into_iter()
        .map(|r| r[width..].to_vec())
        .collect();
    let rewards = rows(&batch["rewards_per_func"]);
    let reference_model = tiny("ref");
    let mut policy = tiny("old");
    let mut checked = 0;
    // A third of the 114 cases (every loss type, β, ε, IS level, state, temperature and
    // truncation masking appear), plus the delta and bias-correction cases: the loss math
    // of every case is `rlhf-ops`'s grpo_parity; this checks the trainer's path.
    let cases = fx["cases"].as_array().unwrap();
    for (i, case) in cases.iter().enumerate() {
        let id = case["id"].as_str().unwrap();
        if !(i % 3 == 0 || id.contains("delta") || id.contains("use_bias")) {
            continue;
        }
        let c = &case["config"];
        let mut cfg = GrpoConfig::default();
        cfg.online.rewards.reward_funcs = vec!["distinct_words".into(), "think_format_reward".into()];
        cfg.online.reward_weights = Some(vec![1.0, 0.5]);
        cfg.online.num_generations = g;
        cfg.online.max_completion_length = fx["max_completion_length"].as_u64().unwrap() as usize;
        cfg.args.per_device_train_batch_size = 8;
        cfg.loss_type = c["loss_type"].as_str().unwrap().into();
        cfg.beta = num(&c["beta"]);
        cfg.online.epsilon = num(&c["epsilon"]);
        cfg.online.epsilon_high = c["epsilon_high"].as_f64();
        cfg.importance_sampling_level = c["importance_sampling_level"].as_str().unwrap().into();
        let off_policy = c["state"] == "off_policy";
        cfg.online.num_iterations = if off_policy { 2 } else { 1 };
        cfg.online.temperature = num(&c["temperature"]);
        cfg.online.mask_truncated_completions = c["mask_truncated_completions"].as_bool().unwrap();
        cfg.delta = c.get("delta").and_then(Value::as_f64);
        if let Some(b) = c.get("use_bias_correction_kl").and_then(Value::as_bool) {
            cfg.use_bias_correction_kl = b;
        }
        let mut plan = cfg.plan(1).unwrap();
        plan.online.reward_names = vec!["table_reward".into(), "eos_length_reward".into()];

        set_state(&mut policy, "old");
        let rollout = generate(&policy, &prompts, g, &Sampler::Fixed(&generated), &mut []).unwrap();
        assert_eq!(rollout.prompt_ids, unpadded, "{id}");
        let reference = if cfg.beta != 0.0 {
            Reference::Frozen(&reference_model)
        } else {
            Reference::None
        };
        let mtc = cfg.online.mask_truncated_completions;
        let (buf, mut metrics) =
            rlhf_train::grpo::prepare(&policy, &reference, &plan, &rollout, &rewards, 0.0, mtc).unwrap();
        assert_eq!(buf.prompt_ids, ids(&batch["prompt_ids"]), "{id}: padded prompts");
        let want_adv: Vec<f64> = fx["advantages"]["group"]["advantages"]
            .as_array()
            .unwrap()
            .iter()
            .map(num)
            .collect();
        for (i, (a, w)) in buf.advantages.iter().zip(&want_adv).enumerate() {
            assert!((a - w).abs() <= 1e-5, "{id}: advantage {i} = {a}, TRL {w}");
        }
        if off_policy {
            set_state(&mut policy, "current");
        }
        let (loss, grad_norm, m) = loss_and_grad(&policy, &buf, |p, b, r, fwd| {
            rlhf_train::grpo::micro_loss(p, &plan, b, (r, r), 1, fwd).unwrap()
        });
        assert!(
            close(loss, num(&case["loss"]), 1e-4, 1e-6),
            "{id}: loss {loss}, TRL {}",
            case["loss"]
        );
        metrics.extend(m);
        metrics.insert("loss".into(), loss);
        metrics.insert("grad_norm".into(), grad_norm);
        check_logged(id, &metrics, &case["logged"]);
        checked += 1;
    }
    assert_eq!(checked, 40);
}

#[test]
fn the_rloo_trainer_path_matches_trl_on_every_case() {
    let fx = load("rloo");
    let reference_model = tiny("ref");
    let mut policy = tiny("old");
    let mut checked = 0;
    for case in fx["cases"].as_array().unwrap() {
        let id = case["id"].as_str().unwrap();
        let c = &case["config"];
        let batch = &fx["batches"][case["batch"].as_str().unwrap()];
        let g = c["num_generations"].as_u64().unwrap() as usize;
        let mask = ids(&batch["prompt_mask"]);
        let unpadded: Vec<Vec<u32>> = ids(&batch["prompt_ids"])
            .iter()
            .zip(&mask)
            .map(|(p, m)| p.iter().zip(m).filter(|(_, &m)| m == 1).map(|(&t, _)| t).collect())
            .collect();
        let prompts: Vec<Vec<u32>> = unpadded.iter().step_by(g).cloned().collect();
        let completions = ids(&batch["completion_ids"]);
        let rewards = rows(&batch["rewards_per_func"]);

        let mut cfg = RlooConfig::default();
        cfg.online.rewards.reward_funcs = vec!["distinct_words".into(), "think_format_reward".into()];
        cfg.online.reward_weights = Some(vec![1.0, 0.5]);
        cfg.online.num_generations = g;
        cfg.online.max_completion_length = 8;
        cfg.args.per_device_train_batch_size = completions.len();
        cfg.beta = num(&c["beta"]);
        cfg.online.epsilon = num(&c["epsilon"]);
        cfg.online.epsilon_high = c["epsilon_high"].as_f64();
        let off_policy = c["state"] == "off_policy";
        cfg.online.num_iterations = if off_policy { 2 } else { 1 };
        cfg.online.temperature = num(&c["temperature"]);
        cfg.online.mask_truncated_completions = c["mask_truncated_completions"].as_bool().unwrap();
        cfg.normalize_advantages = c["normalize_advantages"].as_bool().unwrap();
        cfg.reward_clip_range = c["reward_clip_range"]
            .as_array()
            .map(|r| (r[0].as_f64().unwrap(), r[1].as_f64().unwrap()));
        let mut plan = cfg.plan(1).unwrap();
        plan.online.reward_names = vec!["table_reward".into(), "eos_length_reward".into()];

        set_state(&mut policy, "old");
        let rollout = generate(&policy, &prompts, g, &Sampler::Fixed(&completions), &mut []).unwrap();
        let reference = if cfg.beta != 0.0 {
            Reference::Frozen(&reference_model)
        } else {
            Reference::None
        };
        let mtc = cfg.online.mask_truncated_completions;
        let (buf, mut metrics) =
            rlhf_train::rloo::prepare(&policy, &reference, &plan, &rollout, &rewards, 0.0, mtc).unwrap();
        for (i, (a, w)) in buf
            .advantages
            .iter()
            .zip(case["advantages"].as_array().unwrap())
            .enumerate()
        {
            assert!((a - num(w)).abs() <= 1e-5, "{id}: advantage {i} = {a}, TRL {w}");
        }
        if off_policy {
            set_state(&mut policy, "current");
        }
        let (loss, grad_norm, m) = loss_and_grad(&policy, &buf, |p, b, r, fwd| {
            rlhf_train::rloo::micro_loss(p, &plan, b, (r, r), 1, fwd).unwrap()
        });
        // The ratio is exp of a difference of sums of 8 f32 log-probs (~ -80): their
        // rounding (~5e-6) survives in a loss that is a near-cancelling mean of ±A·ratio.
        assert!(
            close(loss, num(&case["loss"]), 1e-4, 1e-5),
            "{id}: loss {loss}, TRL {}",
            case["loss"]
        );
        metrics.extend(m);
        metrics.insert("loss".into(), loss);
        metrics.insert("grad_norm".into(), grad_norm);
        check_logged(id, &metrics, &case["logged"]);
        checked += 1;
    }
    assert_eq!(checked, 20);
}

/// Two optimizer steps on one generation batch (`num_iterations = 2`, AdamW lr 1e-3,
/// constant schedule, clipping at 1.0) from the unchanged model, policy = reference: the
/// fixture's `e2e_train` log of `Trainer.train()` (generation metrics on step 1 only).
fn two_steps(
    name: &str,
    rollout_and_prepare: impl Fn(&Model, &Model) -> (Buffer, BTreeMap<String, f64>),
    loss: impl Fn(&Model, &Buffer, &[usize], &mut Fwd) -> (candle_core::Tensor, BTreeMap<String, f64>) + Copy,
) {
    let fx = load(name);
    let log = fx["e2e_train"]["log_history"].as_array().unwrap();
    let (policy, reference) = (tiny("ref"), tiny("ref"));
    let (buf, gen_metrics) = rollout_and_prepare(&policy, &reference);
    let params = trainable_params(&policy);
    let mut opt = AdamW::new(params, AdamConfig::default());
    for (k, want) in log[..2].iter().enumerate() {
        let (value, norm, m, mut grads) = loss_and_grads(&policy, &buf, loss);
        grads.clip(1.0);
        opt.step(&grads, 1e-3).unwrap();
        let mut metrics = if k == 0 { gen_metrics.clone() } else { BTreeMap::new() };
        metrics.extend(m);
        metrics.insert("loss".into(), value);
        metrics.insert("grad_norm".into(), norm);
        check_logged(&format!("{name} e2e step {}", k + 1), &metrics, want);
    }
}

#[test]
fn two_grpo_steps_on_one_buffered_batch_match_trl_train() {
    let fx = load("grpo");
    let batch = &fx["batch"];
    let g = 4;
    let unpadded = ids(&batch["prompt_ids_unpadded"]);
    let prompts: Vec<Vec<u32>> = unpadded.iter().step_by(g).cloned().collect();
    let width = batch["prompt_ids"][0].as_array().unwrap().len();
    let generated: Vec<Vec<u32>> = ids(&batch["generate_output_ids"])
        .into_iter()
        .map(|r| r[width..].to_vec())
        .collect();
    let rewards = rows(&batch["rewards_per_func"]);
    let mut cfg = GrpoConfig::default();
    cfg.online.rewards.reward_funcs = vec!["distinct_words".into(), "think_format_reward".into()];
    cfg.online.reward_weights = Some(vec![1.0, 0.5]);
    cfg.online.num_generations = g;
    cfg.online.max_completion_length = 8;
    cfg.args.per_device_train_batch_size = 8;
    cfg.beta = 0.04;
    cfg.online.num_iterations = 2;
    cfg.online.epsilon_high = Some(0.28);
    let mut plan = cfg.plan(1).unwrap();
    plan.online.reward_names = vec!["table_reward".into(), "eos_length_reward".into()];
    assert!(rlhf_train::grpo::needs_old_logps(&plan));
    two_steps(
        "grpo",
        |policy, reference| {
            let rollout = generate(policy, &prompts, g, &Sampler::Fixed(&generated), &mut []).unwrap();
            let r = Reference::Frozen(reference);
            rlhf_train::grpo::prepare(policy, &r, &plan, &rollout, &rewards, 0.0, false).unwrap()
        },
        |p, b, r, fwd| rlhf_train::grpo::micro_loss(p, &plan, b, (r, r), 1, fwd).unwrap(),
    );
}

#[test]
fn two_rloo_steps_on_one_buffered_batch_match_trl_train() {
    let fx = load("rloo");
    let batch = &fx["batches"][fx["e2e_train"]["batch"].as_str().unwrap()];
    let g = 4;
    let mask = ids(&batch["prompt_mask"]);
    let unpadded: Vec<Vec<u32>> = ids(&batch["prompt_ids"])
        .iter()
        .zip(&mask)
        .map(|(p, m)| p.iter().zip(m).filter(|(_, &m)| m == 1).map(|(&t, _)| t).collect())
        .collect();
    let prompts: Vec<Vec<u32>> = unpadded.iter().step_by(g).cloned().collect();
    let completions = ids(&batch["completion_ids"]);
    let rewards = rows(&batch["rewards_per_func"]);
    let mut cfg = RlooConfig::default();
    cfg.online.rewards.reward_funcs = vec!["distinct_words".into(), "think_format_reward".into()];
    cfg.online.reward_weights = Some(vec![1.0, 0.5]);
    cfg.online.num_generations = g;
    cfg.online.max_completion_length = 8;
    cfg.args.per_device_train_batch_size = completions.len();
    cfg.online.num_iterations = 2;
    let mut plan = cfg.plan(1).unwrap();
    plan.online.reward_names = vec!["table_reward".into(), "eos_length_reward".into()];
    two_steps(
        "rloo",
        |policy, reference| {
            let rollout = generate(policy, &prompts, g, &Sampler::Fixed(&completions), &mut []).unwrap();
            let r = Reference::Frozen(reference);
            rlhf_train::rloo::prepare(policy, &r, &plan, &rollout, &rewards, 0.0, false).unwrap()
        },
        |p, b, r, fwd| rlhf_train::rloo::micro_loss(p, &plan, b, (r, r), 1, fwd).unwrap(),
    );
}
