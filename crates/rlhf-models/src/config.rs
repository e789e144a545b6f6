//! `config.json` of a Hugging Face checkpoint as one family-neutral config: every field that
//! changes the math, under transformers' generic names (`hidden_size`, `num_hidden_layers`,
//! ...), validated with the field name in each error. Each family reads and writes its own
//! keys ([`crate::family`]); unknown fields are kept and written back.

mod gpt2_keys;
mod llama_keys;
mod rope;

use std::path::{Path, PathBuf};

use rlhf_ops::nn::Activation;
use serde_json::{Map, Value};

pub use rlhf_ops::rope::{RopeConfig, RopeScaling};

use crate::error::{io_err, ModelError, Result};
use crate::family::Family;

/// The normalisation of a family.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NormKind {
    /// `LayerNorm` with weight and bias (GPT-2).
    LayerNorm,
    /// `RMSNorm` with a weight only, computed in f32 (Llama family).
    RmsNorm,
}

/// The MLP of a family.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MlpKind {
    /// `out(act(in(x)))` (GPT-2).
    Plain,
    /// `down(act(gate(x)) · up(x))`, SwiGLU with `silu` (Llama family).
    Gated,
}

/// Hyper-parameters of a decoder, family-neutral (transformers' generic names).
#[derive(Clone, Debug)]
pub struct ModelConfig {
    /// The family (names, file layout, defaults).
    pub family: Family,
    /// Vocabulary size `V` (rows of the embedding; may exceed the tokenizer's).
    pub vocab_size: usize,
    /// Hidden size `H`.
    pub hidden_size: usize,
    /// MLP inner size.
    pub intermediate_size: usize,
    /// Transformer blocks.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (grouped-query attention when fewer than the query heads).
    pub num_key_value_heads: usize,
    /// Size of one attention head (Qwen3: not `H / heads`).
    pub head_dim: usize,
    /// Longest sequence (GPT-2: rows of the position embedding; RoPE: the table size and the
    /// dynamic-NTK threshold).
    pub max_position_embeddings: usize,
    /// MLP activation (`activation_function` / `hidden_act`).
    pub hidden_act: Activation,
    /// Layer norm or RMSNorm.
    pub norm: NormKind,
    /// The norms' epsilon (`layer_norm_epsilon` / `rms_norm_eps`).
    pub norm_eps: f64,
    /// Plain or gated MLP.
    pub mlp: MlpKind,
    /// Rotary position embedding; `None`: learned absolute positions (GPT-2).
    pub rope: Option<RopeConfig>,
    /// One fused `[q; k; v]` projection (GPT-2's `c_attn`) instead of three.
    pub fused_qkv: bool,
    /// Biases on q, k and v.
    pub qkv_bias: bool,
    /// Bias on the attention output projection.
    pub o_bias: bool,
    /// Biases on the MLP projections.
    pub mlp_bias: bool,
    /// RMSNorm over each head of q and k before RoPE (Qwen3).
    pub qk_norm: bool,
    /// Sliding-window size of the layers that use one.
    pub sliding_window: Option<usize>,
    /// Per layer: whether it attends through the sliding window.
    pub sliding_layers: Vec<bool>,
    /// Divide attention scores by `sqrt(head_dim)` (always, except GPT-2's
    /// `scale_attn_weights = false`).
    pub scale_attn_weights: bool,
    /// GPT-2: also divide attention scores by `layer_idx + 1`.
    pub scale_attn_by_inverse_layer_idx: bool,
    /// GPT-2: attention scores in f32 with the scale applied first (matters below f32).
    pub reorder_and_upcast_attn: bool,
    /// The LM head shares the token embedding.
    pub tie_word_embeddings: bool,
    /// Dropout on attention probabilities (`attn_pdrop` / `attention_dropout`).
    pub attn_pdrop: f64,
    /// Dropout on embeddings (GPT-2).
    pub embd_pdrop: f64,
    /// Dropout on residual branches (GPT-2).
    pub resid_pdrop: f64,
    /// Value-head dropout (`summary_dropout_prob`, TRL's default 0.1 when absent).
    pub summary_dropout_prob: f64,
    /// End-of-sequence ids (`eos_token_id`, a number or a list).
    pub eos_token_id: Vec<u32>,
    /// Beginning-of-sequence token.
    pub bos_token_id: Option<u32>,
    /// Padding token.
    pub pad_token_id: Option<u32>,
    /// Outputs of a sequence-classification head.
    pub num_labels: usize,
    /// The whole JSON object as read (unknown fields are preserved on save).
    pub raw: Map<String, Value>,
}

