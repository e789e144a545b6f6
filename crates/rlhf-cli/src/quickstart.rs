//! `rlhf quickstart`: the whole pipeline — SFT → reward model → PPO with LoRA (or GRPO, RLOO,
//! DPO, or all four side by side) — on a built-in synthetic assistant world, no download,
//! minutes on 2 cores. Ends with a before/after report: reward-model scores, the verdict of
//! an independent rule-based judge, and the KL to the SFT model.

mod algorithms;

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use rlhf_models::{Family, GenerationConfig, LoadOptions, Model, ModelConfig, Tokenizer};
use rlhf_ops::rng::RngStream;
use rlhf_train::ppo_run::{score_texts, Query};
use rlhf_train::reward::RewardConfig;
use rlhf_train::sft::SftConfig;
use rlhf_train::synth::{self, SynthConfig};
use rlhf_train::trainer::TrainingArgs;
use serde_json::json;

/// Arguments of `rlhf quickstart`.
#[derive(clap::Args)]
pub struct Args {
    /// Run directory (its stage directories are replaced on every run).
    #[arg(long, default_value = "runs/quickstart")]
    output_dir: PathBuf,
    /// A smaller world, model and schedule: under 2 minutes.
    #[arg(long)]
    fast: bool,
    /// Seed of the data, the model and every stage.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// The policy-optimisation stage: `ppo` (TRL 0.11's, the default), `grpo`, `rloo`, `dpo`,
    /// or `all` (the four from the same SFT and reward models, compared in one table).
    #[arg(long, value_enum, default_value = "ppo")]
    algorithm: algorithms::Algorithm,
    /// The model: `qwen2` (a Qwen2-style chat model trained on conversations rendered with
    /// its ChatML template, the default) or `gpt2` (a GPT-2 on plain `User:`/`Assistant:`
    /// text).
    #[arg(long, value_enum, default_value = "qwen2")]
    family: QuickFamily,
}

/// The model family of a quickstart run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum QuickFamily {
    /// A Qwen2-style chat model (RMSNorm, RoPE, SwiGLU, grouped-query attention with q/k/v
    /// biases, tied embeddings) on conversational data.
    Qwen2,
    /// A GPT-2 on plain text.
    Gpt2,
}

impl QuickFamily {
    fn name(self) -> &'static str {
        match self {
            Self::Qwen2 => "qwen2",
            Self::Gpt2 => "gpt2",
        }
    }
}

/// Sizes of one quickstart run.
struct Plan {
    synth: SynthConfig,
    family: QuickFamily,
    layers: usize,
    hidden: usize,
    /// Positions of the model, and the SFT / reward / DPO `max_length`.
    max_length: usize,
    sft_epochs: f64,
    sft_lr: f64,
    rm_epochs: f64,
    rm_lr: f64,
    ppo_steps: u64,
    ppo_batch: usize,
    ppo_mini_batch: usize,
    ppo_lr: f64,
    /// Optimizer steps of GRPO and RLOO.
    online_steps: u64,
    /// Completions per GRPO step (prompts × 8 generations).
    grpo_batch: usize,
    grpo_lr: f64,
    /// Completions per RLOO step (prompts × 2 generations).
    rloo_batch: usize,
    rloo_lr: f64,
    dpo_steps: u64,
    dpo_lr: f64,
    eval_prompts: usize,
}

