//! The online loop of GRPO and RLOO: 1. config, run directory, policy, reference, reward
//! functions and prompts; 2. per optimizer step, `gradient_accumulation_steps` micro-steps,
//! each taking the next `per_device_train_batch_size` completions of the buffered generation
//! batch (generated and scored when the previous one has served
//! `steps_per_generation × num_iterations` micro-steps); 3. the shared
//! [`TrainLoop`](crate::trainer::TrainLoop) step (clipping, AdamW, schedule, NaN guard,
//! `metrics.jsonl`, TensorBoard, checkpoints); 4. evaluation on `eval_file` prompts.
//!
//! Metrics follow TRL's log: each value is appended when computed and a logged value is the
//! mean since the last log ([`MetricLog`]), so generation metrics are averaged over the
//! generation batches of the logging window, not over its steps.
//!
//! **Exact resume.** A checkpoint holds, besides the model, optimizer and loop state, the
//! metric log, the token count and the live generation batch (`online_state.json`); the
//! prompts of generation batch `i` and each completion's random stream are functions of
//! `(seed, i)`, so a resumed run continues exactly as an uninterrupted one.

use std::path::{Path, PathBuf};

use rlhf_models::{GenerationConfig, LoadOptions, Model};
use rlhf_ops::rl::rewards::{group_advantages, reward_metrics, ScaleRewards};
use rlhf_ops::rl::Metrics;
use rlhf_ops::sink::GradSink;
use serde::{Deserialize, Serialize};

use super::buffer::Buffer;
use super::rollout::{completion_streams, gather_table, generate, score, Rollout, Sampler};
use super::{pool_metrics, MetricLog, Pool, Reference};
use crate::chat_data::read_prompts_for;
use crate::checkpoint::write_atomic;
use crate::config_values::setting_of;
use crate::data::{PromptRow, PromptSet};
use crate::error::{Result, TrainError};
use crate::grpo_config::GrpoPlan;
use crate::online_config::{OnlineArgs, OnlinePlan, ReferenceModel};
use crate::optim::Grads;
use crate::peft_args::PeftArgs;
use crate::reward_fns::RewardFuncs;
use crate::rloo_config::RlooPlan;
use crate::stop::StopSignal;
use crate::trainer::{open_run, permutation, trainable_params, DataPaths, TrainLoop, TrainingArgs};

/// The algorithm of an online run: what is computed per generation batch and per micro-batch.
#[derive(Clone, Copy)]
pub enum Algorithm<'a> {
    /// [`crate::grpo`].
    Grpo(&'a GrpoPlan),
    /// [`crate::rloo`].
    Rloo(&'a RlooPlan),
}

impl Algorithm<'_> {
    /// The shared sizes and sampling settings.
    pub fn online(&self) -> &OnlinePlan {
        match self {
            Self::Grpo(p) => &p.online,
            Self::Rloo(p) => &p.online,
        }
    }

    fn reference(&self) -> &ReferenceModel {
        match self {
            Self::Grpo(p) => &p.reference,
            Self::Rloo(p) => &p.reference,
        }
    }

    /// Stage 3 of the algorithm ([`crate::grpo::prepare`], [`crate::rloo::prepare`]).
    #[allow(clippy::too_many_arguments)]
    pub fn prepare(
        &self,
        policy: &Model,
        reference: &Reference<'_>,
        rollout: &super::rollout::Rollout,
        rewards: &[Vec<f64>],
        num_tokens_seen: f64,
        mask_truncated_completions: bool,
    ) -> Result<(Buffer, Metrics)> {
        let mtc = mask_truncated_completions;
        match self {
            Self::Grpo(p) => crate::grpo::prepare(policy, reference, p, rollout, rewards, num_tokens_seen, mtc),
            Self::Rloo(p) => crate::rloo::prepare(policy, reference, p, rollout, rewards, num_tokens_seen, mtc),
        }
    }

    /// Stage 4 ([`crate::grpo::micro_loss`], [`crate::rloo::micro_loss`]): this rank's
    /// part `rows.0` of micro-batch `rows.1`.
    pub fn micro_loss(
        &self,
        policy: &Model,
        buf: &Buffer,
        rows: (&[usize], &[usize]),
        ga: usize,
        fwd: &mut rlhf_models::Fwd,
    ) -> Result<(candle_core::Tensor, Metrics)> {
        match self {
            Self::Grpo(p) => crate::grpo::micro_loss(policy, p, buf, rows, ga, fwd),
            Self::Rloo(p) => crate::rloo::micro_loss(policy, p, buf, rows, ga, fwd),
        }
    }

    /// How each micro-batch metric pools over ranks.
    pub fn metric_pool(&self, key: &str) -> Pool {
        match self {
            Self::Grpo(p) => crate::grpo::metric_pool(p, key),
            Self::Rloo(_) => crate::rloo::metric_pool(key),
        }
    }
}

