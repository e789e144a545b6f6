//! GPT-2 (Radford et al. 2019) as in `transformers.GPT2Model`, numerically identical in f32.
//!
//! Weights keep the Hugging Face names and layouts (`Conv1D` weights are `(in, out)`), so
//! loading and saving are walks over the config. The KV cache lives outside the model.

use candle_core::{DType, Device, Tensor};
use rlhf_ops::attention::{packed_causal_attention, PackedAttention};
use rlhf_ops::nn::{causal_padding_bias, compute_dtype, dropout, layer_norm, softmax_last_dim};
use rlhf_ops::rng::RngStream;
use rlhf_ops::sink::{embedding, GradSink};
use rlhf_peft::{Param, Proj, ProjCtx};

use crate::cache::KvCache;
use crate::config::Gpt2Config;
use crate::error::{ModelError, Result};
use crate::weights::Weights;

/// How a forward pass runs: with or without an autograd graph, with or without dropout,
/// with or without LoRA adapters.
pub struct Fwd<'a> {
    /// Record the graph for a backward pass.
    pub grad: bool,
    /// Train mode: dropout draws its masks from this stream. `None` is eval mode.
    pub dropout: Option<&'a mut RngStream>,
    /// Apply LoRA adapters. `false` is PEFT's `disable_adapter()`: the reference model of
    /// PPO without a second copy (trained biases and saved modules then read their kept
    /// originals; see `rlhf_models::lora`). Models without adapters ignore it.
    pub adapters: bool,
    /// Where the embedding lookups put their tables' gradients (touched rows only) instead
    /// of the graph; see [`rlhf_ops::sink`]. `None`: dense gradients through the graph.
    pub sink: Option<&'a GradSink>,
}

impl<'a> Fwd<'a> {
    /// Eval mode without gradients (generation, scoring, reference log-probs).
    pub fn eval() -> Fwd<'static> {
        Fwd {
            grad: false,
            dropout: None,
            adapters: true,
            sink: None,
        }
    }

    /// Eval mode (no dropout) that records gradients.
    pub fn eval_grad() -> Fwd<'static> {
        Fwd {
            grad: true,
            dropout: None,
            adapters: true,
            sink: None,
        }
    }

    /// Train mode: gradients and seeded dropout.
    pub fn train(rng: &mut RngStream) -> Fwd<'_> {
        Fwd {
            grad: true,
            dropout: Some(rng),
            adapters: true,
            sink: None,
        }
    }

    /// The same pass with adapters disabled: `Fwd::eval().without_adapters()` is the
    /// reference model of a LoRA policy.
    pub fn without_adapters(self) -> Self {
        Fwd {
            adapters: false,
            ..self
        }
    }

    /// The same pass with embedding gradients delivered to `sink`.
    pub fn with_sink<'b>(self, sink: &'b GradSink) -> Fwd<'b>
    where
        'a: 'b,
    {
        Fwd {
            sink: Some(sink),
            ..self
        }
    }

    /// Applies dropout with probability `p` in train mode; identity in eval mode.
    pub fn dropout(&mut self, x: &Tensor, p: f64) -> Result<Tensor> {
        match self.dropout.as_deref_mut() {
            Some(rng) if p > 0.0 => Ok(dropout(x, p, &mut |n| rng.uniform_vec(n))?),
            _ => Ok(x.clone()),
        }
    }

    /// The settings a projection needs ([`ProjCtx`]), borrowing the dropout stream.
    pub fn proj(&mut self) -> ProjCtx<'_> {
        ProjCtx {
            grad: self.grad,
            adapters: self.adapters,
            dropout: self.dropout.as_deref_mut(),
        }
    }
}

/// Layer normalisation weights.
#[derive(Clone, Debug)]
pub struct LayerNorm {
    /// Scale `(H)`.
    pub weight: Param,
    /// Shift `(H)`.
    pub bias: Param,
    eps: f64,
}

impl LayerNorm {
    /// The epsilon added to the variance.
    pub fn eps(&self) -> f64 {
        self.eps
    }

    fn forward(&self, x: &Tensor, fwd: &Fwd) -> Result<Tensor> {
        let (g, a) = (fwd.grad, fwd.adapters);
        Ok(layer_norm(
            x,
            self.weight.get_in(g, a),
            self.bias.get_in(g, a),
            self.eps,
        )?)
    }
}

