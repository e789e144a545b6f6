//! `LoraConfig` with PEFT's field names, defaults and `adapter_config.json` format
//! (peft `src/peft/tuners/lora/config.py`; see REFERENCE.md §4.1).

use serde::{Deserialize, Serialize, Serializer};
use serde_json::{Map, Value};

use super::LoraError;

/// PEFT config switches we do not implement: loading an adapter that turns one on is an
/// error rather than a silently different model.
const UNSUPPORTED_SWITCHES: &[&str] = &[
    "use_qalora",
    "use_bdlora",
    "trainable_token_indices",
    "target_parameters",
    "layer_replication",
    "exclude_modules",
    "alora_invocation_tokens",
    "eva_config",
    "corda_config",
    "arrow_config",
    "kasa_config",
    "lora_ga_config",
    "monteclora_config",
    "velora_config",
    "loftq_config",
    "megatron_config",
];

/// Which biases train (PEFT `bias`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LoraBias {
    /// No bias trains.
    #[default]
    None,
    /// Every bias of the model trains (layer norms included, as PEFT's `"bias" in name`).
    All,
    /// The biases of the LoRA-targeted projections train.
    LoraOnly,
}

/// What a pass with adapters disabled uses for trained biases and saved modules (ours; not a
/// PEFT key, written to `adapter_config.json` only when not the default).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReferenceBias {
    /// The values from before training (the base checkpoint's), so "adapters disabled" is
    /// exactly the base model. Our default.
    #[default]
    Original,
    /// The current trained biases (PEFT's `disable_adapter()` and TRL's reference).
    /// Saved modules (`modules_to_save`) still fall back to their originals, as in PEFT.
    Trained,
}

impl ReferenceBias {
    fn is_original(&self) -> bool {
        *self == Self::Original
    }
}

/// PEFT `task_type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[allow(missing_docs)]
pub enum TaskType {
    #[serde(rename = "CAUSAL_LM")]
    CausalLm,
    #[serde(rename = "SEQ_CLS")]
    SeqCls,
    #[serde(rename = "SEQ_2_SEQ_LM")]
    Seq2SeqLm,
    #[serde(rename = "TOKEN_CLS")]
    TokenCls,
    #[serde(rename = "QUESTION_ANS")]
    QuestionAns,
    #[serde(rename = "FEATURE_EXTRACTION")]
    FeatureExtraction,
}

/// PEFT `target_modules`: module-name suffixes, or `"all-linear"` (a single other string is
/// a regex in PEFT, which we do not support).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TargetModules {
    /// A module matches a name `n` when its full name equals `n` or ends with `.n`.
    List(Vec<String>),
    /// `"all-linear"`: every projection of the blocks, never the LM head or a score head.
    One(String),
}

/// PEFT `init_lora_weights`: `true` (Kaiming-uniform A, zero B), `false` (A and B with
/// `nn.Linear`'s default init: the adapter is not a no-op) or `"gaussian"` (A normal with
/// standard deviation `1/r`, PEFT's `normal_(std=1/r)`; zero B).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum InitLoraWeights {
    /// `true` or `false`.
    Bool(bool),
    /// A named scheme; only `"gaussian"` is supported.
    Name(String),
}

impl Default for InitLoraWeights {
    fn default() -> Self {
        Self::Bool(true)
    }
}