/// The config keys of an online run the loop reads.
pub struct Job<'a> {
    /// `grpo` or `rloo` (messages).
    pub name: &'a str,
    /// The policy.
    pub model_name_or_path: &'a str,
    /// Training prompts.
    pub train_file: Option<&'a str>,
    /// Evaluation prompts.
    pub eval_file: Option<&'a str>,
    /// A directory with `train.*` / `validation.*`.
    pub dataset_name: Option<&'a str>,
    /// Generation and reward keys.
    pub online: &'a OnlineArgs,
    /// Shared training settings.
    pub args: &'a TrainingArgs,
    /// LoRA / quantization.
    pub peft: &'a PeftArgs,
}

/// What an online run produced.
pub struct OnlineOutcome {
    /// The trained policy.
    pub model: Model,
    /// `output_dir/final`.
    pub final_dir: PathBuf,
    /// `reward` of each generation batch of this process's run (after a resume: since it).
    pub rewards: Vec<f64>,
    /// The last evaluation metrics (without the `eval_` prefix), if evaluation ran.
    pub eval: Option<Metrics>,
}

/// The run state a checkpoint keeps besides the model, the optimizer and the loop.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct OnlineState {
    log: MetricLog,
    num_tokens_seen: f64,
    buffer: Option<Buffer>,
}

/// Tokenised prompts with their rows.
struct Prompts {
    set: PromptSet,
    ids: Vec<Vec<u32>>,
}

/// The prompts of `path` and their generation ids ([`read_prompts_for`]), each with room for `max_completion_length` new tokens.
fn tokenize_prompts(model: &Model, path: &Path, max_completion_length: usize) -> Result<Prompts> {
    let (set, ids) = read_prompts_for(model, path)?;
    let n_pos = model.cfg().max_position_embeddings;
    for (i, p) in ids.iter().enumerate() {
        if p.is_empty() || p.len() + max_completion_length > n_pos {
            return Err(TrainError::Row {
                path: set.path.clone(),
                row: i + 1,
                msg: format!(
                    "the prompt has {} tokens; with max_completion_length {max_completion_length} it needs more than the \
                     model's {n_pos} positions\nhint: shorten the prompt or lower max_completion_length",
                    p.len()
                ),
            });
        }
    }
    Ok(Prompts { set, ids })
}