/// One transformer block: `x + attn(ln_1(x))`, then `x + mlp(ln_2(x))`.
#[derive(Clone, Debug)]
pub struct Block {
    /// Pre-attention layer norm.
    pub ln_1: LayerNorm,
    /// Fused query/key/value projection `(H, 3H)`.
    pub c_attn: Proj,
    /// Attention output projection `(H, H)`.
    pub attn_c_proj: Proj,
    /// Pre-MLP layer norm.
    pub ln_2: LayerNorm,
    /// MLP input projection `(H, inner)`.
    pub c_fc: Proj,
    /// MLP output projection `(inner, H)`.
    pub mlp_c_proj: Proj,
}

/// The GPT-2 backbone (`GPT2Model`) plus the LM head weight when it is not tied.
#[derive(Clone, Debug)]
pub struct Gpt2 {
    /// Hyper-parameters.
    pub cfg: Gpt2Config,
    /// Token embedding `(V, H)`; also the LM head when tied.
    pub wte: Param,
    /// Position embedding `(n_positions, H)`.
    pub wpe: Param,
    /// Transformer blocks.
    pub blocks: Vec<Block>,
    /// Final layer norm.
    pub ln_f: LayerNorm,
    /// Untied LM head `(V, H)` (`lm_head.weight`), when `tie_word_embeddings` is false.
    pub lm_head: Option<Param>,
}

impl Gpt2 {
    /// Builds the model from checkpoint tensors, checking every shape against the config.
    /// Weights are frozen; see [`Gpt2::set_trainable`].
    pub fn from_weights(cfg: Gpt2Config, w: &mut Weights) -> Result<Self> {
        let (h, inner, v) = (cfg.n_embd, cfg.n_inner, cfg.vocab_size);
        let p = |w: &mut Weights, name: &str, shape: &[usize]| w.take(name, shape).map(Param::frozen);
        let ln = |w: &mut Weights, name: &str| -> Result<LayerNorm> {
            Ok(LayerNorm {
                weight: p(w, &format!("{name}.weight"), &[h])?,
                bias: p(w, &format!("{name}.bias"), &[h])?,
                eps: cfg.layer_norm_epsilon,
            })
        };
        let proj = |w: &mut Weights, name: &str, i: usize, o: usize| -> Result<Proj> {
            Ok(Proj::dense(
                p(w, &format!("{name}.weight"), &[i, o])?,
                Some(p(w, &format!("{name}.bias"), &[o])?),
            ))
        };
        let wte = p(w, "wte.weight", &[v, h])?;
        let wpe = p(w, "wpe.weight", &[cfg.n_positions, h])?;
        // `n_layer` comes from config.json: grow with the blocks the file actually holds
        // instead of reserving `n_layer` up front (a huge value would abort the allocation
        // before the first missing tensor is reported).
        let mut blocks = Vec::new();
        for i in 0..cfg.n_layer {
            let pre = format!("h.{i}");
            blocks.push(Block {
                ln_1: ln(w, &format!("{pre}.ln_1"))?,
                c_attn: proj(w, &format!("{pre}.attn.c_attn"), h, 3 * h)?,
                attn_c_proj: proj(w, &format!("{pre}.attn.c_proj"), h, h)?,
                ln_2: ln(w, &format!("{pre}.ln_2"))?,
                c_fc: proj(w, &format!("{pre}.mlp.c_fc"), h, inner)?,
                mlp_c_proj: proj(w, &format!("{pre}.mlp.c_proj"), inner, h)?,
            });
        }
        let ln_f = ln(w, "ln_f")?;
        let lm_head = if cfg.tie_word_embeddings {
            None
        } else {
            Some(p(w, "lm_head.weight", &[v, h])?)
        };
        Ok(Self {
            cfg,
            wte,
            wpe,
            blocks,
            ln_f,
            lm_head,
        })
    }

