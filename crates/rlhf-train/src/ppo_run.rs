//! `rlhf ppo`: the full TRL-style loop over a prompt set — generate, score with a reward
//! model, `step()`, `log_stats` — with periodic atomic checkpoints and exact resume.
//!
//! With several ranks ([`crate::dist`]) a step's prompts are `batch_size` per rank: each
//! rank generates and scores its own, [`PpoTrainer::step`] makes the batch global, and rank 0
//! logs and saves. Each response is sampled from the stream of its index in the step's global
//! batch ([`step_streams`]), so what is sampled depends neither on the number of ranks nor on
//! a resume.

use std::path::{Path, PathBuf};

use rlhf_models::{GenerationConfig, LoadOptions, Model};
use rlhf_ops::rng::RngStream;
use serde::{Deserialize, Serialize};

use crate::chat_data::read_prompts_for;
use crate::checkpoint::{load_tensors, save_tensors, write_atomic, RunDir};
use crate::data::read_data;
use crate::error::{Result, TrainError};
use crate::peft_args::{load_trainable, save_trained, PeftArgs};
use crate::ppo::{log_stats, PpoState, PpoTrainer};
use crate::ppo_config::PpoConfig;
use crate::score::reward_tokens;
use crate::stop::StopSignal;
use crate::tensorboard::{ReportArgs, TagStyle};
use crate::trainer::{permutation, prepare_run_dir};

/// Settings of `rlhf ppo`: TRL's `PPOConfig` plus paths, generation and run cadence.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct PpoRunConfig {
    /// The policy to train (a causal LM directory; a value head is added if missing).
    pub model_name_or_path: String,
    /// The reference (default: the same directory, loaded as a frozen copy).
    pub ref_model_path: Option<String>,
    /// Reward model (GPT2ForSequenceClassification directory, e.g. `rlhf reward` output).
    pub reward_model_path: String,
    /// Prompts (JSONL, CSV or Parquet with a `query` or `prompt` column).
    pub train_file: String,
    /// Run directory.
    pub output_dir: String,
    /// Replace a run already in `output_dir`.
    pub overwrite_output_dir: bool,
    /// `latest` or a `checkpoint-<step>` directory.
    pub resume_from_checkpoint: Option<String>,
    /// Tokens to generate per response (upper bound).
    pub max_new_tokens: usize,
    /// Length sampler `[output_min_length, output_max_length)` for `max_new_tokens`.
    pub output_min_length: Option<usize>,
    /// Upper end (exclusive) of the length sampler.
    pub output_max_length: Option<usize>,
    /// Sampling (true, TRL's examples) or greedy.
    pub do_sample: bool,
    /// Sampling temperature.
    pub temperature: f64,
    /// Top-k (0 = off).
    pub top_k: usize,
    /// Top-p (1.0 = off).
    pub top_p: f64,
    /// Checkpoint every this many PPO steps (0 = only the final model).
    pub save_steps: u64,
    /// Keep only this many checkpoints.
    pub save_total_limit: Option<usize>,
    /// Print a query / response / reward table every this many steps (0 = never).
    pub log_samples: u64,
    /// JSON log lines instead of a progress bar.
    pub quiet: bool,
    /// Matrix products with bf16 operands and f32 sums (AVX512-BF16 where the CPU has it);
    /// weights, gradients and optimizer state stay f32 (see `rlhf_ops::precision`).
    pub bf16: bool,
    /// TRL's `PPOConfig`.
    #[serde(flatten)]
    pub ppo: PpoConfig,
    /// LoRA / quantization (`use_peft`: the reference is the policy with adapters disabled).
    #[serde(flatten)]
    pub peft: PeftArgs,
    /// `report_to` and `logging_dir` (TensorBoard; TRL 0.11's tags and histograms).
    #[serde(flatten)]
    pub report: ReportArgs,
}

impl Default for PpoRunConfig {
    fn default() -> Self {
        Self {
            model_name_or_path: String::new(),
            ref_model_path: None,
            reward_model_path: String::new(),
            train_file: String::new(),
            output_dir: "runs/ppo".into(),
            overwrite_output_dir: false,
            resume_from_checkpoint: None,
            max_new_tokens: 32,
            output_min_length: None,
            output_max_length: None,
            do_sample: true,
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            save_steps: 100,
            save_total_limit: None,
            log_samples: 10,
            quiet: false,
            bf16: false,
            ppo: PpoConfig::default(),
            peft: PeftArgs::default(),
            report: ReportArgs::default(),
        }
    }
}

