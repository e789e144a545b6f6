//! The plumbing every trainer shares: `TrainingArguments`-style settings, the step plan
//! (epochs, micro-batches, gradient accumulation), the optimizer and schedule, logging,
//! evaluation and checkpoint cadence, NaN guards, and exact resume.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::Var;
use rlhf_models::Model;
use rlhf_ops::dropout::DropoutKeys;
use rlhf_ops::rng::RngStream;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use crate::checkpoint::{load_tensors, save_tensors, write_atomic, RunDir};
use crate::error::{Result, TrainError};
use crate::optim::{AdamConfig, AdamW, Grads, LinearSchedule};
use crate::stop::StopSignal;

mod args;

pub use args::TrainingArgs;

/// What happened in one optimizer step.
pub struct StepReport {
    /// Metrics were logged (the object written to `metrics.jsonl`).
    pub logged: Option<Value>,
    /// The caller should evaluate now.
    pub evaluate: bool,
    /// The caller should save a checkpoint now (after evaluating).
    pub save: bool,
}

/// Everything a checkpoint must restore besides weights and optimizer moments.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct TrainerState {
    /// Optimizer steps done.
    pub global_step: u64,
    /// Seed of the dropout streams ([`TrainLoop::dropout_keys`]).
    pub dropout_seed: u64,
    /// Metric sums since the last log.
    pub accum: BTreeMap<String, f64>,
    /// Steps since the last log.
    pub accum_steps: u64,
    /// Examples seen since the last log.
    pub accum_samples: u64,
    /// Ranks of the run that wrote the state (absent: 1); resuming needs the same number.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub world_size: Option<usize>,
}

/// The shared training loop state: plan, optimizer, schedule, logging and checkpoints.
pub struct TrainLoop {
    /// Settings.
    pub args: TrainingArgs,
    /// The run directory.
    pub run: RunDir,
    /// The optimizer over the trainable parameters.
    pub opt: AdamW,
    /// Examples in the training set.
    pub n_train: usize,
    /// Optimizer steps per epoch.
    pub steps_per_epoch: u64,
    /// Total optimizer steps.
    pub total_steps: u64,
    /// Loop state saved in checkpoints.
    pub state: TrainerState,
    schedule: LinearSchedule,
    progress: indicatif::ProgressBar,
    last_log: Instant,
    last_checkpoint: Option<PathBuf>,
}

