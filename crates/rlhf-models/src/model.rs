//! A GPT-2 checkpoint directory as one value: backbone, optional heads and tokenizer,
//! loaded from and saved to the Hugging Face layout.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use rlhf_ops::rng::RngStream;
use rlhf_peft::{LoraConfig, Param};

use crate::config::Gpt2Config;
use crate::error::{io_err, ModelError, Result};
use crate::gpt2::{Fwd, Gpt2};
use crate::heads::{ScoreHead, ValueHead};
use crate::lora::QuantConfig;
use crate::tokenizer::Tokenizer;
use crate::weights::{save_safetensors, write_atomic, Weights};

/// Files of the tokenizer copied verbatim from the source directory on save.
const TOKENIZER_SIDE_FILES: &[&str] = &[
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
];

/// How to load a model.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// Weight dtype (F32 by default; BF16 halves memory).
    pub dtype: DType,
    /// Device.
    pub device: Device,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            dtype: DType::F32,
            device: Device::Cpu,
        }
    }
}

/// A GPT-2 with the heads and tokenizer found in its directory.
#[derive(Clone, Debug)]
pub struct Model {
    /// The backbone (and the LM head through the tied embedding).
    pub gpt2: Gpt2,
    /// TRL's value head (`v_head.summary`), when present.
    pub value_head: Option<ValueHead>,
    /// The sequence-classification head (`score`), when present.
    pub score_head: Option<ScoreHead>,
    /// The tokenizer, when the directory has `tokenizer.json`.
    pub tokenizer: Option<Tokenizer>,
    /// The LoRA adapter applied to this model ([`crate::lora::apply_lora`] or
    /// [`crate::lora::load_adapter`]), if any.
    pub lora: Option<LoraConfig>,
    /// The quantization of the frozen projections ([`crate::lora::quantize`]), if any.
    pub quantization: Option<QuantConfig>,
    source_dir: Option<PathBuf>,
    side_files: Vec<(String, Vec<u8>)>,
}

impl Model {
    /// Loads a Hugging Face GPT-2 directory: `config.json`, `model.safetensors` (or a sharded
    /// index), `tokenizer.json` when present; `v_head.summary.*` and `score.weight` when present.
    /// All weights start frozen.
    pub fn load(dir: &Path, opts: &LoadOptions) -> Result<Self> {
        if !dir.is_dir() {
            return Err(ModelError::Io {
                path: dir.to_path_buf(),
                source: std::io::Error::new(std::io::ErrorKind::NotFound, "model directory not found"),
            });
        }
        let cfg = Gpt2Config::from_file(&dir.join("config.json"))?;
        let mut w = Weights::from_dir(dir, opts.dtype, &opts.device)?;
        let h = cfg.n_embd;
        let value_head = match (w.contains("v_head.summary.weight"), w.contains("v_head.summary.bias")) {
            (false, false) => None,
            _ => Some(ValueHead {
                weight: Param::frozen(w.take("v_head.summary.weight", &[1, h])?.to_dtype(DType::F32)?),
                bias: Param::frozen(w.take("v_head.summary.bias", &[1])?.to_dtype(DType::F32)?),
                dropout: cfg.summary_dropout_prob,
            }),
        };
        let score_head = match w.contains("score.weight") {
            false => None,
            true => {
                let weight = w.take("score.weight", &[cfg.num_labels, h])?.to_dtype(DType::F32)?;
                if w.contains("score.bias") {
                    return Err(ModelError::Input(format!(
                        "{}: `score.bias` is not supported: GPT2ForSequenceClassification's score has no bias",
                        w.source.display()
                    )));
                }
                Some(ScoreHead {
                    weight: Param::frozen(weight),
                })
            }
        };
        let gpt2 = Gpt2::from_weights(cfg, &mut w)?;
        let tok_path = dir.join("tokenizer.json");
        let tokenizer = if tok_path.is_file() {
            let tok = Tokenizer::from_file(&tok_path, gpt2.cfg.eos_token_id, gpt2.cfg.pad_token_id)?;
            if tok.vocab_size() > gpt2.cfg.vocab_size {
                return Err(ModelError::Config {
                    path: dir.join("config.json"),
                    field: "vocab_size".into(),
                    msg: format!(
                        "{} is smaller than the tokenizer's vocabulary ({} tokens in {})\n\
                         hint: the tokenizer does not belong to this model; resize the embeddings or use the model's own tokenizer",
                        gpt2.cfg.vocab_size,
                        tok.vocab_size(),
                        tok_path.display()
                    ),
                });
            }
            Some(tok)
        } else {
            None
        };
        let mut side_files = Vec::new();
        for name in TOKENIZER_SIDE_FILES {
            let p = dir.join(name);
            if p.is_file() {
                side_files.push((name.to_string(), std::fs::read(&p).map_err(io_err(&p))?));
            }
        }
        Ok(Self {
            gpt2,
            value_head,
            score_head,
            tokenizer,
            lora: None,
            quantization: None,
            source_dir: Some(dir.to_path_buf()),
            side_files,
        })
    }

