//! One decoder for every family, built from shared pieces (the families are one model with
//! flags; see [`crate::family`]):
//!
//! ```text
//! x = embed_tokens[ids] (+ embed_positions[pos])            GPT-2: learned positions
//! for each layer:
//!     x = x + o_proj(attention(input_norm(x)))              q, k, v: fused or split; GQA;
//!                                                           RoPE (Llama family); q/k norm (Qwen3);
//!                                                           sliding window (Mistral, Qwen)
//!     x = x + mlp(post_norm(x))                             plain GELU or gated SiLU
//! hidden = norm(x)                                          LayerNorm or RMSNorm
//! logits = hidden · lm_head^T                               tied to embed_tokens or not
//! ```
//!
//! Every projection keeps `nn.Linear`'s layout `(out, in)`; GPT-2's `Conv1D` weights are
//! transposed once at load and back at save ([`crate::model`]). Names are the checkpoint's
//! ([`crate::family::Names`]), so loading, saving and LoRA targeting walk the same list.
//! The KV cache lives outside the model. Shapes use `B` batch, `T` time, `H` hidden,
//! `N` packed tokens, `nh`/`nkv` query/key-value heads, `hd` head size.

mod attention;
mod fwd;
mod packing;
mod pieces;
mod walk;

use candle_core::{DType, Device, Tensor};
use rlhf_ops::nn::causal_padding_bias;
use rlhf_ops::rng::RngStream;
use rlhf_ops::sink::embedding;
use rlhf_peft::{Param, Proj};

pub use attention::{Attention, Qkv};
pub use fwd::Fwd;
pub use pieces::{Mlp, Norm};

use crate::cache::KvCache;
use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use crate::family::{MlpNames, QkvNames};
use crate::rope::Rope;
use packing::Packing;
pub use packing::{prefix_sharing, set_prefix_sharing, PrefixSharingGuard};

/// One block: `x + attn(input_norm(x))`, then `x + mlp(post_norm(x))`.
#[derive(Clone, Debug)]
pub struct Layer {
    /// Norm before attention (`ln_1` / `input_layernorm`).
    pub input_norm: Norm,
    /// Self-attention.
    pub attn: Attention,
    /// Norm before the MLP (`ln_2` / `post_attention_layernorm`).
    pub post_norm: Norm,
    /// The MLP.
    pub mlp: Mlp,
}

/// Where the LM head's weight comes from.
#[derive(Clone, Debug)]
pub enum LmHead {
    /// The token embedding (`tie_word_embeddings`).
    Tied,
    /// Its own `lm_head.weight` `(V, H)`.
    Untied(Param),
    /// None: a sequence-classification checkpoint of an untied family has no LM head.
    Absent,
}

/// The backbone (embeddings, blocks, final norm) plus the LM head.
#[derive(Clone, Debug)]
pub struct Transformer {
    /// Hyper-parameters.
    pub cfg: ModelConfig,
    /// Token embedding `(V, H)`.
    pub embed_tokens: Param,
    /// Learned position embedding `(max_position_embeddings, H)` (GPT-2).
    pub embed_positions: Option<Param>,
    /// The blocks.
    pub layers: Vec<Layer>,
    /// Final norm.
    pub norm: Norm,
    /// The LM head.
    pub lm_head: LmHead,
    /// RoPE frequencies (Llama family).
    pub(crate) rope: Option<Rope>,
}

/// A weight the checkpoint walk visits: its name (relative to the backbone prefix, or the
/// top-level `lm_head.weight`), its shape inside the model, and whether the file stores it
/// transposed (`Conv1D`).
pub(crate) struct Slot {
    pub name: String,
    pub shape: Vec<usize>,
    pub transposed: bool,
}

/// Hands out the weights of the walk: from a checkpoint or freshly initialised.
pub(crate) struct Loader<'a> {
    get: &'a mut dyn FnMut(&Slot) -> Result<Param>,
    /// Projection weights are stored `(in, out)` in the file.
    conv: bool,
}