impl TrainLoop {
    /// Plans the run over `n_train` examples and builds the optimizer over `params`. With
    /// several ranks ([`crate::dist`]) a micro-batch holds `per_device_train_batch_size`
    /// examples per rank, and rank 0's values of `params` are given to every rank.
    pub fn new(args: TrainingArgs, run: RunDir, params: Vec<(String, Var)>, n_train: usize) -> Result<Self> {
        args.validate()?;
        let dist = crate::dist::world();
        dist.broadcast_vars(&params.iter().map(|(_, v)| v).collect::<Vec<_>>())?;
        let batches = n_train.div_ceil(args.per_device_train_batch_size * dist.size()) as u64;
        let ga = args.gradient_accumulation_steps as u64;
        let steps_per_epoch = batches.div_ceil(ga).max(1);
        let total_steps = if args.max_steps > 0 {
            args.max_steps as u64
        } else {
            ((args.num_train_epochs * steps_per_epoch as f64).ceil() as u64).max(1)
        };
        let warmup = if args.warmup_steps > 0 {
            args.warmup_steps
        } else {
            (args.warmup_ratio * total_steps as f64).ceil() as u64
        };
        let cfg = AdamConfig {
            beta1: args.adam_beta1,
            beta2: args.adam_beta2,
            eps: args.adam_epsilon,
            weight_decay: args.weight_decay,
        };
        let opt = AdamW::new(params, cfg);
        let progress = if args.quiet || !dist.is_main() {
            indicatif::ProgressBar::hidden()
        } else {
            let pb = indicatif::ProgressBar::new(total_steps);
            if let Ok(style) =
                indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}")
            {
                pb.set_style(style);
            }
            pb
        };
        let state = TrainerState {
            global_step: 0,
            dropout_seed: args.seed.wrapping_add(0x5EED),
            accum: BTreeMap::new(),
            accum_steps: 0,
            accum_samples: 0,
            world_size: None,
        };
        Ok(Self {
            args,
            run,
            opt,
            n_train,
            steps_per_epoch,
            total_steps,
            state,
            schedule: LinearSchedule {
                warmup,
                total: total_steps,
            },
            progress,
            last_log: Instant::now(),
            last_checkpoint: None,
        })
    }

    /// Whether all steps are done.
    pub fn done(&self) -> bool {
        self.state.global_step >= self.total_steps
    }

    /// The learning rate of the next optimizer step.
    pub fn lr(&self) -> f64 {
        match self.args.lr_scheduler_type.as_str() {
            "constant" => self.args.learning_rate,
            _ => self.args.learning_rate * self.schedule.factor(self.state.global_step),
        }
    }

    /// The micro-batches of the next optimizer step over all ranks: epoch `e` visits a
    /// permutation seeded by `seed + e` in micro-batches of `per_device_train_batch_size ×
    /// ranks` examples, each split into contiguous parts, one per rank
    /// ([`crate::dist::split`]); the last step of an epoch may have fewer.
    pub fn next_step(&self) -> Vec<MicroBatch> {
        let dist = crate::dist::world();
        let s = self.state.global_step;
        let epoch = s / self.steps_per_epoch;
        let bs = self.args.per_device_train_batch_size * dist.size();
        let ga = self.args.gradient_accumulation_steps as u64;
        let perm = permutation(self.n_train, self.args.seed.wrapping_add(epoch));
        let first = (s % self.steps_per_epoch) * ga;
        (first..first + ga)
            .map(|b| b as usize * bs)
            .filter(|&start| start < self.n_train)
            .map(|start| {
                let global = perm[start..(start + bs).min(self.n_train)].to_vec();
                let mine = crate::dist::split(global.len(), dist.rank(), dist.size());
                MicroBatch { global, mine }
            })
            .collect()
    }

    /// This rank's examples of each micro-batch of the next optimizer step
    /// ([`TrainLoop::next_step`]; on one process, the whole micro-batches), empty ones left out.
    pub fn next_micro_batches(&self) -> Vec<Vec<usize>> {
        self.next_step()
            .iter()
            .map(|m| m.mine().to_vec())
            .filter(|m| !m.is_empty())
            .collect()
    }

    /// The dropout streams of a forward pass of the next optimizer step over the sequences
    /// with global ids `examples` (in the order the pass takes them), keyed by the seed, the
    /// step and `pass` (e.g. the micro-batch): every rank keys a sequence alike, so N ranks
    /// drop what one process drops, and a resumed run what an uninterrupted one does.
    pub fn dropout_keys(&self, pass: u64, examples: Vec<u64>) -> DropoutKeys {
        let key = RngStream::keyed(&[self.state.dropout_seed, self.state.global_step, pass]).seed;
        DropoutKeys::new(key, examples)
    }

    /// Applies one optimizer step: sums gradients over ranks, NaN guard, clipping, update,
    /// schedule, metric accumulation; logs every `logging_steps` and says whether to
    /// evaluate or save. With several ranks, `metrics` and `samples` are this rank's:
    /// metrics become means weighted by `samples` over ranks (`min_*` / `max_*`: the extremes;
    /// [`crate::dist::Collective::reduce_metrics`]).
    pub fn apply(&mut self, mut grads: Grads, metrics: &BTreeMap<String, f64>, samples: usize) -> Result<StepReport> {
        let step = self.state.global_step + 1;
        let dist = crate::dist::world();
        let sizes: Vec<usize> = self.opt.vars().iter().map(|v| v.elem_count()).collect();
        dist.all_reduce_grads(&mut grads, &sizes)?;
        let mut metrics = metrics.clone();
        dist.reduce_metrics(&mut metrics, samples as f64)?;
        let samples = if dist.size() > 1 {
            let mut sum = [samples as f64];
            dist.all_reduce_f64(&mut sum, crate::dist::ReduceOp::Sum)?;
            sum[0] as usize
        } else {
            samples
        };
        let metrics = &metrics;
        if metrics.values().any(|v| !v.is_finite()) || grads.non_finite() {
            let bad: Vec<String> = metrics
                .iter()
                .filter(|(_, v)| !v.is_finite())
                .map(|(k, v)| format!("{k} = {v}"))
                .collect();
            return Err(TrainError::Diverged(format!(
                "step {step}: non-finite {} — stopping without saving this state\n\
                 last good checkpoint: {}\n\
                 hint: lower the learning rate, enable max_grad_norm, or check the data and reward scale",
                if bad.is_empty() {
                    "gradient".to_string()
                } else {
                    bad.join(", ")
                },
                self.last_checkpoint
                    .as_ref()
                    .map_or("none".into(), |p| p.display().to_string()),
            )));
        }
        let grad_norm = grads.clip(self.args.max_grad_norm);
        let lr = self.lr();
        self.opt.step(&grads, lr)?;
        self.state.global_step = step;
        for (k, v) in metrics {
            *self.state.accum.entry(k.clone()).or_default() += v;
        }
        self.state.accum_steps += 1;
        self.state.accum_samples += samples as u64;
        self.progress.set_position(step);
        let epoch_end = step.is_multiple_of(self.steps_per_epoch);
        let last = step >= self.total_steps;
        let mut logged = None;
        if step.is_multiple_of(self.args.logging_steps) || last {
            let n = self.state.accum_steps.max(1) as f64;
            let mut obj = Map::new();
            obj.insert("step".into(), json!(step));
            obj.insert("epoch".into(), json!(step as f64 / self.steps_per_epoch as f64));
            for (k, v) in std::mem::take(&mut self.state.accum) {
                obj.insert(k, json!(v / n));
            }
            obj.insert("grad_norm".into(), json!(grad_norm));
            obj.insert("learning_rate".into(), json!(self.lr()));
            let secs = self.last_log.elapsed().as_secs_f64().max(1e-9);
            obj.insert(
                "samples_per_second".into(),
                json!(self.state.accum_samples as f64 / secs),
            );
            self.state.accum_steps = 0;
            self.state.accum_samples = 0;
            self.last_log = Instant::now();
            let obj = Value::Object(obj);
            self.progress.set_message(progress_message(&obj));
            if self.args.quiet && dist.is_main() {
                eprintln!("{obj}");
            }
            self.run.log(&obj)?;
            logged = Some(obj);
        }
        let every = |strategy: &str, n: u64| match strategy {
            "steps" => step.is_multiple_of(n),
            "epoch" => epoch_end,
            _ => false,
        };
        let evaluate = every(
            &self.args.eval_strategy,
            self.args.eval_steps.unwrap_or(self.args.logging_steps),
        ) || (last && self.args.eval_strategy != "no");
        let save = every(&self.args.save_strategy, self.args.save_steps) && !last;
        Ok(StepReport { logged, evaluate, save })
    }

    /// Logs evaluation metrics (keys get the `eval_` prefix).
    pub fn log_eval(&mut self, metrics: &BTreeMap<String, f64>) -> Result<Value> {
        let mut obj = Map::new();
        obj.insert("step".into(), json!(self.state.global_step));
        obj.insert(
            "epoch".into(),
            json!(self.state.global_step as f64 / self.steps_per_epoch as f64),
        );
        for (k, v) in metrics {
            obj.insert(format!("eval_{k}"), json!(v));
        }
        let obj = Value::Object(obj);
        self.progress.println(format!(
            "eval @ step {}: {}",
            self.state.global_step,
            progress_message(&obj)
        ));
        self.run.log(&obj)?;
        Ok(obj)
    }

    /// Saves `checkpoint-<step>/`: the model, optimizer moments and loop state (rank 0
    /// writes, every rank returns once it is complete).
    pub fn save_checkpoint(&mut self, model: &Model) -> Result<PathBuf> {
        self.save_checkpoint_with(model, |_| Ok(()))
    }

    /// [`TrainLoop::save_checkpoint`] plus a trainer's own files, written by `extra` into
    /// the temporary directory, so they are part of the checkpoint's atomic rename.
    pub fn save_checkpoint_with(&mut self, model: &Model, extra: impl FnOnce(&Path) -> Result<()>) -> Result<PathBuf> {
        let step = self.state.global_step;
        let ranks = crate::dist::world().size();
        self.state.world_size = (ranks > 1).then_some(ranks);
        let state = serde_json::to_vec_pretty(&self.state).map_err(|e| TrainError::Checkpoint(e.to_string()))?;
        let opt = self.opt.state()?;
        let dir = self.run.save_checkpoint(step, self.args.save_total_limit, |tmp| {
            crate::peft_args::save_trained(model, tmp)?;
            save_tensors(&opt, &tmp.join("optimizer.safetensors"))?;
            extra(tmp)?;
            write_atomic(&tmp.join("trainer_state.json"), &state)
        })?;
        self.last_checkpoint = Some(dir.clone());
        Ok(dir)
    }

    /// When `stop` was requested: closes the progress bar, saves `checkpoint-<step>/` of the
    /// last completed step (unless it is there already) and returns
    /// [`TrainError::Interrupted`] naming it. Call between optimizer steps only.
    pub fn stop_if_requested(&mut self, model: &Model, stop: &StopSignal) -> Result<()> {
        self.stop_if_requested_with(model, stop, |_| Ok(()))
    }

    /// [`TrainLoop::stop_if_requested`], the checkpoint holding `extra`'s files too
    /// ([`TrainLoop::save_checkpoint_with`]).
    pub fn stop_if_requested_with(
        &mut self,
        model: &Model,
        stop: &StopSignal,
        extra: impl FnOnce(&Path) -> Result<()>,
    ) -> Result<()> {
        let (run, step, total) = (self.run.clone(), self.state.global_step, self.total_steps);
        let out = crate::stop::stop_if_requested(stop, &run, step, total, || self.save_checkpoint_with(model, extra));
        if out.is_err() {
            self.progress.finish_and_clear();
        }
        out
    }

    /// Restores optimizer and loop state from a checkpoint (the model's weights must already
    /// come from the same checkpoint) and drops metrics logged after it.
    pub fn resume(&mut self, ckpt: &Path) -> Result<()> {
        let p = ckpt.join("trainer_state.json");
        let text = std::fs::read_to_string(&p).map_err(|source| TrainError::Io {
            path: p.clone(),
            source,
        })?;
        self.state =
            serde_json::from_str(&text).map_err(|e| TrainError::Checkpoint(format!("{}: {e}", p.display())))?;
        crate::dist::check_resume_ranks(ckpt, self.state.world_size)?;
        self.opt
            .load_state(&load_tensors(&ckpt.join("optimizer.safetensors"))?)?;
        self.run.truncate_metrics_after(self.state.global_step)?;
        self.progress.set_position(self.state.global_step);
        self.last_checkpoint = Some(ckpt.to_path_buf());
        Ok(())
    }

    /// Saves the final model to `output_dir/final` and closes the progress bar.
    pub fn finish(&mut self, model: &Model) -> Result<PathBuf> {
        self.progress.finish_and_clear();
        self.run.save_final(|tmp| crate::peft_args::save_trained(model, tmp))
    }

    /// Prints a line above the progress bar (rank 0 only).
    pub fn println(&self, msg: impl AsRef<str>) {
        if !crate::dist::world().is_main() {
            return;
        }
        if self.args.quiet {
            eprintln!("{}", msg.as_ref());
        } else {
            self.progress.println(msg.as_ref());
        }
    }
}