/// Runs an online algorithm (`cfg` is the whole config, written to the run's `config.toml`).
pub fn train_online<C: Serialize>(
    cfg: &C,
    job: &Job<'_>,
    algo: Algorithm<'_>,
    stop: &StopSignal,
) -> Result<OnlineOutcome> {
    let args = job.args;
    let _precision = rlhf_ops::precision::PrecisionGuard::for_run(args.bf16);
    let plan = algo.online().clone();
    for w in &plan.warnings {
        tracing::warn!("{w}");
    }
    // 1. run directory, policy (from the checkpoint when resuming), reference, rewards, data
    let (run, resume, model) = open_run(cfg, args, job.model_name_or_path, job.peft, "CAUSAL_LM", |m| {
        if args.disable_dropout {
            m.disable_dropout();
        }
        Ok(())
    })?;
    let frozen = match algo.reference() {
        ReferenceModel::InitialPolicy => Some(Model::load(Path::new(job.model_name_or_path), &LoadOptions::default())?),
        ReferenceModel::Model(p) => Some(Model::load(Path::new(p), &LoadOptions::default())?),
        _ => None,
    };
    let reference = match (algo.reference(), &frozen) {
        (ReferenceModel::AdaptersDisabled, _) => Reference::AdaptersDisabled,
        (_, Some(m)) => Reference::Frozen(m),
        _ => Reference::None,
    };
    let mut funcs = RewardFuncs::from_args(
        &job.online.rewards,
        job.online.reward_weights.as_deref(),
        plan.max_completion_length,
        &LoadOptions::default(),
    )?;
    let files = DataPaths::resolve(job.train_file, job.eval_file, job.dataset_name)?;
    let train = tokenize_prompts(&model, &files.train, plan.max_completion_length)?;
    let eval = files
        .validation
        .as_deref()
        .map(|p| tokenize_prompts(&model, p, plan.max_completion_length))
        .transpose()?;
    let length = plan.run_length(train.ids.len(), args)?;
    // TrainLoop counts micro-batches of `per_device_train_batch_size` per rank.
    let global_bs = plan.per_device_train_batch_size * plan.num_processes;
    let mut lp = TrainLoop::new(
        args.clone(),
        run,
        trainable_params(&model),
        length.micro_steps_per_epoch as usize * global_bs,
    )?;
    let tok = model.tokenizer()?.clone();
    let gen_cfg = plan.generation_config(model.eos_token_ids(), tok.pad_token_id);
    let mut state = OnlineState::default();
    if let Some(ckpt) = &resume {
        lp.resume(ckpt)?;
        let p = ckpt.join("online_state.json");
        let text = std::fs::read_to_string(&p).map_err(|source| TrainError::Io {
            path: p.clone(),
            source,
        })?;
        state = serde_json::from_str(&text).map_err(|e| TrainError::Checkpoint(format!("{}: {e}", p.display())))?;
    }
    lp.println(format!(
        "{}: {} prompts ({} per generation × {} completions, {} left out per epoch), {} steps, {} trainable parameters",
        job.name,
        train.ids.len(),
        plan.prompts_per_generation,
        plan.num_generations,
        length.prompts_dropped_per_epoch,
        lp.total_steps,
        lp.opt.num_params()
    ));

    // 2. the loop
    let ctx = Step {
        model: &model,
        reference: &reference,
        algo,
        plan: &plan,
        train: &train,
        gen_cfg: &gen_cfg,
        length: &length,
        args,
        job,
    };
    let mut rewards = Vec::new();
    let mut last_eval = None;
    while !lp.done() {
        lp.stop_if_requested_with(&model, stop, |dir| write_state(dir, &state))?;
        let step = lp.state.global_step;
        let (grads, samples) = ctx.gradients(&mut lp, &mut state, &mut funcs, &mut rewards)?;
        // 3. the optimizer step. TrainLoop divides what it accumulated by the steps of the
        // logging window: hand it TRL's means, scaled, on the step that logs (none before).
        let next = step + 1;
        let logs = next.is_multiple_of(args.logging_steps) || next >= lp.total_steps;
        let window = (lp.state.accum_steps + 1) as f64;
        let pass: Metrics = match logs {
            true => state
                .log
                .take_means()
                .into_iter()
                .map(|(k, v)| (k, v * window))
                .collect(),
            false => Metrics::new(),
        };
        let report = lp.apply(grads, &pass, samples)?;
        // 4. evaluation and checkpoints
        if let (true, Some(e)) = (report.evaluate, &eval) {
            let m = evaluate(&model, &e.set.rows, &e.ids, &mut funcs, &plan, &gen_cfg, args.seed)?;
            lp.log_eval(&m)?;
            last_eval = Some(m);
        }
        if report.save {
            save(&mut lp, &model, &state)?;
        }
    }
    let final_dir = lp.finish(&model)?;
    Ok(OnlineOutcome {
        model,
        final_dir,
        rewards,
        eval: last_eval,
    })
}

/// What every optimizer step of a run reads.
struct Step<'a> {
    model: &'a Model,
    reference: &'a Reference<'a>,
    algo: Algorithm<'a>,
    plan: &'a OnlinePlan,
    train: &'a Prompts,
    gen_cfg: &'a GenerationConfig,
    length: &'a crate::online_config::RunLength,
    args: &'a TrainingArgs,
    job: &'a Job<'a>,
}