    /// A randomly initialised model with transformers' GPT-2 init: normal(0, 0.02) weights,
    /// output projections scaled by `1/sqrt(2 n_layer)`, zero biases, unit layer norms.
    pub fn random(cfg: Gpt2Config, rng: &mut RngStream, dtype: DType, device: &Device) -> Result<Self> {
        let (h, inner, v) = (cfg.n_embd, cfg.n_inner, cfg.vocab_size);
        let mut normal = |shape: &[usize], std: f64| -> Result<Param> {
            let n: usize = shape.iter().product();
            let data: Vec<f32> = (0..n).map(|_| (rng.normal() * std) as f32).collect();
            Ok(Param::frozen(Tensor::from_vec(data, shape, device)?.to_dtype(dtype)?))
        };
        let zeros = |n: usize| -> Result<Param> { Ok(Param::frozen(Tensor::zeros(n, dtype, device)?)) };
        let ones = |n: usize| -> Result<Param> { Ok(Param::frozen(Tensor::ones(n, dtype, device)?)) };
        let eps = cfg.layer_norm_epsilon;
        let ln = || -> Result<LayerNorm> {
            Ok(LayerNorm {
                weight: ones(h)?,
                bias: zeros(h)?,
                eps,
            })
        };
        let proj_std = 0.02 / (2.0 * cfg.n_layer as f64).sqrt();
        let wte = normal(&[v, h], 0.02)?;
        let wpe = normal(&[cfg.n_positions, h], 0.01)?;
        let mut blocks = Vec::with_capacity(cfg.n_layer);
        for _ in 0..cfg.n_layer {
            blocks.push(Block {
                ln_1: ln()?,
                c_attn: Proj::dense(normal(&[h, 3 * h], 0.02)?, Some(zeros(3 * h)?)),
                attn_c_proj: Proj::dense(normal(&[h, h], proj_std)?, Some(zeros(h)?)),
                ln_2: ln()?,
                c_fc: Proj::dense(normal(&[h, inner], 0.02)?, Some(zeros(inner)?)),
                mlp_c_proj: Proj::dense(normal(&[inner, h], proj_std)?, Some(zeros(h)?)),
            });
        }
        let lm_head = if cfg.tie_word_embeddings {
            None
        } else {
            Some(normal(&[v, h], 0.02)?)
        };
        Ok(Self {
            cfg,
            wte,
            wpe,
            blocks,
            ln_f: ln()?,
            lm_head,
        })
    }