/// A LoRA configuration, field for field PEFT's `LoraConfig` (names and defaults), and the
/// schema of `adapter_config.json`. Keys we do not model are kept in `extra` and written
/// back unchanged.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct LoraConfig {
    /// Always `"LORA"`.
    pub peft_type: String,
    /// `CAUSAL_LM`, `SEQ_CLS`, ...
    pub task_type: Option<TaskType>,
    /// The base model the adapter was trained on (only compared, with a warning).
    pub base_model_name_or_path: Option<String>,
    /// Hub revision of the base model.
    pub revision: Option<String>,
    /// Rank `r` (8).
    pub r: usize,
    /// `lora_alpha` (8); scaling is `alpha / r` (or `alpha / sqrt(r)` with rsLoRA).
    #[serde(serialize_with = "int_if_integral")]
    pub lora_alpha: f64,
    /// Dropout on the adapter's input in train mode (0.0).
    pub lora_dropout: f64,
    /// Projections to adapt (`None`: GPT-2's default, `["c_attn"]`).
    pub target_modules: Option<TargetModules>,
    /// Which biases train (`"none"`).
    pub bias: LoraBias,
    /// Rank-stabilised scaling `alpha / sqrt(r)` (Kalajdzievski 2023, arXiv 2312.03732).
    pub use_rslora: bool,
    /// Extra modules trained in full and saved with the adapter (`["score"]` for a reward
    /// model); their originals serve passes with adapters disabled.
    pub modules_to_save: Option<Vec<String>>,
    /// Weights stored `(in, out)`. Always true for GPT-2's `Conv1D` (PEFT sets it, with a
    /// warning, when it was false); the adapter tensors are the same either way.
    pub fan_in_fan_out: bool,
    /// Initialisation of A and B.
    pub init_lora_weights: InitLoraWeights,
    /// Written by PEFT (`true` when saved); not used.
    pub inference_mode: bool,
    /// DoRA (not supported: must be false).
    pub use_dora: bool,
    /// A bias on `lora_B` (not supported: must be false).
    pub lora_bias: bool,
    /// Layers to adapt (not supported: must be null).
    pub layers_to_transform: Option<Value>,
    /// Name of the layer list for `layers_to_transform`.
    pub layers_pattern: Option<Value>,
    /// Per-module ranks (not supported: must be empty).
    pub rank_pattern: Map<String, Value>,
    /// Per-module alphas (not supported: must be empty).
    pub alpha_pattern: Map<String, Value>,
    /// What "adapters disabled" uses for trained biases (ours, see [`ReferenceBias`]).
    #[serde(skip_serializing_if = "ReferenceBias::is_original")]
    pub reference_bias: ReferenceBias,
    /// Every other key of `adapter_config.json`, kept as read.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl Default for LoraConfig {
    fn default() -> Self {
        Self {
            peft_type: "LORA".into(),
            task_type: None,
            base_model_name_or_path: None,
            revision: None,
            r: 8,
            lora_alpha: 8.0,
            lora_dropout: 0.0,
            target_modules: None,
            bias: LoraBias::None,
            use_rslora: false,
            modules_to_save: None,
            fan_in_fan_out: false,
            init_lora_weights: InitLoraWeights::Bool(true),
            inference_mode: false,
            use_dora: false,
            lora_bias: false,
            layers_to_transform: None,
            layers_pattern: None,
            rank_pattern: Map::new(),
            alpha_pattern: Map::new(),
            reference_bias: ReferenceBias::Original,
            extra: Map::new(),
        }
    }
}

/// `16.0` → `16` (PEFT writes `lora_alpha` as an int); other values as floats.
fn int_if_integral<S: Serializer>(v: &f64, s: S) -> Result<S::Ok, S::Error> {
    if v.fract() == 0.0 && v.abs() < 9e15 {
        s.serialize_i64(*v as i64)
    } else {
        s.serialize_f64(*v)
    }
}

