//! Batched generation with a KV cache: greedy and sampling (temperature, top-k, top-p),
//! left-padded prompts, per-row stop at EOS. Mirrors Hugging Face `generate` as TRL's
//! `PPOTrainer.generate` calls it, returning ragged prompt and response ids.

use candle_core::{DType, Tensor};
use rlhf_ops::rng::RngStream;

use rayon::prelude::*;
use rlhf_ops::packed::PackedFormat;
use rlhf_ops::precision::MatmulPrecision;

use crate::cache::KvCache;
use crate::decode::Decoder;
use crate::error::{ModelError, Result};
use crate::transformer::{Fwd, Transformer};

/// Generation settings (Hugging Face `GenerationConfig` names).
#[derive(Clone, Debug, PartialEq)]
pub struct GenerationConfig {
    /// Tokens to generate at most per row.
    pub max_new_tokens: usize,
    /// EOS is forbidden before this many new tokens.
    pub min_new_tokens: usize,
    /// Sample (true) or take the argmax (false, greedy).
    pub do_sample: bool,
    /// Logits are divided by this before sampling.
    pub temperature: f64,
    /// Keep only the `top_k` most likely tokens (0 = off).
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches `top_p` (1.0 = off).
    pub top_p: f64,
    /// Rows stop after emitting any of these tokens (empty: never stop early; a model's
    /// `generation_config.json` may list several, as Llama 3 Instruct does).
    pub eos_token_id: Vec<u32>,
    /// Id written after a row stopped.
    pub pad_token_id: u32,
}

impl Default for GenerationConfig {
    /// TRL's canonical PPO settings: pure sampling (`top_k` 0, `top_p` 1.0), 32 new tokens.
    fn default() -> Self {
        Self {
            max_new_tokens: 32,
            min_new_tokens: 0,
            do_sample: true,
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            eos_token_id: vec![50256],
            pad_token_id: 50256,
        }
    }
}

impl GenerationConfig {
    /// Checks the settings, saying which one is wrong and why.
    pub fn validate(&self) -> Result<()> {
        if self.do_sample && !(self.temperature > 0.0 && self.temperature.is_finite()) {
            return Err(ModelError::Input(format!(
                "temperature must be > 0, got {}",
                self.temperature
            )));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(ModelError::Input(format!(
                "top_p must be in (0, 1], got {}",
                self.top_p
            )));
        }
        if self.min_new_tokens > self.max_new_tokens {
            return Err(ModelError::Input(format!(
                "min_new_tokens ({}) exceeds max_new_tokens ({})",
                self.min_new_tokens, self.max_new_tokens
            )));
        }
        Ok(())
    }
}

/// The output of [`generate`]: per row, the prompt as given and the new tokens, cut after
/// the first EOS (kept), like TRL's `generate(..., return_prompt=False)`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Generation {
    /// Prompt ids per row (unpadded).
    pub prompt_ids: Vec<Vec<u32>>,
    /// New ids per row, ending with EOS if the row stopped.
    pub response_ids: Vec<Vec<u32>>,
}