impl Step<'_> {
    /// The summed gradients of the next optimizer step's `gradient_accumulation_steps`
    /// micro-batches (generating a new batch when the buffered one is used up), and the
    /// completions they held. Micro-step `m = step · GA + k` reads generation batch
    /// `m / micro_steps_per_generation`, micro-batch `(m mod micro_steps_per_generation)
    /// mod steps_per_generation` of it.
    fn gradients(
        &self,
        lp: &mut TrainLoop,
        state: &mut OnlineState,
        funcs: &mut RewardFuncs,
        rewards: &mut Vec<f64>,
    ) -> Result<(Grads, usize)> {
        let (plan, ga) = (self.plan, self.args.gradient_accumulation_steps);
        let dist = crate::dist::world();
        let vars: Vec<_> = lp.opt.vars().into_iter().cloned().collect();
        let var_refs: Vec<_> = vars.iter().collect();
        let mut grads = Grads::new(vars.len());
        let (mut loss_sum, mut samples) = (0.0, 0);
        let step = lp.state.global_step;
        for k in 0..ga as u64 {
            let micro = step * ga as u64 + k;
            let per_generation = plan.micro_steps_per_generation as u64;
            let (generation, within) = (micro / per_generation, micro % per_generation);
            if within == 0 || state.buffer.is_none() {
                let (buf, m) = self.new_generation(generation, funcs, state.num_tokens_seen)?;
                state.num_tokens_seen = m.get("num_tokens").copied().unwrap_or(state.num_tokens_seen);
                rewards.push(m.get("reward").copied().unwrap_or(f64::NAN));
                state.log.extend(&m);
                state.buffer = Some(buf);
            }
            let buf = state
                .buffer
                .as_ref()
                .expect("invariant: a generation batch is buffered");
            // The micro-batch of all ranks; this rank takes its contiguous part.
            let global = buf.slice_rows(
                within as usize % plan.steps_per_generation,
                plan.per_device_train_batch_size * plan.num_processes,
            );
            let part = crate::dist::split(global.len(), dist.rank(), dist.size());
            let mine = &global[part];
            let mut m = Metrics::new();
            let mut value = 0.0;
            if !mine.is_empty() {
                // Each completion's dropout is keyed by its row of the generation batch.
                let rows = mine
                    .iter()
                    .map(|&r| generation.wrapping_mul(1 << 20).wrapping_add(r as u64))
                    .collect();
                let mut keys = lp.dropout_keys(k, rows);
                let sink = GradSink::new();
                let mut fwd = rlhf_models::Fwd::train(&mut keys).with_sink(&sink);
                let (loss, metrics) = self.algo.micro_loss(self.model, buf, (mine, &global), ga, &mut fwd)?;
                value = loss.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?;
                if value.is_finite() {
                    grads.add(&var_refs, &loss.backward()?)?;
                    grads.add_sink(&var_refs, sink.take())?;
                }
                m = metrics;
            }
            if dist.any(!value.is_finite())? {
                return Err(TrainError::Diverged(format!(
                    "step {}: the {} loss is not finite ({value} on rank {})\nhint: lower the learning rate, or check \
                     the rewards",
                    step + 1,
                    self.job.name,
                    dist.rank()
                )));
            }
            pool_metrics(&mut m, mine.len() as f64, buf.tokens(mine), &|k| {
                self.algo.metric_pool(k)
            })?;
            state.log.extend(&m);
            loss_sum += value;
            samples += mine.len();
        }
        // The ranks' parts sum to the step's loss.
        let mut total = [loss_sum];
        dist.all_reduce_f64(&mut total, crate::dist::ReduceOp::Sum)?;
        state.log.push("loss", total[0]);
        Ok((grads, samples))
    }

    /// Generates, scores and prepares generation batch `generation`: its prompts are the
    /// next `prompts_per_generation` of the epoch's permutation (`seed + epoch`, as TRL's
    /// `RepeatSampler`; the file order without `shuffle_dataset`).
    fn new_generation(
        &self,
        generation: u64,
        funcs: &mut RewardFuncs,
        num_tokens_seen: f64,
    ) -> Result<(Buffer, Metrics)> {
        let (plan, args, train) = (self.plan, self.args, self.train);
        let per_epoch = self.length.generations_per_epoch as u64;
        let (epoch, pos) = (generation / per_epoch, (generation % per_epoch) as usize);
        let n = train.ids.len();
        let order = match self.job.online.shuffle_dataset {
            true => permutation(n, args.seed.wrapping_add(epoch)),
            false => (0..n).collect(),
        };
        let ppg = plan.prompts_per_generation;
        let g = plan.num_generations;
        // Each rank samples and scores the groups of its contiguous part of the prompts, each
        // completion from the stream of its index in the generation batch; every rank then
        // holds the whole batch, so group and batch statistics are global.
        let dist = crate::dist::world();
        let part = crate::dist::split(ppg, dist.rank(), dist.size());
        let idx = &order[pos * ppg..(pos + 1) * ppg][part.clone()];
        let prompts: Vec<Vec<u32>> = idx.iter().map(|&i| train.ids[i].clone()).collect();
        let rows: Vec<&PromptRow> = idx.iter().map(|&i| &train.set.rows[i]).collect();
        let mut streams = completion_streams(args.seed, generation, ppg * g);
        let streams = &mut streams[part.start * g..part.end * g];
        let (rollout, rewards) = match prompts.is_empty() {
            true => (Rollout::default(), Vec::new()),
            false => {
                let rollout = generate(self.model, &prompts, g, &Sampler::Policy(self.gen_cfg), streams)?;
                let rewards = score(funcs, &rows, g, &rollout)?;
                (rollout, rewards)
            }
        };
        let rollout = rollout.gather()?;
        let rewards = gather_table(&rewards, plan.reward_weights.len())?;
        let mtc = self.job.online.mask_truncated_completions;
        let (mut buf, m) = self
            .algo
            .prepare(self.model, self.reference, &rollout, &rewards, num_tokens_seen, mtc)?;
        if plan.steps_per_generation > 1 {
            buf.order = permutation(buf.len(), args.seed ^ generation.wrapping_mul(0x9E37_79B9));
        }
        Ok((buf, m))
    }
}