    /// A randomly initialised model of shape `cfg` (see [`Gpt2::random`]).
    pub fn random(cfg: Gpt2Config, seed: u64, dtype: DType, device: &Device) -> Result<Self> {
        let mut rng = RngStream::new(seed);
        let gpt2 = Gpt2::random(cfg, &mut rng, dtype, device)?;
        Ok(Self {
            gpt2,
            value_head: None,
            score_head: None,
            tokenizer: None,
            lora: None,
            quantization: None,
            source_dir: None,
            side_files: Vec::new(),
        })
    }

    /// The directory the model was loaded from (`None` for a model built in memory).
    pub fn source_dir(&self) -> Option<&Path> {
        self.source_dir.as_deref()
    }

    /// The config.
    pub fn cfg(&self) -> &Gpt2Config {
        &self.gpt2.cfg
    }

    /// The tokenizer, or an error saying the directory had none.
    pub fn tokenizer(&self) -> Result<&Tokenizer> {
        self.tokenizer.as_ref().ok_or_else(|| {
            ModelError::Input("the model has no tokenizer (tokenizer.json missing from its directory)".into())
        })
    }

    /// Adds a freshly initialised value head if there is none; returns whether it did
    /// (TRL logs a notice then: expected unless resuming PPO training).
    pub fn ensure_value_head(&mut self, seed: u64) -> Result<bool> {
        if self.value_head.is_some() {
            return Ok(false);
        }
        let mut rng = RngStream::new(seed);
        let h = self.cfg().n_embd;
        let p = self.cfg().summary_dropout_prob;
        self.value_head = Some(ValueHead::random(h, p, &mut rng, self.gpt2.device())?);
        Ok(true)
    }

    /// Adds a freshly initialised score head (`num_labels` from the config) if there is none;
    /// returns whether it did.
    pub fn ensure_score_head(&mut self, seed: u64) -> Result<bool> {
        if self.score_head.is_some() {
            return Ok(false);
        }
        let mut rng = RngStream::new(seed);
        let (h, n) = (self.cfg().n_embd, self.cfg().num_labels);
        self.score_head = Some(ScoreHead::random(h, n, &mut rng, self.gpt2.device())?);
        Ok(true)
    }