impl LoraConfig {
    /// Parses `adapter_config.json` text and validates it.
    pub fn from_json(text: &str) -> Result<Self, LoraError> {
        let cfg: Self = serde_json::from_str(text).map_err(|e| LoraError::Config {
            field: "adapter_config.json".into(),
            msg: e.to_string(),
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// `adapter_config.json` text (pretty, sorted keys as PEFT writes them).
    pub fn to_json(&self) -> Result<String, LoraError> {
        let v = serde_json::to_value(self).map_err(|e| LoraError::Config {
            field: "adapter_config.json".into(),
            msg: e.to_string(),
        })?;
        let sorted: std::collections::BTreeMap<&String, &Value> = v.as_object().into_iter().flatten().collect();
        let mut text = serde_json::to_string_pretty(&sorted).map_err(|e| LoraError::Config {
            field: "adapter_config.json".into(),
            msg: e.to_string(),
        })?;
        text.push('\n');
        Ok(text)
    }

    /// The LoRA scaling: `lora_alpha / r`, or `lora_alpha / sqrt(r)` with `use_rslora`
    /// (PEFT `LoraLayer.update_layer`).
    pub fn scaling(&self) -> f64 {
        if self.use_rslora {
            self.lora_alpha / (self.r as f64).sqrt()
        } else {
            self.lora_alpha / self.r as f64
        }
    }

    /// `modules_to_save` without duplicates, in first-seen order (PEFT appends its SEQ_CLS
    /// defaults `classifier`, `score`, so saved configs repeat `score`).
    pub fn modules_to_save_unique(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for m in self.modules_to_save.iter().flatten() {
            if !out.contains(m) {
                out.push(m.clone());
            }
        }
        out
    }

    /// Whether the projection with full name `module` (e.g. `transformer.h.0.attn.c_attn`)
    /// is adapted: PEFT's `check_target_module_exists` (equal, or ends with `.name`); without
    /// `target_modules`, the model family's defaults (`default_targets`, e.g. `c_attn` for
    /// GPT-2 and `q_proj`, `v_proj` for the Llama family).
    pub fn is_target(&self, module: &str, default_targets: &[&str]) -> bool {
        let matches = |n: &str| module == n || module.ends_with(&format!(".{n}"));
        match &self.target_modules {
            None => default_targets.iter().any(|n| matches(n)),
            Some(TargetModules::List(l)) => l.iter().any(|n| matches(n)),
            Some(TargetModules::One(s)) => s == "all-linear",
        }
    }

    /// Checks the values and that no unsupported PEFT feature is switched on.
    pub fn validate(&self) -> Result<(), LoraError> {
        let bad = |field: &str, msg: String| {
            Err(LoraError::Config {
                field: field.into(),
                msg,
            })
        };
        if self.peft_type != "LORA" {
            return bad(
                "peft_type",
                format!("`{}` is not a LoRA adapter; only `LORA` is supported", self.peft_type),
            );
        }
        if self.r == 0 {
            return bad("r", "must be at least 1".into());
        }
        if !(self.lora_alpha.is_finite() && self.lora_alpha > 0.0) {
            return bad("lora_alpha", format!("must be positive, got {}", self.lora_alpha));
        }
        if !(0.0..1.0).contains(&self.lora_dropout) {
            return bad("lora_dropout", format!("must be in [0, 1), got {}", self.lora_dropout));
        }
        if let Some(TargetModules::One(s)) = &self.target_modules {
            if s != "all-linear" {
                return bad(
                    "target_modules",
                    format!("the string `{s}` is a regex in PEFT, which is not supported; hint: use a list such as [\"c_attn\", \"c_proj\"] or \"all-linear\""),
                );
            }
        }
        if let InitLoraWeights::Name(n) = &self.init_lora_weights {
            if n != "gaussian" {
                return bad(
                    "init_lora_weights",
                    format!("`{n}` is not supported; hint: use true, false or \"gaussian\""),
                );
            }
        }
        let off = [
            ("use_dora", self.use_dora),
            ("lora_bias", self.lora_bias),
            (
                "layers_to_transform",
                self.layers_to_transform.as_ref().is_some_and(truthy),
            ),
            ("rank_pattern", !self.rank_pattern.is_empty()),
            ("alpha_pattern", !self.alpha_pattern.is_empty()),
        ];
        for (field, on) in off {
            if on {
                return bad(
                    field,
                    "this PEFT feature is not supported; hint: leave it at its default".into(),
                );
            }
        }
        for key in UNSUPPORTED_SWITCHES {
            if self.extra.get(*key).is_some_and(truthy) {
                return bad(
                    key,
                    "this PEFT feature is not supported; hint: leave it at its default".into(),
                );
            }
        }
        Ok(())
    }
}

/// A JSON value that switches a feature on: anything but null, false, 0, "", [] and {}.
fn truthy(v: &Value) -> bool {
    match v {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64() != Some(0.0),
        Value::String(s) => !s.is_empty(),
        Value::Array(a) => !a.is_empty(),
        Value::Object(o) => !o.is_empty(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_peft_defaults() {
        let c = LoraConfig::default();
        assert_eq!((c.r, c.lora_alpha, c.lora_dropout), (8, 8.0, 0.0));
        assert_eq!(c.bias, LoraBias::None);
        assert_eq!(c.init_lora_weights, InitLoraWeights::Bool(true));
        assert_eq!(c.scaling(), 1.0);
        assert!(c.is_target("transformer.h.3.attn.c_attn", &["c_attn"]));
        assert!(!c.is_target("transformer.h.3.attn.c_proj", &["c_attn"]));
    }

    #[test]
    fn a_suffix_matches_whole_name_components_only() {
        let c = LoraConfig {
            target_modules: Some(TargetModules::List(vec!["c_proj".into()])),
            ..Default::default()
        };
        assert!(c.is_target("transformer.h.0.attn.c_proj", &["c_attn"]));
        assert!(c.is_target("transformer.h.0.mlp.c_proj", &["c_attn"]));
        assert!(!c.is_target("transformer.h.0.attn.xc_proj", &["c_attn"]));
        let all = LoraConfig {
            target_modules: Some(TargetModules::One("all-linear".into())),
            ..Default::default()
        };
        assert!(all.is_target("transformer.h.0.mlp.c_fc", &["c_attn"]));
    }

    #[test]
    fn rslora_scaling_divides_by_the_square_root_of_r() {
        let c = LoraConfig {
            r: 8,
            lora_alpha: 16.0,
            use_rslora: true,
            ..Default::default()
        };
        assert!((c.scaling() - 5.656854249492381).abs() < 1e-15);
    }

    #[test]
    fn json_round_trip_keeps_unknown_keys_and_writes_alpha_as_an_integer() {
        let text = r#"{"peft_type": "LORA", "r": 4, "lora_alpha": 8, "bias": "lora_only",
            "target_modules": ["c_attn"], "task_type": "SEQ_CLS", "peft_version": "0.21.2",
            "modules_to_save": ["score", "classifier", "score"], "use_qalora": false}"#;
        let c = LoraConfig::from_json(text).unwrap();
        assert_eq!(c.bias, LoraBias::LoraOnly);
        assert_eq!(c.task_type, Some(TaskType::SeqCls));
        assert_eq!(c.modules_to_save_unique(), vec!["score", "classifier"]);
        let out: Value = serde_json::from_str(&c.to_json().unwrap()).unwrap();
        assert_eq!(out["lora_alpha"], Value::from(8));
        assert_eq!(out["peft_version"], Value::from("0.21.2"));
        assert!(out.get("reference_bias").is_none(), "the default is not written");
        assert_eq!(LoraConfig::from_json(&c.to_json().unwrap()).unwrap(), c);
    }

    #[test]
    fn unsupported_features_and_bad_values_are_config_errors_naming_the_field() {
        for (text, field) in [
            (r#"{"peft_type": "IA3"}"#, "peft_type"),
            (r#"{"use_dora": true}"#, "use_dora"),
            (r#"{"r": 0}"#, "r"),
            (r#"{"lora_dropout": 1.0}"#, "lora_dropout"),
            (r#"{"target_modules": ".*attn"}"#, "target_modules"),
            (r#"{"init_lora_weights": "pissa"}"#, "init_lora_weights"),
            (r#"{"rank_pattern": {"c_attn": 4}}"#, "rank_pattern"),
            (r#"{"layers_to_transform": [0]}"#, "layers_to_transform"),
            (r#"{"trainable_token_indices": [1, 2]}"#, "trainable_token_indices"),
        ] {
            match LoraConfig::from_json(text) {
                Err(LoraError::Config { field: f, .. }) => assert_eq!(f, field, "{text}"),
                other => panic!("{text}: {other:?}"),
            }
        }
    }
}