/// Generates continuations for a batch of prompts.
///
/// Prompts are left-padded into one batch; positions come from the attention mask, so each
/// row sees exactly what it would alone. A row that emits EOS is finished: it gets
/// `pad_token_id` with mask 0 afterwards. `rng` drives sampling; the same seed gives the
/// same samples.
///
/// f32 models on the CPU decode with [`Decoder`] (weights packed once for the whole
/// generation; bf16 panels when the thread's
/// [`matmul_precision`](rlhf_ops::precision::matmul_precision) is bf16), others with
/// [`generate_composed`]. Both draw the same random numbers in the same order and compute
/// the same logits up to the order of f32 sums.
pub fn generate(
    model: &Transformer,
    prompts: &[Vec<u32>],
    cfg: &GenerationConfig,
    rng: &mut RngStream,
) -> Result<Generation> {
    check(model, prompts, cfg)?;
    let format = match rlhf_ops::precision::matmul_precision() {
        MatmulPrecision::Bf16 => PackedFormat::Bf16,
        MatmulPrecision::Highest => PackedFormat::F32,
    };
    let max_len = prompts.iter().map(Vec::len).max().unwrap_or(0);
    // An empty batch has nothing to pack: the composed path returns it as it is.
    let decoder = match prompts.is_empty() {
        true => None,
        false => Decoder::new(model, prompts.len(), max_len + cfg.max_new_tokens, format)?,
    };
    let Some(mut dec) = decoder else {
        return generate_composed(model, prompts, cfg, rng);
    };
    // The loop runs on a worker of the rayon pool, so that the step's many short parallel
    // loops are forked from a worker instead of each being handed over from this thread.
    let responses = rayon::scope(|_| -> Result<_> {
        let logits = dec.prefill(prompts)?;
        decode_loop(&mut dec, logits, prompts.len(), cfg, &mut |_| rng.uniform_f64())
    })?;
    Ok(Generation {
        prompt_ids: prompts.to_vec(),
        response_ids: responses,
    })
}

/// `g` completions of every prompt, for GRPO / RLOO groups: row `i·g + j` continues prompt
/// `i` and samples from its own stream `rngs[i·g + j]`, so a completion depends only on its
/// prompt, its stream and the weights — not on the other rows of the batch (nor on `g`).
/// On the [`Decoder`] path each prompt is prefilled once and its cache copied to its group
/// ([`Decoder::prefill_groups`]); finished rows leave the step. Other models generate each
/// row through [`generate_composed`] with its stream, which draws the same numbers.
///
/// # Errors
/// As [`generate`]; [`ModelError::Input`] when `rngs` is not one stream per completion.
pub fn generate_groups(
    model: &Transformer,
    prompts: &[Vec<u32>],
    g: usize,
    cfg: &GenerationConfig,
    rngs: &mut [RngStream],
) -> Result<Generation> {
    check(model, prompts, cfg)?;
    let rows = prompts.len() * g;
    if g == 0 || rngs.len() != rows {
        return Err(ModelError::Input(format!(
            "generate_groups: {} prompts × {g} generations need {rows} random streams (one per completion), got {}",
            prompts.len(),
            rngs.len()
        )));
    }
    let repeated: Vec<Vec<u32>> = prompts.iter().flat_map(|p| std::iter::repeat_n(p.clone(), g)).collect();
    let format = match rlhf_ops::precision::matmul_precision() {
        MatmulPrecision::Bf16 => PackedFormat::Bf16,
        MatmulPrecision::Highest => PackedFormat::F32,
    };
    let max_len = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let decoder = match rows {
        0 => None,
        _ => Decoder::new(model, rows, max_len + cfg.max_new_tokens, format)?,
    };
    let response_ids = match decoder {
        Some(mut dec) => rayon::scope(|_| -> Result<_> {
            let logits = dec.prefill_groups(prompts, g)?;
            decode_loop(&mut dec, logits, rows, cfg, &mut |r| rngs[r].uniform_f64())
        })?,
        None => {
            let mut out = Vec::with_capacity(rows);
            for (p, rng) in repeated.iter().zip(rngs.iter_mut()) {
                out.extend(generate_composed(model, std::slice::from_ref(p), cfg, rng)?.response_ids);
            }
            out
        }
    };
    Ok(Generation {
        prompt_ids: repeated,
        response_ids,
    })
}

