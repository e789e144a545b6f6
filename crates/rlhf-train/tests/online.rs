//! GRPO and RLOO end to end on tiny models: a rule reward rises on held-out prompts the run
//! never saw (GPT-2 with a regex, a Llama-family model with a length target), a run resumed
//! from a checkpoint inside a generation batch continues exactly, and LoRA on an int8 base
//! (reference = adapters disabled) trains and saves an adapter.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use rlhf_models::{LoadOptions, Model};
use rlhf_train::data::read_prompt_rows;
use rlhf_train::grpo_config::GrpoConfig;
use rlhf_train::online::run::evaluate;
use rlhf_train::online_config::OnlineArgs;
use rlhf_train::reward_fns::RewardFuncs;
use rlhf_train::rloo_config::RlooConfig;
use rlhf_train::trainer::TrainingArgs;

/// Distinct prompts of `fixtures/data/ppo_prompts.jsonl`: the first `n_train` to
/// `train.jsonl`, the last `n_eval` (none of them in training) to `eval.jsonl`.
fn split_prompts(dir: &Path, n_train: usize, n_eval: usize) -> (PathBuf, PathBuf) {
    let text = std::fs::read_to_string(fixtures().join("data/ppo_prompts.jsonl")).unwrap();
    let mut seen = std::collections::BTreeSet::new();
    let unique: Vec<&str> = text.lines().filter(|l| seen.insert(*l)).collect();
    assert!(unique.len() >= n_train + n_eval, "{} distinct prompts", unique.len());
    let (train, eval) = (dir.join("train.jsonl"), dir.join("eval.jsonl"));
    std::fs::write(&train, unique[..n_train].join("\n") + "\n").unwrap();
    std::fs::write(&eval, unique[unique.len() - n_eval..].join("\n") + "\n").unwrap();
    (train, eval)
}

/// Mean reward of `model`'s completions (4 per prompt, fixed streams) on the prompts of
/// `file` under the run's reward functions.
fn held_out_reward(model: &Model, online: &OnlineArgs, args: &TrainingArgs, file: &Path) -> f64 {
    let plan = online.plan(args, 1, "test").unwrap();
    let set = read_prompt_rows(file).unwrap();
    let tok = model.tokenizer().unwrap();
    let ids: Vec<Vec<u32>> = set
        .rows
        .iter()
        .map(|r| tok.encode_special(&r.prompt, true).unwrap())
        .collect();
    let mut funcs = RewardFuncs::from_args(
        &online.rewards,
        online.reward_weights.as_deref(),
        online.max_completion_length,
        &LoadOptions::default(),
    )
    .unwrap();
    let gen = plan.generation_config(model.eos_token_ids(), tok.pad_token_id);
    evaluate(model, &set.rows, &ids, &mut funcs, &plan, &gen, 7).unwrap()["reward"]
}

fn load(dir: &Path) -> Model {
    Model::load(dir, &LoadOptions::default()).unwrap()
}

/// A small, fast GRPO run: 2 prompts × 8 completions per step, constant learning rate.
fn grpo_cfg(model: &Path, train: &Path, out: &Path, steps: i64, lr: f64) -> GrpoConfig {
    let mut c = GrpoConfig {
        model_name_or_path: model.display().to_string(),
        train_file: Some(train.display().to_string()),
        ..GrpoConfig::default()
    };
    c.online.num_generations = 8;
    c.online.max_completion_length = 12;
    c.args.per_device_train_batch_size = 16;
    c.args.learning_rate = lr;
    c.args.lr_scheduler_type = "constant".into();
    c.args.max_steps = steps;
    c.args.logging_steps = 5;
    c.args.save_strategy = "no".into();
    c.args.output_dir = out.display().to_string();
    c.args.quiet = true;
    c
}

