//! [`Model::load`] and [`Model::save`]: a checkpoint directory in the Hugging Face layout.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor};
use rlhf_peft::Param;

use super::{LoadOptions, Model};
use crate::chat::ChatTemplate;
use crate::config::ModelConfig;
use crate::error::{io_err, ModelError, Result};
use crate::family::Family;
use crate::heads::{ScoreHead, ValueHead};
use crate::tokenizer::Tokenizer;
use crate::transformer::Transformer;
use crate::weights::{save_safetensors, write_atomic, Weights};

/// Files of the tokenizer copied verbatim from the source directory on save.
const TOKENIZER_SIDE_FILES: &[&str] = &[
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
];

impl Model {
    /// Loads a Hugging Face directory of any supported family: `config.json`,
    /// `model.safetensors` (or a sharded index), `generation_config.json` and
    /// `tokenizer.json` when present; `v_head.summary.*` and `score.weight` when present.
    /// All weights start frozen.
    ///
    /// `dir` may also be a Hugging Face Hub id (`Qwen/Qwen2.5-0.5B`), looked up in the Hub
    /// cache at `opts.revision` and downloaded when online ([`crate::hub::resolve_model`]).
    pub fn load(dir: &Path, opts: &LoadOptions) -> Result<Self> {
        let resolved = resolve_dir(dir, opts.revision.as_deref())?;
        let dir = resolved.as_path();
        let cfg = ModelConfig::from_file(&dir.join("config.json"))?;
        let mut w = Weights::from_dir(dir, opts.dtype, &opts.device)?;
        w.strip_prefix(&format!("{}.", cfg.family.names().prefix));
        w.drop_matching(|n| n.ends_with("rotary_emb.inv_freq"));
        let h = cfg.hidden_size;
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
                        "{}: `score.bias` is not supported: {}'s score has no bias",
                        w.source.display(),
                        cfg.family.seq_cls_class()
                    )));
                }
                Some(ScoreHead {
                    weight: Param::frozen(weight),
                })
            }
        };
        // A sequence-classification checkpoint of an untied family has no LM head.
        let lm_head = score_head.is_none() || w.contains("lm_head.weight");
        let backbone = Transformer::from_weights(cfg, &mut w, lm_head)?;
        let generation = read_optional_json(&dir.join("generation_config.json"))?;
        let tok_path = dir.join("tokenizer.json");
        let tokenizer = if tok_path.is_file() {
            let cfg = &backbone.cfg;
            let stop_ids = eos_ids_of(generation.as_ref()).unwrap_or_else(|| cfg.eos_token_id.clone());
            let tok = Tokenizer::from_dir(dir, &stop_ids, cfg.pad_token_id)?;
            if tok.vocab_size() > cfg.vocab_size {
                return Err(ModelError::Config {
                    path: dir.join("config.json"),
                    field: "vocab_size".into(),
                    msg: format!(
                        "{} is smaller than the tokenizer's vocabulary ({} tokens in {})\n\
                         hint: the tokenizer does not belong to this model; resize the embeddings or use the model's own tokenizer",
                        cfg.vocab_size,
                        tok.vocab_size(),
                        tok_path.display()
                    ),
                });
            }
            Some(tok)
        } else {
            None
        };
        let chat_template = ChatTemplate::load(dir)?;
        let mut side_files = Vec::new();
        for name in TOKENIZER_SIDE_FILES {
            let p = dir.join(name);
            if p.is_file() {
                side_files.push((name.to_string(), std::fs::read(&p).map_err(io_err(&p))?));
            }
        }
        Ok(Self {
            backbone,
            value_head,
            score_head,
            tokenizer,
            chat_template,
            lora: None,
            quantization: None,
            generation,
            source_dir: Some(dir.to_path_buf()),
            side_files,
        })
    }

    /// Writes a Hugging Face directory transformers loads: `config.json`, `model.safetensors`
    /// (the file layout of the family — GPT-2's `Conv1D` weights transposed back — with
    /// `v_head.summary.*` beside the weights as TRL saves them; a sequence-classification
    /// model has no `lm_head.weight`), `generation_config.json` and the tokenizer files.
    /// Each file is written to a temporary name and renamed.
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
        let prefix = format!("{}.", self.family().names().prefix);
        let mut tensors: BTreeMap<String, Tensor> = BTreeMap::new();
        for (name, p) in self.named_params() {
            if name == "lm_head.weight" && self.score_head.is_some() {
                continue;
            }
            let relative = name.strip_prefix(&prefix).unwrap_or(&name);
            let t = match self.backbone.stored_transposed(relative) {
                true => p.value().t()?.contiguous()?,
                false => p.value().clone(),
            };
            tensors.insert(name, t);
        }
        save_safetensors(&tensors, &dir.join("model.safetensors"))?;
        let mut cfg = self.backbone.cfg.clone();
        // The pad id the score was pooled by, so that transformers pools the same token.
        cfg.pad_token_id = self.pad_token_id();
        write_json(&dir.join("config.json"), &cfg.to_json(self.architecture()))?;
        let mut gen = self.generation.clone().unwrap_or_else(|| serde_json::json!({}));
        if let Some(g) = gen.as_object_mut() {
            g.insert("bos_token_id".into(), cfg.bos_token_id.into());
            if !g.contains_key("eos_token_id") {
                g.insert(
                    "eos_token_id".into(),
                    cfg.to_json(self.architecture())["eos_token_id"].clone(),
                );
            }
            if cfg.pad_token_id.is_some() && !g.contains_key("pad_token_id") {
                g.insert("pad_token_id".into(), cfg.pad_token_id.into());
            }
        }
        write_json(&dir.join("generation_config.json"), &gen)?;
        if let Some(tok) = &self.tokenizer {
            write_atomic(&dir.join("tokenizer.json"), tok.json().as_bytes())?;
            let mut have: Vec<&str> = Vec::new();
            for (name, bytes) in &self.side_files {
                write_atomic(&dir.join(name), bytes)?;
                have.push(name);
            }
            if !have.contains(&"tokenizer_config.json") && self.family() == Family::Gpt2 {
                let eos = tok.id_to_token(tok.eos_token_id).unwrap_or_default();
                let tc = serde_json::json!({
                    "tokenizer_class": "GPT2Tokenizer",
                    "model_max_length": cfg.max_position_embeddings,
                    "bos_token": eos, "eos_token": eos, "unk_token": eos,
                    "add_prefix_space": false,
                    "clean_up_tokenization_spaces": false,
                });
                write_json(&dir.join("tokenizer_config.json"), &tc)?;
            }
        }
        Ok(())
    }
}

