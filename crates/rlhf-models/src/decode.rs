//! Incremental decoding on the CPU from weights packed once per generation.
//!
//! [`Decoder`] runs the same decoder as [`Transformer::forward`] with a KV cache, for every
//! family, but on plain f32 buffers: every projection is a [`PackedMatrix`] product (the
//! weight packed into column panels once, then streamed once per step while the step's few
//! rows stay in cache; q, k and v share one matrix, as do the gate and up projections), and
//! the norms, RoPE, attention against the cache, the activation and the residual adds are
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

use crate::config::NormKind;
use crate::error::{ModelError, Result};
use crate::transformer::{Mlp, Norm, Qkv, Transformer};

/// Rows per rayon task in the row-wise loops (norms, activation); a decoding step's few rows
/// run on the calling thread, where waking the pool would cost more than the loop.
const ROWS_PER_TASK: usize = 64;

/// Projections ready for decoding: their effective weights stacked along the output
/// (`[q; k; v]`, `[gate; up]`) and packed, the biases as f32 (zeros where absent).
struct PackedProj {
    w: PackedMatrix,
    bias: Vec<f32>,
}

impl PackedProj {
    fn new(ps: &[&Proj], format: PackedFormat) -> Result<Self> {
        let k = ps[0].shape().0;
        let mut rows: Vec<Tensor> = Vec::with_capacity(ps.len());
        let mut bias = Vec::new();
        for p in ps {
            let (_, n) = p.shape();
            rows.push(p.effective_weight(DType::F32)?);
            match p.bias() {
                Some(b) => bias.extend(b.value().to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?),
                None => bias.extend(std::iter::repeat_n(0f32, n)),
            }
        }
        let w = Tensor::cat(&rows, 0)?.contiguous()?;
        let n = w.dim(0)?;
        // `(out, in)` row-major is `(in, out)` column-major: the product's `k × n` operand.
        let w = with_f32(&w, |s| PackedMatrix::new(MatRef::row_major(s, k).t(), k, n, format))??;
        Ok(Self { w, bias })
    }

    /// `x · Wᵀ + b` for `m` rows of `x` (row-major `m × k`).
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

/// Norm weights as f32.
struct NormF32 {
    w: Vec<f32>,
    b: Option<Vec<f32>>,
    eps: f32,
    kind: NormKind,
}

impl NormF32 {
    fn new(n: &Norm) -> Result<Self> {
        let f = |t: &Tensor| -> Result<Vec<f32>> { Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?) };
        Ok(Self {
            w: f(n.weight.value())?,
            b: n.bias.as_ref().map(|b| f(b.value())).transpose()?,
            eps: n.eps() as f32,
            kind: n.kind(),
        })
    }

