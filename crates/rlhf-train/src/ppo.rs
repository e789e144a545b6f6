//! PPO for RLHF exactly as TRL 0.11's `PPOTrainer` (Ziegler et al. 2019; Stiennon et al.
//! 2020): `generate` → score → `step(queries, responses, scores)` → `log_stats`.
//!
//! `step` runs the stages in order: 1. score scaling, 2. batched no-grad forward of the
//! policy and the reference (log-probs, values, response masks), 3. KL-penalised rewards,
//! 4. GAE, 5. PPO epochs over shuffled minibatches (clipped policy and value losses, Adam),
//! 6. statistics under TRL's names and the KL-controller update. The math lives in
//! `rlhf_ops::ppo`; this file orders it.
//!
//! With several ranks ([`crate::dist`]) each rank passes its own `batch_size` rollouts (TRL's
//! per-device meaning); `step` gathers them into the global batch (rank order), so score
//! scaling, KL rewards, GAE, whitening, the statistics and the KL controller see all of it, as
//! one process with the whole batch would (TRL whitens per process: a deliberate deviation,
//! `docs/scaling.md`). The no-grad forward passes and the PPO minibatches are split across
//! ranks (see [`crate::ppo_dist`]).

use std::collections::BTreeMap;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use rlhf_models::{Fwd, GenerationConfig, Model};
use rlhf_ops::dropout::DropoutKeys;
use rlhf_ops::ppo::{
    compute_advantages, compute_rewards, lm_head_logprobs_and_entropy, log_softmax, logprobs_and_entropy, ppo_loss,
    KlController, KlPenalty, PpoLossConfig, PpoLossInputs,
};
use rlhf_ops::rng::RngStream;
use rlhf_ops::sink::GradSink;
use serde::{Deserialize, Serialize};

use crate::collate::{pad, PadSide};
use crate::error::{Result, TrainError};
use crate::optim::{AdamConfig, AdamW, Grads};
use crate::ppo_config::{PpoConfig, RunningMoments};
use crate::trainer::permutation;

mod stats;

pub use stats::{log_stats, Stats};
use stats::{mean_std, step_stats};

/// State that a checkpoint must restore besides weights and optimizer moments.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct PpoState {
    /// `step()` calls done.
    pub current_step: u64,
    /// The KL coefficient.
    pub kl_coef: f64,
    /// Score-scaling moments.
    pub running: RunningMoments,
    /// Minibatch shuffling stream (seed, counter).
    pub shuffle: (u64, u64),
    /// Seed of the dropout streams, and a second word that is always 0 (masks are keyed by
    /// step and row, not drawn from a running stream; the pair keeps earlier checkpoints
    /// loadable).
    pub dropout: (u64, u64),
}

/// Rollout tensors of a batch, right-padded to the longest query + response.
struct Rollout {
    ids: Tensor,
    mask: Tensor,
    /// `(B, T-1)`: 1 on response tokens (position `t` predicts token `t + 1`).
    masks: Tensor,
}

/// TRL 0.11's `PPOTrainer` over a policy with a value head and a frozen reference.
pub struct PpoTrainer {
    /// Settings.
    pub config: PpoConfig,
    /// The policy (with `value_head`); its trainable weights are optimised.
    pub model: Model,
    /// The frozen reference (`None`: the policy with adapters disabled).
    pub ref_model: Option<Model>,
    /// The KL controller.
    pub kl_ctl: KlController,
    /// Score-scaling statistics.
    pub running: RunningMoments,
    /// `step()` calls done.
    pub current_step: u64,
    opt: AdamW,
    shuffle: RngStream,
    dropout_seed: u64,
}

