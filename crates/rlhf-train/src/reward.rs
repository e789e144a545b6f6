//! Reward modelling: TRL's `RewardTrainer` / `RewardConfig` (1.x defaults) on a GPT-2
//! sequence-classification model (`num_labels = 1`).
//!
//! Stages: 1. config and model, 2. data (tokenise prompt + chosen / prompt + rejected with
//! EOS appended, drop rows longer than `max_length`), 3. the loop (one forward over
//! `[chosen; rejected]`, Bradley–Terry loss with optional margin and centering, AdamW),
//! 4. evaluation, 5. checkpoints and the final `GPT2ForSequenceClassification` directory.
//!
//! Deviations from TRL 1.x `RewardConfig` defaults: `bf16 = false` and no gradient
//! checkpointing (CPU training in f32; checkpointing trades time for memory that tiny and
//! small models do not need). Accuracy counts ties as wrong (TRL 1.x; 0.11 counted them right).

use std::collections::BTreeMap;
use std::path::PathBuf;

use candle_core::{Tensor, D};
use rlhf_models::{Fwd, Model};
use rlhf_ops::ppo::bradley_terry_loss;
use rlhf_ops::sink::GradSink;
use serde::{Deserialize, Serialize};

use crate::chat_data::ChatData;
use crate::data::{read_data, Rows};
use crate::error::{Result, TrainError};
use crate::optim::Grads;
use crate::peft_args::PeftArgs;
use crate::stop::StopSignal;
use crate::trainer::{open_run, trainable_params, DataPaths, TrainLoop, TrainingArgs};

/// `RewardConfig`: TRL's names; defaults of TRL 1.x (see the module docs for deviations).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct RewardConfig {
    /// Model directory (a causal LM gets a fresh score head; a reward model continues).
    pub model_name_or_path: String,
    /// Training data (JSONL, CSV or Parquet with `prompt`?, `chosen`, `rejected`, `margin`?).
    pub train_file: Option<String>,
    /// Evaluation data.
    pub eval_file: Option<String>,
    /// A directory with `train.*` and optionally `validation.*`.
    pub dataset_name: Option<String>,
    /// Rows whose chosen or rejected side is longer than this (in tokens) are dropped.
    pub max_length: Option<usize>,
    /// Weight of `mean((r_c + r_r)^2)` (Eisenstein et al. 2023; 0.01 recommended).
    pub center_rewards_coefficient: Option<f64>,
    /// Shared training settings.
    #[serde(flatten)]
    pub args: TrainingArgs,
    /// LoRA / quantization (TRL `ModelConfig` names).
    #[serde(flatten)]
    pub peft: PeftArgs,
}

impl Default for RewardConfig {
    fn default() -> Self {
        Self {
            model_name_or_path: String::new(),
            train_file: None,
            eval_file: None,
            dataset_name: None,
            max_length: Some(1024),
            center_rewards_coefficient: None,
            args: TrainingArgs {
                output_dir: "runs/reward".into(),
                learning_rate: 1e-4,
                logging_steps: 10,
                disable_dropout: true,
                ..TrainingArgs::default()
            },
            peft: PeftArgs::default(),
        }
    }
}

/// One tokenised preference pair.
#[derive(Clone, Debug, PartialEq)]
pub struct Pair {
    /// prompt + chosen + EOS.
    pub chosen: Vec<u32>,
    /// prompt + rejected + EOS.
    pub rejected: Vec<u32>,
    /// Optional margin subtracted inside the loss.
    pub margin: Option<f32>,
}

/// Reads and tokenises preference rows, plain text or conversational
/// ([`ChatData::reward_pair`]: prompt + answer with EOS appended, as TRL's `RewardTrainer`); rows longer than `max_length` are dropped and
/// counted. An empty result is an error that says why.
pub fn prepare_pairs(model: &Model, rows: &Rows, max_length: Option<usize>) -> Result<(Vec<Pair>, usize)> {
    let mut pairs = Vec::with_capacity(rows.len());
    let mut dropped = 0;
    let data = ChatData::with_template(model.tokenizer()?, model.chat_template.as_ref());
    let limit = max_length
        .unwrap_or(usize::MAX)
        .min(model.cfg().max_position_embeddings);
    for i in 0..rows.len() {
        let (chosen, rejected) = data.reward_pair(rows, i)?;
        let margin = rows.opt_number(i, "margin")?.map(|m| m as f32);
        if let Some(m) = margin.filter(|m| !m.is_finite()) {
            return Err(TrainError::Row {
                path: rows.path.clone(),
                row: i + 1,
                msg: format!("margin {m} is out of range; hint: margins are reward differences, small finite numbers"),
            });
        }
        if chosen.len() > limit || rejected.len() > limit {
            dropped += 1;
            continue;
        }
        pairs.push(Pair {
            chosen,
            rejected,
            margin,
        });
    }
    if pairs.is_empty() {
        return Err(TrainError::Data {
            path: rows.path.clone(),
            msg: format!(
                "every one of the {} rows is longer than max_length ({limit} tokens) and was dropped\n\
                 hint: raise max_length (at most the model's n_positions)",
                rows.len()
            ),
        });
    }
    Ok((pairs, dropped))
}

