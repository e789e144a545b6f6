//! What differs between model families is data, not code: checkpoint names, config keys,
//! the transformers class names, PEFT's default LoRA targets and the projection layout on
//! disk. The math is the shared pieces of [`crate::transformer`]; a family only says which
//! pieces it uses ([`crate::ModelConfig`]) and what they are called here.
//!
//! | family | `model_type` | classes | LoRA defaults | projections on disk |
//! |---|---|---|---|---|
//! | GPT-2 | `gpt2` | `GPT2LMHeadModel`, `GPT2ForSequenceClassification` | `c_attn` | `Conv1D` `(in, out)` |
//! | Llama (Llama 2/3.x, SmolLM2) | `llama` | `LlamaForCausalLM`, `LlamaForSequenceClassification` | `q_proj`, `v_proj` | `nn.Linear` `(out, in)` |
//! | Qwen2 / Qwen2.5 | `qwen2` | `Qwen2ForCausalLM`, `Qwen2ForSequenceClassification` | `q_proj`, `v_proj` | `(out, in)` |
//! | Qwen3 | `qwen3` | `Qwen3ForCausalLM`, `Qwen3ForSequenceClassification` | `q_proj`, `v_proj` | `(out, in)` |
//! | Mistral | `mistral` | `MistralForCausalLM`, `MistralForSequenceClassification` | `q_proj`, `v_proj` | `(out, in)` |

/// A model family: one backbone with flags, plus the names of this table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Family {
    /// GPT-2 (`GPT2LMHeadModel`).
    Gpt2,
    /// Llama 2 / 3.x and SmolLM2 (`LlamaForCausalLM`).
    Llama,
    /// Qwen2 / Qwen2.5 (`Qwen2ForCausalLM`): q/k/v biases.
    Qwen2,
    /// Qwen3 (`Qwen3ForCausalLM`): q/k norms, explicit `head_dim`.
    Qwen3,
    /// Mistral (`MistralForCausalLM`): sliding-window attention.
    Mistral,
}

/// Checkpoint names of the pieces of a family, relative to the backbone prefix.
#[derive(Debug)]
pub struct Names {
    /// The backbone's attribute (`base_model_prefix`): `transformer` or `model`.
    pub prefix: &'static str,
    /// Token embedding.
    pub embed_tokens: &'static str,
    /// Learned position embedding, when the family has one.
    pub embed_positions: Option<&'static str>,
    /// The list of blocks.
    pub layers: &'static str,
    /// Norm before attention.
    pub input_norm: &'static str,
    /// Norm before the MLP.
    pub post_norm: &'static str,
    /// The attention module.
    pub attn: &'static str,
    /// Fused q/k/v projection, or separate q, k, v projections.
    pub qkv: QkvNames,
    /// Attention output projection.
    pub o_proj: &'static str,
    /// Per-head query / key norms (Qwen3).
    pub q_norm: &'static str,
    /// See `q_norm`.
    pub k_norm: &'static str,
    /// The MLP module.
    pub mlp: &'static str,
    /// Plain MLP (`fc_in`, `fc_out`) or gated (`gate`, `up`, `down`).
    pub mlp_proj: MlpNames,
    /// Final norm.
    pub final_norm: &'static str,
}

