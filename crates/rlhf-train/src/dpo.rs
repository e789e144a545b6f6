//! Direct preference optimisation: TRL 1.16's `DPOTrainer` (Rafailov et al. 2023, arXiv
//! 2305.18290) with the settings of [`DpoConfig`].
//!
//! Stages: 1. config, run directory, policy and reference (a separate checkpoint
//! `ref_model_name_or_path`; else the policy with adapters disabled under `use_peft`; else a
//! frozen copy of the starting policy), 2. data ([`data`]: EOS appended to text
//! completions, prompt/completion split, rows whose prompt fills `max_length` dropped) and,
//! with `precompute_ref_log_probs`, the reference's summed log-probs computed once,
//! 3. the loop ([`batch`]: one packed forward over `[chosen; rejected]`, the reference's
//! summed log-probs, [`rlhf_ops::rl::dpo::dpo_loss`] with the plan's weighted losses,
//! AdamW), 4. evaluation (`eval_` metrics), 5. checkpoints and the final causal-LM directory
//! (or PEFT adapter).
//!
//! Metrics carry TRL 1.16's names (`loss`, `rewards/{chosen,rejected,accuracies,margins}`,
//! `logps/*`, `logits/*`, `entropy`, `mean_token_accuracy`, `num_tokens`, `grad_norm`,
//! `learning_rate`). As TRL, `num_tokens` is the running total of real tokens trained on
//! over all processes, and a logged value is the mean over the steps since the last log.
//!
//! Deviations from TRL 1.16 (besides [`crate::dpo_config`]'s): with several processes each
//! computes the precomputed reference log-probs of every row (TRL splits them); the token
//! metrics (`entropy`, `logits/*`, `mean_token_accuracy`) are averaged over processes
//! weighted by pairs (TRL: by tokens). With `precompute_ref_log_probs` and the default
//! reference, a resumed run computes them with a fresh copy of the starting policy (TRL
//! computes them again with the resumed policy).

pub mod batch;
pub mod data;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use rlhf_models::{Fwd, LoadOptions, Model};
use rlhf_ops::sink::GradSink;

pub use batch::{batch_loss, reference_logps, DpoBatchOutput, PackedBatch, RefSource};
pub use data::{chat_template_for, prepare_examples, DpoExample};

use crate::data::read_data;
pub use crate::dpo_config::{DpoConfig, DpoPlan};
use crate::error::{Result, TrainError};
use crate::online_config::ReferenceModel;
use crate::optim::Grads;
use crate::stop::StopSignal;
use crate::trainer::{open_run, trainable_params, DataPaths, TrainLoop};

/// What a training run produced.
pub struct DpoOutcome {
    /// The trained policy.
    pub model: Model,
    /// `output_dir/final`.
    pub final_dir: PathBuf,
    /// The last evaluation metrics (without the `eval_` prefix), if evaluation ran.
    pub eval: Option<BTreeMap<String, f64>>,
}

/// Trains a policy as `DPOTrainer.train()` does.
pub fn train(cfg: &DpoConfig) -> Result<DpoOutcome> {
    train_until(cfg, &StopSignal::new())
}

/// Loads a frozen reference model (eval mode, no trainable weights).
fn load_reference(path: &str, policy: &Model) -> Result<Model> {
    let mut m = Model::load(Path::new(path), &LoadOptions::default())?;
    m.disable_dropout();
    if m.cfg().vocab_size != policy.cfg().vocab_size {
        return Err(TrainError::setting(
            "ref_model_name_or_path",
            format!(
                "`{path}` has a vocabulary of {} tokens, the policy {}\n\
                 hint: the reference must share the policy's tokenizer (usually the SFT model the policy starts from)",
                m.cfg().vocab_size,
                policy.cfg().vocab_size
            ),
        ));
    }
    Ok(m)
}

