//! GPT-2's `config.json` keys (`transformers.GPT2Config`).

use rlhf_ops::nn::Activation;
use serde_json::{Map, Value};

use super::{Fields, MlpKind, ModelConfig, NormKind};
use crate::error::Result;
use crate::family::Family;

pub(super) fn parse(f: &Fields) -> Result<ModelConfig> {
    let n_layer = f.usize("n_layer", None)?;
    let n_head = f.usize("n_head", None)?;
    let n_embd = f.usize("n_embd", None)?;
    if n_head == 0 || n_embd % n_head != 0 {
        return Err(f.err(
            "n_head",
            format!("n_embd ({n_embd}) must be a positive multiple of n_head ({n_head})"),
        ));
    }
    Ok(ModelConfig {
        family: Family::Gpt2,
        vocab_size: f.usize("vocab_size", Some(50257))?,
        hidden_size: n_embd,
        intermediate_size: f.opt_usize("n_inner")?.unwrap_or(4 * n_embd),
        num_hidden_layers: n_layer,
        num_attention_heads: n_head,
        num_key_value_heads: n_head,
        head_dim: n_embd / n_head,
        max_position_embeddings: f.usize("n_positions", Some(1024))?,
        hidden_act: f.activation("activation_function", "gelu_new")?,
        norm: NormKind::LayerNorm,
        norm_eps: f.f64("layer_norm_epsilon", 1e-5)?,
        mlp: MlpKind::Plain,
        rope: None,
        fused_qkv: true,
        qkv_bias: true,
        o_bias: true,
        mlp_bias: true,
        qk_norm: false,
        sliding_window: None,
        sliding_layers: vec![false; n_layer.min(1 << 16)],
        scale_attn_weights: f.bool("scale_attn_weights", true)?,
        scale_attn_by_inverse_layer_idx: f.bool("scale_attn_by_inverse_layer_idx", false)?,
        reorder_and_upcast_attn: f.bool("reorder_and_upcast_attn", false)?,
        tie_word_embeddings: f.bool("tie_word_embeddings", true)?,
        attn_pdrop: f.prob("attn_pdrop", 0.1)?,
        embd_pdrop: f.prob("embd_pdrop", 0.1)?,
        resid_pdrop: f.prob("resid_pdrop", 0.1)?,
        summary_dropout_prob: f.prob("summary_dropout_prob", 0.1)?,
        eos_token_id: f.ids("eos_token_id")?,
        bos_token_id: f.opt_usize("bos_token_id")?.map(|v| v as u32),
        pad_token_id: f.opt_usize("pad_token_id")?.map(|v| v as u32),
        num_labels: f.num_labels()?,
        raw: f.raw.clone(),
    })
}

pub(super) fn write(c: &ModelConfig, m: &mut Map<String, Value>) {
    let mut set = |k: &str, v: Value| {
        m.insert(k.to_string(), v);
    };
    set("n_layer", c.num_hidden_layers.into());
    set("n_head", c.num_attention_heads.into());
    set("n_embd", c.hidden_size.into());
    set(
        "n_inner",
        if c.intermediate_size == 4 * c.hidden_size {
            Value::Null
        } else {
            c.intermediate_size.into()
        },
    );
    set("n_positions", c.max_position_embeddings.into());
    set("vocab_size", c.vocab_size.into());
    let act = match c.hidden_act {
        Activation::GeluTanh => "gelu_new",
        Activation::GeluErf => "gelu",
        Activation::Relu => "relu",
        Activation::Silu => "silu",
    };
    set("activation_function", act.into());
    set("layer_norm_epsilon", c.norm_eps.into());
    set("scale_attn_weights", c.scale_attn_weights.into());
    set(
        "scale_attn_by_inverse_layer_idx",
        c.scale_attn_by_inverse_layer_idx.into(),
    );
    set("reorder_and_upcast_attn", c.reorder_and_upcast_attn.into());
    set("attn_pdrop", c.attn_pdrop.into());
    set("embd_pdrop", c.embd_pdrop.into());
    set("resid_pdrop", c.resid_pdrop.into());
}