/// One micro-batch of an optimizer step: its examples over all ranks and this rank's part.
#[derive(Clone, Debug, PartialEq)]
pub struct MicroBatch {
    /// Example indices of the whole micro-batch (every rank's), in order.
    pub global: Vec<usize>,
    /// This rank's part of `global`.
    pub mine: std::ops::Range<usize>,
}

impl MicroBatch {
    /// This rank's example indices.
    pub fn mine(&self) -> &[usize] {
        &self.global[self.mine.clone()]
    }

    /// Global ids of this rank's sequences, one per example.
    pub fn mine_ids(&self) -> Vec<u64> {
        self.mine().iter().map(|&i| i as u64).collect()
    }

    /// Global ids of this rank's preference pairs' sequences ([`pair_sequence_ids`]).
    pub fn mine_pair_ids(&self) -> Vec<u64> {
        pair_sequence_ids(self.mine())
    }
}

/// Global ids of the sequences of preference pairs `pairs` in the order pair models take
/// them (every chosen, then every rejected): `2i` and `2i + 1` for pair `i`.
pub fn pair_sequence_ids(pairs: &[usize]) -> Vec<u64> {
    let chosen = pairs.iter().map(|&i| 2 * i as u64);
    chosen.chain(pairs.iter().map(|&i| 2 * i as u64 + 1)).collect()
}