impl Loader<'_> {
    /// The weight `name` of `shape` (as the model holds it).
    pub(crate) fn param(&mut self, name: String, shape: &[usize], transposed: bool) -> Result<Param> {
        (self.get)(&Slot {
            name,
            shape: shape.to_vec(),
            transposed,
        })
    }

    /// The projection `name` with weight `(out, in)` and, when `bias`, its bias.
    fn proj(&mut self, name: String, (out, inp): (usize, usize), bias: bool) -> Result<Proj> {
        let w = self.param(format!("{name}.weight"), &[out, inp], self.conv)?;
        let b = match bias {
            true => Some(self.param(format!("{name}.bias"), &[out], false)?),
            false => None,
        };
        Ok(Proj::dense(w, b))
    }
}

impl Transformer {
    /// Builds the model from checkpoint tensors (names relative to the backbone prefix),
    /// checking every shape against the config. `head` says whether an LM head is needed:
    /// a sequence-classification checkpoint of an untied family has none. Weights start
    /// frozen.
    pub(crate) fn from_weights(cfg: ModelConfig, w: &mut crate::weights::Weights, head: bool) -> Result<Self> {
        let mut take = |slot: &Slot| -> Result<Param> {
            let t = if slot.transposed {
                let stored: Vec<usize> = slot.shape.iter().rev().copied().collect();
                w.take(&slot.name, &stored)?.t()?.contiguous()?
            } else {
                w.take(&slot.name, &slot.shape)?
            };
            Ok(Param::frozen(t))
        };
        let model = Self::build(cfg, &mut take, head)?;
        Ok(model)
    }

    /// A randomly initialised model with transformers' init: normal(0, 0.02) weights
    /// (GPT-2: output projections scaled by `1/sqrt(2 n_layer)`; position table std 0.01),
    /// zero biases, unit norms.
    pub fn random(cfg: ModelConfig, rng: &mut RngStream, dtype: DType, device: &Device) -> Result<Self> {
        let proj_std = match cfg.family {
            crate::family::Family::Gpt2 => 0.02 / (2.0 * cfg.num_hidden_layers as f64).sqrt(),
            _ => 0.02,
        };
        let mut init = |slot: &Slot| -> Result<Param> {
            let n: usize = slot.shape.iter().product();
            let name = slot.name.as_str();
            let data: Vec<f32> = if name.ends_with("bias") {
                vec![0.0; n]
            } else if slot.shape.len() == 1 {
                vec![1.0; n]
            } else {
                let std = if name.ends_with("wpe.weight") {
                    0.01
                } else if name.contains("c_proj") || name.contains("o_proj") || name.contains("down_proj") {
                    proj_std
                } else {
                    0.02
                };
                (0..n).map(|_| (rng.normal() * std) as f32).collect()
            };
            Ok(Param::frozen(
                Tensor::from_vec(data, slot.shape.as_slice(), device)?.to_dtype(dtype)?,
            ))
        };
        Self::build(cfg, &mut init, true)
    }

