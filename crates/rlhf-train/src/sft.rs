//! Supervised fine-tuning: TRL's `SFTTrainer` / `SFTConfig` (1.x defaults) for a causal LM.
//!
//! Stages: 1. config and model, 2. data (`prompt` + `completion`, or `text`; EOS appended;
//! rows longer than `max_length` dropped and counted), 3. the loop (next-token cross
//! entropy, on completion tokens only when `completion_only_loss`), 4. evaluation,
//! 5. checkpoints and the final `GPT2LMHeadModel` directory.
//!
//! The loss of one optimizer step is the mean over every label token of all its
//! micro-batches (transformers' `num_items_in_batch` normalisation), so gradient
//! accumulation gives the same update as one large batch.
//!
//! Deviations from TRL 1.x: rows longer than `max_length` are dropped (TRL truncates);
//! `packing` is not supported; f32 instead of bf16; no gradient checkpointing.

use std::collections::BTreeMap;
use std::path::PathBuf;

use candle_core::{DType, Tensor, D};
use rlhf_models::{Fwd, Model};
use rlhf_ops::ppo::logprobs_from_logits;
use serde::{Deserialize, Serialize};

use crate::chat_data::ChatData;
use crate::collate::{pad, PadSide};
use crate::data::{read_data, Rows};
use crate::error::{Result, TrainError};
use crate::optim::Grads;
use crate::peft_args::PeftArgs;
use crate::stop::StopSignal;
use crate::trainer::{open_run, trainable_params, DataPaths, TrainLoop, TrainingArgs};

/// `SFTConfig`: TRL's names and 1.x defaults (deviations in the module docs).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct SftConfig {
    /// Model directory (a GPT-2 causal LM).
    pub model_name_or_path: String,
    /// Training data (JSONL, CSV or Parquet).
    pub train_file: Option<String>,
    /// Evaluation data.
    pub eval_file: Option<String>,
    /// A directory with `train.*` and optionally `validation.*`.
    pub dataset_name: Option<String>,
    /// Column with the whole text when there is no `prompt` / `completion`.
    pub dataset_text_field: String,
    /// Rows longer than this (tokens, EOS included) are dropped.
    pub max_length: Option<usize>,
    /// Loss on completion tokens only (default: yes when rows have a prompt).
    pub completion_only_loss: Option<bool>,
    /// Loss on assistant turns only (conversational rows; the template must mark them with
    /// `{% generation %}`, e.g. TRL's `*_training.jinja` given as `chat_template_path`).
    pub assistant_only_loss: bool,
    /// A Jinja chat template file used instead of the model's own.
    pub chat_template_path: Option<String>,
    /// Shared training settings.
    #[serde(flatten)]
    pub args: TrainingArgs,
    /// LoRA / quantization (TRL `ModelConfig` names).
    #[serde(flatten)]
    pub peft: PeftArgs,
}

impl Default for SftConfig {
    fn default() -> Self {
        Self {
            model_name_or_path: String::new(),
            train_file: None,
            eval_file: None,
            dataset_name: None,
            dataset_text_field: "text".into(),
            max_length: Some(1024),
            completion_only_loss: None,
            assistant_only_loss: false,
            chat_template_path: None,
            args: TrainingArgs {
                output_dir: "runs/sft".into(),
                learning_rate: 2e-5,
                logging_steps: 10,
                ..TrainingArgs::default()
            },
            peft: PeftArgs::default(),
        }
    }
}

/// One tokenised example: ids and which positions are trained on.
#[derive(Clone, Debug, PartialEq)]
pub struct Example {
    /// prompt + completion + EOS (or text + EOS).
    pub ids: Vec<u32>,
    /// 1 where the token is a label (predicted from the tokens before it).
    pub labels: Vec<u8>,
}

