//! The `dpo-small` workload of `rlhf bench` (`WORKLOADS.md`): one `DPOTrainer` step.

use candle_core::{DType, Device};
use rlhf_models::{Fwd, Model, ModelConfig};
use rlhf_train::dpo::{batch_loss, prepare_examples, DpoConfig, DpoExample, RefSource};
use rlhf_train::optim::{AdamConfig, AdamW, Grads};
use serde_json::json;

use crate::bench::{dtype_name, peak_rss_mib, stats, threads, time_steps};

/// A DPO step as `DPOTrainer` runs it with `WORKLOADS.md`'s settings: 8 pairs of
/// `prefs_train.jsonl` in file order (the next 8 each step), tokenized as TRL (EOS appended,
/// prompt/completion split, `max_length` 128 keep_start), sigmoid loss with beta 0.1, a frozen
/// copy of the starting policy as reference (its forward included), one policy forward and
/// backward over `[chosen; rejected]`, clipping at 1.0, AdamW lr 1e-6; dropout off (TRL's
/// `disable_dropout`).
pub fn dpo(name: &str, cfg: ModelConfig, warmup: usize, steps: usize) -> anyhow::Result<()> {
    let mut policy = Model::random(cfg, 0, DType::F32, &Device::Cpu)?;
    policy.set_tokenizer(rlhf_train::assets::gpt2_tokenizer()?);
    policy.disable_dropout();
    let reference = policy.clone();
    policy.set_trainable(true)?;
    let dpo_cfg = DpoConfig {
        max_length: Some(128),
        ..DpoConfig::default()
    };
    let plan = dpo_cfg.plan(1)?;
    let rows = rlhf_train::data::Rows {
        path: "prefs_train.jsonl (embedded)".into(),
        rows: rlhf_train::assets::prefs_train()
            .into_iter()
            .take(64)
            .map(|(p, c, r)| {
                let mut m = serde_json::Map::new();
                m.insert("prompt".into(), p.into());
                m.insert("chosen".into(), c.into());
                m.insert("rejected".into(), r.into());
                m
            })
            .collect(),
    };
    let (examples, _) = prepare_examples(&policy, None, &rows, &plan)?;
    let params = rlhf_train::trainer::trainable_params(&policy);
    let mut opt = AdamW::new(params, AdamConfig::default());
    let vars: Vec<_> = opt.vars().into_iter().cloned().collect();
    let reference = RefSource::Forward {
        model: &reference,
        adapters: true,
    };
    let (mut step, mut tokens) = (0usize, 0usize);
    let times = time_steps(warmup, steps, || {
        let batch: Vec<&DpoExample> = (0..8).map(|k| &examples[(step * 8 + k) % examples.len()]).collect();
        step += 1;
        let sink = rlhf_ops::sink::GradSink::new();
        let out = batch_loss(
            &policy,
            reference,
            &batch,
            &plan,
            &mut Fwd::eval_grad().with_sink(&sink),
        )?;
        tokens = out.tokens;
        let var_refs: Vec<_> = vars.iter().collect();
        let mut grads = Grads::new(vars.len());
        grads.add(&var_refs, &out.loss.backward()?)?;
        grads.add_sink(&var_refs, sink.take())?;
        grads.clip(1.0);
        opt.step(&grads, 1e-6)?;
        Ok(())
    })?;
    let (median, min, max) = stats(times);
    println!(
        "{}",
        json!({"workload": name, "seconds_per_step": median, "min": min, "max": max,
            "throughput": 8.0 / median, "unit": "pairs/s", "peak_rss_mib": peak_rss_mib(),
            "threads": threads(), "dtype": dtype_name(), "tokens_last_step": tokens})
    );
    Ok(())
}