#[derive(Serialize, Deserialize)]
struct RunState {
    ppo: PpoState,
    /// Ranks of the run (absent: 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    world_size: Option<usize>,
}

/// What a PPO run produced.
pub struct PpoOutcome {
    /// The trained policy.
    pub model: Model,
    /// `output_dir/final`.
    pub final_dir: PathBuf,
    /// Mean reward of each step.
    pub reward_means: Vec<f64>,
}

/// Reads prompts (`query` or `prompt` column).
pub fn read_prompts(path: &Path) -> Result<Vec<String>> {
    let rows = read_data(path)?;
    let col = if rows.has(0, "query") { "query" } else { "prompt" };
    (0..rows.len()).map(|i| rows.text(i, col).map(str::to_string)).collect()
}

/// A PPO prompt: its ids, its text (what the sample logs show, and what a reward model reads
/// before the response for a text prompt) and its conversation, when it is one.
#[derive(Clone, Debug, PartialEq)]
pub struct Query {
    /// The prompt text (a conversation: its rendering without special tokens).
    pub text: String,
    /// The ids the policy continues.
    pub ids: Vec<u32>,
    /// The messages of a conversational prompt.
    pub conversation: Option<Vec<rlhf_models::Message>>,
}

impl Query {
    /// A text prompt.
    pub fn text(text: String, ids: Vec<u32>) -> Self {
        Self {
            text,
            ids,
            conversation: None,
        }
    }
}

/// Prompts with their ids, read as the online trainers read them ([`read_prompts_for`]): text
/// tokenised with the tokenizer's special tokens, or a conversation rendered with the model's
/// chat template and the generation prompt.
pub fn prompt_ids(model: &Model, path: &Path) -> Result<Vec<Query>> {
    let (set, ids) = read_prompts_for(model, path)?;
    let tok = model.tokenizer()?;
    set.rows
        .into_iter()
        .zip(ids)
        .map(|(row, ids)| {
            Ok(match row.conversation {
                None => Query::text(row.prompt, ids),
                Some(m) => Query {
                    text: tok.decode(&ids, true)?,
                    ids,
                    conversation: Some(m),
                },
            })
        })
        .collect()
}

/// Runs PPO as TRL's example scripts do.
pub fn train(cfg: &PpoRunConfig) -> Result<PpoOutcome> {
    train_until(cfg, &StopSignal::new())
}