fn progress_message(obj: &Value) -> String {
    let Some(m) = obj.as_object() else { return String::new() };
    m.iter()
        .filter(|(k, _)| !matches!(k.as_str(), "step" | "epoch"))
        .filter_map(|(k, v)| v.as_f64().map(|x| format!("{k} {x:.4}")))
        .collect::<Vec<_>>()
        .join("  ")
}

/// A seeded Fisher–Yates permutation of `0..n`.
pub fn permutation(n: usize, seed: u64) -> Vec<usize> {
    let mut rng = RngStream::new(seed);
    let mut p: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        p.swap(i, rng.below(i + 1));
    }
    p
}

/// The training and evaluation files of a run, from `train_file` / `eval_file` or a
/// `dataset_name` directory with `train.*` and `validation.*` splits.
#[derive(Clone, Debug, PartialEq)]
pub struct DataPaths {
    /// Training data.
    pub train: PathBuf,
    /// Evaluation data, if any.
    pub validation: Option<PathBuf>,
}

impl DataPaths {
    /// Resolves the config keys; `eval_file` overrides a directory's validation split.
    pub fn resolve(train_file: Option<&str>, eval_file: Option<&str>, dataset_name: Option<&str>) -> Result<Self> {
        let (train, validation) = match (train_file, dataset_name) {
            (Some(f), _) => (PathBuf::from(f), None),
            (None, Some(d)) => {
                let files = crate::data::DataFiles::resolve(Path::new(d))?;
                (files.train, files.validation)
            }
            (None, None) => {
                return Err(TrainError::Config(
                    "no training data: set `train_file` (JSONL, CSV or Parquet) or `dataset_name` (a directory with train.*)"
                        .into(),
                ))
            }
        };
        Ok(Self {
            train,
            validation: eval_file.map(PathBuf::from).or(validation),
        })
    }
}

