//! A checkpoint directory as one value: the backbone of any family, optional heads and the
//! tokenizer, loaded from and saved to the Hugging Face layout. Trainers and the CLI use
//! [`Model`]'s methods and never see a family: the backbone is reached through
//! [`Model::backbone`] only by code that walks weights or packs them.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use rlhf_ops::rng::RngStream;
use rlhf_peft::{LoraConfig, Param};

use crate::cache::KvCache;
use crate::chat::ChatTemplate;
use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use crate::family::Family;
use crate::generate::{Generation, GenerationConfig};
use crate::heads::{ScoreHead, ValueHead};
use crate::lora::QuantConfig;
use crate::tokenizer::Tokenizer;
use crate::transformer::{Fwd, Transformer};

mod files;

use files::eos_ids_of;

/// How to load a model.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// Weight dtype (F32 by default, whatever the checkpoint stores; BF16 halves memory).
    pub dtype: DType,
    /// Device.
    pub device: Device,
    /// The Hub revision (branch, tag or commit) when the model is named by id
    /// (`main` when `None`); ignored for a directory.
    pub revision: Option<String>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            dtype: DType::F32,
            device: Device::Cpu,
            revision: None,
        }
    }
}

/// A decoder with the heads and tokenizer found in its directory.
#[derive(Clone, Debug)]
pub struct Model {
    backbone: Transformer,
    /// TRL's value head (`v_head.summary`), when present.
    pub value_head: Option<ValueHead>,
    /// The sequence-classification head (`score`), when present.
    pub score_head: Option<ScoreHead>,
    /// The tokenizer, when the directory has `tokenizer.json`.
    pub tokenizer: Option<Tokenizer>,
    /// The chat template(s) of the directory (`chat_template.jinja`, else
    /// `tokenizer_config.json`'s `chat_template`), when it has one.
    pub chat_template: Option<ChatTemplate>,
    /// The LoRA adapter applied to this model ([`crate::lora::apply_lora`] or
    /// [`crate::lora::load_adapter`]), if any.
    pub lora: Option<LoraConfig>,
    /// The quantization of the frozen projections ([`crate::lora::quantize`]), if any.
    pub quantization: Option<QuantConfig>,
    /// `generation_config.json` as read (its `eos_token_id` list stops generation).
    generation: Option<serde_json::Value>,
    source_dir: Option<PathBuf>,
    side_files: Vec<(String, Vec<u8>)>,
}

impl Model {
    /// A randomly initialised model of shape `cfg` (see [`Transformer::random`]).
    pub fn random(cfg: ModelConfig, seed: u64, dtype: DType, device: &Device) -> Result<Self> {
        let mut rng = RngStream::new(seed);
        let backbone = Transformer::random(cfg, &mut rng, dtype, device)?;
        Ok(Self {
            backbone,
            value_head: None,
            score_head: None,
            tokenizer: None,
            chat_template: None,
            lora: None,
            quantization: None,
            generation: None,
            source_dir: None,
            side_files: Vec::new(),
        })
    }

    /// The directory the model was loaded from (`None` for a model built in memory).
    pub fn source_dir(&self) -> Option<&Path> {
        self.source_dir.as_deref()
    }

    /// The config.
    pub fn cfg(&self) -> &ModelConfig {
        &self.backbone.cfg
    }

    /// The family.
    pub fn family(&self) -> Family {
        self.backbone.cfg.family
    }

    /// The backbone and LM head (family-neutral pieces, for code that walks or packs
    /// weights; trainers use this type's methods).
    pub fn backbone(&self) -> &Transformer {
        &self.backbone
    }

    /// Mutable access to the backbone.
    pub fn backbone_mut(&mut self) -> &mut Transformer {
        &mut self.backbone
    }

    /// The dtype of the weights.
    pub fn dtype(&self) -> DType {
        self.backbone.dtype()
    }

    /// The device of the weights.
    pub fn device(&self) -> &Device {
        self.backbone.device()
    }

    /// Sets every dropout probability to zero (TRL's `disable_dropout`), value head included.
    pub fn disable_dropout(&mut self) {
        self.backbone.cfg.disable_dropout();
        if let Some(v) = &mut self.value_head {
            v.dropout = 0.0;
        }
    }