    /// Assembles the pieces, asking `get` for each weight in the walk's order.
    fn build(cfg: ModelConfig, get: &mut dyn FnMut(&Slot) -> Result<Param>, head: bool) -> Result<Self> {
        let names = cfg.family.names();
        let mut ld = Loader {
            get,
            conv: cfg.family.conv1d_weights(),
        };
        let (h, inner, v) = (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size);
        let (qw, kvw) = cfg.qkv_widths();
        let embed_tokens = ld.param(format!("{}.weight", names.embed_tokens), &[v, h], false)?;
        let embed_positions = match names.embed_positions {
            Some(pos) if cfg.rope.is_none() => {
                Some(ld.param(format!("{pos}.weight"), &[cfg.max_position_embeddings, h], false)?)
            }
            _ => None,
        };
        // `num_hidden_layers` comes from config.json: grow with the blocks the file holds
        // instead of reserving up front (a huge value would abort the allocation before the
        // first missing tensor is reported).
        let mut layers = Vec::new();
        for i in 0..cfg.num_hidden_layers {
            let pre = format!("{}.{i}", names.layers);
            let attn_pre = format!("{pre}.{}", names.attn);
            let input_norm = Norm::load(&cfg, format!("{pre}.{}", names.input_norm), h, &mut ld)?;
            let qkv = match &names.qkv {
                QkvNames::Fused(n) => {
                    Qkv::Fused(ld.proj(format!("{attn_pre}.{n}"), (qw + 2 * kvw, h), cfg.qkv_bias)?)
                }
                QkvNames::Split([q, k, vn]) => Qkv::Split {
                    q: ld.proj(format!("{attn_pre}.{q}"), (qw, h), cfg.qkv_bias)?,
                    k: ld.proj(format!("{attn_pre}.{k}"), (kvw, h), cfg.qkv_bias)?,
                    v: ld.proj(format!("{attn_pre}.{vn}"), (kvw, h), cfg.qkv_bias)?,
                },
            };
            let o_proj = ld.proj(format!("{attn_pre}.{}", names.o_proj), (h, qw), cfg.o_bias)?;
            let (q_norm, k_norm) = match cfg.qk_norm {
                true => (
                    Some(Norm::load(
                        &cfg,
                        format!("{attn_pre}.{}", names.q_norm),
                        cfg.head_dim,
                        &mut ld,
                    )?),
                    Some(Norm::load(
                        &cfg,
                        format!("{attn_pre}.{}", names.k_norm),
                        cfg.head_dim,
                        &mut ld,
                    )?),
                ),
                false => (None, None),
            };
            let post_norm = Norm::load(&cfg, format!("{pre}.{}", names.post_norm), h, &mut ld)?;
            let mlp_pre = format!("{pre}.{}", names.mlp);
            let mlp = match &names.mlp_proj {
                MlpNames::Plain([i_n, o_n]) => Mlp::Plain {
                    fc_in: ld.proj(format!("{mlp_pre}.{i_n}"), (inner, h), cfg.mlp_bias)?,
                    fc_out: ld.proj(format!("{mlp_pre}.{o_n}"), (h, inner), cfg.mlp_bias)?,
                },
                MlpNames::Gated([g, u, d]) => Mlp::Gated {
                    gate: ld.proj(format!("{mlp_pre}.{g}"), (inner, h), cfg.mlp_bias)?,
                    up: ld.proj(format!("{mlp_pre}.{u}"), (inner, h), cfg.mlp_bias)?,
                    down: ld.proj(format!("{mlp_pre}.{d}"), (h, inner), cfg.mlp_bias)?,
                },
            };
            layers.push(Layer {
                input_norm,
                attn: Attention {
                    qkv,
                    o_proj,
                    q_norm,
                    k_norm,
                },
                post_norm,
                mlp,
            });
        }
        let norm = Norm::load(&cfg, names.final_norm.to_string(), h, &mut ld)?;
        let lm_head = match (cfg.tie_word_embeddings, head) {
            (true, _) => LmHead::Tied,
            (false, true) => LmHead::Untied(ld.param("lm_head.weight".into(), &[v, h], false)?),
            (false, false) => LmHead::Absent,
        };
        let rope = cfg.rope.as_ref().map(Rope::new).transpose()?;
        Ok(Self {
            cfg,
            embed_tokens,
            embed_positions,
            layers,
            norm,
            lm_head,
            rope,
        })
    }

    /// The dtype of the weights.
    pub fn dtype(&self) -> DType {
        self.embed_tokens.value().dtype()
    }

    /// The device of the weights.
    pub fn device(&self) -> &Device {
        self.embed_tokens.value().device()
    }