impl ModelConfig {
    /// A GPT-2 config for a model built from scratch (tests and benchmarks): GPT-2's
    /// defaults (`gelu_new`, eps 1e-5, dropout 0.1, tied embeddings, EOS 50256).
    pub fn gpt2(n_layer: usize, n_head: usize, n_embd: usize, n_positions: usize, vocab_size: usize) -> Self {
        let mut raw = Map::new();
        raw.insert("model_type".into(), "gpt2".into());
        Self {
            family: Family::Gpt2,
            vocab_size,
            hidden_size: n_embd,
            intermediate_size: 4 * n_embd,
            num_hidden_layers: n_layer,
            num_attention_heads: n_head,
            num_key_value_heads: n_head,
            head_dim: n_embd / n_head.max(1),
            max_position_embeddings: n_positions,
            hidden_act: Activation::GeluTanh,
            norm: NormKind::LayerNorm,
            norm_eps: 1e-5,
            mlp: MlpKind::Plain,
            rope: None,
            fused_qkv: true,
            qkv_bias: true,
            o_bias: true,
            mlp_bias: true,
            qk_norm: false,
            sliding_window: None,
            sliding_layers: vec![false; n_layer],
            scale_attn_weights: true,
            scale_attn_by_inverse_layer_idx: false,
            reorder_and_upcast_attn: false,
            tie_word_embeddings: true,
            attn_pdrop: 0.1,
            embd_pdrop: 0.1,
            resid_pdrop: 0.1,
            summary_dropout_prob: 0.1,
            eos_token_id: vec![50256],
            bos_token_id: Some(50256),
            pad_token_id: None,
            num_labels: 1,
            raw,
        }
    }

    /// The tiny GPT-2 shape (2 layers, 4 heads, 128 hidden, 256 positions, GPT-2 vocabulary).
    pub fn gpt2_tiny() -> Self {
        Self::gpt2(2, 4, 128, 256, 50257)
    }

    /// The GPT-2-small shape (12 layers, 12 heads, 768 hidden, 1024 positions).
    pub fn gpt2_small() -> Self {
        Self::gpt2(12, 12, 768, 1024, 50257)
    }

    /// A Llama-family config for a model built from scratch: `family`'s defaults (RMSNorm,
    /// SwiGLU, RoPE with `rope_theta`, no dropout; Qwen2 q/k/v biases; Qwen3 q/k norms),
    /// `head_dim = hidden / heads`, untied embeddings unless set after. Errors name the
    /// invalid combination (e.g. heads not a multiple of the key/value heads).
    #[allow(clippy::too_many_arguments)]
    pub fn llama_family(
        family: Family,
        hidden_size: usize,
        intermediate_size: usize,
        num_hidden_layers: usize,
        num_attention_heads: usize,
        num_key_value_heads: usize,
        vocab_size: usize,
        rope_theta: f64,
    ) -> Result<Self> {
        let mut raw = Map::new();
        raw.insert("model_type".into(), family.model_type().into());
        raw.insert("rope_theta".into(), rope_theta.into());
        raw.insert("num_attention_heads".into(), num_attention_heads.into());
        raw.insert("hidden_size".into(), hidden_size.into());
        raw.insert("intermediate_size".into(), intermediate_size.into());
        raw.insert("num_hidden_layers".into(), num_hidden_layers.into());
        raw.insert("num_key_value_heads".into(), num_key_value_heads.into());
        raw.insert("vocab_size".into(), vocab_size.into());
        raw.insert("max_position_embeddings".into(), 2048.into());
        raw.insert("tie_word_embeddings".into(), false.into());
        Self::from_map(raw, Path::new("<built in memory>"))
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

    /// Validates a parsed `config.json` object (`path` is only used in messages). The family
    /// comes from `model_type`, else from `architectures`.
    pub fn from_map(raw: Map<String, Value>, path: &Path) -> Result<Self> {
        let f = Fields { raw: &raw, path };
        let family = family_of(&f)?;
        let cfg = match family {
            Family::Gpt2 => gpt2_keys::parse(&f)?,
            _ => llama_keys::parse(&f, family)?,
        };
        cfg.validate(&f)?;
        Ok(cfg)
    }

    fn validate(&self, f: &Fields) -> Result<()> {
        let (h, nh, nkv, hd) = (
            self.hidden_size,
            self.num_attention_heads,
            self.num_key_value_heads,
            self.head_dim,
        );
        for (field, v) in [
            ("num_hidden_layers", self.num_hidden_layers),
            ("hidden_size", h),
            ("num_attention_heads", nh),
            ("num_key_value_heads", nkv),
            ("head_dim", hd),
            ("intermediate_size", self.intermediate_size),
            ("max_position_embeddings", self.max_position_embeddings),
            ("vocab_size", self.vocab_size),
        ] {
            if v == 0 {
                return Err(f.err(&f.key(field, self.family), "must be positive".into()));
            }
        }
        if nh % nkv != 0 {
            return Err(f.err(
                "num_key_value_heads",
                format!("{nh} query heads cannot be shared evenly by {nkv} key/value heads; hint: num_attention_heads must be a multiple of num_key_value_heads"),
            ));
        }
        if self.rope.is_some() && hd % 2 != 0 {
            return Err(f.err("head_dim", format!("RoPE needs an even head_dim, found {hd}")));
        }
        if self.fused_qkv && nh * hd != h {
            return Err(f.err(
                &f.key("num_attention_heads", self.family),
                format!("hidden size ({h}) must be a positive multiple of the heads ({nh})"),
            ));
        }
        Ok(())
    }

    /// The projection widths: queries `num_attention_heads · head_dim`, keys and values
    /// `num_key_value_heads · head_dim` each.
    pub fn qkv_widths(&self) -> (usize, usize) {
        (
            self.num_attention_heads * self.head_dim,
            self.num_key_value_heads * self.head_dim,
        )
    }

    /// The sliding window of layer `layer`, if it has one.
    pub fn layer_window(&self, layer: usize) -> Option<usize> {
        match self.sliding_layers.get(layer) {
            Some(true) => self.sliding_window,
            _ => None,
        }
    }

    /// The checkpoint's name of `max_position_embeddings` (GPT-2: `n_positions`), for
    /// messages.
    pub fn max_positions_key(&self) -> &'static str {
        match self.family {
            Family::Gpt2 => "n_positions",
            _ => "max_position_embeddings",
        }
    }