    /// The chat template, or an error naming the directory that has none (rendering
    /// messages needs one).
    pub fn chat_template(&self) -> Result<&ChatTemplate> {
        self.chat_template.as_ref().ok_or_else(|| {
            ModelError::Chat(crate::chat::ChatError::NoTemplate {
                dir: self.source_dir.clone().unwrap_or_default(),
            })
        })
    }

    /// The tokenizer, or an error saying the directory had none.
    pub fn tokenizer(&self) -> Result<&Tokenizer> {
        self.tokenizer.as_ref().ok_or_else(|| {
            ModelError::Input("the model has no tokenizer (tokenizer.json missing from its directory)".into())
        })
    }

    /// The ids that end generation: `generation_config.json`'s `eos_token_id` (a number or a
    /// list) when present, else `config.json`'s, else the tokenizer's EOS.
    pub fn eos_token_ids(&self) -> Vec<u32> {
        eos_ids_of(self.generation.as_ref())
            .or_else(|| Some(self.cfg().eos_token_id.clone()).filter(|v| !v.is_empty()))
            .or_else(|| self.tokenizer.as_ref().map(|t| vec![t.eos_token_id]))
            .unwrap_or_default()
    }

    /// The pad id a score head pools by ([`crate::heads::pooled_index`]) and batches are
    /// padded with: `pad_token_id` from the config, else the tokenizer's pad token, else the
    /// first EOS (what TRL's trainers set, and what [`Model::save`] writes into
    /// `config.json`).
    pub fn pad_token_id(&self) -> Option<u32> {
        self.cfg()
            .pad_token_id
            .or_else(|| self.tokenizer.as_ref().map(|t| t.pad_token_id))
            .or(self.cfg().first_eos())
    }

    /// Adds a freshly initialised value head if there is none; returns whether it did
    /// (TRL logs a notice then: expected unless resuming PPO training).
    pub fn ensure_value_head(&mut self, seed: u64) -> Result<bool> {
        if self.value_head.is_some() {
            return Ok(false);
        }
        let mut rng = RngStream::new(seed);
        let h = self.cfg().hidden_size;
        let p = self.cfg().summary_dropout_prob;
        self.value_head = Some(ValueHead::random(h, p, &mut rng, self.backbone.device())?);
        Ok(true)
    }

    /// Adds a freshly initialised score head (`num_labels` from the config) if there is none;
    /// returns whether it did.
    pub fn ensure_score_head(&mut self, seed: u64) -> Result<bool> {
        if self.score_head.is_some() {
            return Ok(false);
        }
        let mut rng = RngStream::new(seed);
        let (h, n) = (self.cfg().hidden_size, self.cfg().num_labels);
        self.score_head = Some(ScoreHead::random(h, n, &mut rng, self.backbone.device())?);
        Ok(true)
    }

    /// Sets `num_labels` (the score head's rows), before [`Model::ensure_score_head`].
    pub fn set_num_labels(&mut self, n: usize) {
        self.backbone.cfg.num_labels = n;
    }

    /// Makes every weight, heads included, trainable (full fine-tuning) or frozen.
    pub fn set_trainable(&mut self, trainable: bool) -> Result<()> {
        self.backbone.set_trainable(trainable)?;
        let mut heads: Vec<&mut Param> = Vec::new();
        if let Some(v) = &mut self.value_head {
            heads.push(&mut v.weight);
            heads.push(&mut v.bias);
        }
        if let Some(s) = &mut self.score_head {
            heads.push(&mut s.weight);
        }
        for p in heads {
            if trainable {
                p.make_trainable()?;
            } else {
                p.freeze();
            }
        }
        Ok(())
    }

    /// The backbone's final hidden states over a padded batch, positions from the mask.
    ///
    /// # Shapes
    /// `ids`, `mask`: `(B, T)` → `(B, T, H)`.
    pub fn forward(&self, ids: &Tensor, mask: &Tensor, fwd: &mut Fwd) -> Result<Tensor> {
        self.backbone.forward(ids, mask, None, fwd)
    }