/// Tokenises SFT rows as TRL 1.16's `SFTTrainer` does (plain text, prompt-completion, or
/// conversational rows rendered with the chat template, [`ChatData::sft_example`]); rows
/// longer than `max_length` are dropped and counted.
pub fn prepare_examples(model: &Model, rows: &Rows, cfg: &SftConfig) -> Result<(Vec<Example>, usize)> {
    let tok = model.tokenizer()?;
    let template = crate::chat_data::template_for(model, cfg.chat_template_path.as_deref())?;
    let data = ChatData::with_template(tok, template.as_ref());
    let limit = cfg
        .max_length
        .unwrap_or(usize::MAX)
        .min(model.cfg().max_position_embeddings);
    let (mut out, mut dropped) = (Vec::with_capacity(rows.len()), 0);
    for i in 0..rows.len() {
        let t = data.sft_example(rows, i, &cfg.dataset_text_field, cfg.assistant_only_loss)?;
        if t.input_ids.len() > limit {
            dropped += 1;
            continue;
        }
        let labels = t
            .labels(cfg.completion_only_loss.unwrap_or(true))
            .iter()
            .enumerate()
            .map(|(p, &l)| u8::from(p >= 1 && l != -100))
            .collect();
        out.push(Example {
            ids: t.input_ids,
            labels,
        });
    }
    if out.is_empty() {
        return Err(TrainError::Data {
            path: rows.path.clone(),
            msg: format!(
                "every one of the {} rows is longer than max_length ({limit} tokens) and was dropped\n\
                 hint: raise max_length (at most the model's n_positions)",
                rows.len()
            ),
        });
    }
    Ok((out, dropped))
}

/// Summed next-token negative log-likelihood over label tokens, the number of label
/// tokens, and how many of them the argmax predicts.
pub struct NllOutput {
    /// Sum of `-log p(label)` (scalar, differentiable).
    pub nll_sum: Tensor,
    /// Label tokens.
    pub tokens: usize,
    /// Label tokens the argmax predicts.
    pub correct: usize,
}

/// Causal-LM loss pieces of a batch (right-padded; position `t` predicts token `t + 1`).
pub fn batch_nll(model: &Model, batch: &[&Example], fwd: &mut Fwd) -> Result<NllOutput> {
    let seqs: Vec<Vec<u32>> = batch.iter().map(|e| e.ids.clone()).collect();
    let pad_id = model.tokenizer()?.pad_token_id;
    let (ids, mask) = pad(&seqs, pad_id, PadSide::Right, model.device())?;
    let t = ids.dim(1)?;
    let logits = model.logits(&ids, &mask, fwd)?.narrow(1, 0, t - 1)?;
    let targets = ids.narrow(1, 1, t - 1)?.contiguous()?;
    let lw: Vec<f32> = batch
        .iter()
        .flat_map(|e| (1..t).map(move |k| e.labels.get(k).map_or(0.0, |&l| f32::from(l))))
        .collect();
    let tokens = lw.iter().filter(|&&w| w > 0.0).count();
    let weights = Tensor::from_vec(lw, (batch.len(), t - 1), ids.device())?;
    let logp = logprobs_from_logits(&logits, &targets)?;
    let nll_sum = (logp * &weights)?.sum_all()?.neg()?;
    let pred = logits.argmax(D::Minus1)?;
    let correct = (pred.eq(&targets)?.to_dtype(DType::F32)? * &weights)?
        .sum_all()?
        .to_scalar::<f32>()? as usize;
    Ok(NllOutput {
        nll_sum,
        tokens,
        correct,
    })
}

/// Mean token loss and accuracy over a data set, without dropout or gradients.
pub fn evaluate(model: &Model, examples: &[Example], batch: usize) -> Result<BTreeMap<String, f64>> {
    let (mut nll, mut tokens, mut correct) = (0.0, 0usize, 0usize);
    for chunk in examples.chunks(batch.max(1)) {
        let refs: Vec<&Example> = chunk.iter().collect();
        let out = batch_nll(model, &refs, &mut Fwd::eval())?;
        nll += out.nll_sum.to_scalar::<f32>()? as f64;
        tokens += out.tokens;
        correct += out.correct;
    }
    let n = tokens.max(1) as f64;
    Ok(BTreeMap::from([
        ("loss".into(), nll / n),
        ("mean_token_accuracy".into(), correct as f64 / n),
    ]))
}

/// What a training run produced.
pub struct SftOutcome {
    /// The trained model.
    pub model: Model,
    /// `output_dir/final`.
    pub final_dir: PathBuf,
    /// The last evaluation metrics, if evaluation ran.
    pub eval: Option<BTreeMap<String, f64>>,
}