impl Plan {
    fn new(fast: bool, seed: u64, family: QuickFamily) -> Self {
        // A conversation holds a few more tokens than its text row (the turn markers).
        let max_length = match family {
            QuickFamily::Gpt2 => 64,
            QuickFamily::Qwen2 => 72,
        };
        if fast {
            Self {
                synth: SynthConfig {
                    seed,
                    n_sft: 1000,
                    n_pairs_train: 1000,
                    n_pairs_eval: 200,
                    n_prompts: 256,
                },
                family,
                max_length,
                layers: 2,
                hidden: 128,
                sft_epochs: 5.0,
                sft_lr: 3e-3,
                rm_epochs: 1.0,
                rm_lr: 1e-3,
                ppo_steps: 30,
                ppo_batch: 32,
                ppo_mini_batch: 8,
                // 3e-3 let some seeds learn ever shorter answers (reward hacking, KL > 30).
                ppo_lr: 1.5e-3,
                online_steps: 40,
                grpo_batch: 32,
                grpo_lr: 4e-3,
                rloo_batch: 64,
                rloo_lr: 8e-3,
                dpo_steps: 60,
                dpo_lr: 2e-3,
                eval_prompts: 128,
            }
        } else {
            Self {
                synth: SynthConfig {
                    seed,
                    n_sft: 2000,
                    n_pairs_train: 2000,
                    n_pairs_eval: 200,
                    n_prompts: 512,
                },
                family,
                max_length,
                layers: 4,
                hidden: 128,
                sft_epochs: 4.0,
                sft_lr: 2e-3,
                rm_epochs: 1.0,
                rm_lr: 5e-4,
                ppo_steps: 30,
                ppo_batch: 64,
                ppo_mini_batch: 16,
                ppo_lr: 2e-3,
                online_steps: 40,
                grpo_batch: 32,
                grpo_lr: 4e-3,
                rloo_batch: 64,
                rloo_lr: 8e-3,
                dpo_steps: 60,
                dpo_lr: 2e-3,
                eval_prompts: 128,
            }
        }
    }
}

fn heading(text: &str) {
    println!("\n== {text}");
}

fn args(out: &Path, epochs: f64, lr: f64, seed: u64) -> TrainingArgs {
    TrainingArgs {
        output_dir: out.display().to_string(),
        overwrite_output_dir: true,
        per_device_train_batch_size: 16,
        per_device_eval_batch_size: 32,
        learning_rate: lr,
        num_train_epochs: epochs,
        warmup_ratio: 0.05,
        logging_steps: 10,
        save_steps: 1_000_000,
        seed,
        ..TrainingArgs::default()
    }
}

/// One policy's answers to the evaluation prompts, scored by the reward model and judged.
struct Eval {
    /// Prompt and response ids, for the KL to the SFT model.
    ids: Vec<(Vec<u32>, Vec<u32>)>,
    responses: Vec<String>,
    rewards: Vec<f32>,
    /// The judge's full verdict: polite, helpful (a real tip), on topic, fluent.
    good: Vec<bool>,
    /// The preference rule alone: polite, neither rude nor negative, not about another topic.
    style: Vec<bool>,
}

impl Eval {
    fn mean_reward(&self) -> f64 {
        self.rewards.iter().map(|&r| r as f64).sum::<f64>() / self.rewards.len().max(1) as f64
    }
    fn good_share(&self) -> f64 {
        share(&self.good)
    }
    fn style_share(&self) -> f64 {
        share(&self.style)
    }
}

fn share(v: &[bool]) -> f64 {
    v.iter().filter(|&&g| g).count() as f64 / v.len().max(1) as f64
}

/// The user's words of a prompt, as the judge reads them.
fn question(q: &Query) -> &str {
    q.conversation
        .as_ref()
        .and_then(|m| m.last())
        .and_then(|m| m.text())
        .unwrap_or(&q.text)
}

/// Samples one response per prompt (seeded, as PPO samples), scores it with the reward model
/// the way PPO does ([`score_texts`]) and judges it.
fn evaluate(policy: &Model, rm: &Model, prompts: &[Query], seed: u64) -> anyhow::Result<Eval> {
    let tok = policy.tokenizer()?;
    let ids: Vec<Vec<u32>> = prompts.iter().map(|q| q.ids.clone()).collect();
    let gen = GenerationConfig {
        max_new_tokens: 40,
        eos_token_id: policy.eos_token_ids(),
        pad_token_id: tok.pad_token_id,
        ..Default::default()
    };
    let out = policy.generate(&ids, &gen, &mut RngStream::new(seed))?;
    let responses: Vec<String> = out
        .response_ids
        .iter()
        .map(|r| tok.decode(r, true))
        .collect::<Result<_, _>>()?;
    let refs: Vec<&Query> = prompts.iter().collect();
    let rewards = score_texts(rm, &refs, &responses, 32)?;
    let verdicts: Vec<synth::Judgement> = prompts
        .iter()
        .zip(&responses)
        .map(|(q, r)| synth::judge(question(q), r))
        .collect();
    let good = verdicts.iter().map(|j| j.good).collect();
    let style = verdicts
        .iter()
        .map(|j| j.polite && !j.rude_or_negative && !j.off_topic)
        .collect();
    Ok(Eval {
        ids: ids.into_iter().zip(out.response_ids).collect(),
        responses,
        rewards,
        good,
        style,
    })
}

