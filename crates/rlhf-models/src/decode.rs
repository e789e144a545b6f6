//! Incremental decoding on the CPU from weights packed once per generation.
//!
//! [`Decoder`] runs the same GPT-2 as [`Gpt2::forward`] with a KV cache, but on plain f32
//! buffers: every projection is a [`PackedMatrix`] product (the weight packed into column
//! panels once, then streamed once per step while the step's few rows stay in cache), and
//! layer norm, attention against the cache, the activation and the residual adds are
//! direct loops over those buffers — no tensor per operation, no head split or merge copies,
//! no padding. Each sequence keeps only its real tokens in the cache, so a finished row
//! costs nothing and left padding never enters the computation; a row's positions are
//! `0, 1, 2, …`, as `cumsum(mask) - 1` gives the padded path.
//!
//! It computes what the composed path computes up to the order of f32 sums (tested against
//! it: logits within 1e-4 in f32). With [`PackedFormat::Bf16`] the projections and the LM
//! head take bf16-rounded operands with f32 sums, as
//! [`MatmulPrecision::Bf16`](rlhf_ops::precision::MatmulPrecision) does elsewhere.
//!
//! Models on other devices or dtypes, or with a quantized base (whose packed copy would
//! cost the memory quantization saves), are not served ([`Decoder::new`] returns `None`)
//! and generate through the composed path.

use candle_core::{DType, Tensor};
use rayon::prelude::*;
use rlhf_ops::attention::CACHED_KEY_BLOCK;
use rlhf_ops::bf16::MatRef;
use rlhf_ops::nn::Activation;
use rlhf_ops::packed::{PackedFormat, PackedMatrix};
use rlhf_peft::Proj;

use crate::error::{ModelError, Result};
use crate::gpt2::{Gpt2, LayerNorm};

/// Rows per rayon task in the row-wise loops (layer norm, activation); a decoding step's
/// few rows run on the calling thread, where waking the pool would cost more than the loop.
const ROWS_PER_TASK: usize = 64;

/// A projection ready for decoding: the effective weight packed, the bias as f32.
struct PackedProj {
    w: PackedMatrix,
    bias: Vec<f32>,
}

impl PackedProj {
    fn new(p: &Proj, format: PackedFormat) -> Result<Self> {
        let (k, n) = p.shape();
        let w = p.effective_weight(DType::F32)?.contiguous()?;
        let w = with_f32(&w, |s| PackedMatrix::new(MatRef::row_major(s, n), k, n, format))??;
        let bias = match p.bias() {
            Some(b) => b.value().to_dtype(DType::F32)?.flatten_all()?.to_vec1()?,
            None => vec![0.0; n],
        };
        Ok(Self { w, bias })
    }

    /// `x · W + b` for `m` rows of `x` (row-major `m × k`).
    fn forward(&self, x: &[f32], m: usize) -> Result<Vec<f32>> {
        let n = self.w.n();
        let mut y = Vec::with_capacity(m * n);
        for _ in 0..m {
            y.extend_from_slice(&self.bias);
        }
        self.w.matmul(MatRef::row_major(x, self.w.k()), m, &mut y, true)?;
        Ok(y)
    }
}

/// Layer-norm weights as f32.
struct Norm {
    w: Vec<f32>,
    b: Vec<f32>,
    eps: f32,
}

impl Norm {
    fn new(ln: &LayerNorm) -> Result<Self> {
        let f = |t: &Tensor| -> Result<Vec<f32>> { Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?) };
        Ok(Self {
            w: f(ln.weight.value())?,
            b: f(ln.bias.value())?,
            eps: ln.eps() as f32,
        })
    }

    fn forward(&self, x: &[f32]) -> Vec<f32> {
        let h = self.w.len();
        let mut y = vec![0f32; x.len()];
        let rows = |(y, x): (&mut [f32], &[f32])| rlhf_ops::kernels::ln_fwd_rows(x, &self.w, &self.b, self.eps, y);
        if x.len() <= h * ROWS_PER_TASK {
            rows((&mut y, x));
        } else {
            y.par_chunks_mut(h * ROWS_PER_TASK)
                .zip(x.par_chunks(h * ROWS_PER_TASK))
                .for_each(rows);
        }
        y
    }
}

struct Layer {
    ln_1: Norm,
    c_attn: PackedProj,
    attn_c_proj: PackedProj,
    ln_2: Norm,
    c_fc: PackedProj,
    mlp_c_proj: PackedProj,
    /// Attention-score factor of this layer.
    scale: f32,
    /// Keys per row and head in blocks of [`CACHED_KEY_BLOCK`] positions, each block
    /// component-major: `(rows, n_head, ceil(capacity / 16), head_dim, 16)`.
    k: Vec<f32>,
    /// Values, same layout.
    v: Vec<f32>,
}