    /// Makes every weight, heads included, trainable (full fine-tuning) or frozen.
    pub fn set_trainable(&mut self, trainable: bool) -> Result<()> {
        self.gpt2.set_trainable(trainable)?;
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

    /// Backbone forward then LM logits (f32).
    ///
    /// # Shapes
    /// `ids`, `mask`: `(B, T)` → `(B, T, V)`.
    pub fn logits(&self, ids: &Tensor, mask: &Tensor, fwd: &mut Fwd) -> Result<Tensor> {
        let hidden = self.gpt2.forward(ids, mask, None, fwd)?;
        self.gpt2.lm_logits(&hidden, fwd.grad)
    }

    /// The pad id a score head pools by ([`crate::heads::pooled_index`]) and batches are
    /// padded with: `pad_token_id` from the config, else the tokenizer's pad token, else EOS
    /// (what TRL's trainers set, and what [`Model::save`] writes into `config.json`).
    pub fn pad_token_id(&self) -> Option<u32> {
        self.cfg()
            .pad_token_id
            .or_else(|| self.tokenizer.as_ref().map(|t| t.pad_token_id))
            .or(self.cfg().eos_token_id)
    }

    /// Backbone forward then the score head at each row's rightmost token that is not
    /// padding (transformers 5.x's pooling; see [`crate::heads::pooled_index`]). Pad the
    /// batch with [`Model::pad_token_id`].
    ///
    /// # Shapes
    /// `ids`, `mask`: `(B, T)` → `(B, num_labels)`.
    pub fn scores(&self, ids: &Tensor, mask: &Tensor, fwd: &mut Fwd) -> Result<Tensor> {
        let head = self.score_head()?;
        let hidden = self.gpt2.forward(ids, mask, None, fwd)?;
        head.forward_with(&hidden, ids, self.pad_token_id(), fwd.grad, fwd.adapters)
    }

    fn score_head(&self) -> Result<&ScoreHead> {
        self.score_head.as_ref().ok_or_else(|| {
            ModelError::Input(
                "the model has no score head (`score.weight`)\n\
                 hint: pass a reward model (GPT2ForSequenceClassification, e.g. the output of `rlhf reward`)"
                    .into(),
            )
        })
    }

    /// [`Model::scores`] of unpadded sequences, run packed ([`Gpt2::forward_packed`]): the
    /// same scores as the padded batch (each sequence is read at its rightmost token that is
    /// not padding), with the position-wise work done on real tokens only.
    ///
    /// # Shapes
    /// `seqs`: `B` sequences → `(B, num_labels)`, f32.
    pub fn scores_packed(&self, seqs: &[&[u32]], fwd: &mut Fwd) -> Result<Tensor> {
        let head = self.score_head()?;
        let hidden = self.gpt2.forward_packed(seqs, fwd)?;
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

    /// Every weight under its checkpoint name (`transformer.` prefix for the backbone, as
    /// transformers writes `GPT2LMHeadModel` / `GPT2ForSequenceClassification`).
    pub fn named_params(&self) -> Vec<(String, &Param)> {
        let mut out: Vec<(String, &Param)> = self
            .gpt2
            .named_params()
            .into_iter()
            .map(|(n, p)| {
                if n == "lm_head.weight" {
                    (n, p)
                } else {
                    (format!("transformer.{n}"), p)
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
            "GPT2ForSequenceClassification"
        } else {
            "GPT2LMHeadModel"
        }
    }

    /// Writes a Hugging Face directory transformers loads: `config.json`, `model.safetensors`
    /// (with `v_head.summary.*` beside the weights as TRL saves them), `generation_config.json`
    /// and the tokenizer files. Each file is written to a temporary name and renamed.
    ///
    /// A model with a LoRA adapter or quantized projections is refused: save the adapter
    /// ([`crate::lora::save_adapter`]) or merge it first ([`crate::lora::merge_and_unload`]).
    pub fn save(&self, dir: &Path) -> Result<()> {
        if self.lora.is_some() || self.quantization.is_some() {
            return Err(ModelError::Adapter {
                path: dir.to_path_buf(),
                msg: "this model has a LoRA adapter or quantized weights, which a plain checkpoint cannot hold\n\
                      hint: save the adapter with rlhf_models::lora::save_adapter (a PEFT directory), \
                      or merge it first with rlhf_models::lora::merge_and_unload"
                    .into(),
            });
        }
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        let tensors: BTreeMap<String, Tensor> = self
            .named_params()
            .into_iter()
            .map(|(n, p)| (n, p.value().clone()))
            .collect();
        save_safetensors(&tensors, &dir.join("model.safetensors"))?;
        let mut cfg = self.gpt2.cfg.clone();
        // The pad id the score was pooled by, so that transformers pools the same token.
        cfg.pad_token_id = self.pad_token_id();
        write_json(&dir.join("config.json"), &cfg.to_json(self.architecture()))?;
        let gen = serde_json::json!({
            "bos_token_id": cfg.bos_token_id,
            "eos_token_id": cfg.eos_token_id,
        });
        write_json(&dir.join("generation_config.json"), &gen)?;
        if let Some(tok) = &self.tokenizer {
            write_atomic(&dir.join("tokenizer.json"), tok.json().as_bytes())?;
            let mut have: Vec<&str> = Vec::new();
            for (name, bytes) in &self.side_files {
                write_atomic(&dir.join(name), bytes)?;
                have.push(name);
            }
            if !have.contains(&"tokenizer_config.json") {
                let eos = tok.id_to_token(tok.eos_token_id).unwrap_or_default();
                let tc = serde_json::json!({
                    "tokenizer_class": "GPT2Tokenizer",
                    "model_max_length": cfg.n_positions,
                    "bos_token": eos, "eos_token": eos, "unk_token": eos,
                    "add_prefix_space": false,
                    "clean_up_tokenization_spaces": false,
                });
                write_json(&dir.join("tokenizer_config.json"), &tc)?;
            }
        }
        Ok(())
    }

    /// Replaces the tokenizer (and forgets side files that belonged to the old one).
    pub fn set_tokenizer(&mut self, tokenizer: Tokenizer) {
        self.tokenizer = Some(tokenizer);
        self.side_files.clear();
    }
}

fn write_json(path: &Path, v: &serde_json::Value) -> Result<()> {
    let mut text = serde_json::to_string_pretty(v).map_err(|source| ModelError::Json {
        path: PathBuf::from(path),
        source,
    })?;
    text.push('\n');
    write_atomic(path, text.as_bytes())
}