/// Writes `checkpoint-<step>/` with the run's online state inside it.
fn save(lp: &mut TrainLoop, model: &Model, state: &OnlineState) -> Result<PathBuf> {
    lp.save_checkpoint_with(model, |dir| write_state(dir, state))
}

/// Writes `online_state.json` into the (temporary) checkpoint directory `dir`.
fn write_state(dir: &Path, state: &OnlineState) -> Result<()> {
    let bytes = serde_json::to_vec(state).map_err(|e| TrainError::Checkpoint(e.to_string()))?;
    write_atomic(&dir.join("online_state.json"), &bytes)
}

/// The reward metrics of `num_generations_eval` completions of every evaluation prompt,
/// sampled with fixed streams (the same at every evaluation, so evaluations compare).
pub fn evaluate(
    model: &Model,
    rows: &[PromptRow],
    ids: &[Vec<u32>],
    funcs: &mut RewardFuncs,
    plan: &OnlinePlan,
    gen_cfg: &GenerationConfig,
    seed: u64,
) -> Result<Metrics> {
    let g = plan.num_generations_eval;
    let chunk = (plan.per_device_train_batch_size / g).max(1);
    let mut table = Vec::new();
    for (c, start) in (0..ids.len()).step_by(chunk).enumerate() {
        let end = (start + chunk).min(ids.len());
        let mut streams = completion_streams(seed ^ 0xE7A1, c as u64, (end - start) * g);
        let rollout = generate(model, &ids[start..end], g, &Sampler::Policy(gen_cfg), &mut streams)?;
        let refs: Vec<&PromptRow> = rows[start..end].iter().collect();
        table.extend(score(funcs, &refs, g, &rollout)?);
    }
    let w = &plan.reward_weights;
    let frac = if g > 1 {
        group_advantages(&table, w, g, ScaleRewards::Group, Default::default())
            .map_err(setting_of)?
            .frac_reward_zero_std
    } else {
        0.0
    };
    let names: Vec<&str> = plan.reward_names.iter().map(String::as_str).collect();
    reward_metrics(&table, w, &names, frac).map_err(setting_of)
}