    /// Forward pass over a padded batch.
    ///
    /// `mask` covers the cached past and the new tokens; positions are derived from it as
    /// transformers does for generation (`cumsum(mask) - 1`), so left- and right-padded rows
    /// give the same hidden states for their real tokens. With a cache, the new keys and
    /// values are appended to it.
    ///
    /// # Shapes
    /// `ids`: `(B, T)` u32, `mask`: `(B, S)` with `S = past + T` → hidden `(B, T, H)`.
    pub fn forward(&self, ids: &Tensor, mask: &Tensor, cache: Option<&mut KvCache>, fwd: &mut Fwd) -> Result<Tensor> {
        self.forward_at(ids, mask, None, cache, fwd)
    }

    /// [`Transformer::forward`] with explicit position ids `(B·T)` for the new tokens
    /// (e.g. `arange` over a left-padded row, as TRL's GRPO scoring forward passes none);
    /// `None` derives them from the mask.
    ///
    /// # Shapes
    /// `ids`: `(B, T)`, `mask`: `(B, S)`, `positions`: `B·T` → hidden `(B, T, H)`.
    pub fn forward_at(
        &self,
        ids: &Tensor,
        mask: &Tensor,
        positions: Option<&[u32]>,
        mut cache: Option<&mut KvCache>,
        fwd: &mut Fwd,
    ) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let mask_rows: Vec<Vec<u32>> = mask.to_dtype(DType::U32)?.to_vec2()?;
        let s = mask_rows.first().map_or(0, Vec::len);
        let past = cache.as_ref().map_or(0, |c| c.len());
        if mask_rows.len() != b || s != past + t {
            return Err(ModelError::Input(format!(
                "attention mask has shape ({}, {s}); expected ({b}, {}) for {t} new tokens after {past} cached",
                mask_rows.len(),
                past + t
            )));
        }
        let max_pos = self.cfg.max_position_embeddings;
        let positions = match positions {
            Some(p) => {
                if p.len() != b * t {
                    return Err(ModelError::Input(format!(
                        "{} position ids for a ({b}, {t}) batch; expected {}",
                        p.len(),
                        b * t
                    )));
                }
                if let Some(&bad) = p.iter().find(|&&x| x as usize >= max_pos) {
                    return Err(ModelError::Input(format!(
                        "position {bad} is beyond the model's max_position_embeddings ({max_pos})"
                    )));
                }
                p.to_vec()
            }
            None => positions_from_mask(&mask_rows, t, max_pos, self.cfg.max_positions_key())?,
        };
        if let Some(keys) = fwd.dropout.as_deref_mut() {
            keys.set_padded(&mask_rows, t)?;
        }
        let x = self
            .embed(&ids.flatten_all()?, &positions, fwd)?
            .reshape((b, t, self.cfg.hidden_size))?;
        let mut x = fwd.dropout(&x, self.cfg.embd_pdrop)?;
        let rope = self.rope_tables(&positions)?;
        let full = causal_padding_bias(&mask_rows, t, self.device())?;
        let windowed =
            match self.cfg.sliding_window {
                Some(w) if self.cfg.sliding_layers.iter().any(|&s| s) => Some(
                    rlhf_ops::nn::causal_window_padding_bias(&mask_rows, t, Some(w), self.device())?,
                ),
                _ => None,
            };
        for (i, layer) in self.layers.iter().enumerate() {
            let bias = match (&windowed, self.cfg.layer_window(i)) {
                (Some(wb), Some(_)) => wb,
                _ => &full,
            };
            let layer_cache = cache.as_deref_mut().map(|c| (c, i));
            let attend = attention::Attend::Padded { bias, b, t };
            x = self.layer_forward(layer, i, &x, attend, rope.as_ref(), layer_cache, fwd)?;
        }
        if let Some(c) = cache {
            c.advance(t)?;
        }
        self.norm.forward(&x, fwd)
    }

    /// Forward pass over sequences packed end to end, without padding: every position-wise
    /// part of the model (embeddings, norms, projections, MLP) runs over the `N` real tokens
    /// only, and attention alone runs per sequence. Each sequence's positions start at 0, so
    /// the hidden states are those of [`Transformer::forward`] on the right-padded batch at
    /// its real tokens, for a fraction of the work when lengths differ.
    ///
    /// # Shapes
    /// `seqs`: `B` sequences of token ids → hidden `(N, H)`, `N` = total length, rows in
    /// sequence order.
    pub fn forward_packed(&self, seqs: &[&[u32]], fwd: &mut Fwd) -> Result<Tensor> {
        self.forward_packed_from(seqs, &vec![0; seqs.len()], fwd)
    }

    /// [`Transformer::forward_packed`] with sequence `i`'s positions counted from
    /// `offsets[i]` (the positions of a left-padded row whose position ids run over its
    /// padding, as transformers' default `arange`).
    ///
    /// # Shapes
    /// `seqs`: `B` sequences of token ids → hidden `(N, H)`, `N` = total length, rows in
    /// sequence order.
    pub fn forward_packed_from(&self, seqs: &[&[u32]], offsets: &[usize], fwd: &mut Fwd) -> Result<Tensor> {
        // Shared prefixes run once unless the pass draws dropout (whose masks are per
        // sequence); see `packing`.
        let drops = fwd.dropout.is_some() && self.draws_dropout();
        let packing = if packing::prefix_sharing() && !drops {
            Packing::shared(seqs, offsets, &self.cfg, self.device())?
        } else {
            Packing::new(seqs, offsets, &self.cfg, self.device())?
        };
        if let Some(keys) = fwd.dropout.as_deref_mut() {
            keys.set_packed(&packing.lens)?;
        }
        let x = self.embed(&packing.ids, &packing.positions_host, fwd)?;
        let mut x = fwd.dropout(&x, self.cfg.embd_pdrop)?;
        let rope = self.rope_tables(&packing.positions_host)?;
        for (i, layer) in self.layers.iter().enumerate() {
            let attend = attention::Attend::Packed(&packing);
            x = self.layer_forward(layer, i, &x, attend, rope.as_ref(), None, fwd)?;
        }
        packing.gather(&self.norm.forward(&x, fwd)?)
    }

    /// Whether a pass in train mode draws any dropout mask: a dropout probability of the
    /// config or of a LoRA adapter above 0.
    pub fn draws_dropout(&self) -> bool {
        let c = &self.cfg;
        c.attn_pdrop > 0.0
            || c.embd_pdrop > 0.0
            || c.resid_pdrop > 0.0
            || self
                .projections()
                .iter()
                .any(|(_, p)| p.lora().is_some_and(|l| l.dropout > 0.0))
    }

    /// Token (+ position) embeddings of flat ids.
    ///
    /// # Shapes
    /// `ids`: `(N)` → `(N, H)`.
    fn embed(&self, ids: &Tensor, positions: &[u32], fwd: &mut Fwd) -> Result<Tensor> {
        let grad = fwd.grad;
        let tok = embedding(self.embed_tokens.get(grad), ids, fwd.sink)?;
        match &self.embed_positions {
            Some(wpe) => {
                let pos = Tensor::from_vec(positions.to_vec(), positions.len(), self.device())?;
                Ok((tok + embedding(wpe.get(grad), &pos, fwd.sink)?)?)
            }
            None => Ok(tok),
        }
    }

    /// RoPE cos/sin for these positions, `(N, hd)` each (`None` without RoPE).
    fn rope_tables(&self, positions: &[u32]) -> Result<Option<(Tensor, Tensor)>> {
        match &self.rope {
            Some(r) => Ok(Some(r.cos_sin(positions, self.compute_dtype(), self.device())?)),
            None => Ok(None),
        }
    }

    /// The dtype the attention and norms compute in.
    pub(crate) fn compute_dtype(&self) -> DType {
        rlhf_ops::nn::compute_dtype(self.dtype())
    }

    /// One block. `x` is `(B, T, H)`, or `(N, H)` packed rows.
    #[allow(clippy::too_many_arguments)]
    fn layer_forward(
        &self,
        l: &Layer,
        layer: usize,
        x: &Tensor,
        attend: attention::Attend,
        rope: Option<&(Tensor, Tensor)>,
        cache: Option<(&mut KvCache, usize)>,
        fwd: &mut Fwd,
    ) -> Result<Tensor> {
        let h = l.input_norm.forward(x, fwd)?;
        let a = self.attention(l, layer, &h, attend, rope, cache, fwd)?;
        let x = (x + fwd.dropout(&a, self.cfg.resid_pdrop)?)?;
        let m = l
            .mlp
            .forward(&l.post_norm.forward(&x, fwd)?, self.cfg.hidden_act, fwd)?;
        Ok((x + fwd.dropout(&m, self.cfg.resid_pdrop)?)?)
    }

    /// The factor of the attention scores of layer `layer` (0-based).
    pub(crate) fn attention_scale(&self, layer: usize) -> f64 {
        let mut scale = 1.0;
        if self.cfg.scale_attn_weights {
            scale /= (self.cfg.head_dim as f64).sqrt();
        }
        if self.cfg.scale_attn_by_inverse_layer_idx {
            scale /= (layer + 1) as f64;
        }
        scale
    }

    /// The LM head's weight `(V, H)`: `lm_head.weight`, or the embedding when tied; tracked
    /// for gradients when `grad`.
    pub fn lm_head_weight(&self, grad: bool) -> Result<&Tensor> {
        match &self.lm_head {
            LmHead::Tied => Ok(self.embed_tokens.get(grad)),
            LmHead::Untied(p) => Ok(p.get(grad)),
            LmHead::Absent => Err(ModelError::Input(
                "this model has no LM head: it was loaded from a sequence-classification checkpoint of an untied family\n\
                 hint: load the causal-LM checkpoint to generate or compute log-probs"
                    .into(),
            )),
        }
    }

    /// LM-head logits, in f32 (f64 for an f64 model).
    ///
    /// # Shapes
    /// `hidden`: `(.., H)` → `(.., V)`.
    pub fn lm_logits(&self, hidden: &Tensor, grad: bool) -> Result<Tensor> {
        let w = self.lm_head_weight(grad)?;
        let logits = rlhf_peft::proj::linear_2d(hidden, w)?;
        match logits.dtype() {
            DType::F64 => Ok(logits),
            _ => Ok(logits.to_dtype(DType::F32)?),
        }
    }
}