    /// Every weight with its Hugging Face name (without the `transformer.` prefix; the untied
    /// head is `lm_head.weight`).
    pub fn named_params(&self) -> Vec<(String, &Param)> {
        let mut out = vec![
            ("wte.weight".to_string(), &self.wte),
            ("wpe.weight".to_string(), &self.wpe),
        ];
        fn ln<'a>(out: &mut Vec<(String, &'a Param)>, name: String, l: &'a LayerNorm) {
            out.push((format!("{name}.weight"), &l.weight));
            out.push((format!("{name}.bias"), &l.bias));
        }
        for (i, b) in self.blocks.iter().enumerate() {
            ln(&mut out, format!("h.{i}.ln_1"), &b.ln_1);
            for (name, proj) in [("attn.c_attn", &b.c_attn), ("attn.c_proj", &b.attn_c_proj)] {
                for (k, prm) in proj.params() {
                    out.push((format!("h.{i}.{name}.{k}"), prm));
                }
            }
            ln(&mut out, format!("h.{i}.ln_2"), &b.ln_2);
            for (name, proj) in [("mlp.c_fc", &b.c_fc), ("mlp.c_proj", &b.mlp_c_proj)] {
                for (k, prm) in proj.params() {
                    out.push((format!("h.{i}.{name}.{k}"), prm));
                }
            }
        }
        ln(&mut out, "ln_f".to_string(), &self.ln_f);
        if let Some(head) = &self.lm_head {
            out.push(("lm_head.weight".to_string(), head));
        }
        out
    }

    /// Mutable access to every weight, by the names of [`Gpt2::named_params`].
    pub fn named_params_mut(&mut self) -> Vec<(String, &mut Param)> {
        let mut out: Vec<(String, &mut Param)> = vec![
            ("wte.weight".to_string(), &mut self.wte),
            ("wpe.weight".to_string(), &mut self.wpe),
        ];
        for (i, b) in self.blocks.iter_mut().enumerate() {
            out.push((format!("h.{i}.ln_1.weight"), &mut b.ln_1.weight));
            out.push((format!("h.{i}.ln_1.bias"), &mut b.ln_1.bias));
            out.push((format!("h.{i}.ln_2.weight"), &mut b.ln_2.weight));
            out.push((format!("h.{i}.ln_2.bias"), &mut b.ln_2.bias));
            for (name, proj) in [
                ("attn.c_attn", &mut b.c_attn),
                ("attn.c_proj", &mut b.attn_c_proj),
                ("mlp.c_fc", &mut b.c_fc),
                ("mlp.c_proj", &mut b.mlp_c_proj),
            ] {
                for (k, prm) in proj.params_mut() {
                    out.push((format!("h.{i}.{name}.{k}"), prm));
                }
            }
        }
        out.push(("ln_f.weight".to_string(), &mut self.ln_f.weight));
        out.push(("ln_f.bias".to_string(), &mut self.ln_f.bias));
        if let Some(head) = &mut self.lm_head {
            out.push(("lm_head.weight".to_string(), head));
        }
        out
    }

    /// Every projection with its module name (without the `transformer.` prefix):
    /// `h.{i}.attn.c_attn`, `h.{i}.attn.c_proj`, `h.{i}.mlp.c_fc`, `h.{i}.mlp.c_proj`.
    pub fn projections(&self) -> Vec<(String, &Proj)> {
        let mut out = Vec::with_capacity(4 * self.blocks.len());
        for (i, b) in self.blocks.iter().enumerate() {
            out.push((format!("h.{i}.attn.c_attn"), &b.c_attn));
            out.push((format!("h.{i}.attn.c_proj"), &b.attn_c_proj));
            out.push((format!("h.{i}.mlp.c_fc"), &b.c_fc));
            out.push((format!("h.{i}.mlp.c_proj"), &b.mlp_c_proj));
        }
        out
    }

    /// Mutable access to the projections, named as in [`Gpt2::projections`].
    pub fn projections_mut(&mut self) -> Vec<(String, &mut Proj)> {
        let mut out = Vec::with_capacity(4 * self.blocks.len());
        for (i, b) in self.blocks.iter_mut().enumerate() {
            out.push((format!("h.{i}.attn.c_attn"), &mut b.c_attn));
            out.push((format!("h.{i}.attn.c_proj"), &mut b.attn_c_proj));
            out.push((format!("h.{i}.mlp.c_fc"), &mut b.c_fc));
            out.push((format!("h.{i}.mlp.c_proj"), &mut b.mlp_c_proj));
        }
        out
    }

    /// Makes every weight trainable (full fine-tuning) or frozen.
    pub fn set_trainable(&mut self, trainable: bool) -> Result<()> {
        for (_, p) in self.named_params_mut() {
            if trainable {
                p.make_trainable()?;
            } else {
                p.freeze();
            }
        }
        Ok(())
    }

    /// The dtype of the weights.
    pub fn dtype(&self) -> DType {
        self.wte.value().dtype()
    }

    /// The device of the weights.
    pub fn device(&self) -> &Device {
        self.wte.value().device()
    }

    /// Forward pass over a padded batch.
    ///
    /// `mask` covers the cached past and the new tokens; positions are derived from it as
    /// transformers does for generation (`cumsum(mask) - 1`, 1 at padding), so left- and
    /// right-padded rows give the same hidden states for their real tokens. With a cache,
    /// the new keys and values are appended to it.
    ///
    /// # Shapes
    /// `ids`: `(B, T)` u32, `mask`: `(B, S)` with `S = past + T` → hidden `(B, T, H)`.
    pub fn forward(
        &self,
        ids: &Tensor,
        mask: &Tensor,
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
        let positions = positions_from_mask(&mask_rows, t, self.cfg.n_positions)?;
        let device = self.device();
        let pos = Tensor::from_vec(positions, b * t, device)?;
        let grad = fwd.grad;
        let h = self.cfg.n_embd;
        let tok = embedding(self.wte.get(grad), &ids.flatten_all()?, fwd.sink)?;
        let pe = embedding(self.wpe.get(grad), &pos, fwd.sink)?;
        let mut x = fwd.dropout(&(tok + pe)?.reshape((b, t, h))?, self.cfg.embd_pdrop)?;
        let bias = causal_padding_bias(&mask_rows, t, device)?;
        for (i, block) in self.blocks.iter().enumerate() {
            let layer_cache = cache.as_deref_mut().map(|c| (c, i));
            x = self.block_forward(block, i, &x, Attend::Padded(&bias), layer_cache, fwd)?;
        }
        if let Some(c) = cache {
            c.advance(t)?;
        }
        self.ln_f.forward(&x, fwd)
    }

    /// Forward pass over sequences packed end to end, without padding: every position-wise
    /// part of the model (embeddings, layer norms, projections, MLP) runs over the `N` real
    /// tokens only, and attention alone runs per sequence (the rows are gathered into a
    /// right-padded `(B, T)` layout for it and scattered back). Each sequence's positions
    /// start at 0, so the hidden states are those of [`Gpt2::forward`] on the right-padded
    /// batch at its real tokens, for a fraction of the work when lengths differ (a batch of
    /// preference pairs is typically 2/3 real tokens).
    ///
    /// # Shapes
    /// `seqs`: `B` sequences of token ids → hidden `(N, H)`, `N` = total length, rows in
    /// sequence order.
    pub fn forward_packed(&self, seqs: &[&[u32]], fwd: &mut Fwd) -> Result<Tensor> {
        let packing = Packing::new(seqs, self.cfg.n_positions, self.device())?;
        let grad = fwd.grad;
        let tok = embedding(self.wte.get(grad), &packing.ids, fwd.sink)?;
        let pe = embedding(self.wpe.get(grad), &packing.positions, fwd.sink)?;
        let mut x = fwd.dropout(&(tok + pe)?, self.cfg.embd_pdrop)?;
        for (i, block) in self.blocks.iter().enumerate() {
            x = self.block_forward(block, i, &x, Attend::Packed(&packing), None, fwd)?;
        }
        self.ln_f.forward(&x, fwd)
    }

    /// One transformer block. `x` is `(B, T, H)`, or `(N, H)` packed rows.
    fn block_forward(
        &self,
        blk: &Block,
        layer: usize,
        x: &Tensor,
        attend: Attend,
        cache: Option<(&mut KvCache, usize)>,
        fwd: &mut Fwd,
    ) -> Result<Tensor> {
        let a = self.attention(blk, layer, &blk.ln_1.forward(x, fwd)?, attend, cache, fwd)?;
        let x = (x + fwd.dropout(&a, self.cfg.resid_pdrop)?)?;
        let m = blk.c_fc.forward(&blk.ln_2.forward(&x, fwd)?, &mut fwd.proj())?;
        let m = blk
            .mlp_c_proj
            .forward(&self.cfg.activation.apply(&m)?, &mut fwd.proj())?;
        Ok((x + fwd.dropout(&m, self.cfg.resid_pdrop)?)?)
    }

    /// Causal self-attention: `softmax(q k^T * scale + bias) v`.
    ///
    /// # Shapes
    /// `x`: `(B, T, H)` with [`Attend::Padded`] → `(B, T, H)`; `(N, H)` packed rows with
    /// [`Attend::Packed`] → `(N, H)`.
    fn attention(
        &self,
        blk: &Block,
        layer: usize,
        x: &Tensor,
        attend: Attend,
        cache: Option<(&mut KvCache, usize)>,
        fwd: &mut Fwd,
    ) -> Result<Tensor> {
        let h = x.dim(candle_core::D::Minus1)?;
        let (nh, hd) = (self.cfg.n_head, self.cfg.head_dim());
        let qkv = blk.c_attn.forward(x, &mut fwd.proj())?;
        let scale = self.attention_scale(layer);
        let packing = match attend {
            Attend::Packed(p) => Some(p),
            Attend::Padded(_) => None,
        };
        if let Some(p) = packing.filter(|_| rlhf_ops::kernels::applies(&[&qkv])) {
            let keep = match fwd.dropout.as_deref_mut() {
                Some(rng) if self.cfg.attn_pdrop > 0.0 => Some(std::sync::Arc::new(PackedAttention::dropout_keep(
                    &p.lens,
                    nh,
                    self.cfg.attn_pdrop,
                    &mut |n| rng.uniform_vec(n),
                ))),
                _ => None,
            };
            let cfg = PackedAttention {
                lens: p.lens.clone(),
                n_head: nh,
                scale: scale as f32,
                keep,
            };
            let out = packed_causal_attention(&qkv, cfg)?;
            return Ok(blk.attn_c_proj.forward(&out, &mut fwd.proj())?);
        }
        let (qkv, bias, b, t) = match attend {
            Attend::Packed(p) => (p.unpack(&qkv)?, p.bias()?, p.lens.len(), p.t),
            Attend::Padded(bias) => {
                let (b, t, _) = x.dims3()?;
                (qkv, bias, b, t)
            }
        };
        let heads = |i: usize| -> Result<Tensor> {
            Ok(qkv
                .narrow(2, i * h, h)?
                .reshape((b, t, nh, hd))?
                .transpose(1, 2)?
                .contiguous()?)
        };
        let (q, k, v) = (heads(0)?, heads(1)?, heads(2)?);
        let (k, v) = match cache {
            Some((c, i)) => c.append(i, &k, &v)?,
            None => (k, v),
        };
        let dtype = q.dtype();
        let up = compute_dtype(dtype);
        let scores = if self.cfg.reorder_and_upcast_attn || up != dtype {
            // Upcast before the product, scale first (transformers' `_upcast_and_reordered_attn`).
            (q.to_dtype(up)? * scale)?.matmul(&k.to_dtype(up)?.t()?)?
        } else {
            (q.matmul(&k.t()?)? * scale)?
        };
        let probs = softmax_last_dim(&scores.broadcast_add(&bias.to_dtype(scores.dtype())?)?)?.to_dtype(dtype)?;
        let probs = fwd.dropout(&probs, self.cfg.attn_pdrop)?;
        let out = probs.matmul(&v)?.transpose(1, 2)?.reshape((b, t, h))?;
        let out = match packing {
            Some(p) => p.pack(&out)?,
            None => out,
        };
        Ok(blk.attn_c_proj.forward(&out, &mut fwd.proj())?)
    }

    /// The factor of the attention scores of layer `layer` (0-based).
    pub(crate) fn attention_scale(&self, layer: usize) -> f64 {
        let mut scale = 1.0;
        if self.cfg.scale_attn_weights {
            scale /= (self.cfg.head_dim() as f64).sqrt();
        }
        if self.cfg.scale_attn_by_inverse_layer_idx {
            scale /= (layer + 1) as f64;
        }
        scale
    }

    /// The LM head's weight `(V, H)`: `lm_head.weight`, or `wte` when tied; tracked for
    /// gradients when `grad`.
    pub fn lm_head_weight(&self, grad: bool) -> &Tensor {
        self.lm_head.as_ref().unwrap_or(&self.wte).get(grad)
    }

    /// LM-head logits, in f32 (f64 for an f64 model).
    ///
    /// # Shapes
    /// `hidden`: `(.., H)` → `(.., V)`.
    pub fn lm_logits(&self, hidden: &Tensor, grad: bool) -> Result<Tensor> {
        let w = self.lm_head.as_ref().unwrap_or(&self.wte).get(grad);
        let logits = rlhf_peft::proj::matmul_2d(hidden, &w.t()?)?;
        match logits.dtype() {
            DType::F64 => Ok(logits),
            _ => Ok(logits.to_dtype(DType::F32)?),
        }
    }
}