/// [`train`], stopping between PPO steps once `stop` is requested: the last completed step is
/// saved as a checkpoint and the error is [`TrainError::Interrupted`].
pub fn train_until(cfg: &PpoRunConfig, stop: &StopSignal) -> Result<PpoOutcome> {
    let _precision = rlhf_ops::precision::PrecisionGuard::for_run(cfg.bf16);
    // 1. config, run directory, models
    cfg.ppo.validate()?;
    let sampler = length_sampler(cfg)?;
    for (k, v) in [
        ("model_name_or_path", &cfg.model_name_or_path),
        ("reward_model_path", &cfg.reward_model_path),
        ("train_file", &cfg.train_file),
    ] {
        if v.is_empty() && !(k == "model_name_or_path" && cfg.resume_from_checkpoint.is_some()) {
            return Err(TrainError::setting(k, "required"));
        }
    }
    let (run, resume) = prepare_run_dir(
        cfg,
        &cfg.output_dir,
        cfg.overwrite_output_dir,
        cfg.resume_from_checkpoint.as_deref(),
    )?;
    let run = run.with_tag_style(TagStyle::AsLogged);
    let opts = LoadOptions::default();
    let reward_model = Model::load(Path::new(&cfg.reward_model_path), &opts)?;
    if reward_model.score_head.is_none() {
        return Err(TrainError::Config(format!(
            "{}: no score head (`score.weight`); hint: reward_model_path must be a reward model such as `rlhf reward` output",
            cfg.reward_model_path
        )));
    }
    let (policy, reference, policy_dir) = load_policy(cfg, resume.as_deref())?;
    run.write_config(&crate::config::to_toml(cfg)?)?;
    let (mut trainer, fresh) = PpoTrainer::new(cfg.ppo.clone(), policy, reference)?;
    if fresh {
        tracing::info!(
            "{}: no v_head weight found; initialised a fresh value head",
            policy_dir.display()
        );
    }

    // 2. prompts, tokenised; those that cannot fit a response are dropped
    let tok = trainer.model.tokenizer()?.clone();
    let n_pos = trainer.model.cfg().max_position_embeddings;
    let max_new = cfg
        .output_max_length
        .map_or(cfg.max_new_tokens, |m| m.saturating_sub(1).max(1));
    let prompts: Vec<Query> = prompt_ids(&trainer.model, Path::new(&cfg.train_file))?
        .into_iter()
        .filter(|q| !q.ids.is_empty() && q.ids.len() + max_new <= n_pos)
        .collect();
    let dist = crate::dist::world();
    let bs = cfg.ppo.batch_size * dist.size();
    if prompts.len() < bs {
        return Err(TrainError::Data {
            path: PathBuf::from(&cfg.train_file),
            msg: format!(
                "{} usable prompt{}, fewer than batch_size × ranks ({bs}); a prompt is usable when it is not empty and \
                 leaves room for {max_new} new tokens within n_positions ({n_pos})\n\
                 hint: add prompts, lower batch_size, or lower max_new_tokens / output_max_length",
                prompts.len(),
                if prompts.len() == 1 { "" } else { "s" }
            ),
        });
    }
    let gen = GenerationConfig {
        max_new_tokens: cfg.max_new_tokens,
        min_new_tokens: 0,
        do_sample: cfg.do_sample,
        temperature: cfg.temperature,
        top_k: cfg.top_k,
        top_p: cfg.top_p,
        eos_token_id: trainer.model.eos_token_ids(),
        pad_token_id: tok.pad_token_id,
    };
    if let Some(ckpt) = &resume {
        let p = ckpt.join("trainer_state.json");
        let text = std::fs::read_to_string(&p).map_err(|source| TrainError::Io {
            path: p.clone(),
            source,
        })?;
        let st: RunState =
            serde_json::from_str(&text).map_err(|e| TrainError::Checkpoint(format!("{}: {e}", p.display())))?;
        crate::dist::check_resume_ranks(ckpt, st.world_size)?;
        trainer.restore(&st.ppo, &load_tensors(&ckpt.join("optimizer.safetensors"))?)?;
        run.truncate_metrics_after(trainer.current_step)?;
    }
    let total = cfg.ppo.total_ppo_steps();
    let per_epoch = (prompts.len() / bs) as u64;
    let progress = if cfg.quiet || !dist.is_main() {
        indicatif::ProgressBar::hidden()
    } else {
        indicatif::ProgressBar::new(total)
    };
    progress.set_position(trainer.current_step);
    let say = |msg: String| {
        if cfg.quiet && dist.is_main() {
            eprintln!("{msg}")
        } else {
            // Hidden on ranks other than 0.
            progress.println(msg)
        }
    };
    say(format!(
        "ppo: {} prompts, {total} steps of {bs}, {} trainable parameters",
        prompts.len(),
        trainer.num_trainable()
    ));

    // 3. the loop: generate → score → step → log
    let mut reward_means = Vec::new();
    let mut last_ckpt: Option<PathBuf> = resume.clone();
    while trainer.current_step < total {
        let save = || save_checkpoint(&run, &trainer, cfg.save_total_limit);
        crate::stop::stop_if_requested(stop, &run, trainer.current_step, total, save)
            .inspect_err(|_| progress.finish_and_clear())?;
        let s = trainer.current_step;
        let perm = permutation(prompts.len(), cfg.ppo.seed.wrapping_add(s / per_epoch));
        let start = (s % per_epoch) as usize * bs;
        // This rank's part of the step's prompts, each sampled from its own stream.
        let mine = crate::dist::split(bs, dist.rank(), dist.size());
        let batch: Vec<&Query> = perm[start + mine.start..start + mine.end]
            .iter()
            .map(|&i| &prompts[i])
            .collect();
        let queries: Vec<Vec<u32>> = batch.iter().map(|q| q.ids.clone()).collect();
        let (mut streams, max_new_tokens) = step_streams(cfg.ppo.seed, s, bs, sampler, gen.max_new_tokens);
        let step_gen = GenerationConfig {
            max_new_tokens,
            ..gen.clone()
        };
        let responses = trainer.generate_rows(&queries, &step_gen, &mut streams[mine.clone()])?;
        let texts: Vec<String> = responses
            .iter()
            .map(|r| tok.decode(r, true))
            .collect::<std::result::Result<_, _>>()?;
        let scores = score_texts(&reward_model, &batch, &texts, cfg.ppo.mini_batch_size)?;
        let mut stats = trainer.step(&queries, &responses, &scores).map_err(|e| match e {
            TrainError::Diverged(m) => TrainError::Diverged(format!(
                "{m}\nlast good checkpoint: {}",
                last_ckpt.as_ref().map_or("none".into(), |p| p.display().to_string())
            )),
            other => other,
        })?;
        let record = log_stats(&mut stats, &dist.all_gather_f32(&scores)?, trainer.current_step);
        run.log(&record)?;
        run.log_histograms(trainer.current_step, &stats.tensors)?;
        let mean = stats.scalars["env/reward_mean"];
        reward_means.push(mean);
        progress.set_position(trainer.current_step);
        progress.set_message(format!("reward {mean:.3}  kl {:.3}", stats.scalars["objective/kl"]));
        if cfg.quiet && dist.is_main() {
            eprintln!("{record}");
        }
        if cfg.log_samples > 0 && trainer.current_step % cfg.log_samples == 0 {
            let mut table = format!("step {}: query | response | reward", trainer.current_step);
            for (q, (r, sc)) in batch.iter().zip(texts.iter().zip(&scores)).take(4) {
                table.push_str(&format!("\n  {} | {} | {sc:.3}", one_line(&q.text), one_line(r)));
            }
            say(table);
        }
        if cfg.save_steps > 0 && trainer.current_step % cfg.save_steps == 0 && trainer.current_step < total {
            last_ckpt = Some(save_checkpoint(&run, &trainer, cfg.save_total_limit)?);
        }
    }
    progress.finish_and_clear();
    let final_dir = run.save_final(|tmp| save_trained(&trainer.model, tmp))?;
    Ok(PpoOutcome {
        model: trainer.model,
        final_dir,
        reward_means,
    })
}