impl PpoTrainer {
    /// A trainer as `PPOTrainer(config, model, ref_model, tokenizer)`: the policy gets a
    /// value head if it has none (returned as `true` so the caller can log it, as TRL warns),
    /// and the optimizer is Adam over its trainable weights (TRL's default).
    pub fn new(config: PpoConfig, mut model: Model, ref_model: Option<Model>) -> Result<(Self, bool)> {
        config.validate()?;
        if ref_model.is_none() && model.lora.is_none() {
            return Err(TrainError::Config(
                "no reference model: pass a frozen copy of the policy as ref_model, or give the policy LoRA \
                 adapters (use_peft) so that the reference is the policy with adapters disabled"
                    .into(),
            ));
        }
        let fresh_head = model.ensure_value_head(config.seed)?;
        if let Some(v) = &mut model.value_head {
            v.weight.make_trainable()?;
            v.bias.make_trainable()?;
        }
        let params = crate::trainer::trainable_params(&model);
        if params.is_empty() {
            return Err(TrainError::Config("the policy has no trainable parameters".into()));
        }
        crate::dist::world().broadcast_vars(&params.iter().map(|(_, v)| v).collect::<Vec<_>>())?;
        let kl_ctl = if config.adap_kl_ctrl {
            KlController::adaptive(config.init_kl_coef, config.target, config.horizon)
        } else {
            KlController::fixed(config.init_kl_coef)
        };
        let opt = AdamW::new(params, AdamConfig::default());
        let shuffle = RngStream::new(config.seed);
        let dropout_seed = config.seed.wrapping_add(1);
        let t = Self {
            config,
            model,
            ref_model,
            kl_ctl,
            running: RunningMoments::default(),
            current_step: 0,
            opt,
            shuffle,
            dropout_seed,
        };
        Ok((t, fresh_head))
    }

    /// Number of optimised scalars.
    pub fn num_trainable(&self) -> usize {
        self.opt.num_params()
    }

    /// TRL's `generate(queries, return_prompt=False, length_sampler, batch_size)`: batched
    /// sampling in chunks of `batch_size` (left padding inside the batch), each response cut
    /// after its first EOS (kept). With a length sampler `(min, max)`, each chunk draws its
    /// `max_new_tokens` uniformly from `min..max` (max exclusive, as `LengthSampler`).
    pub fn generate(
        &self,
        queries: &[Vec<u32>],
        gen: &GenerationConfig,
        length_sampler: Option<(usize, usize)>,
        batch_size: usize,
        rng: &mut RngStream,
    ) -> Result<Vec<Vec<u32>>> {
        let mut out = Vec::with_capacity(queries.len());
        for chunk in queries.chunks(batch_size.max(1)) {
            let mut cfg = gen.clone();
            if let Some((lo, hi)) = length_sampler {
                cfg.max_new_tokens = lo + rng.below(hi.saturating_sub(lo).max(1));
            }
            let g = self.model.generate(chunk, &cfg, rng)?;
            for mut r in g.response_ids {
                crate::collate::cut_after_eos(&mut r, &gen.eos_token_id);
                out.push(r);
            }
        }
        Ok(out)
    }

    /// Responses of `queries`, row `i` sampled from `streams[i]` (batched, each prompt
    /// prefilled once), each cut after its first EOS: what a row samples does not depend on
    /// the rows beside it, so a batch split over ranks samples what one process would.
    pub fn generate_rows(
        &self,
        queries: &[Vec<u32>],
        gen: &GenerationConfig,
        streams: &mut [RngStream],
    ) -> Result<Vec<Vec<u32>>> {
        if queries.is_empty() {
            return Ok(Vec::new());
        }
        let g = self.model.generate_groups(queries, 1, gen, streams)?;
        Ok(g.response_ids
            .into_iter()
            .map(|mut r| {
                crate::collate::cut_after_eos(&mut r, &gen.eos_token_id);
                r
            })
            .collect())
    }