/// Fine-tunes a causal LM as `SFTTrainer.train()` does.
pub fn train(cfg: &SftConfig) -> Result<SftOutcome> {
    train_until(cfg, &StopSignal::new())
}

/// [`train`], stopping between optimizer steps once `stop` is requested: the last completed
/// step is saved as a checkpoint and the error is [`TrainError::Interrupted`].
pub fn train_until(cfg: &SftConfig, stop: &StopSignal) -> Result<SftOutcome> {
    let _precision = rlhf_ops::precision::PrecisionGuard::for_run(cfg.args.bf16);
    // 1. config, run directory and model (from the checkpoint when resuming)
    let args = &cfg.args;
    let (run, resume, model) = open_run(cfg, args, &cfg.model_name_or_path, &cfg.peft, "CAUSAL_LM", |m| {
        if args.disable_dropout {
            m.disable_dropout();
        }
        Ok(())
    })?;

    // 2. data
    let files = DataPaths::resolve(
        cfg.train_file.as_deref(),
        cfg.eval_file.as_deref(),
        cfg.dataset_name.as_deref(),
    )?;
    let (train_ex, dropped) = prepare_examples(&model, &read_data(&files.train)?, cfg)?;
    let eval_ex = match &files.validation {
        Some(p) => Some(prepare_examples(&model, &read_data(p)?, cfg)?.0),
        None => None,
    };
    let params = trainable_params(&model);
    let mut lp = TrainLoop::new(args.clone(), run, params, train_ex.len())?;
    if dropped > 0 {
        lp.println(format!(
            "dropped {dropped} training rows longer than max_length ({:?} tokens)",
            cfg.max_length
        ));
    }
    lp.println(format!(
        "sft: {} examples, {} steps, {} trainable parameters",
        train_ex.len(),
        lp.total_steps,
        lp.opt.num_params()
    ));
    if let Some(ckpt) = &resume {
        lp.resume(ckpt)?;
    }

    // 3. the loop: the step's loss is the mean over all its label tokens
    let dropout = !args.disable_dropout;
    let mut eval = None;
    while !lp.done() {
        lp.stop_if_requested(&model, stop)?;
        let vars: Vec<_> = lp.opt.vars().into_iter().cloned().collect();
        let var_refs: Vec<_> = vars.iter().collect();
        let mut grads = Grads::new(vars.len());
        // The label tokens of the whole step, every rank's: each rank's summed loss over
        // them adds up to the step's mean.
        let plan = lp.next_step();
        let step_tokens: usize = plan
            .iter()
            .flat_map(|m| &m.global)
            .map(|&i| train_ex[i].labels.iter().skip(1).filter(|&&l| l == 1).count())
            .sum();
        let (mut nll, mut correct, mut samples) = (0.0, 0usize, 0usize);
        for (pass, m) in plan.iter().enumerate().filter(|(_, m)| !m.mine().is_empty()) {
            let batch: Vec<&Example> = m.mine().iter().map(|&i| &train_ex[i]).collect();
            let mut keys = lp.dropout_keys(pass as u64, m.mine_ids());
            let mut fwd = if dropout {
                Fwd::train(&mut keys)
            } else {
                Fwd::eval_grad()
            };
            let out = batch_nll(&model, &batch, &mut fwd)?;
            grads.add(&var_refs, &(&out.nll_sum / step_tokens.max(1) as f64)?.backward()?)?;
            nll += out.nll_sum.to_scalar::<f32>()? as f64;
            correct += out.correct;
            samples += batch.len();
        }
        let mut sums = [nll, correct as f64];
        crate::dist::world().all_reduce_f64(&mut sums, crate::dist::ReduceOp::Sum)?;
        let (nll, correct) = (sums[0], sums[1]);
        let n = step_tokens.max(1) as f64;
        let metrics = BTreeMap::from([
            ("loss".to_string(), nll / n),
            ("mean_token_accuracy".to_string(), correct / n),
            ("num_tokens".to_string(), step_tokens as f64),
        ]);
        let report = lp.apply(grads, &metrics, samples)?;
        // 4. evaluation
        if report.evaluate {
            if let Some(ex) = &eval_ex {
                let m = evaluate(&model, ex, args.per_device_eval_batch_size)?;
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
    Ok(SftOutcome { model, final_dir, eval })
}
