//! The `config.json` keys of the Llama family: `LlamaConfig`, `Qwen2Config`, `Qwen3Config`
//! and `MistralConfig` (class defaults where a key is absent; see
//! `fixtures/families/README.md` and the transformers configuration classes).

use serde_json::{Map, Value};

use super::{Fields, MlpKind, ModelConfig, NormKind};
use crate::error::Result;
use crate::family::Family;

/// Class defaults that differ between the families.
struct Defaults {
    vocab_size: usize,
    /// `num_key_value_heads` when the key is absent (`null` always means "= heads").
    kv_heads_absent: Option<usize>,
    /// `head_dim` when absent (`None`: `hidden / heads`).
    head_dim: Option<usize>,
    max_position_embeddings: usize,
}

fn defaults(family: Family) -> Defaults {
    match family {
        Family::Qwen2 => Defaults {
            vocab_size: 151_936,
            kv_heads_absent: Some(32),
            head_dim: None,
            max_position_embeddings: 32_768,
        },
        Family::Qwen3 => Defaults {
            vocab_size: 151_936,
            kv_heads_absent: Some(32),
            head_dim: Some(128),
            max_position_embeddings: 32_768,
        },
        Family::Mistral => Defaults {
            vocab_size: 32_000,
            kv_heads_absent: Some(8),
            head_dim: None,
            max_position_embeddings: 4096 * 32,
        },
        _ => Defaults {
            vocab_size: 32_000,
            kv_heads_absent: None,
            head_dim: None,
            max_position_embeddings: 2048,
        },
    }
}

pub(super) fn parse(f: &Fields, family: Family) -> Result<ModelConfig> {
    let d = defaults(family);
    let hidden = f.usize("hidden_size", None)?;
    let heads = f.usize("num_attention_heads", None)?;
    let layers = f.usize("num_hidden_layers", None)?;
    if heads == 0 {
        return Err(f.err("num_attention_heads", "must be positive".into()));
    }
    let kv = match f.raw.get("num_key_value_heads") {
        None => d.kv_heads_absent.unwrap_or(heads),
        Some(Value::Null) => heads,
        Some(_) => f.usize("num_key_value_heads", None)?,
    };
    let head_dim = match f.opt_usize("head_dim")? {
        Some(hd) => hd,
        None if f.raw.contains_key("head_dim") => hidden / heads,
        None => d.head_dim.unwrap_or(hidden / heads),
    };
    let attention_bias = f.bool("attention_bias", false)?;
    let (qkv_bias, o_bias) = match family {
        // Qwen2's q/k/v carry biases whatever the config says; its o_proj never does.
        Family::Qwen2 => (true, false),
        Family::Mistral => (false, false),
        _ => (attention_bias, attention_bias),
    };
    let max_pos = f.usize("max_position_embeddings", Some(d.max_position_embeddings))?;
    let (sliding_window, sliding_layers) = sliding(f, family, layers)?;
    let eps_default = 1e-6;
    Ok(ModelConfig {
        family,
        vocab_size: f.usize("vocab_size", Some(d.vocab_size))?,
        hidden_size: hidden,
        intermediate_size: f.usize("intermediate_size", None)?,
        num_hidden_layers: layers,
        num_attention_heads: heads,
        num_key_value_heads: kv,
        head_dim,
        max_position_embeddings: max_pos,
        hidden_act: f.activation("hidden_act", "silu")?,
        norm: NormKind::RmsNorm,
        norm_eps: f.f64("rms_norm_eps", eps_default)?,
        mlp: MlpKind::Gated,
        rope: Some(super::rope::parse(f, head_dim, max_pos)?),
        fused_qkv: false,
        qkv_bias,
        o_bias,
        mlp_bias: family == Family::Llama && f.bool("mlp_bias", false)?,
        qk_norm: family == Family::Qwen3,
        sliding_window,
        sliding_layers,
        scale_attn_weights: true,
        scale_attn_by_inverse_layer_idx: false,
        reorder_and_upcast_attn: false,
        tie_word_embeddings: f.bool("tie_word_embeddings", false)?,
        attn_pdrop: f.prob("attention_dropout", 0.0)?,
        embd_pdrop: 0.0,
        resid_pdrop: 0.0,
        summary_dropout_prob: f.prob("summary_dropout_prob", 0.1)?,
        eos_token_id: f.ids("eos_token_id")?,
        bos_token_id: f.opt_usize("bos_token_id")?.map(|v| v as u32),
        pad_token_id: f.opt_usize("pad_token_id")?.map(|v| v as u32),
        num_labels: f.num_labels()?,
        raw: f.raw.clone(),
    })
}

/// The sliding window and which layers use it: Mistral on every layer when
/// `sliding_window` is set; Qwen2/Qwen3 only with `use_sliding_window`, on the layers
/// `layer_types` marks `sliding_attention` (by default those from `max_window_layers` on);
/// Llama never.
fn sliding(f: &Fields, family: Family, layers: usize) -> Result<(Option<usize>, Vec<bool>)> {
    let none = || (None, vec![false; layers.min(1 << 16)]);
    let window = f.opt_usize("sliding_window")?;
    match family {
        Family::Mistral => Ok(match window {
            Some(w) => (Some(w), vec![true; layers.min(1 << 16)]),
            None => none(),
        }),
        Family::Qwen2 | Family::Qwen3 => {
            let window = if f.bool("use_sliding_window", false)? {
                window
            } else {
                None
            };
            let Some(w) = window else { return Ok(none()) };
            if let Some(types) = f.get("layer_types") {
                let types = types
                    .as_array()
                    .ok_or_else(|| f.err("layer_types", format!("expected a list, found {types}")))?;
                if types.len() != layers {
                    return Err(f.err(
                        "layer_types",
                        format!("has {} entries for {layers} layers", types.len()),
                    ));
                }
                let flags = types
                    .iter()
                    .map(|t| match t.as_str() {
                        Some("sliding_attention") => Ok(true),
                        Some("full_attention") => Ok(false),
                        _ => Err(f.err(
                            "layer_types",
                            format!("unknown layer type {t}; expected \"full_attention\" or \"sliding_attention\""),
                        )),
                    })
                    .collect::<Result<Vec<_>>>()?;
                return Ok((Some(w), flags));
            }
            let from = f.usize("max_window_layers", Some(28))?;
            Ok((Some(w), (0..layers.min(1 << 16)).map(|i| i >= from).collect()))
        }
        _ => Ok(none()),
    }
}

pub(super) fn write(c: &ModelConfig, m: &mut Map<String, Value>) {
    let mut set = |k: &str, v: Value| {
        m.insert(k.to_string(), v);
    };
    set("vocab_size", c.vocab_size.into());
    set("hidden_size", c.hidden_size.into());
    set("intermediate_size", c.intermediate_size.into());
    set("num_hidden_layers", c.num_hidden_layers.into());
    set("num_attention_heads", c.num_attention_heads.into());
    set("num_key_value_heads", c.num_key_value_heads.into());
    set("head_dim", c.head_dim.into());
    set("max_position_embeddings", c.max_position_embeddings.into());
    set("rms_norm_eps", c.norm_eps.into());
    set("attention_dropout", c.attn_pdrop.into());
}