    /// One PPO optimisation step on a batch of `batch_size` (query, response, score); with
    /// several ranks, this rank's part of the global batch (module docs).
    pub fn step(&mut self, queries: &[Vec<u32>], responses: &[Vec<u32>], scores: &[f32]) -> Result<Stats> {
        let t_total = Instant::now();
        check_batch(queries, responses, scores, self.config.batch_size)?;
        let device = self.model.device().clone();
        let dist = crate::dist::world();
        let global = crate::ppo_dist::gather_batch(queries, responses, scores)?;
        let (queries, responses, scores) = match &global {
            Some((q, r, s)) => (q.as_slice(), r.as_slice(), s.as_slice()),
            None => (queries, responses, scores),
        };
        let bs = queries.len();

        // 1. score scaling and clipping
        let mut scores: Vec<f32> = scores.to_vec();
        if self.config.use_score_scaling {
            self.running.update(&scores);
            let factor = (self.running.std + f32::EPSILON as f64) as f32;
            let mean = self.running.mean as f32;
            let norm = self.config.use_score_norm;
            scores
                .iter_mut()
                .for_each(|s| *s = if norm { (*s - mean) / factor } else { *s / factor });
        }
        if let Some(c) = self.config.score_clip {
            scores.iter_mut().for_each(|s| *s = s.clamp(-c as f32, c as f32));
        }
        let scores_t = Tensor::from_vec(scores.clone(), bs, &device)?;

        // 2. batched forward passes (no grad, eval mode) of policy and reference
        let t = Instant::now();
        let roll = self.rollout(queries, responses, &device)?;
        let kind = KlPenalty::from_trl_name(&self.config.kl_penalty).unwrap_or_default();
        let full = kind == KlPenalty::Full;
        let (logprobs, values, pol_full) = self.forward_no_grad(&self.model, &roll, true, full, true)?;
        // The reference: a separate frozen model, or the policy with its adapters disabled.
        let (ref_logprobs, _, ref_full) = match &self.ref_model {
            Some(reference) => self.forward_no_grad(reference, &roll, false, full, true)?,
            None => self.forward_no_grad(&self.model, &roll, false, full, false)?,
        };
        let values = values.ok_or_else(|| TrainError::Config("internal: the policy forward gave no values".into()))?;
        let time_forward = t.elapsed().as_secs_f64();

        // 3. KL-penalised rewards (the score lands on the last response token)
        let t = Instant::now();
        let kl_coef = self.kl_ctl.value();
        let (kl_lp, kl_ref) = match (pol_full, ref_full) {
            (Some(p), Some(r)) => (p, r),
            _ => (logprobs.clone(), ref_logprobs.clone()),
        };
        let rw = compute_rewards(&scores_t, &kl_lp, &kl_ref, &roll.masks, kl_coef, kind)?;
        let time_rewards = t.elapsed().as_secs_f64();

        // 4. advantages (GAE, whitened) and returns
        let t = Instant::now();
        let c = &self.config;
        let adv = compute_advantages(&values, &rw.rewards, &roll.masks, c.gamma, c.lam, c.whiten_rewards)?;
        let time_adv = t.elapsed().as_secs_f64();

        // 5. PPO epochs over shuffled minibatches
        let t = Instant::now();
        let mut mb_stats: Vec<rlhf_ops::ppo::PpoStats> = Vec::new();
        let loss_cfg = PpoLossConfig {
            cliprange: c.cliprange,
            cliprange_value: c.cliprange_value,
            vf_coef: c.vf_coef,
            ratio_threshold: c.ratio_threshold,
        };
        let (mbs, ga, epochs) = (c.mini_batch_size, c.gradient_accumulation_steps, c.ppo_epochs);
        let (early_stopping, target_kl, max_norm, lr) = (
            c.early_stopping,
            c.target_kl,
            c.max_grad_norm.unwrap_or(0.0),
            c.learning_rate,
        );
        let vars: Vec<_> = self.opt.vars().into_iter().cloned().collect();
        let var_refs: Vec<_> = vars.iter().collect();
        let sizes: Vec<usize> = vars.iter().map(|v| v.elem_count()).collect();
        // Global minibatch statistics (equal to each minibatch's own on one process).
        let mut mb_scalars: Vec<[(&'static str, f64); 15]> = Vec::new();
        let (ranks, mbs_global) = (dist.size(), mbs * dist.size());
        let row_tokens: Vec<f32> = roll.masks.sum(1)?.to_vec1()?;
        // Minibatch passes of this step, counted alike on every rank: with the step and the
        // row, they key each response's dropout masks.
        let mut pass = 0u64;
        for _ in 0..epochs {
            let perm = permutation(bs, self.shuffle.next_u64());
            for backward in perm.chunks(mbs_global * ga) {
                let mut grads = Grads::new(vars.len());
                for mb_global in backward.chunks(mbs_global) {
                    // This rank's part of the minibatch; its loss is weighted by its share of
                    // the minibatch's response tokens, so the sum over ranks is the mean.
                    let mb = &mb_global[crate::dist::split(mb_global.len(), dist.rank(), ranks)];
                    pass += 1;
                    let count = |rows: &[usize]| rows.iter().map(|&i| row_tokens[i] as f64).sum::<f64>();
                    let (global_tokens, my_tokens) = (count(mb_global), count(mb));
                    if mb.is_empty() {
                        mb_scalars.push(crate::ppo_dist::reduce_minibatch(None, 0.0, c.ratio_threshold)?);
                        continue;
                    }
                    let idx = Tensor::from_vec(mb.iter().map(|&i| i as u32).collect::<Vec<_>>(), mb.len(), &device)?;
                    let sel = |x: &Tensor| x.index_select(&idx, 0);
                    let (ids, mask) = (sel(&roll.ids)?, sel(&roll.mask)?);
                    let key = RngStream::keyed(&[self.dropout_seed, self.current_step, pass]).seed;
                    let mut keys = DropoutKeys::new(key, mb.iter().map(|&i| i as u64).collect());
                    let sink = GradSink::new();
                    let mut fwd = Fwd::train(&mut keys).with_sink(&sink);
                    let hidden = self.model.forward(&ids, &mask, &mut fwd)?;
                    let tt = hidden.dim(1)?;
                    let vhead = self
                        .model
                        .value_head
                        .as_ref()
                        .ok_or_else(|| TrainError::Config("policy lost its value head".into()))?;
                    let vpreds = vhead.forward(&hidden, &mut fwd)?.narrow(1, 0, tt - 1)?;
                    let (old_lp, m) = (sel(&logprobs)?, sel(&roll.masks)?);
                    let (new_lp, entropy) = response_logprobs(&self.model, &hidden, &ids, &m, &old_lp, &sink)?;
                    let (old_v, a, r) = (sel(&adv.values)?, sel(&adv.advantages)?, sel(&adv.returns)?);
                    let inputs = PpoLossInputs {
                        old_logprobs: &old_lp,
                        values: &old_v,
                        entropy: &entropy,
                        vpreds: &vpreds,
                        logprobs: &new_lp,
                        mask: &m,
                        advantages: &a,
                        returns: &r,
                    };
                    // Across ranks the ratio threshold applies to the whole minibatch's mean
                    // ratio, which `reduce_minibatch` decides.
                    let local_cfg = PpoLossConfig {
                        ratio_threshold: if ranks > 1 { f64::INFINITY } else { c.ratio_threshold },
                        ..loss_cfg
                    };
                    let mut out = ppo_loss(&inputs, &local_cfg)?;
                    let share = global_tokens / my_tokens;
                    let scalars =
                        crate::ppo_dist::reduce_minibatch(Some((&mut out, &m)), my_tokens, c.ratio_threshold)?;
                    if !crate::ppo_dist::stat(&scalars, "loss/total").is_finite() {
                        return Err(TrainError::Diverged(format!(
                            "PPO step {}: non-finite loss; hint: lower the learning rate or check the reward scale",
                            self.current_step + 1
                        )));
                    }
                    let loss = ((out.pg_loss + out.vf_loss)? / (ga as f64 * share))?;
                    grads.add(&var_refs, &loss.backward()?)?;
                    grads.add_sink(&var_refs, sink.take())?;
                    mb_stats.push(out.stats);
                    mb_scalars.push(scalars);
                }
                dist.all_reduce_grads(&mut grads, &sizes)?;
                grads.clip(max_norm);
                self.opt.step(&grads, lr)?;
            }
            if early_stopping
                && mb_scalars
                    .last()
                    .is_some_and(|s| crate::ppo_dist::stat(s, "policy/policykl") > 1.5 * target_kl)
            {
                break;
            }
        }
        let time_opt = t.elapsed().as_secs_f64();

        // 6. statistics (TRL's `record_step_stats`) and the KL controller update
        let t = Instant::now();
        let mut stats = step_stats(
            &logprobs,
            &ref_logprobs,
            &roll.masks,
            &rw.non_score_rewards,
            &scores,
            kl_coef,
        )?;
        stats
            .tensors
            .insert("objective/logprobs".into(), logprobs.flatten_all()?.to_vec1()?);
        stats
            .tensors
            .insert("objective/ref_logprobs".into(), ref_logprobs.flatten_all()?.to_vec1()?);
        let lens = |v: &[Vec<u32>]| v.iter().map(|x| x.len() as f32).collect::<Vec<f32>>();
        for (name, l) in [("queries", lens(queries)), ("responses", lens(responses))] {
            let (m, s) = mean_std(&l);
            stats.scalars.insert(format!("tokens/{name}_len_mean"), m);
            stats.scalars.insert(format!("tokens/{name}_len_std"), s);
            stats.tensors.insert(format!("tokens/{name}_dist"), l);
        }
        let n = mb_scalars.len().max(1) as f64;
        for s in &mb_scalars {
            for &(k, v) in s {
                *stats.scalars.entry(format!("ppo/{k}")).or_default() += v / n;
            }
        }
        let cat = |f: fn(&rlhf_ops::ppo::PpoStats) -> &Tensor| -> Result<Vec<f32>> {
            let mut v = Vec::new();
            for s in &mb_stats {
                v.extend(f(s).flatten_all()?.to_vec1::<f32>()?);
            }
            Ok(v)
        };
        stats
            .tensors
            .insert("ppo/policy/advantages".into(), cat(|s| &s.policy_advantages)?);
        stats
            .tensors
            .insert("ppo/policy/ratio".into(), cat(|s| &s.policy_ratio)?);
        let err = stats.scalars.get("ppo/val/error").copied().unwrap_or(0.0);
        let rvar = stats.scalars.get("ppo/returns/var").copied().unwrap_or(1.0);
        stats.scalars.insert("ppo/val/var_explained".into(), 1.0 - err / rvar);
        stats.scalars.insert("ppo/learning_rate".into(), lr);
        let mean_kl = stats.scalars["objective/kl"];
        if mean_kl < -1.0 {
            tracing::warn!("KL divergence is starting to become negative: {mean_kl:.2} - this might be a precursor for failed training");
        }
        self.kl_ctl.update(mean_kl, bs);
        self.current_step += 1;
        let time_stats = t.elapsed().as_secs_f64();
        for (k, v) in [
            ("forward_pass", time_forward),
            ("compute_rewards", time_rewards),
            ("compute_advantages", time_adv),
            ("optimize_step", time_opt),
            ("calc_stats", time_stats),
            ("total", t_total.elapsed().as_secs_f64()),
        ] {
            stats.scalars.insert(format!("time/ppo/{k}"), v);
        }
        Ok(stats)
    }

    /// Pads query + response rows (right padding) and marks the response positions.
    fn rollout(&self, queries: &[Vec<u32>], responses: &[Vec<u32>], device: &Device) -> Result<Rollout> {
        let seqs: Vec<Vec<u32>> = queries
            .iter()
            .zip(responses)
            .map(|(q, r)| [q.as_slice(), r.as_slice()].concat())
            .collect();
        let pad_id = self.model.pad_token_id().unwrap_or(0);
        let (ids, mask) = pad(&seqs, pad_id, PadSide::Right, device)?;
        let t = ids.dim(1)?;
        let mut masks = vec![0f32; queries.len() * (t - 1)];
        for (b, (q, r)) in queries.iter().zip(responses).enumerate() {
            let start = q.len() - 1;
            for k in start..(start + r.len()).min(t - 1) {
                masks[b * (t - 1) + k] = 1.0;
            }
        }
        let masks = Tensor::from_vec(masks, (queries.len(), t - 1), device)?;
        Ok(Rollout { ids, mask, masks })
    }

    /// TRL's `batched_forward_pass`: log-probs of the next tokens `(B, T-1)`, values
    /// `(B, T-1)` (policy only) and, for `kl_penalty = "full"`, full log-softmax, in chunks
    /// of `mini_batch_size`, eval mode, no gradients.
    /// With several ranks each computes its own rows and the results are gathered.
    fn forward_no_grad(
        &self,
        model: &Model,
        roll: &Rollout,
        with_values: bool,
        full: bool,
        adapters: bool,
    ) -> Result<(Tensor, Option<Tensor>, Option<Tensor>)> {
        let (b, t) = roll.ids.dims2()?;
        let dist = crate::dist::world();
        let rows = crate::dist::split(b, dist.rank(), dist.size());
        let (mut lps, mut vals, mut fulls) = (Vec::new(), Vec::new(), Vec::new());
        let (mut start, b) = (rows.start, rows.end);
        while start < b {
            let n = self.config.mini_batch_size.min(b - start);
            let (ids, mask) = (roll.ids.narrow(0, start, n)?, roll.mask.narrow(0, start, n)?);
            let mut fwd = if adapters {
                Fwd::eval()
            } else {
                Fwd::eval().without_adapters()
            };
            let hidden = model.forward(&ids, &mask, &mut fwd)?;
            let h = hidden.narrow(1, 0, t - 1)?;
            if full {
                let logits = model.lm_logits(&h, false)?;
                lps.push(logprobs_and_entropy(&logits, &ids.narrow(1, 1, t - 1)?)?.0);
                fulls.push(log_softmax(&logits)?);
            } else {
                lps.push(head_logprobs(model, &h, &ids.narrow(1, 1, t - 1)?, false, None)?.0);
            }
            if with_values {
                if let Some(v) = &model.value_head {
                    vals.push(v.forward(&hidden, &mut fwd)?.narrow(1, 0, t - 1)?);
                }
            }
            start += n;
        }
        let cat = |v: Vec<Tensor>| -> Result<Option<Tensor>> {
            if v.is_empty() {
                Ok(None)
            } else {
                Ok(Some(crate::ppo_dist::gather_rows(&Tensor::cat(&v, 0)?)?))
            }
        };
        let lp = cat(lps)?.ok_or_else(|| TrainError::Config("empty batch".into()))?;
        Ok((lp, cat(vals)?, cat(fulls)?))
    }

    /// The trainer's state for a checkpoint.
    pub fn state(&self) -> PpoState {
        PpoState {
            current_step: self.current_step,
            kl_coef: self.kl_ctl.value(),
            running: self.running.clone(),
            shuffle: (self.shuffle.seed, self.shuffle.counter),
            dropout: (self.dropout_seed, 0),
        }
    }

    /// Restores [`PpoTrainer::state`] and the optimizer moments.
    pub fn restore(&mut self, state: &PpoState, optimizer: &BTreeMap<String, Tensor>) -> Result<()> {
        self.current_step = state.current_step;
        self.kl_ctl = match self.kl_ctl {
            KlController::Fixed { .. } => KlController::fixed(state.kl_coef),
            KlController::Adaptive { target, horizon, .. } => KlController::adaptive(state.kl_coef, target, horizon),
        };
        self.running = state.running.clone();
        self.shuffle = RngStream {
            seed: state.shuffle.0,
            counter: state.shuffle.1,
        };
        self.dropout_seed = state.dropout.0;
        self.opt.load_state(optimizer)
    }

    /// The optimizer moments for a checkpoint.
    pub fn optimizer_state(&self) -> Result<BTreeMap<String, Tensor>> {
        self.opt.state()
    }
}

/// Log-probs and entropies of `labels` at hidden states `(.., H)`: the fused LM-head kernel
/// for f32/f64 models (no `(.., V)` tensor kept), otherwise logits and the fused softmax.
fn head_logprobs(
    model: &Model,
    h: &Tensor,
    labels: &Tensor,
    grad: bool,
    sink: Option<&GradSink>,
) -> Result<(Tensor, Tensor)> {
    let w = model.lm_head_weight(grad)?;
    if rlhf_ops::kernels::applies_f32_f64(&[h, w]) && w.dtype() == h.dtype() {
        Ok(lm_head_logprobs_and_entropy(h, w, labels, sink)?)
    } else {
        let logits = model.lm_logits(h, grad)?;
        Ok(logprobs_and_entropy(&logits, labels)?)
    }
}

/// The minibatch's differentiable log-probs and entropies `(B, T-1)`, computed through the
/// LM head only at response positions (`mask` 1), where the loss reads them. Elsewhere the
/// log-prob is `old_lp`'s (ratio exactly 1) and the entropy 0: no loss term sees those
/// positions, only the `ppo/policy/ratio` histogram does (TRL computes the query and
/// padding tokens' log-probs there too).
fn response_logprobs(
    model: &Model,
    hidden: &Tensor,
    ids: &Tensor,
    mask: &Tensor,
    old_lp: &Tensor,
    sink: &GradSink,
) -> Result<(Tensor, Tensor)> {
    let (b, t, h) = hidden.dims3()?;
    let m: Vec<f32> = mask.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    let ids_host: Vec<u32> = ids.flatten_all()?.to_vec1()?;
    let (mut rows, mut labels, mut slots) = (Vec::new(), Vec::new(), Vec::new());
    for bi in 0..b {
        for p in 0..t - 1 {
            if m[bi * (t - 1) + p] != 0.0 {
                rows.push((bi * t + p) as u32);
                labels.push(ids_host[bi * t + p + 1]);
                slots.push((bi * (t - 1) + p) as u32);
            }
        }
    }
    let dev = hidden.device();
    let n = rows.len();
    let rows = Tensor::from_vec(rows, n, dev)?;
    let labels = Tensor::from_vec(labels, n, dev)?;
    let slots = Tensor::from_vec(slots, n, dev)?;
    let hs = hidden.reshape((b * t, h))?.index_select(&rows, 0)?;
    let (lp, ent) = head_logprobs(model, &hs, &labels, true, Some(sink))?;
    let keep = (1.0 - mask.to_dtype(old_lp.dtype())?)?;
    let base = (old_lp.detach() * keep)?.flatten_all()?;
    let lp = base.index_add(&slots, &lp, 0)?.reshape((b, t - 1))?;
    let ent = base
        .zeros_like()?
        .index_add(&slots, &ent.detach(), 0)?
        .reshape((b, t - 1))?;
    Ok((lp, ent))
}

fn check_batch(queries: &[Vec<u32>], responses: &[Vec<u32>], scores: &[f32], bs: usize) -> Result<()> {
    for (what, n) in [
        ("queries", queries.len()),
        ("responses", responses.len()),
        ("scores", scores.len()),
    ] {
        if n != bs {
            return Err(TrainError::Config(format!(
                "step(): got {n} {what}, expected batch_size = {bs}; pass exactly batch_size samples or change batch_size"
            )));
        }
    }
    if let Some(i) = queries.iter().position(Vec::is_empty) {
        return Err(TrainError::Config(format!("step(): query {i} is empty")));
    }
    if let Some(i) = responses.iter().position(Vec::is_empty) {
        return Err(TrainError::Config(format!(
            "step(): response {i} is empty (a response needs at least one token, e.g. EOS)"
        )));
    }
    if let Some(i) = scores.iter().position(|s| !s.is_finite()) {
        return Err(TrainError::Diverged(format!(
            "step(): score {i} is {}; nothing was updated\nhint: check the reward model and the reward scale",
            scores[i]
        )));
    }
    Ok(())
}