/// [`train`], stopping between optimizer steps once `stop` is requested: the last completed
/// step is saved as a checkpoint and the error is [`TrainError::Interrupted`].
pub fn train_until(cfg: &DpoConfig, stop: &StopSignal) -> Result<DpoOutcome> {
    let _precision = rlhf_ops::precision::PrecisionGuard::for_run(cfg.args.bf16);
    // 1. config, run directory, policy (from the checkpoint when resuming) and reference
    let args = &cfg.args;
    let plan = cfg.plan(crate::dist::world().size())?;
    let (run, resume, model) = open_run(cfg, args, &cfg.model_name_or_path, &cfg.peft, "CAUSAL_LM", |m| {
        if args.disable_dropout {
            m.disable_dropout();
        }
        Ok(())
    })?;
    // The frozen reference, if it is a model of its own. With precomputed log-probs and the
    // default reference, a fresh run uses the policy itself before its first step (as TRL).
    let mut reference = match &plan.reference {
        ReferenceModel::Model(p) => Some(load_reference(p, &model)?),
        ReferenceModel::InitialPolicy if plan.precompute_ref_log_probs && resume.is_none() => None,
        ReferenceModel::InitialPolicy => Some(load_reference(&cfg.model_name_or_path, &model)?),
        ReferenceModel::AdaptersDisabled | ReferenceModel::None => None,
    };
    // Without a model of its own the reference is the policy, with adapters disabled under PEFT.
    let policy_adapters = plan.reference != ReferenceModel::AdaptersDisabled;

    // 2. data (and the reference log-probs, once, when precomputed)
    let files = DataPaths::resolve(
        cfg.train_file.as_deref(),
        cfg.eval_file.as_deref(),
        cfg.dataset_name.as_deref(),
    )?;
    let train_rows = read_data(&files.train)?;
    let eval_rows = files.validation.as_deref().map(read_data).transpose()?;
    let all_rows: Vec<_> = std::iter::once(&train_rows).chain(eval_rows.as_ref()).collect();
    let template = chat_template_for(&model, Path::new(&cfg.model_name_or_path), &all_rows)?;
    let (mut train_ex, dropped) = prepare_examples(&model, template.as_ref(), &train_rows, &plan)?;
    let mut eval_ex = match &eval_rows {
        Some(rows) => Some(prepare_examples(&model, template.as_ref(), rows, &plan)?.0),
        None => None,
    };
    if plan.precompute_ref_log_probs {
        let (m, adapters) = match &reference {
            Some(r) => (r, true),
            None => (&model, policy_adapters),
        };
        for set in std::iter::once(&mut train_ex).chain(eval_ex.as_mut()) {
            let ids: Vec<_> = set.iter().map(|e| &e.ids).collect();
            let sums = reference_logps(m, adapters, &ids, &plan, plan.precompute_ref_batch_size)?;
            set.iter_mut().zip(sums).for_each(|(e, s)| e.ref_logps = Some(s));
        }
        // The reference model is not needed any more.
        reference = None;
    }
    let ref_source = match (&reference, plan.precompute_ref_log_probs) {
        (_, true) => RefSource::Precomputed,
        (Some(r), false) => RefSource::Forward {
            model: r,
            adapters: true,
        },
        (None, false) => RefSource::Forward {
            model: &model,
            adapters: policy_adapters,
        },
    };

    let params = trainable_params(&model);
    let mut lp = TrainLoop::new(args.clone(), run, params, train_ex.len())?;
    for w in &plan.warnings {
        lp.println(format!("warning: {w}"));
    }
    if dropped > 0 {
        lp.println(format!(
            "dropped {dropped} training rows whose prompt alone has max_length ({:?}) tokens or more",
            plan.max_length
        ));
    }
    lp.println(format!(
        "dpo: {} pairs, {} steps, {} trainable parameters, reference: {}",
        train_ex.len(),
        lp.total_steps,
        lp.opt.num_params(),
        describe(&plan)
    ));
    if let Some(ckpt) = &resume {
        lp.resume(ckpt)?;
    }
    let mut num_tokens = tokens_before(&mut lp, &train_ex, &plan);

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
        // With several ranks each takes its part of every micro-batch; its mean loss is
        // weighted by that part's share, so the sum over ranks is the micro-batch's mean.
        let step = lp.next_step();
        let mut samples = 0;
        for (pass, m) in step.iter().enumerate() {
            let mine: Vec<&DpoExample> = m.mine().iter().map(|&i| &train_ex[i]).collect();
            num_tokens += m
                .global
                .iter()
                .map(|&i| train_ex[i].tokens(plan.max_length))
                .sum::<usize>();
            let mut mb_metrics = BTreeMap::new();
            if !mine.is_empty() {
                let share = m.global.len() as f64 / mine.len() as f64;
                let mut keys = lp.dropout_keys(pass as u64, m.mine_pair_ids());
                let sink = GradSink::new();
                let fwd = if dropout {
                    Fwd::train(&mut keys)
                } else {
                    Fwd::eval_grad()
                };
                let out = batch_loss(&model, ref_source, &mine, &plan, &mut fwd.with_sink(&sink))?;
                grads.add(&var_refs, &(&out.loss / (ga * share))?.backward()?)?;
                grads.add_sink(&var_refs, sink.take())?;
                mb_metrics = out.metrics;
            }
            // The whole micro-batch's metrics, as one process computes them.
            crate::dist::world().reduce_metrics(&mut mb_metrics, mine.len() as f64)?;
            for (k, v) in mb_metrics {
                *metrics.entry(k).or_default() += v / step.len() as f64;
            }
            samples += mine.len();
        }
        // TRL logs the running total; the loop logs means over the steps since the last log,
        // so this step's entry is what makes that mean the total.
        let window = lp.state.accum_steps as f64;
        let logged_so_far = lp.state.accum.get("num_tokens").copied().unwrap_or(0.0);
        metrics.insert("num_tokens".into(), (window + 1.0) * num_tokens as f64 - logged_so_far);
        let report = lp.apply(grads, &metrics, samples)?;
        // 4. evaluation
        if report.evaluate {
            if let Some(examples) = &eval_ex {
                let mut m = evaluate(&model, ref_source, examples, &plan, args.per_device_eval_batch_size)?;
                m.insert("num_tokens".into(), num_tokens as f64);
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
    Ok(DpoOutcome { model, final_dir, eval })
}

/// The reference, in words, for the start-of-run line.
fn describe(plan: &DpoPlan) -> String {
    let source = match &plan.reference {
        ReferenceModel::Model(p) => format!("`{p}`"),
        ReferenceModel::AdaptersDisabled => "the policy with adapters disabled".into(),
        _ => "a frozen copy of the starting policy".into(),
    };
    if plan.precompute_ref_log_probs {
        format!("{source}, log-probs precomputed")
    } else {
        source
    }
}

/// Real tokens of the optimizer steps before the loop's current one, over all processes
/// (the `num_tokens` total a resumed run goes on from): whole epochs see every example once.
fn tokens_before(lp: &mut TrainLoop, examples: &[DpoExample], plan: &DpoPlan) -> usize {
    let step = lp.state.global_step;
    let per_epoch: usize = examples.iter().map(|e| e.tokens(plan.max_length)).sum();
    let epochs = step / lp.steps_per_epoch;
    let mut total = per_epoch * epochs as usize;
    for s in epochs * lp.steps_per_epoch..step {
        lp.state.global_step = s;
        total += lp
            .next_step()
            .iter()
            .flat_map(|m| m.global.iter())
            .map(|&i| examples[i].tokens(plan.max_length))
            .sum::<usize>();
    }
    lp.state.global_step = step;
    total
}

/// Mean DPO metrics over a data set without dropout or gradients, as TRL's evaluation loop:
/// `loss` is the mean over pairs, every other metric the mean over batches.
pub fn evaluate(
    model: &Model,
    reference: RefSource<'_>,
    examples: &[DpoExample],
    plan: &DpoPlan,
    batch: usize,
) -> Result<BTreeMap<String, f64>> {
    let mut sums: BTreeMap<String, f64> = BTreeMap::new();
    let (mut loss, mut batches) = (0.0, 0usize);
    for chunk in examples.chunks(batch.max(1)) {
        let refs: Vec<&DpoExample> = chunk.iter().collect();
        let out = batch_loss(model, reference, &refs, plan, &mut Fwd::eval())?;
        for (k, v) in out.metrics {
            *sums.entry(k).or_default() += v;
        }
        loss += out.loss.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()? * chunk.len() as f64;
        batches += 1;
    }
    let mut m: BTreeMap<String, f64> = sums.into_iter().map(|(k, v)| (k, v / batches.max(1) as f64)).collect();
    m.insert("loss".into(), loss / examples.len().max(1) as f64);
    Ok(m)
}