/// The sampling loop of [`generate`] on a prefilled [`Decoder`] (`logits` after each of the
/// `rows` prompts): the new tokens of every row. `draw(row)` gives the row's next uniform.
fn decode_loop(
    dec: &mut Decoder,
    mut logits: Vec<f32>,
    rows: usize,
    cfg: &GenerationConfig,
    draw: &mut dyn FnMut(usize) -> f64,
) -> Result<Vec<Vec<u32>>> {
    let v = dec.vocab_size();
    let mut active: Vec<usize> = (0..rows).collect();
    let mut responses: Vec<Vec<u32>> = vec![Vec::with_capacity(cfg.max_new_tokens); rows];
    for step in 0..cfg.max_new_tokens {
        // One uniform per row, drawn in row order as the composed path draws them; the rows
        // are then sampled in parallel.
        let draws: Vec<Option<f64>> = active.iter().map(|&r| cfg.do_sample.then(|| draw(r))).collect();
        let toks: Vec<u32> = logits
            .par_chunks_exact_mut(v)
            .zip(draws)
            .map(|(l, u)| next_token_with(l, step, cfg, u))
            .collect();
        let (mut rows, mut tokens) = (Vec::with_capacity(active.len()), Vec::with_capacity(active.len()));
        for (&row, tok) in active.iter().zip(toks) {
            responses[row].push(tok);
            if !cfg.eos_token_id.contains(&tok) {
                rows.push(row);
                tokens.push(tok);
            }
        }
        if rows.is_empty() || step + 1 == cfg.max_new_tokens {
            break;
        }
        logits = dec.step(&rows, &tokens)?;
        active = rows;
    }
    Ok(responses)
}

/// The next token of a row from its logits: EOS forbidden before `min_new_tokens`, then a
/// sample or the argmax.
fn next_token(logits: &mut [f32], step: usize, cfg: &GenerationConfig, rng: &mut RngStream) -> u32 {
    let u = cfg.do_sample.then(|| rng.uniform_f64());
    next_token_with(logits, step, cfg, u)
}

/// [`next_token`] with the uniform draw of sampling given (`None`: greedy).
fn next_token_with(logits: &mut [f32], step: usize, cfg: &GenerationConfig, u: Option<f64>) -> u32 {
    if step < cfg.min_new_tokens {
        for &eos in &cfg.eos_token_id {
            if let Some(l) = logits.get_mut(eos as usize) {
                *l = f32::NEG_INFINITY;
            }
        }
    }
    match u {
        Some(u) => sample_with(logits, cfg, u),
        None => argmax(logits),
    }
}

/// Checks the settings and the prompts against the model.
fn check(model: &Transformer, prompts: &[Vec<u32>], cfg: &GenerationConfig) -> Result<()> {
    cfg.validate()?;
    let v = model.cfg.vocab_size;
    if cfg.pad_token_id as usize >= v {
        return Err(ModelError::Input(format!(
            "pad_token_id {} is outside the vocabulary of {v} tokens\nhint: use the model's own pad id (Model::pad_token_id)",
            cfg.pad_token_id
        )));
    }
    let n_pos = model.cfg.max_position_embeddings;
    for (i, p) in prompts.iter().enumerate() {
        if p.is_empty() {
            return Err(ModelError::Input(format!(
                "prompt {i} is empty; generation needs at least one token"
            )));
        }
        if p.len() + cfg.max_new_tokens > n_pos {
            return Err(ModelError::Input(format!(
                "prompt {i} has {} tokens; with max_new_tokens {} it needs {} positions but the model has {} {n_pos}\n\
                 hint: shorten the prompt or lower max_new_tokens",
                p.len(),
                cfg.max_new_tokens,
                p.len() + cfg.max_new_tokens,
                model.cfg.max_positions_key()
            )));
        }
        if let Some(&bad) = p.iter().find(|&&t| t as usize >= model.cfg.vocab_size) {
            return Err(ModelError::Input(format!(
                "prompt {i} has token id {bad}, outside the vocabulary of {} tokens",
                model.cfg.vocab_size
            )));
        }
    }
    Ok(())
}