/// A GPT-2 prepared for generating from `rows` sequences of up to `capacity` tokens each
/// (prompt and new tokens), with its KV cache. Built per generation: the packed weights are
/// a snapshot of the model's current weights (adapters applied, as [`crate::Fwd::eval`]).
pub struct Decoder<'m> {
    model: &'m Gpt2,
    layers: Vec<Layer>,
    ln_f: Norm,
    lm_head: PackedMatrix,
    /// Tokens cached per row.
    lens: Vec<usize>,
    capacity: usize,
}

impl<'m> Decoder<'m> {
    /// Packs `model`'s weights in `format` and allocates the cache; `None` when the model
    /// is not an f32 model on the CPU or a projection has a quantized base.
    pub fn new(model: &'m Gpt2, rows: usize, capacity: usize, format: PackedFormat) -> Result<Option<Self>> {
        let dense = |p: &Proj| match p {
            Proj::Dense(_) => true,
            Proj::Lora(l) => matches!(*l.base, Proj::Dense(_)),
            Proj::Int8(_) | Proj::Nf4(_) => false,
        };
        if !model.device().is_cpu() || model.dtype() != DType::F32 || !model.projections().iter().all(|(_, p)| dense(p))
        {
            return Ok(None);
        }
        let cfg = &model.cfg;
        let cache_len = rows * cfg.n_head * padded(capacity) * cfg.head_dim();
        let layers = model
            .blocks
            .iter()
            .enumerate()
            .map(|(i, b)| {
                Ok(Layer {
                    ln_1: Norm::new(&b.ln_1)?,
                    c_attn: PackedProj::new(&b.c_attn, format)?,
                    attn_c_proj: PackedProj::new(&b.attn_c_proj, format)?,
                    ln_2: Norm::new(&b.ln_2)?,
                    c_fc: PackedProj::new(&b.c_fc, format)?,
                    mlp_c_proj: PackedProj::new(&b.mlp_c_proj, format)?,
                    scale: model.attention_scale(i) as f32,
                    k: vec![0f32; cache_len],
                    v: vec![0f32; cache_len],
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let head = model.lm_head_weight(false).contiguous()?;
        let (v, h) = head.dims2()?;
        let lm_head = with_f32(&head, |s| PackedMatrix::new(MatRef::row_major(s, h).t(), h, v, format))??;
        Ok(Some(Self {
            model,
            layers,
            ln_f: Norm::new(&model.ln_f)?,
            lm_head,
            lens: vec![0; rows],
            capacity,
        }))
    }

    /// Size of the vocabulary (columns of the logits).
    pub fn vocab_size(&self) -> usize {
        self.lm_head.n()
    }

    /// Tokens cached for each row.
    pub fn lens(&self) -> &[usize] {
        &self.lens
    }

    /// Runs each row's prompt (row `i` of the cache gets `prompts[i]`) and returns the
    /// logits after each prompt's last token, row-major `(prompts.len(), V)`.
    pub fn prefill(&mut self, prompts: &[Vec<u32>]) -> Result<Vec<f32>> {
        let entries: Vec<(usize, u32)> = prompts
            .iter()
            .enumerate()
            .flat_map(|(r, p)| p.iter().map(move |&t| (r, t)))
            .collect();
        let mut last = Vec::with_capacity(prompts.len());
        let mut end = 0;
        for (r, p) in prompts.iter().enumerate() {
            if p.is_empty() {
                return Err(ModelError::Input(format!("prompt {r} is empty")));
            }
            end += p.len();
            last.push(end - 1);
        }
        self.forward(&entries, &last)
    }

    /// Appends `tokens[i]` to row `rows[i]` and returns the logits after it, row-major
    /// `(rows.len(), V)`.
    pub fn step(&mut self, rows: &[usize], tokens: &[u32]) -> Result<Vec<f32>> {
        if rows.len() != tokens.len() {
            return Err(ModelError::Input(format!(
                "{} rows but {} tokens to append",
                rows.len(),
                tokens.len()
            )));
        }
        let entries: Vec<(usize, u32)> = rows.iter().copied().zip(tokens.iter().copied()).collect();
        let all: Vec<usize> = (0..entries.len()).collect();
        self.forward(&entries, &all)
    }

    /// Runs `entries` (row, token), appended in order after each row's cached tokens, and
    /// returns the logits at the entries `logits_at`.
    fn forward(&mut self, entries: &[(usize, u32)], logits_at: &[usize]) -> Result<Vec<f32>> {
        let cfg = &self.model.cfg;
        let (h, nh, hd) = (cfg.n_embd, cfg.n_head, cfg.head_dim());
        let n = entries.len();
        // The cache slot (= position) of every entry.
        let mut next = self.lens.clone();
        let mut slots = Vec::with_capacity(n);
        for (e, &(r, tok)) in entries.iter().enumerate() {
            let Some(len) = next.get_mut(r) else {
                return Err(ModelError::Input(format!(
                    "entry {e} is for row {r}, but the decoder has {} rows",
                    self.lens.len()
                )));
            };
            if *len >= self.capacity.min(cfg.n_positions) {
                return Err(ModelError::Input(format!(
                    "row {r} is full: {} tokens cached, capacity {} (n_positions {})",
                    *len, self.capacity, cfg.n_positions
                )));
            }
            if tok as usize >= cfg.vocab_size {
                return Err(ModelError::Input(format!(
                    "token id {tok} (entry {e}) is outside the vocabulary of {} tokens",
                    cfg.vocab_size
                )));
            }
            slots.push(*len);
            *len += 1;
        }
        let device = self.model.device();
        let ids = Tensor::from_vec(entries.iter().map(|&(_, t)| t).collect::<Vec<_>>(), n, device)?;
        let pos = Tensor::from_vec(slots.iter().map(|&s| s as u32).collect::<Vec<_>>(), n, device)?;
        let tok = self.model.wte.value().index_select(&ids, 0)?;
        let pe = self.model.wpe.value().index_select(&pos, 0)?;
        let mut x: Vec<f32> = (tok + pe)?.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        // Cache positions per row and head, whole key blocks.
        let capacity = padded(self.capacity);
        let activation = cfg.activation;
        for layer in &mut self.layers {
            let qkv = layer.c_attn.forward(&layer.ln_1.forward(&x), n)?;
            // Keys and values into the cache, then every entry's query against its row.
            for (e, (&(r, _), &slot)) in entries.iter().zip(&slots).enumerate() {
                for head in 0..nh {
                    let base = (r * nh + head) * capacity * hd;
                    let src = e * 3 * h + head * hd;
                    let block = base + (slot / CACHED_KEY_BLOCK) * CACHED_KEY_BLOCK * hd + slot % CACHED_KEY_BLOCK;
                    for (c, &x) in qkv[src + h..src + h + hd].iter().enumerate() {
                        layer.k[block + c * CACHED_KEY_BLOCK] = x;
                    }
                    let at = base + slot * hd;
                    layer.v[at..at + hd].copy_from_slice(&qkv[src + 2 * h..src + 2 * h + hd]);
                }
            }
            let mut attn = vec![0f32; n * h];
            let (k, v, scale) = (&layer.k, &layer.v, layer.scale);
            attn.par_chunks_mut(hd).enumerate().for_each_init(
                || vec![0f32; capacity],
                |p, (idx, out)| {
                    let (e, head) = (idx / nh, idx % nh);
                    let (r, len) = (entries[e].0, slots[e] + 1);
                    let base = (r * nh + head) * capacity * hd;
                    let q = &qkv[e * 3 * h + head * hd..e * 3 * h + (head + 1) * hd];
                    let (kt, v) = (&k[base..base + capacity * hd], &v[base..base + len * hd]);
                    rlhf_ops::attention::cached_attention_row(q, kt, v, len, scale, p, out);
                },
            );
            let a = layer.attn_c_proj.forward(&attn, n)?;
            rlhf_ops::simd::add_in_place_f32(&mut x, &a);
            let mut m = layer.c_fc.forward(&layer.ln_2.forward(&x), n)?;
            activate(activation, &mut m, layer.c_fc.w.n())?;
            let m = layer.mlp_c_proj.forward(&m, n)?;
            rlhf_ops::simd::add_in_place_f32(&mut x, &m);
        }
        self.lens = next;
        let mut last = Vec::with_capacity(logits_at.len() * h);
        for &e in logits_at {
            last.extend_from_slice(&x[e * h..(e + 1) * h]);
        }
        let hidden = self.ln_f.forward(&last);
        let mut logits = vec![0f32; logits_at.len() * self.lm_head.n()];
        self.lm_head
            .matmul(MatRef::row_major(&hidden, h), logits_at.len(), &mut logits, false)?;
        Ok(logits)
    }
}

/// `capacity` rounded up to whole key blocks.
fn padded(capacity: usize) -> usize {
    capacity.div_ceil(CACHED_KEY_BLOCK) * CACHED_KEY_BLOCK
}

/// Applies the MLP activation in place to rows of `width`.
fn activate(act: Activation, x: &mut [f32], width: usize) -> Result<()> {
    match act {
        Activation::GeluTanh => {
            let rows = |c: &mut [f32]| {
                let src = c.to_vec();
                rlhf_ops::kernels::gelu_fwd(&src, c);
            };
            if x.len() <= width * ROWS_PER_TASK {
                rows(x);
            } else {
                x.par_chunks_mut(width * ROWS_PER_TASK).for_each(rows);
            }
        }
        other => {
            let t = Tensor::from_slice(x, x.len(), &candle_core::Device::Cpu)?;
            x.copy_from_slice(&other.apply(&t)?.to_vec1::<f32>()?);
        }
    }
    Ok(())
}

/// Runs `f` on the elements of a contiguous f32 CPU tensor, in place.
fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    let (storage, layout) = t.storage_and_layout();
    match (&*storage, layout.contiguous_offsets()) {
        (candle_core::Storage::Cpu(candle_core::CpuStorage::F32(v)), Some((a, b))) => Ok(f(&v[a..b])),
        _ => Err(ModelError::Input(
            "packing a weight for decoding needs a contiguous f32 tensor on the CPU".into(),
        )),
    }
}