/// Names of the attention input projections.
#[derive(Debug)]
pub enum QkvNames {
    /// One projection to `[q; k; v]`.
    Fused(&'static str),
    /// Three projections.
    Split([&'static str; 3]),
}

/// Names of the MLP projections.
#[derive(Debug)]
pub enum MlpNames {
    /// `out(act(in(x)))`.
    Plain([&'static str; 2]),
    /// `down(act(gate(x)) · up(x))`.
    Gated([&'static str; 3]),
}

const GPT2_NAMES: Names = Names {
    prefix: "transformer",
    embed_tokens: "wte",
    embed_positions: Some("wpe"),
    layers: "h",
    input_norm: "ln_1",
    post_norm: "ln_2",
    attn: "attn",
    qkv: QkvNames::Fused("c_attn"),
    o_proj: "c_proj",
    q_norm: "q_norm",
    k_norm: "k_norm",
    mlp: "mlp",
    mlp_proj: MlpNames::Plain(["c_fc", "c_proj"]),
    final_norm: "ln_f",
};

const LLAMA_NAMES: Names = Names {
    prefix: "model",
    embed_tokens: "embed_tokens",
    embed_positions: None,
    layers: "layers",
    input_norm: "input_layernorm",
    post_norm: "post_attention_layernorm",
    attn: "self_attn",
    qkv: QkvNames::Split(["q_proj", "k_proj", "v_proj"]),
    o_proj: "o_proj",
    q_norm: "q_norm",
    k_norm: "k_norm",
    mlp: "mlp",
    mlp_proj: MlpNames::Gated(["gate_proj", "up_proj", "down_proj"]),
    final_norm: "norm",
};

impl Family {
    /// Every family.
    pub const ALL: [Family; 5] = [Self::Gpt2, Self::Llama, Self::Qwen2, Self::Qwen3, Self::Mistral];

    /// The family of a `config.json` `model_type`.
    pub fn from_model_type(model_type: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|f| f.model_type() == model_type)
    }

    /// The family of a transformers class name (`LlamaForCausalLM`, ...).
    pub fn from_architecture(class: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|f| class == f.causal_lm_class() || class == f.seq_cls_class() || class == f.base_class())
    }

    /// `config.json`'s `model_type`.
    pub fn model_type(self) -> &'static str {
        match self {
            Self::Gpt2 => "gpt2",
            Self::Llama => "llama",
            Self::Qwen2 => "qwen2",
            Self::Qwen3 => "qwen3",
            Self::Mistral => "mistral",
        }
    }

    fn class_stem(self) -> &'static str {
        match self {
            Self::Gpt2 => "GPT2",
            Self::Llama => "Llama",
            Self::Qwen2 => "Qwen2",
            Self::Qwen3 => "Qwen3",
            Self::Mistral => "Mistral",
        }
    }

    /// The causal-LM class (`architectures` of a policy checkpoint).
    pub fn causal_lm_class(self) -> &'static str {
        match self {
            Self::Gpt2 => "GPT2LMHeadModel",
            Self::Llama => "LlamaForCausalLM",
            Self::Qwen2 => "Qwen2ForCausalLM",
            Self::Qwen3 => "Qwen3ForCausalLM",
            Self::Mistral => "MistralForCausalLM",
        }
    }

    /// The sequence-classification class (`architectures` of a reward model).
    pub fn seq_cls_class(self) -> &'static str {
        match self {
            Self::Gpt2 => "GPT2ForSequenceClassification",
            Self::Llama => "LlamaForSequenceClassification",
            Self::Qwen2 => "Qwen2ForSequenceClassification",
            Self::Qwen3 => "Qwen3ForSequenceClassification",
            Self::Mistral => "MistralForSequenceClassification",
        }
    }

    /// The backbone class (`GPT2Model`, `LlamaModel`, ...), whose checkpoints have no prefix.
    pub fn base_class(self) -> &'static str {
        match self {
            Self::Gpt2 => "GPT2Model",
            Self::Llama => "LlamaModel",
            Self::Qwen2 => "Qwen2Model",
            Self::Qwen3 => "Qwen3Model",
            Self::Mistral => "MistralModel",
        }
    }

    /// A readable name for messages.
    pub fn display_name(self) -> &'static str {
        match self {
            Self::Gpt2 => "GPT-2",
            _ => self.class_stem(),
        }
    }

    /// Checkpoint names of the pieces.
    pub fn names(self) -> &'static Names {
        match self {
            Self::Gpt2 => &GPT2_NAMES,
            _ => &LLAMA_NAMES,
        }
    }

    /// PEFT's default `target_modules` for this family
    /// (`TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING`).
    pub fn default_lora_targets(self) -> &'static [&'static str] {
        match self {
            Self::Gpt2 => &["c_attn"],
            _ => &["q_proj", "v_proj"],
        }
    }

    /// Projection weights are stored as `Conv1D`, `(in, out)`, on disk (GPT-2): they are
    /// transposed once at load to the `nn.Linear` layout `(out, in)` used inside, and back at
    /// save. PEFT then records `fan_in_fan_out = true` in adapter configs.
    pub fn conv1d_weights(self) -> bool {
        self == Self::Gpt2
    }
}

impl std::fmt::Display for Family {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.display_name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_types_and_classes_round_trip() {
        for f in Family::ALL {
            assert_eq!(Family::from_model_type(f.model_type()), Some(f));
            assert_eq!(Family::from_architecture(f.causal_lm_class()), Some(f));
            assert_eq!(Family::from_architecture(f.seq_cls_class()), Some(f));
        }
        assert_eq!(Family::from_model_type("bert"), None);
    }
}