/// Rewards and loss of a batch of pairs: one forward pass over `[chosen; rejected]`.
pub struct PairBatchOutput {
    /// Bradley–Terry loss (+ centering), scalar.
    pub loss: Tensor,
    /// Chosen rewards `(B)`.
    pub chosen: Vec<f32>,
    /// Rejected rewards `(B)`.
    pub rejected: Vec<f32>,
}

/// The loss of `RewardTrainer.compute_loss` on a batch of pairs.
pub fn pair_loss(model: &Model, pairs: &[&Pair], center: Option<f64>, fwd: &mut Fwd) -> Result<PairBatchOutput> {
    let b = pairs.len();
    // Packed: no padding (the padded batch's scores at each last token, for about 2/3 of
    // the work); see `Model::forward_packed`.
    let seqs: Vec<&[u32]> = pairs
        .iter()
        .map(|p| p.chosen.as_slice())
        .chain(pairs.iter().map(|p| p.rejected.as_slice()))
        .collect();
    let r = model
        .scores_packed(&seqs, fwd)?
        .narrow(D::Minus1, 0, 1)?
        .squeeze(D::Minus1)?;
    let (rc, rr) = (r.narrow(0, 0, b)?, r.narrow(0, b, b)?);
    let margin = if pairs.iter().any(|p| p.margin.is_some()) {
        let m: Vec<f32> = pairs.iter().map(|p| p.margin.unwrap_or(0.0)).collect();
        Some(Tensor::from_vec(m, b, r.device())?)
    } else {
        None
    };
    let loss = bradley_terry_loss(&rc, &rr, margin.as_ref(), center)?;
    Ok(PairBatchOutput {
        loss,
        chosen: rc.to_vec1()?,
        rejected: rr.to_vec1()?,
    })
}

/// TRL 1.x's logged reward metrics of one batch.
pub fn pair_metrics(loss: f64, chosen: &[f32], rejected: &[f32]) -> BTreeMap<String, f64> {
    let n = chosen.len().max(1) as f64;
    let all = chosen.iter().chain(rejected).map(|&x| x as f64);
    let mut m = BTreeMap::new();
    m.insert("loss".into(), loss);
    m.insert(
        "accuracy".into(),
        chosen.iter().zip(rejected).filter(|(c, r)| c > r).count() as f64 / n,
    );
    m.insert(
        "margin".into(),
        chosen.iter().zip(rejected).map(|(c, r)| (c - r) as f64).sum::<f64>() / n,
    );
    m.insert("mean_reward".into(), all.clone().sum::<f64>() / (2.0 * n));
    m.insert("min_reward".into(), all.clone().fold(f64::INFINITY, f64::min));
    m.insert("max_reward".into(), all.fold(f64::NEG_INFINITY, f64::max));
    m
}

/// Mean loss and reward metrics over a data set, without dropout or gradients.
pub fn evaluate(model: &Model, pairs: &[Pair], batch: usize, center: Option<f64>) -> Result<BTreeMap<String, f64>> {
    let (mut chosen, mut rejected, mut loss_sum) = (Vec::new(), Vec::new(), 0.0);
    for chunk in pairs.chunks(batch.max(1)) {
        let refs: Vec<&Pair> = chunk.iter().collect();
        let out = pair_loss(model, &refs, center, &mut Fwd::eval())?;
        loss_sum += out.loss.to_scalar::<f32>()? as f64 * chunk.len() as f64;
        chosen.extend(out.chosen);
        rejected.extend(out.rejected);
    }
    Ok(pair_metrics(loss_sum / pairs.len().max(1) as f64, &chosen, &rejected))
}

/// What a training run produced.
pub struct RewardOutcome {
    /// The trained model.
    pub model: Model,
    /// `output_dir/final`.
    pub final_dir: PathBuf,
    /// The last evaluation metrics (without the `eval_` prefix), if evaluation ran.
    pub eval: Option<BTreeMap<String, f64>>,
}

/// Trains a reward model as `RewardTrainer.train()` does.
pub fn train(cfg: &RewardConfig) -> Result<RewardOutcome> {
    train_until(cfg, &StopSignal::new())
}