/// The length sampler `[output_min_length, output_max_length)` for `max_new_tokens`, if set.
fn length_sampler(cfg: &PpoRunConfig) -> Result<Option<(usize, usize)>> {
    match (cfg.output_min_length, cfg.output_max_length) {
        (Some(lo), Some(hi)) if hi > lo => Ok(Some((lo, hi))),
        (None, None) => Ok(None),
        (Some(lo), Some(hi)) => Err(TrainError::setting(
            "output_min_length",
            format!("({lo}) must be below output_max_length ({hi})"),
        )),
        _ => Err(TrainError::setting(
            "output_min_length",
            "the length sampler needs both output_min_length and output_max_length; set both or neither",
        )),
    }
}

/// The sampling streams of step `step`, one per prompt of its global batch of `rows`
/// (stream `i` a function of `(seed, step, i)` alone), and the step's `max_new_tokens`:
/// drawn from `[lo, hi)` by a stream of `(seed, step)` when a length sampler is set (one
/// length per step, as TRL draws one per `generate` call), else `max_new_tokens`.
pub fn step_streams(
    seed: u64,
    step: u64,
    rows: usize,
    length_sampler: Option<(usize, usize)>,
    max_new_tokens: usize,
) -> (Vec<RngStream>, usize) {
    let streams = crate::online::rollout::completion_streams(seed.wrapping_add(2), step, rows);
    let len = match length_sampler {
        Some((lo, hi)) => {
            let mut rng = RngStream::new(seed.wrapping_add(3) ^ step.wrapping_mul(0x9E37_79B9_7F4A_7C15));
            lo + rng.below(hi.saturating_sub(lo).max(1))
        }
        None => max_new_tokens,
    };
    (streams, len)
}