/// Stage 1 of the SFT and reward trainers: validates the settings, prepares the run
/// directory, resolves the checkpoint to resume from (refusing settings that differ from the
/// run's saved config in a key that changes training, [`crate::config::check_resume`]),
/// loads the trainable model (see [`crate::peft_args::load_trainable`]; `prepare` runs on
/// the loaded base) and writes the resolved config.
pub fn open_run<C: serde::Serialize>(
    cfg: &C,
    args: &TrainingArgs,
    model_name_or_path: &str,
    peft: &crate::peft_args::PeftArgs,
    task_type: &str,
    prepare: impl FnOnce(&mut Model) -> Result<()>,
) -> Result<(RunDir, Option<PathBuf>, Model)> {
    args.validate()?;
    let (run, resume) = prepare_run_dir(
        cfg,
        &args.output_dir,
        args.overwrite_output_dir,
        args.resume_from_checkpoint.as_deref(),
    )?;
    if model_name_or_path.is_empty() && resume.is_none() {
        return Err(TrainError::setting(
            "model_name_or_path",
            "required (a GPT-2 model directory)",
        ));
    }
    let model = crate::peft_args::load_trainable(
        Path::new(model_name_or_path),
        resume.as_deref(),
        peft,
        task_type,
        args.seed,
        prepare,
    )?;
    run.write_config(&crate::config::to_toml(cfg)?)?;
    Ok((run, resume, model))
}

/// The run directory of a trainer (see [`RunDir::prepare`]) and, when resuming, the resolved
/// checkpoint, after checking that `cfg` trains as the run's saved configuration did
/// ([`crate::config::check_resume`]); reporting to the integrations of `cfg`'s `report_to`
/// ([`RunDir::with_reporting`]).
pub fn prepare_run_dir<C: serde::Serialize>(
    cfg: &C,
    output_dir: &str,
    overwrite: bool,
    resume_from: Option<&str>,
) -> Result<(RunDir, Option<PathBuf>)> {
    let run = RunDir::prepare(Path::new(output_dir), overwrite, resume_from.is_some())?;
    let resume = resume_from.map(|s| run.resolve_checkpoint(s)).transpose()?;
    if let Some(saved) = resume.as_deref().and_then(|ckpt| run.saved_config(ckpt)) {
        crate::config::check_resume(cfg, &saved)?;
    }
    let report = crate::tensorboard::ReportArgs::of(cfg)?;
    Ok((run.with_reporting(&report, resume.is_some(), overwrite)?, resume))
}

/// The trainable weights of a model, named, for the optimizer.
pub fn trainable_params(model: &Model) -> Vec<(String, Var)> {
    model
        .named_params()
        .into_iter()
        .filter_map(|(n, p)| p.var().map(|v| (n, v.clone())))
        .collect()
}