/// [`generate`] through the composed tensor path: the left-padded batch, every row every
/// step, [`Transformer::forward`] with a [`KvCache`]. Serves every device and dtype, and is the
/// oracle of the [`Decoder`] path.
pub fn generate_composed(
    model: &Transformer,
    prompts: &[Vec<u32>],
    cfg: &GenerationConfig,
    rng: &mut RngStream,
) -> Result<Generation> {
    check(model, prompts, cfg)?;
    let b = prompts.len();
    if b == 0 {
        return Ok(Generation {
            prompt_ids: vec![],
            response_ids: vec![],
        });
    }
    let max_len = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let device = model.device();
    let mut ids = Vec::with_capacity(b * max_len);
    let mut mask: Vec<Vec<u32>> = Vec::with_capacity(b);
    for p in prompts {
        let pad = max_len - p.len();
        ids.extend(std::iter::repeat_n(cfg.pad_token_id, pad).chain(p.iter().copied()));
        mask.push(
            std::iter::repeat_n(0, pad)
                .chain(std::iter::repeat_n(1, p.len()))
                .collect(),
        );
    }
    let cfgm = &model.cfg;
    let mut cache = KvCache::new(
        cfgm.num_hidden_layers,
        b,
        cfgm.num_key_value_heads,
        cfgm.head_dim,
        max_len + cfg.max_new_tokens,
        model.dtype(),
        device,
    )?;
    let mut fwd = Fwd::eval();
    let mut input = Tensor::from_vec(ids, (b, max_len), device)?;
    let mut responses: Vec<Vec<u32>> = vec![Vec::with_capacity(cfg.max_new_tokens); b];
    let mut done = vec![false; b];
    for step in 0..cfg.max_new_tokens {
        let mask_t = mask_tensor(&mask, device)?;
        let hidden = model.forward(&input, &mask_t, Some(&mut cache), &mut fwd)?;
        let t = hidden.dim(1)?;
        let last = hidden.narrow(1, t - 1, 1)?;
        let logits: Vec<Vec<f32>> = model
            .lm_logits(&last, false)?
            .squeeze(1)?
            .to_dtype(DType::F32)?
            .to_vec2()?;
        let mut next = Vec::with_capacity(b);
        for (row, mut l) in logits.into_iter().enumerate() {
            if done[row] {
                next.push(cfg.pad_token_id);
                mask[row].push(0);
                continue;
            }
            let tok = next_token(&mut l, step, cfg, rng);
            responses[row].push(tok);
            done[row] = cfg.eos_token_id.contains(&tok);
            next.push(tok);
            mask[row].push(1);
        }
        if done.iter().all(|&d| d) || step + 1 == cfg.max_new_tokens {
            break;
        }
        input = Tensor::from_vec(next, (b, 1), device)?;
    }
    Ok(Generation {
        prompt_ids: prompts.to_vec(),
        response_ids: responses,
    })
}

fn mask_tensor(mask: &[Vec<u32>], device: &candle_core::Device) -> Result<Tensor> {
    let s = mask.first().map_or(0, Vec::len);
    let flat: Vec<u32> = mask.iter().flatten().copied().collect();
    Ok(Tensor::from_vec(flat, (mask.len(), s), device)?)
}

/// Index of the largest value (the first one on ties, as `torch.argmax`).
pub fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best as u32
}

/// Samples one token from logits after Hugging Face's warpers, in their order:
/// temperature, top-k, top-p (keeping at least one token).
pub fn sample(logits: &mut [f32], cfg: &GenerationConfig, rng: &mut RngStream) -> u32 {
    sample_with(logits, cfg, rng.uniform_f64())
}

