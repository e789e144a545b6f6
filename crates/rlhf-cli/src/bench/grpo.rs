//! `grpo-small` and `grpo-small-lora` (`WORKLOADS.md`): one GRPO step of the trainer's own
//! stages on the SmolLM2-135M shape — 2 prompts × 8 completions of exactly 64 sampled tokens
//! (each prompt prefilled once), the `distinct_words` rule, `dapo`, AdamW lr 1e-6 — with the
//! seconds of each stage reported beside the total.

use std::time::Instant;

use candle_core::{DType, Device};
use rlhf_models::{Fwd, LoadOptions, Model};
use rlhf_train::grpo_config::GrpoConfig;
use rlhf_train::online::rollout::{completion_streams, generate, score, Sampler};
use rlhf_train::online::Reference;
use rlhf_train::optim::{AdamConfig, AdamW, Grads};
use rlhf_train::reward_fns::RewardFuncs;
use serde_json::json;

/// Runs the workload: full fine-tuning with beta 0 (no reference), or LoRA r 16, alpha 32
/// on `q_proj`,`v_proj` with beta 0.04 (reference = adapters disabled).
pub(super) fn grpo(name: &str, lora: bool, steps: usize) -> anyhow::Result<()> {
    let tok = rlhf_train::assets::gpt2_tokenizer()?;
    let mut model = Model::random(super::smollm_shape()?, 0, DType::F32, &Device::Cpu)?;
    model.set_tokenizer(tok.clone());
    let mut cfg = GrpoConfig::default();
    cfg.online.rewards.reward_funcs = vec!["distinct_words".into()];
    cfg.online.num_generations = 8;
    cfg.online.max_completion_length = 64;
    cfg.args.per_device_train_batch_size = 16;
    cfg.args.learning_rate = 1e-6;
    if lora {
        cfg.beta = 0.04;
        cfg.peft.use_peft = true;
        cfg.peft.lora_r = 16;
        cfg.peft.lora_alpha = 32.0;
        cfg.peft.lora_target_modules = Some(vec!["q_proj".into(), "v_proj".into()]);
        // The reference script's `LoraConfig` keeps PEFT's default dropout, 0.
        cfg.peft.lora_dropout = 0.0;
        if let Some(counts) = cfg.peft.apply(&mut model, "CAUSAL_LM", 0)? {
            eprintln!("{counts}");
        }
    } else {
        model.set_trainable(true)?;
    }
    let plan = cfg.plan(1)?;
    let reference = if lora {
        Reference::AdaptersDisabled
    } else {
        Reference::None
    };
    let mut funcs = RewardFuncs::from_args(&cfg.online.rewards, None, 64, &LoadOptions::default())?;
    // Exactly 64 new tokens: no EOS stops a row.
    let gen = rlhf_models::GenerationConfig {
        eos_token_id: vec![],
        ..plan.online.generation_config(vec![], tok.pad_token_id)
    };
    let texts: Vec<String> = rlhf_train::assets::ppo_prompts().into_iter().take(2).collect();
    let prompts: Vec<Vec<u32>> = texts.iter().map(|p| tok.encode(p)).collect::<Result<_, _>>()?;
    let rows: Vec<rlhf_train::data::PromptRow> = texts
        .iter()
        .map(|p| rlhf_train::data::PromptRow {
            prompt: p.clone(),
            columns: Default::default(),
            conversation: None,
        })
        .collect();
    let row_refs: Vec<&rlhf_train::data::PromptRow> = rows.iter().collect();
    let mut opt = AdamW::new(rlhf_train::trainer::trainable_params(&model), AdamConfig::default());
    let vars: Vec<_> = opt.vars().into_iter().cloned().collect();
    let var_refs: Vec<_> = vars.iter().collect();
    let mut generation = 0u64;
    let mut phases: Vec<[f64; 5]> = Vec::new();
    let times = super::time_steps(1, steps, || {
        let t = Instant::now();
        let mut streams = completion_streams(0, generation, 16);
        generation += 1;
        let rollout = generate(&model, &prompts, 8, &Sampler::Policy(&gen), &mut streams)?;
        let t_gen = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let rewards = score(&mut funcs, &row_refs, 8, &rollout)?;
        let (buf, _) = rlhf_train::grpo::prepare(&model, &reference, &plan, &rollout, &rewards, 0.0, false)?;
        let t_score = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let sink = rlhf_ops::sink::GradSink::new();
        let all: Vec<usize> = (0..buf.len()).collect();
        let (loss, _) = {
            let mut keys = rlhf_ops::dropout::DropoutKeys::new(generation, all.iter().map(|&r| r as u64).collect());
            let mut fwd = Fwd::train(&mut keys).with_sink(&sink);
            rlhf_train::grpo::micro_loss(&model, &plan, &buf, (&all, &all), 1, &mut fwd)?
        };
        let t_fwd = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let mut grads = Grads::new(vars.len());
        grads.add(&var_refs, &loss.backward()?)?;
        grads.add_sink(&var_refs, sink.take())?;
        let t_bwd = t.elapsed().as_secs_f64();
        let t = Instant::now();
        grads.clip(1.0);
        opt.step(&grads, 1e-6)?;
        phases.push([t_gen, t_score, t_fwd, t_bwd, t.elapsed().as_secs_f64()]);
        Ok(())
    })?;
    let (median, min, max) = super::stats(times);
    // The timed steps' phases (the warm-up's first entry left out), medians.
    let timed = &phases[phases.len() - steps..];
    let phase = |i: usize| super::stats(timed.iter().map(|p| p[i]).collect()).0;
    println!(
        "{}",
        json!({"workload": name, "seconds_per_step": median, "min": min, "max": max,
            "throughput": 16.0 * 64.0 / median, "unit": "completion tokens/s", "peak_rss_mib": super::peak_rss_mib(),
            "threads": super::threads(), "dtype": super::dtype_name(), "completions": 16, "new_tokens": 64,
            "generation_s": phase(0), "rewards_and_reference_s": phase(1), "loss_forward_s": phase(2),
            "backward_s": phase(3), "optimizer_s": phase(4)})
    );
    Ok(())
}
