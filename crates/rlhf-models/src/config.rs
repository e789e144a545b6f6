//! `config.json` of a Hugging Face GPT-2 checkpoint: every field that changes the math,
//! validated with the field name in each error. Unknown fields are kept and written back.

use std::path::{Path, PathBuf};

use rlhf_ops::nn::Activation;
use serde_json::{Map, Value};

use crate::error::{io_err, ModelError, Result};

/// GPT-2 hyper-parameters (`transformers.GPT2Config`).
#[derive(Clone, Debug)]
pub struct Gpt2Config {
    /// Transformer blocks.
    pub n_layer: usize,
    /// Attention heads.
    pub n_head: usize,
    /// Hidden size `H`.
    pub n_embd: usize,
    /// MLP inner size (`n_inner`, default `4 H`).
    pub n_inner: usize,
    /// Maximum sequence length (position embeddings).
    pub n_positions: usize,
    /// Vocabulary size `V`.
    pub vocab_size: usize,
    /// MLP activation.
    pub activation: Activation,
    /// Layer-norm epsilon.
    pub layer_norm_epsilon: f64,
    /// Divide attention scores by `sqrt(head_dim)`.
    pub scale_attn_weights: bool,
    /// Also divide attention scores by `layer_idx + 1`.
    pub scale_attn_by_inverse_layer_idx: bool,
    /// Compute attention scores in f32 with the scale applied first (matters below f32).
    pub reorder_and_upcast_attn: bool,
    /// The LM head shares the token embedding.
    pub tie_word_embeddings: bool,
    /// Dropout on attention probabilities.
    pub attn_pdrop: f64,
    /// Dropout on embeddings.
    pub embd_pdrop: f64,
    /// Dropout on residual branches.
    pub resid_pdrop: f64,
    /// Value-head dropout (`summary_dropout_prob`, TRL's default 0.1 when absent).
    pub summary_dropout_prob: f64,
    /// End-of-sequence token.
    pub eos_token_id: Option<u32>,
    /// Beginning-of-sequence token.
    pub bos_token_id: Option<u32>,
    /// Padding token.
    pub pad_token_id: Option<u32>,
    /// Outputs of a sequence-classification head.
    pub num_labels: usize,
    /// The whole JSON object as read (unknown fields are preserved on save).
    pub raw: Map<String, Value>,
}

impl Gpt2Config {
    /// Size of one attention head.
    pub fn head_dim(&self) -> usize {
        self.n_embd / self.n_head
    }

    /// A config for a model built from scratch (for tests and benchmarks).
    pub fn new(n_layer: usize, n_head: usize, n_embd: usize, n_positions: usize, vocab_size: usize) -> Self {
        let mut raw = Map::new();
        raw.insert("model_type".into(), "gpt2".into());
        Self {
            n_layer,
            n_head,
            n_embd,
            n_inner: 4 * n_embd,
            n_positions,
            vocab_size,
            activation: Activation::GeluTanh,
            layer_norm_epsilon: 1e-5,
            scale_attn_weights: true,
            scale_attn_by_inverse_layer_idx: false,
            reorder_and_upcast_attn: false,
            tie_word_embeddings: true,
            attn_pdrop: 0.1,
            embd_pdrop: 0.1,
            resid_pdrop: 0.1,
            summary_dropout_prob: 0.1,
            eos_token_id: Some(50256),
            bos_token_id: Some(50256),
            pad_token_id: None,
            num_labels: 1,
            raw,
        }
    }

    /// The tiny GPT-2 shape (2 layers, 4 heads, 128 hidden, 256 positions, GPT-2 vocabulary).
    pub fn tiny() -> Self {
        Self::new(2, 4, 128, 256, 50257)
    }

    /// The GPT-2-small shape (12 layers, 12 heads, 768 hidden, 1024 positions).
    pub fn small() -> Self {
        Self::new(12, 12, 768, 1024, 50257)
    }

    /// Sets every dropout probability to zero (TRL's `disable_dropout`).
    pub fn disable_dropout(&mut self) {
        self.attn_pdrop = 0.0;
        self.embd_pdrop = 0.0;
        self.resid_pdrop = 0.0;
        self.summary_dropout_prob = 0.0;
    }