    /// The first EOS id, if any (the one a tokenizer without its own uses).
    pub fn first_eos(&self) -> Option<u32> {
        self.eos_token_id.first().copied()
    }

    /// The JSON written to `config.json`: the fields read (updated) plus any unknown fields.
    /// `architecture` names the transformers class that loads the directory.
    pub fn to_json(&self, architecture: &str) -> Value {
        let mut m = self.raw.clone();
        match self.family {
            Family::Gpt2 => gpt2_keys::write(self, &mut m),
            _ => llama_keys::write(self, &mut m),
        }
        m.insert("model_type".into(), self.family.model_type().into());
        m.insert("architectures".into(), Value::Array(vec![architecture.into()]));
        let opt = |v: Option<u32>| v.map_or(Value::Null, Value::from);
        m.insert(
            "eos_token_id".into(),
            match self.eos_token_id.as_slice() {
                [] => Value::Null,
                [one] => (*one).into(),
                many => many.iter().map(|&v| Value::from(v)).collect(),
            },
        );
        m.insert("bos_token_id".into(), opt(self.bos_token_id));
        if self.pad_token_id.is_some() || m.contains_key("pad_token_id") {
            m.insert("pad_token_id".into(), opt(self.pad_token_id));
        }
        m.insert("tie_word_embeddings".into(), self.tie_word_embeddings.into());
        if architecture.ends_with("ForSequenceClassification") {
            m.insert("num_labels".into(), self.num_labels.into());
            let id2label: Map<String, Value> = (0..self.num_labels)
                .map(|i| (i.to_string(), format!("LABEL_{i}").into()))
                .collect();
            let label2id: Map<String, Value> = (0..self.num_labels).map(|i| (format!("LABEL_{i}"), i.into())).collect();
            m.insert("id2label".into(), Value::Object(id2label));
            m.insert("label2id".into(), Value::Object(label2id));
        }
        // The weights are written in f32, whatever the checkpoint was stored in; transformers
        // 4.56+ names this `dtype`, older releases `torch_dtype`.
        let key = if m.contains_key("dtype") {
            "dtype"
        } else {
            "torch_dtype"
        };
        m.insert(key.into(), "float32".into());
        Value::Object(m)
    }
}

/// The family named by `model_type`, else by `architectures`.
fn family_of(f: &Fields) -> Result<Family> {
    if let Some(mt) = f.get("model_type") {
        let mt = mt
            .as_str()
            .ok_or_else(|| f.err("model_type", format!("expected a string, found {mt}")))?;
        return Family::from_model_type(mt).ok_or_else(|| {
            let known: Vec<&str> = Family::ALL.iter().map(|f| f.model_type()).collect();
            f.err(
                "model_type",
                format!("\"{mt}\" is not supported; expected one of {}", known.join(", ")),
            )
        });
    }
    let arch = f.get("architectures").and_then(Value::as_array).and_then(|a| a.first());
    match arch.and_then(Value::as_str).and_then(Family::from_architecture) {
        Some(fam) => Ok(fam),
        // Old GPT-2 configs carry neither key.
        None if f.get("n_embd").is_some() => Ok(Family::Gpt2),
        None => Err(f.err(
            "model_type",
            "is missing and `architectures` names no supported class; hint: add \"model_type\": \"llama\" (or gpt2, qwen2, qwen3, mistral)".into(),
        )),
    }
}