/// [`train`], stopping between optimizer steps once `stop` is requested: the last completed
/// step is saved as a checkpoint and the error is [`TrainError::Interrupted`].
pub fn train_until(cfg: &RewardConfig, stop: &StopSignal) -> Result<RewardOutcome> {
    let _precision = rlhf_ops::precision::PrecisionGuard::for_run(cfg.args.bf16);
    // 1. config, run directory and model (from the checkpoint when resuming)
    let args = &cfg.args;
    let (run, resume, model) = open_run(cfg, args, &cfg.model_name_or_path, &cfg.peft, "SEQ_CLS", |m| {
        if args.disable_dropout {
            m.disable_dropout();
        }
        if m.ensure_score_head(args.seed)? {
            tracing::info!("no score head found; initialised `score` (normal, std 0.02)");
        }
        Ok(())
    })?;

    // 2. data
    let files = DataPaths::resolve(
        cfg.train_file.as_deref(),
        cfg.eval_file.as_deref(),
        cfg.dataset_name.as_deref(),
    )?;
    let (train_pairs, dropped) = prepare_pairs(&model, &read_data(&files.train)?, cfg.max_length)?;
    let eval_pairs = match &files.validation {
        Some(p) => Some(prepare_pairs(&model, &read_data(p)?, cfg.max_length)?.0),
        None => None,
    };
    let params = trainable_params(&model);
    let mut lp = TrainLoop::new(args.clone(), run, params, train_pairs.len())?;
    if dropped > 0 {
        lp.println(format!(
            "dropped {dropped} training rows longer than max_length ({:?} tokens)",
            cfg.max_length
        ));
    }
    lp.println(format!(
        "reward model: {} pairs, {} steps, {} trainable parameters",
        train_pairs.len(),
        lp.total_steps,
        lp.opt.num_params()
    ));
    if let Some(ckpt) = &resume {
        lp.resume(ckpt)?;
    }

    // 3. the loop
    let dropout = !args.disable_dropout;
    let ga = args.gradient_accumulation_steps as f64;
    let mut eval = None;
    while !lp.done() {
        lp.stop_if_requested(&model, stop)?;
        let vars: Vec<_> = lp.opt.vars().into_iter().cloned().collect();
        let var_refs: Vec<_> = vars.iter().collect();
        let mut grads = Grads::new(vars.len());
        let mut metrics: BTreeMap<String, f64> = BTreeMap::new();
        // With several ranks each takes its part of every micro-batch, and its mean loss is
        // weighted by that part's share, so the sum over ranks is the micro-batch's mean.
        let plan = lp.next_step();
        let mut samples = 0;
        for (pass, m) in plan.iter().enumerate() {
            let batch: Vec<&Pair> = m.mine().iter().map(|&i| &train_pairs[i]).collect();
            let mut mb_metrics = BTreeMap::new();
            if !batch.is_empty() {
                let share = m.global.len() as f64 / batch.len() as f64;
                let mut keys = lp.dropout_keys(pass as u64, m.mine_pair_ids());
                let sink = GradSink::new();
                let fwd = if dropout {
                    Fwd::train(&mut keys)
                } else {
                    Fwd::eval_grad()
                };
                let out = pair_loss(
                    &model,
                    &batch,
                    cfg.center_rewards_coefficient,
                    &mut fwd.with_sink(&sink),
                )?;
                grads.add(&var_refs, &(&out.loss / (ga * share))?.backward()?)?;
                grads.add_sink(&var_refs, sink.take())?;
                mb_metrics = pair_metrics(out.loss.to_scalar::<f32>()? as f64, &out.chosen, &out.rejected);
            }
            // The whole micro-batch's metrics, as one process computes them.
            crate::dist::world().reduce_metrics(&mut mb_metrics, batch.len() as f64)?;
            for (k, v) in mb_metrics {
                *metrics.entry(k).or_default() += v / plan.len() as f64;
            }
            samples += batch.len();
        }
        let report = lp.apply(grads, &metrics, samples)?;
        // 4. evaluation
        if report.evaluate {
            if let Some(pairs) = &eval_pairs {
                let m = evaluate(
                    &model,
                    pairs,
                    args.per_device_eval_batch_size,
                    cfg.center_rewards_coefficient,
                )?;
                lp.log_eval(&m)?;
                eval = Some(m);
            }
        }
        // 5. checkpoints
        if report.save {
            lp.save_checkpoint(&model)?;
        }
    }
    let final_dir = lp.finish(&model)?;
    Ok(RewardOutcome { model, final_dir, eval })
}