    /// [`Model::forward`] with explicit position ids (`B·T`, row-major), e.g. `arange` over
    /// left-padded rows as TRL's GRPO/RLOO scoring passes none.
    ///
    /// # Shapes
    /// `ids`, `mask`: `(B, T)`, `positions`: `B·T` → `(B, T, H)`.
    pub fn forward_at(&self, ids: &Tensor, mask: &Tensor, positions: &[u32], fwd: &mut Fwd) -> Result<Tensor> {
        self.backbone.forward_at(ids, mask, Some(positions), None, fwd)
    }

    /// [`Model::forward`] with a KV cache: `mask` covers the cached past and `ids`.
    ///
    /// # Shapes
    /// `ids`: `(B, T)`, `mask`: `(B, past + T)` → `(B, T, H)`.
    pub fn forward_cached(&self, ids: &Tensor, mask: &Tensor, cache: &mut KvCache, fwd: &mut Fwd) -> Result<Tensor> {
        self.backbone.forward(ids, mask, Some(cache), fwd)
    }

    /// Hidden states of sequences packed end to end without padding
    /// ([`Transformer::forward_packed`]).
    ///
    /// # Shapes
    /// `seqs`: `B` sequences → `(N, H)`, `N` = total length.
    pub fn forward_packed(&self, seqs: &[&[u32]], fwd: &mut Fwd) -> Result<Tensor> {
        self.backbone.forward_packed(seqs, fwd)
    }

    /// [`Model::forward_packed`] with each sequence's positions counted from its offset
    /// ([`Transformer::forward_packed_from`]).
    ///
    /// # Shapes
    /// `seqs`: `B` sequences, `offsets`: `B` → `(N, H)`, `N` = total length.
    pub fn forward_packed_from(&self, seqs: &[&[u32]], offsets: &[usize], fwd: &mut Fwd) -> Result<Tensor> {
        self.backbone.forward_packed_from(seqs, offsets, fwd)
    }

    /// Whether a forward pass in train mode draws dropout masks (a dropout probability of
    /// the config or of a LoRA adapter above 0).
    pub fn draws_dropout(&self) -> bool {
        self.backbone.draws_dropout()
    }

    /// An empty KV cache for `batch` rows of up to `capacity` positions.
    pub fn new_cache(&self, batch: usize, capacity: usize) -> Result<KvCache> {
        let c = self.cfg();
        KvCache::new(
            c.num_hidden_layers,
            batch,
            c.num_key_value_heads,
            c.head_dim,
            capacity,
            self.dtype(),
            self.device(),
        )
    }

    /// LM-head logits of hidden states, in f32 (f64 for an f64 model).
    ///
    /// # Shapes
    /// `hidden`: `(.., H)` → `(.., V)`.
    pub fn lm_logits(&self, hidden: &Tensor, grad: bool) -> Result<Tensor> {
        self.backbone.lm_logits(hidden, grad)
    }

    /// The LM head's weight `(V, H)` (the embedding when tied), for the fused log-prob
    /// kernels that never materialise the logits.
    pub fn lm_head_weight(&self, grad: bool) -> Result<&Tensor> {
        self.backbone.lm_head_weight(grad)
    }

    /// Backbone forward then LM logits (f32).
    ///
    /// # Shapes
    /// `ids`, `mask`: `(B, T)` → `(B, T, V)`.
    pub fn logits(&self, ids: &Tensor, mask: &Tensor, fwd: &mut Fwd) -> Result<Tensor> {
        let hidden = self.forward(ids, mask, fwd)?;
        self.lm_logits(&hidden, fwd.grad)
    }

    /// Value-head outputs per position (f32).
    ///
    /// # Shapes
    /// `hidden`: `(B, T, H)` → `(B, T)`.
    pub fn values(&self, hidden: &Tensor, fwd: &mut Fwd) -> Result<Tensor> {
        let head = self.value_head.as_ref().ok_or_else(|| {
            ModelError::Input("the model has no value head; hint: Model::ensure_value_head adds one".into())
        })?;
        head.forward(hidden, fwd)
    }