/// Position ids from an attention mask: `cumsum(mask) - 1` for real tokens (transformers'
/// `prepare_inputs_for_generation`). Padding after a real token continues the count (what
/// `arange` gives a right-padded batch, so TRL's batched forward is matched at every
/// position); padding before the first real token gets 1. Only the last `t` columns are
/// returned. Fails if the real tokens of a row exceed `max_positions` (named `key` in
/// messages: `n_positions` or `max_position_embeddings`).
pub fn positions_from_mask(mask: &[Vec<u32>], t: usize, max_positions: usize, key: &str) -> Result<Vec<u32>> {
    let mut out = Vec::with_capacity(mask.len() * t);
    let max_pos = max_positions.saturating_sub(1) as u32;
    for (row_idx, row) in mask.iter().enumerate() {
        let s = row.len();
        let mut count = 0u32;
        let mut last_real: Option<(usize, u32)> = None;
        for (j, &m) in row.iter().enumerate() {
            let pos = if m != 0 {
                count += 1;
                last_real = Some((j, count - 1));
                count - 1
            } else {
                last_real.map_or(1.min(max_pos), |(lj, lp)| (lp + (j - lj) as u32).min(max_pos))
            };
            if j >= s - t {
                out.push(pos);
            }
        }
        if count as usize > max_positions {
            return Err(ModelError::Input(format!(
                "row {row_idx} has {count} tokens, more than the model's {key} ({max_positions})\n\
                 hint: shorten the prompt or lower max_new_tokens / max_length"
            )));
        }
    }
    Ok(out)
}