/// Saves `checkpoint-<step>/`: the policy (and value head), optimizer moments and the
/// trainer's state.
fn save_checkpoint(run: &RunDir, trainer: &PpoTrainer, limit: Option<usize>) -> Result<PathBuf> {
    let ranks = crate::dist::world().size();
    let state = RunState {
        ppo: trainer.state(),
        world_size: (ranks > 1).then_some(ranks),
    };
    let bytes = serde_json::to_vec_pretty(&state).map_err(|e| TrainError::Checkpoint(e.to_string()))?;
    let opt = trainer.optimizer_state()?;
    run.save_checkpoint(trainer.current_step, limit, |tmp| {
        save_trained(&trainer.model, tmp)?;
        save_tensors(&opt, &tmp.join("optimizer.safetensors"))?;
        write_atomic(&tmp.join("trainer_state.json"), &bytes)
    })
}

/// The policy and its reference. Full fine-tuning: the policy (from the checkpoint when
/// resuming) and a frozen copy of `ref_model_path` (default: `model_name_or_path`). LoRA: the
/// base with adapters (fresh, or the checkpoint's) and no separate reference.
fn load_policy(cfg: &PpoRunConfig, resume: Option<&Path>) -> Result<(Model, Option<Model>, PathBuf)> {
    let base = PathBuf::from(&cfg.model_name_or_path);
    let mut policy = load_trainable(&base, resume, &cfg.peft, "CAUSAL_LM", cfg.ppo.seed, |_| Ok(()))?;
    if !cfg.peft.use_peft {
        // The default reference is the policy's own checkpoint, at its revision.
        let (ref_dir, revision) = match &cfg.ref_model_path {
            Some(p) => (p.clone(), None),
            None => (cfg.model_name_or_path.clone(), cfg.peft.model_revision.clone()),
        };
        let opts = LoadOptions {
            revision,
            ..LoadOptions::default()
        };
        let reference = Model::load(Path::new(&ref_dir), &opts)?;
        return Ok((policy, Some(reference), resume.map_or(base, Path::to_path_buf)));
    }
    if let Some(ckpt) = resume {
        load_value_head(&mut policy, &ckpt.join("model.safetensors"))?;
    }
    Ok((policy, None, base))
}

/// Loads `v_head.summary.*` from a safetensors file into a trainable value head.
fn load_value_head(model: &mut Model, path: &Path) -> Result<()> {
    let t = load_tensors(path)?;
    let get = |k: &str| {
        t.get(k)
            .cloned()
            .ok_or_else(|| TrainError::Checkpoint(format!("{}: no `{k}`", path.display())))
    };
    let dropout = model.cfg().summary_dropout_prob;
    model.value_head = Some(rlhf_models::ValueHead {
        weight: rlhf_peft::Param::trainable(&get("v_head.summary.weight")?)?,
        bias: rlhf_peft::Param::trainable(&get("v_head.summary.bias")?)?,
        dropout,
    });
    Ok(())
}

fn one_line(s: &str) -> String {
    let s: String = s.replace('\n', "\\n");
    if s.chars().count() > 60 {
        format!("{}…", s.chars().take(60).collect::<String>())
    } else {
        s
    }
}

/// Rewards of query + response texts from a reward model, re-tokenised with its tokenizer as
/// it was trained: a text query as `query + response` with EOS appended
/// ([`crate::score::reward_tokens`]); a conversation with the response as the assistant's turn,
/// rendered with the reward model's chat template
/// ([`crate::score::conversation_reward_ids`]).
pub fn score_texts(rm: &Model, batch: &[&Query], responses: &[String], chunk: usize) -> Result<Vec<f32>> {
    let mut seqs = Vec::with_capacity(batch.len());
    for (q, r) in batch.iter().zip(responses) {
        let mut ids = match &q.conversation {
            Some(msgs) => crate::score::conversation_reward_ids(rm, msgs, r)?,
            None => reward_tokens(rm, &q.text, r)?,
        };
        ids.truncate(rm.cfg().max_position_embeddings);
        seqs.push(ids);
    }
    let pad_id = rm.pad_token_id().unwrap_or(rm.tokenizer()?.pad_token_id);
    let mut out = Vec::with_capacity(seqs.len());
    for c in seqs.chunks(chunk.max(1)) {
        let (ids, mask) = crate::collate::pad(c, pad_id, crate::collate::PadSide::Right, rm.device())?;
        let s = rm.scores(&ids, &mask, &mut rlhf_models::Fwd::eval())?;
        out.extend(s.flatten_all()?.to_vec1::<f32>()?);
    }
    Ok(out)
}