#[test]
fn grpo_raises_a_regex_reward_on_held_out_prompts_on_gpt2() {
    let tmp = tempfile::tempdir().unwrap();
    let (train, eval) = split_prompts(tmp.path(), 150, 40);
    let model = fixtures().join("tiny-gpt2");
    let mut cfg = grpo_cfg(&model, &train, &tmp.path().join("run"), 25, 1e-2);
    cfg.online.rewards.reward_funcs = vec!["regex_match".into()];
    cfg.online.rewards.reward_regex = Some(r"\d".into());
    let before = held_out_reward(&load(&model), &cfg.online, &cfg.args, &eval);
    let out = rlhf_train::grpo::train(&cfg).unwrap();
    let after = held_out_reward(&out.model, &cfg.online, &cfg.args, &eval);
    assert!(after > before + 0.25, "held-out regex reward {before:.3} -> {after:.3}");
    // The saved policy is the trained one.
    let saved = held_out_reward(&load(&out.final_dir), &cfg.online, &cfg.args, &eval);
    assert!((saved - after).abs() < 1e-9);
}

#[test]
fn grpo_raises_a_length_reward_on_held_out_prompts_on_llama() {
    let tmp = tempfile::tempdir().unwrap();
    let (train, eval) = split_prompts(tmp.path(), 150, 40);
    let model = fixtures().join("families/tiny-llama");
    let mut cfg = grpo_cfg(&model, &train, &tmp.path().join("run"), 25, 1e-2);
    cfg.online.max_completion_length = 16;
    cfg.online.rewards.reward_funcs = vec!["length_target".into()];
    cfg.online.rewards.reward_target_length = Some(4);
    let before = held_out_reward(&load(&model), &cfg.online, &cfg.args, &eval);
    let out = rlhf_train::grpo::train(&cfg).unwrap();
    let after = held_out_reward(&out.model, &cfg.online, &cfg.args, &eval);
    assert!(after > before + 0.5, "held-out length reward {before:.3} -> {after:.3}");
}

#[test]
fn rloo_raises_a_length_reward_on_held_out_prompts_on_llama() {
    let tmp = tempfile::tempdir().unwrap();
    let (train, eval) = split_prompts(tmp.path(), 150, 40);
    let model = fixtures().join("families/tiny-llama");
    let mut c = RlooConfig {
        model_name_or_path: model.display().to_string(),
        train_file: Some(train.display().to_string()),
        ..RlooConfig::default()
    };
    c.online.num_generations = 8;
    c.online.max_completion_length = 16;
    c.online.rewards.reward_funcs = vec!["length_target".into()];
    c.online.rewards.reward_target_length = Some(4);
    c.args = grpo_cfg(&model, &train, &tmp.path().join("run"), 30, 1e-2).args;
    // 4 prompts × 8 per step: RLOO's first signal waits for a completion that stops early.
    c.args.per_device_train_batch_size = 32;
    let before = held_out_reward(&load(&model), &c.online, &c.args, &eval);
    let out = rlhf_train::rloo::train(&c).unwrap();
    let after = held_out_reward(&out.model, &c.online, &c.args, &eval);
    assert!(after > before + 0.5, "held-out length reward {before:.3} -> {after:.3}");
}

#[test]
fn a_grpo_run_resumed_inside_a_generation_batch_continues_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let (train, _) = split_prompts(tmp.path(), 40, 1);
    let model = fixtures().join("tiny-gpt2");
    let mut cfg = grpo_cfg(&model, &train, &tmp.path().join("full"), 6, 1e-3);
    cfg.online.rewards.reward_funcs = vec!["distinct_words".into()];
    cfg.online.num_generations = 4;
    cfg.online.max_completion_length = 6;
    cfg.args.per_device_train_batch_size = 4;
    // Two micro-batches per generation batch, two passes: checkpoint 3 is mid-buffer.
    cfg.online.steps_per_generation = Some(2);
    cfg.online.num_iterations = 2;
    cfg.beta = 0.04;
    cfg.args.disable_dropout = false; // dropout on: its stream must resume too
    cfg.args.logging_steps = 2; // step 3's metrics wait in the checkpoint's log
    cfg.args.save_strategy = "steps".into();
    cfg.args.save_steps = 3;
    rlhf_train::grpo::train(&cfg).unwrap();
    let full = tmp.path().join("full");
    let part = tmp.path().join("part");
    std::fs::create_dir_all(part.join("checkpoint-3")).unwrap();
    for e in std::fs::read_dir(full.join("checkpoint-3")).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), part.join("checkpoint-3").join(e.file_name())).unwrap();
    }
    let lines: Vec<String> = std::fs::read_to_string(full.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .take(1)
        .map(String::from)
        .collect();
    std::fs::write(part.join("metrics.jsonl"), lines.join("\n") + "\n").unwrap();
    std::fs::copy(full.join("config.toml"), part.join("config.toml")).unwrap();
    let mut resumed = cfg.clone();
    resumed.args.output_dir = part.display().to_string();
    resumed.args.resume_from_checkpoint = Some("latest".into());
    rlhf_train::grpo::train(&resumed).unwrap();
    assert_eq!(metrics(&part), metrics(&full));
    let w = |d: &Path| rlhf_train::checkpoint::load_tensors(&d.join("final/model.safetensors")).unwrap();
    let (a, b) = (w(&part), w(&full));
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    for (k, t) in &a {
        let d = (t - &b[k])
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(d, 0.0, "{k}");
    }
}