    /// Reads and validates `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(io_err(path))?;
        let value: Value = serde_json::from_str(&text).map_err(|source| ModelError::Json {
            path: path.to_path_buf(),
            source,
        })?;
        let Value::Object(raw) = value else {
            return Err(ModelError::Config {
                path: path.to_path_buf(),
                field: "<root>".into(),
                msg: "expected a JSON object".into(),
            });
        };
        Self::from_map(raw, path)
    }

    /// Validates a parsed `config.json` object (`path` is only used in messages).
    pub fn from_map(raw: Map<String, Value>, path: &Path) -> Result<Self> {
        let f = Fields { raw: &raw, path };
        if let Some(mt) = raw.get("model_type").and_then(Value::as_str) {
            if mt != "gpt2" {
                return Err(f.err("model_type", format!("\"{mt}\" is not supported; expected \"gpt2\"")));
            }
        }
        let n_layer = f.usize("n_layer", None)?;
        let n_head = f.usize("n_head", None)?;
        let n_embd = f.usize("n_embd", None)?;
        if n_head == 0 || n_embd % n_head != 0 {
            return Err(f.err(
                "n_head",
                format!("n_embd ({n_embd}) must be a positive multiple of n_head ({n_head})"),
            ));
        }
        let n_inner = f.opt_usize("n_inner")?.unwrap_or(4 * n_embd);
        let act_name = f.string("activation_function", "gelu_new")?;
        let activation = Activation::from_hf_name(&act_name).ok_or_else(|| {
            f.err(
                "activation_function",
                format!(
                    "unknown activation \"{act_name}\"; expected one of {}",
                    Activation::HF_NAMES.join(", ")
                ),
            )
        })?;
        let cfg = Self {
            n_layer,
            n_head,
            n_embd,
            n_inner,
            n_positions: f.usize("n_positions", Some(1024))?,
            vocab_size: f.usize("vocab_size", Some(50257))?,
            activation,
            layer_norm_epsilon: f.f64("layer_norm_epsilon", 1e-5)?,
            scale_attn_weights: f.bool("scale_attn_weights", true)?,
            scale_attn_by_inverse_layer_idx: f.bool("scale_attn_by_inverse_layer_idx", false)?,
            reorder_and_upcast_attn: f.bool("reorder_and_upcast_attn", false)?,
            tie_word_embeddings: f.bool("tie_word_embeddings", true)?,
            attn_pdrop: f.prob("attn_pdrop", 0.1)?,
            embd_pdrop: f.prob("embd_pdrop", 0.1)?,
            resid_pdrop: f.prob("resid_pdrop", 0.1)?,
            summary_dropout_prob: f.prob("summary_dropout_prob", 0.1)?,
            eos_token_id: f.opt_usize("eos_token_id")?.map(|v| v as u32),
            bos_token_id: f.opt_usize("bos_token_id")?.map(|v| v as u32),
            pad_token_id: f.opt_usize("pad_token_id")?.map(|v| v as u32),
            num_labels: match f.opt_usize("num_labels")? {
                Some(n) => n,
                None => raw
                    .get("id2label")
                    .and_then(Value::as_object)
                    .map_or(1, |m| m.len().max(1)),
            },
            raw: raw.clone(),
        };
        for (field, v) in [
            ("n_layer", n_layer),
            ("n_embd", n_embd),
            ("n_positions", cfg.n_positions),
            ("vocab_size", cfg.vocab_size),
        ] {
            if v == 0 {
                return Err(f.err(field, "must be positive".into()));
            }
        }
        Ok(cfg)
    }

    /// The JSON written to `config.json`: the fields read (updated) plus any unknown fields.
    /// `architectures` names the transformers class that loads the directory.
    pub fn to_json(&self, architecture: &str) -> Value {
        let mut m = self.raw.clone();
        let set = |m: &mut Map<String, Value>, k: &str, v: Value| {
            m.insert(k.to_string(), v);
        };
        set(&mut m, "model_type", "gpt2".into());
        set(&mut m, "architectures", Value::Array(vec![architecture.into()]));
        set(&mut m, "n_layer", self.n_layer.into());
        set(&mut m, "n_head", self.n_head.into());
        set(&mut m, "n_embd", self.n_embd.into());
        set(
            &mut m,
            "n_inner",
            if self.n_inner == 4 * self.n_embd {
                Value::Null
            } else {
                self.n_inner.into()
            },
        );
        set(&mut m, "n_positions", self.n_positions.into());
        set(&mut m, "vocab_size", self.vocab_size.into());
        let act = match self.activation {
            Activation::GeluTanh => "gelu_new",
            Activation::GeluErf => "gelu",
            Activation::Relu => "relu",
            Activation::Silu => "silu",
        };
        set(&mut m, "activation_function", act.into());
        set(&mut m, "layer_norm_epsilon", self.layer_norm_epsilon.into());
        set(&mut m, "scale_attn_weights", self.scale_attn_weights.into());
        set(
            &mut m,
            "scale_attn_by_inverse_layer_idx",
            self.scale_attn_by_inverse_layer_idx.into(),
        );
        set(&mut m, "reorder_and_upcast_attn", self.reorder_and_upcast_attn.into());
        set(&mut m, "tie_word_embeddings", self.tie_word_embeddings.into());
        set(&mut m, "attn_pdrop", self.attn_pdrop.into());
        set(&mut m, "embd_pdrop", self.embd_pdrop.into());
        set(&mut m, "resid_pdrop", self.resid_pdrop.into());
        let opt = |v: Option<u32>| v.map_or(Value::Null, Value::from);
        set(&mut m, "eos_token_id", opt(self.eos_token_id));
        set(&mut m, "bos_token_id", opt(self.bos_token_id));
        if self.pad_token_id.is_some() {
            set(&mut m, "pad_token_id", opt(self.pad_token_id));
        }
        if architecture.ends_with("ForSequenceClassification") {
            set(&mut m, "num_labels", self.num_labels.into());
            let id2label: Map<String, Value> = (0..self.num_labels)
                .map(|i| (i.to_string(), format!("LABEL_{i}").into()))
                .collect();
            let label2id: Map<String, Value> = (0..self.num_labels).map(|i| (format!("LABEL_{i}"), i.into())).collect();
            set(&mut m, "id2label", Value::Object(id2label));
            set(&mut m, "label2id", Value::Object(label2id));
        }
        m.remove("torch_dtype");
        set(&mut m, "torch_dtype", "float32".into());
        Value::Object(m)
    }
}