/// Typed access to the fields of a `config.json` object, with the field in every error.
pub(crate) struct Fields<'a> {
    pub(crate) raw: &'a Map<String, Value>,
    pub(crate) path: &'a Path,
}

impl Fields<'_> {
    pub(crate) fn err(&self, field: &str, msg: String) -> ModelError {
        ModelError::Config {
            path: PathBuf::from(self.path),
            field: field.into(),
            msg,
        }
    }

    /// The checkpoint's own name of a generic field (GPT-2's `n_embd` for `hidden_size`).
    fn key(&self, generic: &str, family: Family) -> String {
        if family != Family::Gpt2 {
            return generic.into();
        }
        match generic {
            "num_hidden_layers" => "n_layer",
            "hidden_size" => "n_embd",
            "num_attention_heads" | "num_key_value_heads" | "head_dim" => "n_head",
            "intermediate_size" => "n_inner",
            "max_position_embeddings" => "n_positions",
            other => other,
        }
        .into()
    }

    /// The value of `field`, `None` when absent or `null`.
    pub(crate) fn get(&self, field: &str) -> Option<&Value> {
        self.raw.get(field).filter(|v| !v.is_null())
    }

    pub(crate) fn opt_usize(&self, field: &str) -> Result<Option<usize>> {
        match self.get(field) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .map(|n| Some(n as usize))
                .ok_or_else(|| self.err(field, format!("expected a non-negative integer, found {v}"))),
        }
    }

    pub(crate) fn usize(&self, field: &str, default: Option<usize>) -> Result<usize> {
        match (self.opt_usize(field)?, default) {
            (Some(v), _) => Ok(v),
            (None, Some(d)) => Ok(d),
            (None, None) => Err(self.err(field, "is required but missing".into())),
        }
    }

    pub(crate) fn f64(&self, field: &str, default: f64) -> Result<f64> {
        match self.get(field) {
            None => Ok(default),
            Some(v) => v
                .as_f64()
                .ok_or_else(|| self.err(field, format!("expected a number, found {v}"))),
        }
    }

    pub(crate) fn prob(&self, field: &str, default: f64) -> Result<f64> {
        let p = self.f64(field, default)?;
        if (0.0..1.0).contains(&p) {
            Ok(p)
        } else {
            Err(self.err(field, format!("expected a probability in [0, 1), found {p}")))
        }
    }

    pub(crate) fn bool(&self, field: &str, default: bool) -> Result<bool> {
        match self.get(field) {
            None => Ok(default),
            Some(v) => v
                .as_bool()
                .ok_or_else(|| self.err(field, format!("expected true or false, found {v}"))),
        }
    }

    pub(crate) fn string(&self, field: &str, default: &str) -> Result<String> {
        match self.get(field) {
            None => Ok(default.to_string()),
            Some(v) => v
                .as_str()
                .map(str::to_string)
                .ok_or_else(|| self.err(field, format!("expected a string, found {v}"))),
        }
    }

    /// A token id or a list of them (`eos_token_id` may be either).
    pub(crate) fn ids(&self, field: &str) -> Result<Vec<u32>> {
        match self.get(field) {
            None => Ok(Vec::new()),
            Some(Value::Array(a)) => a
                .iter()
                .map(|v| {
                    v.as_u64()
                        .map(|n| n as u32)
                        .ok_or_else(|| self.err(field, format!("expected token ids, found {v}")))
                })
                .collect(),
            Some(v) => v
                .as_u64()
                .map(|n| vec![n as u32])
                .ok_or_else(|| self.err(field, format!("expected a token id or a list of them, found {v}"))),
        }
    }

    /// The activation named by `field`.
    pub(crate) fn activation(&self, field: &str, default: &str) -> Result<Activation> {
        let name = self.string(field, default)?;
        Activation::from_hf_name(&name).ok_or_else(|| {
            self.err(
                field,
                format!(
                    "unknown activation \"{name}\"; expected one of {}",
                    Activation::HF_NAMES.join(", ")
                ),
            )
        })
    }

    /// `num_labels`, else the size of `id2label`, else 1.
    pub(crate) fn num_labels(&self) -> Result<usize> {
        Ok(match self.opt_usize("num_labels")? {
            Some(n) => n,
            None => self
                .raw
                .get("id2label")
                .and_then(Value::as_object)
                .map_or(1, |m| m.len().max(1)),
        })
    }
}