/// [`sample`] with its one uniform draw `u` in `[0, 1)` given.
pub fn sample_with(logits: &mut [f32], cfg: &GenerationConfig, u: f64) -> u32 {
    let inv_t = (1.0 / cfg.temperature) as f32;
    if inv_t != 1.0 {
        logits.iter_mut().for_each(|x| *x *= inv_t);
    }
    let n = logits.len();
    let mut order: Vec<u32> = Vec::new();
    let needs_sort = (cfg.top_k > 0 && cfg.top_k < n) || cfg.top_p < 1.0;
    if needs_sort {
        order = (0..n as u32).collect();
        order.sort_unstable_by(|&a, &b| logits[b as usize].total_cmp(&logits[a as usize]).then(a.cmp(&b)));
        let mut keep = n;
        if cfg.top_k > 0 {
            keep = keep.min(cfg.top_k);
        }
        order.truncate(keep);
        if cfg.top_p < 1.0 {
            let max = logits[order[0] as usize] as f64;
            let probs: Vec<f64> = order.iter().map(|&i| (logits[i as usize] as f64 - max).exp()).collect();
            let z: f64 = probs.iter().sum();
            let mut cum = 0.0;
            let mut cut = order.len();
            for (k, p) in probs.iter().enumerate() {
                cum += p / z;
                if cum >= cfg.top_p {
                    cut = k + 1;
                    break;
                }
            }
            order.truncate(cut.max(1));
        }
    }
    if !needs_sort {
        // Every token is a candidate: weights `e^(x − max)` in place, vectorised.
        let max = rlhf_ops::simd::max_f32(logits);
        let z = rlhf_ops::simd::exp_shift_in_place_f32(logits, max);
        return draw(logits.iter().map(|&w| w as f64), z, u, |k| k as u32);
    }
    let max = order
        .iter()
        .map(|&i| logits[i as usize])
        .fold(f32::NEG_INFINITY, f32::max) as f64;
    let weights: Vec<f64> = order.iter().map(|&i| (logits[i as usize] as f64 - max).exp()).collect();
    let z: f64 = weights.iter().sum();
    draw(weights.iter().copied(), z, u, |k| order[k])
}

/// Inverse-CDF draw: the first candidate whose cumulative weight exceeds `u · z`, `u`
/// uniform in `[0, 1)`; `id(k)` maps the `k`-th weight to its token.
fn draw(weights: impl Iterator<Item = f64>, z: f64, u: f64, id: impl Fn(usize) -> u32) -> u32 {
    let mut u = u * z;
    let mut last = 0;
    for (k, w) in weights.enumerate() {
        if u < w {
            return id(k);
        }
        u -= w;
        if w > 0.0 {
            last = k;
        }
    }
    // Rounding left `u` just above the total: the last candidate with weight takes it.
    id(last)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_one_is_greedy() {
        let cfg = GenerationConfig {
            top_k: 1,
            ..Default::default()
        };
        let mut rng = RngStream::new(3);
        for _ in 0..20 {
            let mut l = vec![0.1, 2.0, 1.9, -3.0];
            assert_eq!(sample(&mut l, &cfg, &mut rng), 1);
        }
    }

    #[test]
    fn top_p_keeps_the_smallest_set_reaching_p() {
        // probabilities ~ [0.64, 0.24, 0.09, 0.03]: top_p 0.8 keeps the first two.
        let cfg = GenerationConfig {
            top_p: 0.8,
            ..Default::default()
        };
        let mut rng = RngStream::new(5);
        let base = [2.0f32, 1.0, 0.0, -1.2];
        let mut seen = [0usize; 4];
        for _ in 0..2000 {
            let mut l = base.to_vec();
            seen[sample(&mut l, &cfg, &mut rng) as usize] += 1;
        }
        assert!(seen[0] > 0 && seen[1] > 0 && seen[2] == 0 && seen[3] == 0, "{seen:?}");
    }

    #[test]
    fn sampling_follows_the_softmax() {
        let cfg = GenerationConfig::default();
        let mut rng = RngStream::new(9);
        let mut hits = 0;
        for _ in 0..10_000 {
            let mut l = vec![0.0f32, (3.0f32).ln()];
            hits += sample(&mut l, &cfg, &mut rng) as usize;
        }
        let p = hits as f64 / 10_000.0;
        assert!((p - 0.75).abs() < 0.02, "p = {p}");
    }

    #[test]
    fn neg_infinity_is_never_sampled() {
        let cfg = GenerationConfig {
            temperature: 0.7,
            ..Default::default()
        };
        let mut rng = RngStream::new(1);
        for _ in 0..1000 {
            let mut l = vec![0.0f32, f32::NEG_INFINITY, 0.5];
            assert_ne!(sample(&mut l, &cfg, &mut rng), 1);
        }
    }
}