fn read_optional_json(path: &Path) -> Result<Option<serde_json::Value>> {
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).map_err(io_err(path))?;
    let v = serde_json::from_str(&text).map_err(|source| ModelError::Json {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(Some(v))
}

fn write_json(path: &Path, v: &serde_json::Value) -> Result<()> {
    let mut text = serde_json::to_string_pretty(v).map_err(|source| ModelError::Json {
        path: PathBuf::from(path),
        source,
    })?;
    text.push('\n');
    write_atomic(path, text.as_bytes())
}

/// `generation_config.json`'s `eos_token_id` (a number or a list), when it names any.
pub(super) fn eos_ids_of(generation: Option<&serde_json::Value>) -> Option<Vec<u32>> {
    generation
        .and_then(|g| g.get("eos_token_id"))
        .map(|v| match v {
            serde_json::Value::Array(a) => a.iter().filter_map(|x| x.as_u64().map(|x| x as u32)).collect(),
            other => other.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
        })
        .filter(|v: &Vec<u32>| !v.is_empty())
}

/// A model directory for `dir`: itself when it is one, else the Hub id it spells, resolved
/// through the Hub cache ([`crate::hub::resolve_model`]).
fn resolve_dir(dir: &Path, revision: Option<&str>) -> Result<PathBuf> {
    if dir.is_dir() {
        return Ok(dir.to_path_buf());
    }
    match dir.to_str() {
        Some(s) => crate::hub::resolve_model(s, revision),
        None => Err(ModelError::Io {
            path: dir.to_path_buf(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "model directory not found"),
        }),
    }
}