/// Writes the data files, trains the tokenizer and saves the untrained model under `base/`
/// (a chat model with its `tokenizer_config.json` and `chat_template.jinja`).
fn prepare(plan: &Plan, seed: u64, out: &Path) -> anyhow::Result<(synth::SynthFiles, PathBuf)> {
    let data = out.join("data");
    let tok_path = data.join("tokenizer.json");
    let chat = plan.family == QuickFamily::Qwen2;
    let (files, tokenizer) = if chat {
        let files = synth::chat::write_all(&plan.synth, &data)?;
        let json = synth::chat::tokenizer_json(&plan.synth, synth::DEFAULT_VOCAB_SIZE)?;
        let mut tok = Tokenizer::from_json(json, &tok_path, None, None)?;
        let im_end = tok
            .token_to_id(synth::chat::IM_END)
            .context("the chat tokenizer has no <|im_end|>")?;
        tok.eos_token_id = im_end;
        tok.eos_token_ids = vec![im_end, tok.pad_token_id];
        (files, tok)
    } else {
        let files = synth::write_all(&plan.synth, &data)?;
        let json = synth::tokenizer_json(&plan.synth, synth::DEFAULT_VOCAB_SIZE)?;
        (files, Tokenizer::from_json(json, &tok_path, None, None)?)
    };
    println!(
        "{} SFT rows, {} + {} preference pairs, {} prompts{}; tokenizer of {} tokens",
        plan.synth.n_sft,
        plan.synth.n_pairs_train,
        plan.synth.n_pairs_eval,
        plan.synth.n_prompts,
        if chat { ", as conversations" } else { "" },
        tokenizer.vocab_size()
    );
    let (v, h) = (tokenizer.vocab_size(), plan.hidden);
    let cfg = if chat {
        // SwiGLU's three matrices of 2h (GPT-2's MLP: two of 4h); 2 key/value heads for 4
        // query heads. A conversation holds ~12 % more tokens than its text row, which the
        // smaller MLP pays for.
        let mut c = ModelConfig::llama_family(Family::Qwen2, h, 2 * h, plan.layers, 4, 2, v, 10_000.0)?;
        c.tie_word_embeddings = true;
        c.max_position_embeddings = plan.max_length;
        (c.eos_token_id, c.bos_token_id, c.pad_token_id) =
            (tokenizer.eos_token_ids.clone(), None, Some(tokenizer.pad_token_id));
        c
    } else {
        let mut c = ModelConfig::gpt2(plan.layers, 4, h, plan.max_length, v);
        (c.eos_token_id, c.bos_token_id) = (vec![tokenizer.eos_token_id], Some(tokenizer.eos_token_id));
        c
    };
    let mut base = Model::random(cfg, seed, candle_core::DType::F32, &candle_core::Device::Cpu)?;
    base.set_tokenizer(tokenizer);
    let base_dir = out.join("base");
    base.save(&base_dir)?;
    if chat {
        synth::chat::write_tokenizer_files(&base_dir, plan.max_length)?;
    }
    Ok((files, base_dir))
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let started = Instant::now();
    let plan = Plan::new(a.fast, a.seed, a.family);
    let out = &a.output_dir;
    if out.exists() && !out.join("summary.json").exists() && std::fs::read_dir(out)?.next().is_some() {
        anyhow::bail!(
            "{} exists and is not a quickstart run directory; hint: pass another --output-dir",
            out.display()
        );
    }
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let mut seconds = serde_json::Map::new();
    let mut lap = Instant::now();
    let mut stage = |name: &str, lap: &mut Instant| {
        seconds.insert(name.to_string(), json!(lap.elapsed().as_secs_f64()));
        *lap = Instant::now();
    };

    // 1. data: the synthetic world, and a byte-level BPE tokenizer trained on it
    heading("1/5 data: a synthetic assistant world (polite, helpful, on-topic answers preferred)");
    let (files, base_dir) = prepare(&plan, a.seed, out)?;
    stage("data", &mut lap);

    // 2. SFT: the policy learns the style, good and bad answers alike
    let model_name = match plan.family {
        QuickFamily::Qwen2 => "Qwen2-style chat model",
        QuickFamily::Gpt2 => "GPT-2",
    };
    heading(&format!(
        "2/5 SFT: a {}-layer {model_name} ({} hidden) learns to answer",
        plan.layers, plan.hidden
    ));
    let sft_cfg = SftConfig {
        model_name_or_path: base_dir.display().to_string(),
        dataset_name: Some(files.sft.display().to_string()),
        max_length: Some(plan.max_length),
        args: args(&out.join("sft"), plan.sft_epochs, plan.sft_lr, a.seed),
        ..SftConfig::default()
    };
    let sft = rlhf_train::sft::train(&sft_cfg)?;
    stage("sft", &mut lap);

    // 3. reward model: initialised from the SFT model, trained on the pairs
    heading("3/5 reward model: Bradley–Terry on preference pairs");
    let mut rm_args = args(&out.join("reward"), plan.rm_epochs, plan.rm_lr, a.seed);
    rm_args.eval_strategy = "epoch".into();
    let rm_cfg = RewardConfig {
        model_name_or_path: sft.final_dir.display().to_string(),
        dataset_name: Some(files.prefs.display().to_string()),
        max_length: Some(plan.max_length),
        args: rm_args,
        ..RewardConfig::default()
    };
    let rm = rlhf_train::reward::train(&rm_cfg)?;
    let rm_accuracy = rm.eval.as_ref().map_or(f64::NAN, |m| m["accuracy"]);
    println!("reward model eval accuracy: {rm_accuracy:.3}");
    stage("reward", &mut lap);

    // 4. policy optimisation with LoRA; the reference is the policy with adapters disabled
    let algos = a.algorithm.expand();
    let names: Vec<&str> = algos.iter().map(|x| x.name()).collect();
    heading(&format!(
        "4/5 {} with LoRA (reference = adapters disabled)",
        names.join(", ").to_uppercase()
    ));
    let sft_model = Model::load(&sft.final_dir, &LoadOptions::default())?;
    let eval_prompts: Vec<Query> =
        rlhf_train::ppo_run::prompt_ids(&sft_model, &files.prompts.join("validation.jsonl"))?
            .into_iter()
            .take(plan.eval_prompts)
            .collect();
    let before = evaluate(&sft_model, &rm.model, &eval_prompts, a.seed + 11)?;
    let inputs = algorithms::Inputs {
        out,
        plan: &plan,
        seed: a.seed,
        sft_dir: &sft.final_dir,
        rm_dir: &rm.final_dir,
        prompts_dir: &files.prompts,
        prefs_dir: &files.prefs,
    };
    let mut results = Vec::new();
    for &algo in &algos {
        if algos.len() > 1 {
            println!("\n-- {}", algo.name().to_uppercase());
        }
        let t = Instant::now();
        let trained = algorithms::train(algo, &inputs)?;
        let secs = t.elapsed().as_secs_f64();
        let after = evaluate(&trained.model, &rm.model, &eval_prompts, a.seed + 11)?;
        let kl = algorithms::kl_to(&trained.model, &sft_model, &after.ids)?;
        results.push((algo, trained, after, kl, secs));
        stage(algo.name(), &mut lap);
    }

    // 5. report: plots, samples, scores before and after
    heading("5/5 report");
    let mut plots = Vec::new();
    for d in ["sft", "reward"].into_iter().chain(names.iter().copied()) {
        plots.extend(crate::plot::plot_run(&out.join(d))?);
    }
    let (_, first, after, _, _) = &results[0];
    let samples: Vec<serde_json::Value> = (0..eval_prompts.len().min(6))
        .map(|i| {
            json!({"prompt": question(&eval_prompts[i]), "before": before.responses[i], "after": after.responses[i],
                   "reward_before": before.rewards[i], "reward_after": after.rewards[i],
                   "judge_before": before.style[i], "judge_after": after.style[i]})
        })
        .collect();
    for s in &samples {
        println!("\n{}", s["prompt"].as_str().unwrap_or_default().replace('\n', " "));
        println!(
            "  before ({:+.2}, {}):{}",
            s["reward_before"].as_f64().unwrap_or(0.0),
            verdict(&s["judge_before"]),
            s["before"].as_str().unwrap_or_default()
        );
        println!(
            "  after  ({:+.2}, {}):{}",
            s["reward_after"].as_f64().unwrap_or(0.0),
            verdict(&s["judge_after"]),
            s["after"].as_str().unwrap_or_default()
        );
    }
    stage("report", &mut lap);
    let threads = candle_core::utils::get_num_threads();
    let total = started.elapsed().as_secs_f64();
    seconds.insert("total".into(), json!(total));
    let table: serde_json::Map<String, serde_json::Value> = results
        .iter()
        .map(|(algo, t, ev, kl, secs)| {
            (
                algo.name().to_string(),
                json!({"mean_reward": ev.mean_reward(), "judge_good_share": ev.good_share(),
                       "judge_style_share": ev.style_share(), "kl_to_sft": kl, "seconds": secs,
                       "final_dir": t.final_dir, "reward_mean_by_step": t.reward_means}),
            )
        })
        .collect();
    let metrics: Vec<PathBuf> = ["sft", "reward"]
        .iter()
        .chain(names.iter())
        .map(|d| out.join(d).join("metrics.jsonl"))
        .collect();
    let mut summary = json!({
        "fast": a.fast,
        "seed": a.seed,
        "threads": threads,
        "algorithm": a.algorithm.name(),
        "family": plan.family.name(),
        "seconds": seconds,
        "reward_model_eval_accuracy": rm_accuracy,
        "eval_prompts": eval_prompts.len(),
        "before": {"mean_reward": before.mean_reward(), "judge_good_share": before.good_share(),
                   "judge_style_share": before.style_share()},
        "after": {"mean_reward": after.mean_reward(), "judge_good_share": after.good_share(),
                  "judge_style_share": after.style_share()},
        "algorithms": table,
        "samples": samples,
        "paths": {
            "sft": sft.final_dir, "reward_model": rm.final_dir, "policy": first.final_dir,
            "metrics": metrics,
            "plots": plots,
        },
    });
    if algos == [algorithms::Algorithm::Ppo] {
        summary["ppo_reward_mean_by_step"] = json!(first.reward_means);
        summary["paths"]["ppo_adapter"] = json!(first.final_dir);
    }
    rlhf_train::checkpoint::write_atomic(
        &out.join("summary.json"),
        serde_json::to_string_pretty(&summary)?.as_bytes(),
    )?;
    println!("\nreward model eval accuracy      {rm_accuracy:.3}");
    if results.len() == 1 {
        let (_, _, after, kl, _) = &results[0];
        println!(
            "mean reward-model score         {:+.3} -> {:+.3}",
            before.mean_reward(),
            after.mean_reward()
        );
        println!(
            "judge: polite, civil, on topic  {:.3} -> {:.3}",
            before.style_share(),
            after.style_share()
        );
        println!(
            "judge: fully good (+ real tip)  {:.3} -> {:.3}",
            before.good_share(),
            after.good_share()
        );
        println!("KL to the SFT model             {kl:.3}");
    } else {
        println!(
            "\n{:<6} {:>16} {:>16} {:>14} {:>8} {:>8}",
            "", "judge style", "judge good", "reward score", "KL", "seconds"
        );
        println!(
            "{:<6} {:>16.3} {:>16.3} {:>+14.3} {:>8} {:>8}",
            "sft",
            before.style_share(),
            before.good_share(),
            before.mean_reward(),
            "-",
            "-"
        );
        for (algo, _, ev, kl, secs) in &results {
            println!(
                "{:<6} {:>16.3} {:>16.3} {:>+14.3} {:>8.3} {:>8.1}",
                algo.name(),
                ev.style_share(),
                ev.good_share(),
                ev.mean_reward(),
                kl,
                secs
            );
        }
    }
    println!(
        "checkpoints: {} (SFT), {} (reward model), {}",
        sft.final_dir.display(),
        rm.final_dir.display(),
        results
            .iter()
            .map(|(algo, t, ..)| format!(
                "{} ({} LoRA adapter)",
                t.final_dir.display(),
                algo.name().to_uppercase()
            ))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "metrics: {}/<stage>/metrics.jsonl; plots: {}/<stage>/plots/*.png; summary: {}",
        out.display(),
        out.display(),
        out.join("summary.json").display()
    );
    println!("finished in {total:.0} s on {threads} threads");
    Ok(())
}

fn verdict(v: &serde_json::Value) -> &'static str {
    if v.as_bool() == Some(true) {
        "judge: good"
    } else {
        "judge: bad"
    }
}