struct Fields<'a> {
    raw: &'a Map<String, Value>,
    path: &'a Path,
}

impl Fields<'_> {
    fn err(&self, field: &str, msg: String) -> ModelError {
        ModelError::Config {
            path: PathBuf::from(self.path),
            field: field.into(),
            msg,
        }
    }

    fn get(&self, field: &str) -> Option<&Value> {
        self.raw.get(field).filter(|v| !v.is_null())
    }

    fn opt_usize(&self, field: &str) -> Result<Option<usize>> {
        match self.get(field) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .map(|n| Some(n as usize))
                .ok_or_else(|| self.err(field, format!("expected a non-negative integer, found {v}"))),
        }
    }

    fn usize(&self, field: &str, default: Option<usize>) -> Result<usize> {
        match (self.opt_usize(field)?, default) {
            (Some(v), _) => Ok(v),
            (None, Some(d)) => Ok(d),
            (None, None) => Err(self.err(field, "is required but missing".into())),
        }
    }

    fn f64(&self, field: &str, default: f64) -> Result<f64> {
        match self.get(field) {
            None => Ok(default),
            Some(v) => v
                .as_f64()
                .ok_or_else(|| self.err(field, format!("expected a number, found {v}"))),
        }
    }

    fn prob(&self, field: &str, default: f64) -> Result<f64> {
        let p = self.f64(field, default)?;
        if (0.0..1.0).contains(&p) {
            Ok(p)
        } else {
            Err(self.err(field, format!("expected a probability in [0, 1), found {p}")))
        }
    }

    fn bool(&self, field: &str, default: bool) -> Result<bool> {
        match self.get(field) {
            None => Ok(default),
            Some(v) => v
                .as_bool()
                .ok_or_else(|| self.err(field, format!("expected true or false, found {v}"))),
        }
    }

    fn string(&self, field: &str, default: &str) -> Result<String> {
        match self.get(field) {
            None => Ok(default.to_string()),
            Some(v) => v
                .as_str()
                .map(str::to_string)
                .ok_or_else(|| self.err(field, format!("expected a string, found {v}"))),
        }
    }
}