    /// Normalises rows of `w.len()` in place into a new buffer.
    fn forward(&self, x: &[f32]) -> Vec<f32> {
        let h = self.w.len();
        let mut y = vec![0f32; x.len()];
        let rows = |(y, x): (&mut [f32], &[f32])| match (&self.kind, &self.b) {
            (NormKind::LayerNorm, Some(b)) => rlhf_ops::kernels::ln_fwd_rows(x, &self.w, b, self.eps, y),
            _ => rlhf_ops::kernels::rms_fwd_rows(x, &self.w, self.eps, y),
        };
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

/// The MLP, packed.
enum MlpF32 {
    Plain {
        fc_in: PackedProj,
        fc_out: PackedProj,
    },
    /// `gate_up` holds `[gate; up]`: outputs `0..I` are the gate, `I..2I` the up projection.
    Gated {
        gate_up: PackedProj,
        down: PackedProj,
    },
}

struct Layer {
    input_norm: NormF32,
    /// `[q; k; v]`, one product.
    qkv: PackedProj,
    o_proj: PackedProj,
    q_norm: Option<NormF32>,
    k_norm: Option<NormF32>,
    post_norm: NormF32,
    mlp: MlpF32,
    /// Attention-score factor of this layer.
    scale: f32,
    /// Sliding window of this layer.
    window: Option<usize>,
    /// Keys per row and key/value head in blocks of [`CACHED_KEY_BLOCK`] positions, each
    /// block component-major: `(rows, nkv, ceil(capacity / 16), hd, 16)`.
    k: Vec<f32>,
    /// Values, `(rows, nkv, capacity, hd)`.
    v: Vec<f32>,
}

/// A model prepared for generating from `rows` sequences of up to `capacity` tokens each
/// (prompt and new tokens), with its KV cache. Built per generation: the packed weights are
/// a snapshot of the model's current weights (adapters applied, as [`crate::Fwd::eval`]).
pub struct Decoder<'m> {
    model: &'m Transformer,
    layers: Vec<Layer>,
    norm: NormF32,
    lm_head: PackedMatrix,
    /// Tokens cached per row.
    lens: Vec<usize>,
    capacity: usize,
}

impl<'m> Decoder<'m> {
    /// Packs `model`'s weights in `format` and allocates the cache; `None` when the model
    /// is not an f32 model on the CPU or a projection has a quantized base.
    pub fn new(model: &'m Transformer, rows: usize, capacity: usize, format: PackedFormat) -> Result<Option<Self>> {
        let dense = |p: &Proj| match p {
            Proj::Dense(_) => true,
            Proj::Lora(l) => matches!(*l.base, Proj::Dense(_)),
            Proj::Int8(_) | Proj::Nf4(_) => false,
        };
        if !rlhf_ops::kernels::fast_kernels()
            || !model.device().is_cpu()
            || model.dtype() != DType::F32
            || !model.projections().iter().all(|(_, p)| dense(p))
        {
            return Ok(None);
        }
        let cfg = &model.cfg;
        let cache_len = rows * cfg.num_key_value_heads * padded(capacity) * cfg.head_dim;
        let layers = model
            .layers
            .iter()
            .enumerate()
            .map(|(i, l)| {
                let qkv = match &l.attn.qkv {
                    Qkv::Fused(p) => PackedProj::new(&[p], format)?,
                    Qkv::Split { q, k, v } => PackedProj::new(&[q, k, v], format)?,
                };
                let mlp = match &l.mlp {
                    Mlp::Plain { fc_in, fc_out } => MlpF32::Plain {
                        fc_in: PackedProj::new(&[fc_in], format)?,
                        fc_out: PackedProj::new(&[fc_out], format)?,
                    },
                    Mlp::Gated { gate, up, down } => MlpF32::Gated {
                        gate_up: PackedProj::new(&[gate, up], format)?,
                        down: PackedProj::new(&[down], format)?,
                    },
                };
                Ok(Layer {
                    input_norm: NormF32::new(&l.input_norm)?,
                    qkv,
                    o_proj: PackedProj::new(&[&l.attn.o_proj], format)?,
                    q_norm: l.attn.q_norm.as_ref().map(NormF32::new).transpose()?,
                    k_norm: l.attn.k_norm.as_ref().map(NormF32::new).transpose()?,
                    post_norm: NormF32::new(&l.post_norm)?,
                    mlp,
                    scale: model.attention_scale(i) as f32,
                    window: cfg.layer_window(i),
                    k: vec![0f32; cache_len],
                    v: vec![0f32; cache_len],
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let head = model.lm_head_weight(false)?.contiguous()?;
        let (v, h) = head.dims2()?;
        let lm_head = with_f32(&head, |s| PackedMatrix::new(MatRef::row_major(s, h).t(), h, v, format))??;
        Ok(Some(Self {
            model,
            layers,
            norm: NormF32::new(&model.norm)?,
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

    /// Prefills each prompt **once** and shares its cache with its group: the decoder's rows
    /// are `prompts.len() × g`, row `i·g + j` (`j < g`) continues prompt `i`, and rows
    /// `i·g + 1 ..` get copies of row `i·g`'s keys and values instead of recomputing them
    /// (GRPO / RLOO sample `g` completions of every prompt). Returns the logits after each
    /// prompt's last token for every row, row-major `(prompts.len()·g, V)`.
    pub fn prefill_groups(&mut self, prompts: &[Vec<u32>], g: usize) -> Result<Vec<f32>> {
        if g == 0 || prompts.len() * g != self.lens.len() {
            return Err(ModelError::Input(format!(
                "prefill_groups: {} prompts × {g} generations do not fill the decoder's {} rows",
                prompts.len(),
                self.lens.len()
            )));
        }
        let mut entries = Vec::new();
        let mut last = Vec::with_capacity(prompts.len());
        for (i, p) in prompts.iter().enumerate() {
            if p.is_empty() {
                return Err(ModelError::Input(format!("prompt {i} is empty")));
            }
            entries.extend(p.iter().map(|&t| (i * g, t)));
            last.push(entries.len() - 1);
        }
        let once = self.forward(&entries, &last)?;
        let v = self.vocab_size();
        let mut logits = Vec::with_capacity(once.len() * g);
        for (i, row) in once.chunks_exact(v).enumerate() {
            for j in 0..g {
                if j > 0 {
                    self.copy_row(i * g, i * g + j);
                }
                logits.extend_from_slice(row);
            }
        }
        Ok(logits)
    }

    /// Copies row `src`'s cached keys and values (and length) to row `dst`.
    fn copy_row(&mut self, src: usize, dst: usize) {
        let cfg = &self.model.cfg;
        let width = cfg.num_key_value_heads * padded(self.capacity) * cfg.head_dim;
        for layer in &mut self.layers {
            layer.k.copy_within(src * width..(src + 1) * width, dst * width);
            layer.v.copy_within(src * width..(src + 1) * width, dst * width);
        }
        self.lens[dst] = self.lens[src];
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

    /// The cache slot (= position) of every entry, checking rows, capacity and ids.
    fn slots(&self, entries: &[(usize, u32)]) -> Result<(Vec<usize>, Vec<usize>)> {
        let cfg = &self.model.cfg;
        let mut next = self.lens.clone();
        let mut slots = Vec::with_capacity(entries.len());
        for (e, &(r, tok)) in entries.iter().enumerate() {
            let Some(len) = next.get_mut(r) else {
                return Err(ModelError::Input(format!(
                    "entry {e} is for row {r}, but the decoder has {} rows",
                    self.lens.len()
                )));
            };
            if *len >= self.capacity.min(cfg.max_position_embeddings) {
                return Err(ModelError::Input(format!(
                    "row {r} is full: {} tokens cached, capacity {} (max_position_embeddings {})",
                    *len, self.capacity, cfg.max_position_embeddings
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
        Ok((slots, next))
    }

    /// Runs `entries` (row, token), appended in order after each row's cached tokens, and
    /// returns the logits at the entries `logits_at`.
    fn forward(&mut self, entries: &[(usize, u32)], logits_at: &[usize]) -> Result<Vec<f32>> {
        let model = self.model;
        let cfg = &model.cfg;
        let h = cfg.hidden_size;
        let n = entries.len();
        let (slots, next) = self.slots(entries)?;
        let mut x = self.embed(entries, &slots)?;
        let rope = self.rope_rows(&slots)?;
        let capacity = padded(self.capacity);
        for layer in &mut self.layers {
            let mut qkv = layer.qkv.forward(&layer.input_norm.forward(&x), n)?;
            prepare_qk(cfg, layer, &mut qkv, rope.as_ref());
            store_kv(cfg, layer, &qkv, entries, &slots, capacity);
            let attn = attend(cfg, layer, &qkv, entries, &slots, capacity);
            let a = layer.o_proj.forward(&attn, n)?;
            rlhf_ops::simd::add_in_place_f32(&mut x, &a);
            let hn = layer.post_norm.forward(&x);
            let m = match &layer.mlp {
                MlpF32::Plain { fc_in, fc_out } => {
                    let mut m = fc_in.forward(&hn, n)?;
                    activate(cfg.hidden_act, &mut m, fc_in.w.n())?;
                    fc_out.forward(&m, n)?
                }
                MlpF32::Gated { gate_up, down } => {
                    let gu = gate_up.forward(&hn, n)?;
                    let m = gated(cfg.hidden_act, &gu, gate_up.w.n() / 2)?;
                    down.forward(&m, n)?
                }
            };
            rlhf_ops::simd::add_in_place_f32(&mut x, &m);
        }
        self.lens = next;
        let mut last = Vec::with_capacity(logits_at.len() * h);
        for &e in logits_at {
            last.extend_from_slice(&x[e * h..(e + 1) * h]);
        }
        let hidden = self.norm.forward(&last);
        let mut logits = vec![0f32; logits_at.len() * self.lm_head.n()];
        self.lm_head
            .matmul(MatRef::row_major(&hidden, h), logits_at.len(), &mut logits, false)?;
        Ok(logits)
    }

    /// Token (+ position) embeddings of the entries, `n × H`.
    fn embed(&self, entries: &[(usize, u32)], slots: &[usize]) -> Result<Vec<f32>> {
        let model = self.model;
        let device = model.device();
        let n = entries.len();
        let ids = Tensor::from_vec(entries.iter().map(|&(_, t)| t).collect::<Vec<_>>(), n, device)?;
        let mut x = model.embed_tokens.value().index_select(&ids, 0)?;
        if let Some(wpe) = &model.embed_positions {
            let pos = Tensor::from_vec(slots.iter().map(|&s| s as u32).collect::<Vec<_>>(), n, device)?;
            x = (x + wpe.value().index_select(&pos, 0)?)?;
        }
        Ok(x.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?)
    }

    /// cos and sin per entry (`n × hd` each) at its slot, or `None` without RoPE.
    fn rope_rows(&self, slots: &[usize]) -> Result<Option<(Vec<f32>, Vec<f32>)>> {
        let Some(rope) = self.model.rope.as_ref() else {
            return Ok(None);
        };
        let seq_len = slots.iter().max().map_or(0, |&m| m + 1);
        let positions: Vec<u32> = slots.iter().map(|&s| s as u32).collect();
        Ok(Some(rope.frequencies_for(seq_len)?.tables(&positions)))
    }
}

/// Qwen3's per-head norms and RoPE on the q and k parts of each entry's `[q; k; v]` row, in
/// place.
fn prepare_qk(cfg: &crate::ModelConfig, layer: &Layer, qkv: &mut [f32], rope: Option<&(Vec<f32>, Vec<f32>)>) {
    let (nh, nkv, hd) = (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim);
    let width = (nh + 2 * nkv) * hd;
    for (e, row) in qkv.chunks_exact_mut(width).enumerate() {
        let (q, rest) = row.split_at_mut(nh * hd);
        let k = &mut rest[..nkv * hd];
        for (part, norm) in [(&mut *q, &layer.q_norm), (&mut *k, &layer.k_norm)] {
            if let Some(nrm) = norm {
                let src = part.to_vec();
                rlhf_ops::kernels::rms_fwd_rows(&src, &nrm.w, nrm.eps, part);
            }
        }
        if let Some((cos, sin)) = rope {
            let (c, s) = (&cos[e * hd..(e + 1) * hd], &sin[e * hd..(e + 1) * hd]);
            rlhf_ops::kernels::rope_row_in_place(q, c, s);
            rlhf_ops::kernels::rope_row_in_place(k, c, s);
        }
    }
}

/// Writes each entry's keys and values into its row's cache at its slot.
fn store_kv(
    cfg: &crate::ModelConfig,
    layer: &mut Layer,
    qkv: &[f32],
    entries: &[(usize, u32)],
    slots: &[usize],
    capacity: usize,
) {
    let (nh, nkv, hd) = (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim);
    let width = (nh + 2 * nkv) * hd;
    for (e, (&(r, _), &slot)) in entries.iter().zip(slots).enumerate() {
        for head in 0..nkv {
            let base = (r * nkv + head) * capacity * hd;
            let k_src = e * width + nh * hd + head * hd;
            let v_src = e * width + (nh + nkv) * hd + head * hd;
            let block = base + (slot / CACHED_KEY_BLOCK) * CACHED_KEY_BLOCK * hd + slot % CACHED_KEY_BLOCK;
            for (c, &x) in qkv[k_src..k_src + hd].iter().enumerate() {
                layer.k[block + c * CACHED_KEY_BLOCK] = x;
            }
            let at = base + slot * hd;
            layer.v[at..at + hd].copy_from_slice(&qkv[v_src..v_src + hd]);
        }
    }
}

/// Every entry's queries against its row's cache, `n × (nh·hd)`.
fn attend(
    cfg: &crate::ModelConfig,
    layer: &Layer,
    qkv: &[f32],
    entries: &[(usize, u32)],
    slots: &[usize],
    capacity: usize,
) -> Vec<f32> {
    let (nh, nkv, hd) = (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim);
    let (width, rep) = ((nh + 2 * nkv) * hd, nh / nkv);
    let mut attn = vec![0f32; entries.len() * nh * hd];
    let (k, v, scale, window) = (&layer.k, &layer.v, layer.scale, layer.window);
    attn.par_chunks_mut(hd).enumerate().for_each_init(
        || vec![0f32; capacity],
        |p, (idx, out)| {
            let (e, head) = (idx / nh, idx % nh);
            let (r, len) = (entries[e].0, slots[e] + 1);
            let base = (r * nkv + head / rep) * capacity * hd;
            let q = &qkv[e * width + head * hd..e * width + (head + 1) * hd];
            let (kt, vv) = (&k[base..base + capacity * hd], &v[base..base + len * hd]);
            match window {
                Some(_) => {
                    let keys = rlhf_ops::attention::sliding_window_keys(len, window);
                    rlhf_ops::attention::cached_attention_row_range(q, kt, vv, keys, scale, p, out);
                }
                None => rlhf_ops::attention::cached_attention_row(q, kt, vv, len, scale, p, out),
            }
        },
    );
    attn
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
        Activation::Silu => x.iter_mut().for_each(|v| *v /= 1.0 + (-*v).exp()),
        other => {
            let t = Tensor::from_slice(x, x.len(), &candle_core::Device::Cpu)?;
            x.copy_from_slice(&other.apply(&t)?.to_vec1::<f32>()?);
        }
    }
    Ok(())
}

/// `act(gate) · up` from rows of `[gate; up]` (`2·inner` wide) → rows of `inner`.
fn gated(act: Activation, gu: &[f32], inner: usize) -> Result<Vec<f32>> {
    let mut out = vec![0f32; gu.len() / 2];
    for (row, o) in gu.chunks_exact(2 * inner).zip(out.chunks_exact_mut(inner)) {
        let (g, u) = row.split_at(inner);
        match act {
            Activation::Silu => rlhf_ops::kernels::silu_mul_row(g, u, o),
            other => {
                let mut a = g.to_vec();
                activate(other, &mut a, inner)?;
                o.iter_mut().zip(a.iter().zip(u)).for_each(|(o, (x, y))| *o = x * y);
            }
        }
    }
    Ok(out)
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