    /// Generates continuations of `prompts` ([`crate::generate::generate`]).
    pub fn generate(&self, prompts: &[Vec<u32>], cfg: &GenerationConfig, rng: &mut RngStream) -> Result<Generation> {
        crate::generate::generate(&self.backbone, prompts, cfg, rng)
    }

    /// `g` completions of every prompt, one random stream per completion
    /// ([`crate::generate::generate_groups`]).
    pub fn generate_groups(
        &self,
        prompts: &[Vec<u32>],
        g: usize,
        cfg: &GenerationConfig,
        rngs: &mut [RngStream],
    ) -> Result<Generation> {
        crate::generate::generate_groups(&self.backbone, prompts, g, cfg, rngs)
    }

    /// Backbone forward then the score head at each row's rightmost token that is not
    /// padding (transformers 5.x's pooling; see [`crate::heads::pooled_index`]). Pad the
    /// batch with [`Model::pad_token_id`].
    ///
    /// # Shapes
    /// `ids`, `mask`: `(B, T)` → `(B, num_labels)`.
    pub fn scores(&self, ids: &Tensor, mask: &Tensor, fwd: &mut Fwd) -> Result<Tensor> {
        let head = self.score_head()?;
        let hidden = self.forward(ids, mask, fwd)?;
        head.forward_with(&hidden, ids, self.pad_token_id(), fwd.grad, fwd.adapters)
    }

    fn score_head(&self) -> Result<&ScoreHead> {
        self.score_head.as_ref().ok_or_else(|| {
            ModelError::Input(
                "the model has no score head (`score.weight`)\n\
                 hint: pass a reward model (a *ForSequenceClassification checkpoint, e.g. the output of `rlhf reward`)"
                    .into(),
            )
        })
    }

    /// [`Model::scores`] of unpadded sequences, run packed ([`Model::forward_packed`]): the
    /// same scores as the padded batch (each sequence is read at its rightmost token that is
    /// not padding), with the position-wise work done on real tokens only.
    ///
    /// # Shapes
    /// `seqs`: `B` sequences → `(B, num_labels)`, f32.
    pub fn scores_packed(&self, seqs: &[&[u32]], fwd: &mut Fwd) -> Result<Tensor> {
        let head = self.score_head()?;
        let hidden = self.forward_packed(seqs, fwd)?;
        let pad = self.pad_token_id();
        let mut start = 0usize;
        let mut rows = Vec::with_capacity(seqs.len());
        for s in seqs {
            rows.push((start + crate::heads::pooled_index(s, pad)) as u32);
            start += s.len();
        }
        let rows = Tensor::from_vec(rows, seqs.len(), hidden.device())?;
        head.forward_rows(&hidden.index_select(&rows, 0)?, fwd.grad, fwd.adapters)
    }

    /// Every weight under its checkpoint name (the family's backbone prefix —
    /// `transformer.` or `model.` — for the backbone, as transformers writes its causal-LM
    /// and sequence-classification classes), projections in the `(out, in)` layout used
    /// inside.
    pub fn named_params(&self) -> Vec<(String, &Param)> {
        let prefix = self.family().names().prefix;
        let mut out: Vec<(String, &Param)> = self
            .backbone
            .named_params()
            .into_iter()
            .map(|(n, p)| {
                if n == "lm_head.weight" {
                    (n, p)
                } else {
                    (format!("{prefix}.{n}"), p)
                }
            })
            .collect();
        if let Some(v) = &self.value_head {
            out.push(("v_head.summary.weight".into(), &v.weight));
            out.push(("v_head.summary.bias".into(), &v.bias));
        }
        if let Some(s) = &self.score_head {
            out.push(("score.weight".into(), &s.weight));
        }
        out
    }

    /// The transformers class that loads what [`Model::save`] writes.
    pub fn architecture(&self) -> &'static str {
        if self.score_head.is_some() {
            self.family().seq_cls_class()
        } else {
            self.family().causal_lm_class()
        }
    }

    /// Replaces the tokenizer (and forgets side files that belonged to the old one).
    pub fn set_tokenizer(&mut self, tokenizer: Tokenizer) {
        self.tokenizer = Some(tokenizer);
        self.side_files.clear();
    }
}