/// What attention runs over.
#[derive(Clone, Copy)]
enum Attend<'a> {
    /// A padded `(B, T)` batch with its additive bias `(B, 1, T, S)`.
    Padded(&'a Tensor),
    /// Packed rows.
    Packed(&'a Packing),
}

/// Where the rows of a packed batch sit in the right-padded layout attention runs in.
struct Packing {
    /// `(N)` token ids, sequences end to end.
    ids: Tensor,
    /// `(N)` positions, from 0 in every sequence.
    positions: Tensor,
    /// `(B·T)`: the packed row of each padded slot (padding slots read row 0; attention
    /// masks them as keys and their outputs are dropped).
    gather: Tensor,
    /// `(N)`: the padded slot of each packed row.
    scatter: Tensor,
    /// Sequence lengths (`B` of them).
    lens: Vec<usize>,
    /// The longest.
    t: usize,
    /// The padded layout's causal bias, built on first use: only the composed attention
    /// (dtypes other than f32) reads it.
    bias: std::cell::OnceCell<Tensor>,
}

impl Packing {
    fn new(seqs: &[&[u32]], n_positions: usize, device: &Device) -> Result<Self> {
        let (b, t) = (seqs.len(), seqs.iter().map(|s| s.len()).max().unwrap_or(0));
        if b == 0 {
            return Err(ModelError::Input("an empty batch: no sequences to run".into()));
        }
        let n: usize = seqs.iter().map(|s| s.len()).sum();
        let (mut ids, mut positions, mut scatter) =
            (Vec::with_capacity(n), Vec::with_capacity(n), Vec::with_capacity(n));
        let mut gather = vec![0u32; b * t];
        for (i, s) in seqs.iter().enumerate() {
            if s.is_empty() {
                return Err(ModelError::Input(format!("sequence {i} of the batch has no tokens")));
            }
            if s.len() > n_positions {
                return Err(ModelError::Input(format!(
                    "sequence {i} has {} tokens, more than the model's n_positions ({n_positions})\n\
                     hint: lower max_length",
                    s.len()
                )));
            }
            for (j, &id) in s.iter().enumerate() {
                gather[i * t + j] = ids.len() as u32;
                scatter.push((i * t + j) as u32);
                ids.push(id);
                positions.push(j as u32);
            }
        }
        Ok(Self {
            ids: Tensor::from_vec(ids, n, device)?,
            positions: Tensor::from_vec(positions, n, device)?,
            gather: Tensor::from_vec(gather, b * t, device)?,
            scatter: Tensor::from_vec(scatter, n, device)?,
            lens: seqs.iter().map(|s| s.len()).collect(),
            t,
            bias: std::cell::OnceCell::new(),
        })
    }

    /// The causal bias of the right-padded layout, `(B, 1, T, T)`.
    fn bias(&self) -> Result<&Tensor> {
        if let Some(b) = self.bias.get() {
            return Ok(b);
        }
        let mask: Vec<Vec<u32>> = self
            .lens
            .iter()
            .map(|&n| (0..self.t).map(|j| u32::from(j < n)).collect())
            .collect();
        let b = causal_padding_bias(&mask, self.t, self.gather.device())?;
        Ok(self.bias.get_or_init(|| b))
    }

    /// `(N, C)` packed rows → `(B, T, C)` padded.
    fn unpack(&self, x: &Tensor) -> Result<Tensor> {
        let c = x.dim(1)?;
        Ok(x.index_select(&self.gather, 0)?.reshape((self.lens.len(), self.t, c))?)
    }

    /// `(B, T, C)` padded → `(N, C)` packed rows.
    fn pack(&self, x: &Tensor) -> Result<Tensor> {
        let c = x.dim(2)?;
        Ok(x.reshape((self.lens.len() * self.t, c))?
            .index_select(&self.scatter, 0)?)
    }
}

/// Position ids from an attention mask: `cumsum(mask) - 1` for real tokens (transformers'
/// `prepare_inputs_for_generation`). Padding after a real token continues the count (what
/// `arange` gives a right-padded batch, so TRL's batched forward is matched at every
/// position); padding before the first real token gets 1. Only the last `t` columns are
/// returned. Fails if the real tokens of a row exceed `n_positions`.
pub fn positions_from_mask(mask: &[Vec<u32>], t: usize, n_positions: usize) -> Result<Vec<u32>> {
    let mut out = Vec::with_capacity(mask.len() * t);
    let max_pos = n_positions.saturating_sub(1) as u32;
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
                last_real.map_or(1, |(lj, lp)| (lp + (j - lj) as u32).min(max_pos))
            };
            if j >= s - t {
                out.push(pos);
            }
        }
        if count as usize > n_positions {
            return Err(ModelError::Input(format!(
                "row {row_idx} has {count} tokens, more than the model's n_positions ({n_positions})\n\
                 hint: shorten the prompt or lower max_new_tokens / max_length"
            )));
        }
    }
    Ok(out)
}