#[test]
fn grpo_with_lora_on_an_int8_base_trains_and_saves_an_adapter() {
    let tmp = tempfile::tempdir().unwrap();
    let (train, _) = split_prompts(tmp.path(), 20, 1);
    let model = fixtures().join("families/tiny-llama");
    let mut cfg = grpo_cfg(&model, &train, &tmp.path().join("run"), 2, 1e-3);
    cfg.online.rewards.reward_funcs = vec!["length_target".into()];
    cfg.online.rewards.reward_target_length = Some(4);
    cfg.online.num_generations = 4;
    cfg.online.max_completion_length = 8;
    cfg.args.per_device_train_batch_size = 8;
    cfg.args.logging_steps = 1;
    cfg.beta = 0.04; // the reference is the policy with its adapters disabled
    cfg.peft.use_peft = true;
    cfg.peft.lora_target_modules = Some(vec!["q_proj".into(), "v_proj".into()]);
    cfg.peft.quant.load_in_8bit = true;
    let out = rlhf_train::grpo::train(&cfg).unwrap();
    assert!(out.final_dir.join("adapter_model.safetensors").is_file());
    let m = metrics(&tmp.path().join("run"));
    assert_eq!(m.len(), 2);
    for line in &m {
        let kl = line["kl"].as_f64().unwrap();
        assert!(kl.is_finite() && kl >= 0.0, "{line}");
    }
    // Step 1 starts from zero-initialised adapters: policy = reference, KL 0.
    assert!(m[0]["kl"].as_f64().unwrap().abs() < 1e-6, "{}", m[0]);
}

/// Conversational prompts (TRL's `[{"role", "content"}]` lists) are rendered with the model's
/// chat template and the generation prompt; GRPO trains on them (tiny Qwen2 has a template),
/// and a model without a template names the row.
#[test]
fn grpo_renders_conversational_prompts_with_the_chat_template() {
    let tmp = tempfile::tempdir().unwrap();
    let rows: Vec<String> = (0..8)
        .map(|i| serde_json::json!({"prompt": [{"role": "user", "content": format!("Count to {i}.")}]}).to_string())
        .collect();
    let train = tmp.path().join("chat_prompts.jsonl");
    std::fs::write(&train, rows.join("\n")).unwrap();
    let qwen = fixtures().join("families/tiny-qwen2");
    let mut cfg = grpo_cfg(&qwen, &train, &tmp.path().join("run"), 2, 1e-3);
    cfg.online.rewards.reward_funcs = vec!["length_target".into()];
    cfg.online.rewards.reward_target_length = Some(4);
    let out = rlhf_train::grpo::train(&cfg).unwrap();
    assert!(out.final_dir.is_dir());
    let metrics = std::fs::read_to_string(tmp.path().join("run/metrics.jsonl")).unwrap();
    assert!(metrics.contains("\"reward\""), "{metrics}");

    let mistral = fixtures().join("families/tiny-mistral");
    let mut cfg = grpo_cfg(&mistral, &train, &tmp.path().join("run2"), 1, 1e-3);
    cfg.online.rewards.reward_funcs = vec!["distinct_words".into()];
    let Err(err) = rlhf_train::grpo::train(&cfg) else {
        panic!("a conversation without a chat template must be an error")
    };
    let err = err.to_string();
    assert!(err.contains("row 1") && err.contains("chat template"), "{err}");
}
