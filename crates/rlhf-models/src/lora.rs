//! LoRA adapters and quantized frozen bases on a [`Model`]: PEFT's `get_peft_model`
//! ([`apply_lora`]), `print_trainable_parameters` ([`count_parameters`]), `merge_and_unload`
//! ([`merge_and_unload`]), `save_pretrained` / `PeftModel.from_pretrained` ([`save_adapter`],
//! [`load_adapter`]), and transformers' `BitsAndBytesConfig` ([`QuantConfig`], [`quantize`]).
//!
//! A LoRA model is the same [`Model`] with some projections replaced by
//! [`rlhf_peft::Proj::Lora`]; the optimizer sees exactly the weights that are trainable in
//! [`Model::named_params`] (`lora_A.weight` / `lora_B.weight`, the biases `bias` selects, and
//! the `modules_to_save` heads). A pass with [`crate::Fwd::without_adapters`] is the reference
//! model: LoRA updates skipped, saved modules read their originals, and, with the default
//! [`ReferenceBias::Original`], trained biases read their originals too, so the reference is
//! exactly the base model.
//!
//! Deliberate deviations from PEFT / TRL (see docs/lora.md):
//! * PEFT's `disable_adapter()` keeps trained biases (`bias = "all" | "lora_only"`), so TRL's
//!   reference is not the base model; we keep the originals unless `reference_bias =
//!   "trained"`.
//! * `merge_and_unload` of a quantized base dequantizes, adds the update and keeps the result
//!   dense in the model dtype (PEFT re-quantizes int8); untargeted quantized projections are
//!   dequantized too, so the result saves as a plain checkpoint.
//! * Quantized projections always use bitsandbytes' differentiable CPU path
//!   (`MatMul8bitFp` / `MatMul4Bit` in f32), also without gradients, so rollout and training
//!   log-probs of PPO come from the same function. `llm_int8_threshold` is kept on the layer
//!   for [`rlhf_peft::int8::Int8Linear::forward_eval`] (the LLM.int8 mixed-precision path).
//! * `modules_to_save` supports `score` and, as an extension, TRL's value head `v_head`;
//!   `classifier` (PEFT's SEQ_CLS default, absent in GPT-2) is ignored.

mod io;

use std::fmt;

use rlhf_ops::rng::RngStream;
use rlhf_peft::int8::Int8Linear;
use rlhf_peft::lora::{LoraBias, ReferenceBias, TargetModules};
use rlhf_peft::nf4::{Nf4Linear, DEFAULT_BLOCKSIZE};
use rlhf_peft::proj::Quantized;
use rlhf_peft::{LoraConfig, LoraLinear, Param, Proj};
use serde::{Deserialize, Serialize};

pub use io::{load_adapter, save_adapter, AdapterLoadOptions, ADAPTER_CONFIG, ADAPTER_WEIGHTS, PEFT_PREFIX};

use crate::error::{ModelError, Result};
use crate::model::Model;

/// Quantization of the frozen projections, with transformers' `BitsAndBytesConfig` names.
/// Only the blocks' projections are quantized (in `nn.Linear`'s `(out, in)` layout; for
/// GPT-2 that is `Conv1D.weight.T`, as transformers' bitsandbytes integration stores it);
/// embeddings, norms and heads stay in the model dtype, as bitsandbytes leaves them.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct QuantConfig {
    /// LLM.int8: one int8 row and one f32 absmax per output feature.
    pub load_in_8bit: bool,
    /// 4-bit blocks of 64 with one absmax each.
    pub load_in_4bit: bool,
    /// The 4-bit format; only `"nf4"` (QLoRA's NormalFloat) is supported.
    pub bnb_4bit_quant_type: String,
    /// Store the block absmaxes in 8 bits too (QLoRA's double quantization).
    pub bnb_4bit_use_double_quant: bool,
    /// LLM.int8 outlier threshold (transformers' default 6.0), used by the inference path
    /// `Int8Linear::forward_eval` only (see the module docs).
    pub llm_int8_threshold: f32,
}

impl Default for QuantConfig {
    fn default() -> Self {
        Self {
            load_in_8bit: false,
            load_in_4bit: false,
            bnb_4bit_quant_type: "nf4".into(),
            bnb_4bit_use_double_quant: false,
            llm_int8_threshold: rlhf_peft::int8::DEFAULT_THRESHOLD,
        }
    }
}

impl QuantConfig {
    /// LLM.int8 with transformers' defaults.
    pub fn int8() -> Self {
        Self {
            load_in_8bit: true,
            ..Default::default()
        }
    }

    /// NF4 (optionally double-quantized), QLoRA's recipe.
    pub fn nf4(double_quant: bool) -> Self {
        Self {
            load_in_4bit: true,
            bnb_4bit_use_double_quant: double_quant,
            ..Default::default()
        }
    }

    /// Checks the combination.
    pub fn validate(&self) -> Result<()> {
        let bad = |msg: &str| Err(ModelError::Input(format!("quantization config: {msg}")));
        if self.load_in_8bit && self.load_in_4bit {
            return bad("load_in_8bit and load_in_4bit are both set; hint: choose one");
        }
        if self.load_in_4bit && self.bnb_4bit_quant_type != "nf4" {
            return bad("bnb_4bit_quant_type must be \"nf4\" (fp4 is not supported)");
        }
        if !(self.llm_int8_threshold.is_finite() && self.llm_int8_threshold >= 0.0) {
            return bad("llm_int8_threshold must be a finite number >= 0");
        }
        Ok(())
    }
}

/// Replaces every frozen dense projection (adapted or not) with its int8 or NF4 form. Call
/// before or after [`apply_lora`]; a no-op when neither `load_in_8bit` nor `load_in_4bit`.
pub fn quantize(model: &mut Model, q: &QuantConfig) -> Result<()> {
    q.validate()?;
    if !q.load_in_8bit && !q.load_in_4bit {
        return Ok(());
    }
    if model.quantization.is_some() {
        return Err(ModelError::Input("the model is already quantized".into()));
    }
    for (_, proj) in model.backbone_mut().projections_mut() {
        *proj = quantize_proj(proj, q)?;
    }
    model.quantization = Some(q.clone());
    Ok(())
}

fn quantize_proj(p: &Proj, q: &QuantConfig) -> Result<Proj> {
    Ok(match p {
        Proj::Dense(d) if q.load_in_8bit => Proj::Int8(Quantized::<Int8Linear>::from_dense(d, q.llm_int8_threshold)?),
        Proj::Dense(d) => Proj::Nf4(Quantized::<Nf4Linear>::from_dense(
            d,
            DEFAULT_BLOCKSIZE,
            q.bnb_4bit_use_double_quant,
        )?),
        Proj::Lora(l) => {
            let mut l = l.clone();
            l.base = Box::new(quantize_proj(&l.base, q)?);
            Proj::Lora(l)
        }
        Proj::Int8(_) | Proj::Nf4(_) => return Err(ModelError::Input("the model is already quantized".into())),
    })
}

/// A module trained in full and saved with the adapter (`modules_to_save`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum SavedModule {
    /// `score` (`GPT2ForSequenceClassification`'s head).
    Score,
    /// `v_head` (TRL's value head; our extension).
    ValueHead,
}

/// The `modules_to_save` entries this model supports, without duplicates.
pub(crate) fn saved_modules(cfg: &LoraConfig) -> Result<Vec<SavedModule>> {
    let mut out = Vec::new();
    for name in cfg.modules_to_save_unique() {
        match name.as_str() {
            "score" => out.push(SavedModule::Score),
            "v_head" => out.push(SavedModule::ValueHead),
            // PEFT appends its SEQ_CLS defaults ["classifier", "score"]; these models have no
            // classifier.
            "classifier" => {}
            other => {
                return Err(ModelError::Input(format!(
                    "modules_to_save: `{other}` is not supported; hint: supported are \"score\" (reward model head) and \"v_head\" (value head)"
                )))
            }
        }
    }
    Ok(out)
}

/// PEFT's `get_peft_model(model, cfg)`: freezes every weight, wraps each projection the
/// config targets in a fresh [`LoraLinear`] (factors drawn from `seed`), makes the biases
/// `bias` selects and the `modules_to_save` heads trainable, keeping originals for passes
/// with adapters disabled (biases only with [`ReferenceBias::Original`]).
///
/// Errors: an invalid config, a model that already has an adapter, targets that match no
/// projection, a saved module the model lacks (add it first, e.g. [`Model::ensure_score_head`]).
pub fn apply_lora(model: &mut Model, cfg: &LoraConfig, seed: u64) -> Result<()> {
    cfg.validate()?;
    if model.lora.is_some() {
        return Err(ModelError::Input(
            "the model already has a LoRA adapter; hint: merge it first (merge_and_unload)".into(),
        ));
    }
    let saved = saved_modules(cfg)?;
    for m in &saved {
        let (missing, hint) = match m {
            SavedModule::Score => (model.score_head.is_none(), "Model::ensure_score_head"),
            SavedModule::ValueHead => (model.value_head.is_none(), "Model::ensure_value_head"),
        };
        if missing {
            return Err(ModelError::Input(format!(
                "modules_to_save lists {m:?}, which the model does not have; hint: add it first with {hint}"
            )));
        }
    }
    model.set_trainable(false)?;
    let keep = cfg.reference_bias == ReferenceBias::Original;
    let family = model.family();
    let (prefix, defaults) = (family.names().prefix, family.default_lora_targets());
    let mut rng = RngStream::new(seed);
    let mut matched = 0;
    for (name, proj) in model.backbone_mut().projections_mut() {
        if !cfg.is_target(&format!("{prefix}.{name}"), defaults) {
            continue;
        }
        matched += 1;
        let (r, s, p) = (cfg.r, cfg.scaling(), cfg.lora_dropout);
        *proj = Proj::Lora(LoraLinear::init(
            proj.clone(),
            r,
            s,
            p,
            &cfg.init_lora_weights,
            &mut rng,
        )?);
        if cfg.bias == LoraBias::LoraOnly {
            if let Some(b) = proj.bias_mut() {
                train_keeping_original(b, keep)?;
            }
        }
    }
    if matched == 0 {
        let hint = match family {
            crate::Family::Gpt2 => "GPT-2's are c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj (\"c_proj\" selects both)",
            _ => "this family's are q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj",
        };
        return Err(ModelError::Input(format!(
            "target_modules {:?} match no projection of the {family} model; hint: {hint}, or \"all-linear\"",
            cfg.target_modules
        )));
    }
    if cfg.bias == LoraBias::All {
        for (name, p) in model.backbone_mut().named_params_mut() {
            if name.ends_with(".bias") {
                train_keeping_original(p, keep)?;
            }
        }
    }
    for m in saved {
        for p in head_params_mut(model, m) {
            train_keeping_original(p, true)?;
        }
    }
    let mut stored = cfg.clone();
    // GPT-2's Conv1D weights are stored transposed; PEFT records it (and sets it itself).
    stored.fan_in_fan_out = family.conv1d_weights();
    if stored.target_modules.is_none() {
        stored.target_modules = Some(TargetModules::List(defaults.iter().map(|s| s.to_string()).collect()));
    }
    if stored.base_model_name_or_path.is_none() {
        stored.base_model_name_or_path = model.source_dir().map(|p| p.display().to_string());
    }
    model.lora = Some(stored);
    Ok(())
}

fn train_keeping_original(p: &mut Param, keep: bool) -> Result<()> {
    if keep {
        p.keep_original()?;
    }
    Ok(p.make_trainable()?)
}

/// The weights of a saved module.
pub(crate) fn head_params_mut(model: &mut Model, m: SavedModule) -> Vec<&mut Param> {
    match m {
        SavedModule::Score => model.score_head.iter_mut().map(|s| &mut s.weight).collect(),
        SavedModule::ValueHead => model
            .value_head
            .iter_mut()
            .flat_map(|v| [&mut v.weight, &mut v.bias])
            .collect(),
    }
}

/// Trainable and total parameter counts, as PEFT's `print_trainable_parameters`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ParamCounts {
    /// Scalars the optimizer updates.
    pub trainable: usize,
    /// All scalars: base weights (a quantized weight counts `in * out`), adapters, and the
    /// originals of saved modules (PEFT counts `original_module` and the trained copy).
    pub all: usize,
}

impl ParamCounts {
    /// `100 * trainable / all`.
    pub fn percent(&self) -> f64 {
        100.0 * self.trainable as f64 / self.all.max(1) as f64
    }
}

impl fmt::Display for ParamCounts {
    /// PEFT's line: `trainable params: 8,960 || all params: 6,534,400 || trainable%: 0.1371`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "trainable params: {} || all params: {} || trainable%: {:.4}",
            thousands(self.trainable),
            thousands(self.all),
            self.percent()
        )
    }
}

fn thousands(n: usize) -> String {
    let digits: Vec<char> = n.to_string().chars().collect();
    let mut groups: Vec<String> = digits.rchunks(3).map(|g| g.iter().collect()).collect();
    groups.reverse();
    groups.join(",")
}

/// Counts the model's parameters (see [`ParamCounts`]).
pub fn count_parameters(model: &Model) -> ParamCounts {
    let mut c = ParamCounts { trainable: 0, all: 0 };
    for (_, p) in model.named_params() {
        let n = p.value().elem_count();
        c.all += n;
        if p.is_trainable() {
            c.trainable += n;
        }
    }
    for (_, proj) in model.backbone().projections() {
        let base = proj.lora().map_or(proj, |l| &l.base);
        if matches!(base, Proj::Int8(_) | Proj::Nf4(_)) {
            let (i, o) = base.shape();
            c.all += i * o;
        }
    }
    let heads = model.value_head.iter().flat_map(|v| [&v.weight, &v.bias]);
    let heads = heads.chain(model.score_head.iter().map(|s| &s.weight));
    c.all += heads
        .filter_map(|p| p.original())
        .map(|t| t.elem_count())
        .sum::<usize>();
    c
}

/// PEFT's `merge_and_unload()`: a new plain model whose projections hold
/// `W + B A * scaling`, with the current biases and saved modules;
/// quantized projections are dequantized (kept dense in the model dtype). Every weight of
/// the result is frozen, and the trained ones are copies, so further training of `model`
/// does not change it.
pub fn merge_and_unload(model: &Model) -> Result<Model> {
    let mut out = model.clone();
    let dtype = model.dtype();
    for (_, proj) in out.backbone_mut().projections_mut() {
        if !matches!(proj, Proj::Dense(_)) {
            *proj = proj.merged(dtype)?;
        }
    }
    let mut heads: Vec<&mut Param> = Vec::new();
    if let Some(v) = &mut out.value_head {
        heads.extend([&mut v.weight, &mut v.bias]);
    }
    if let Some(s) = &mut out.score_head {
        heads.push(&mut s.weight);
    }
    for p in heads {
        if p.is_trainable() {
            *p = Param::frozen(p.value().copy()?);
        } else {
            p.drop_original();
        }
    }
    let all: Vec<&mut Param> = out
        .backbone_mut()
        .named_params_mut()
        .into_iter()
        .map(|(_, p)| p)
        .collect();
    for p in all {
        if p.is_trainable() {
            *p = Param::frozen(p.value().copy()?);
        } else {
            p.drop_original();
        }
    }
    out.lora = None;
    out.quantization = None;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_print_like_peft() {
        let c = ParamCounts {
            trainable: 8960,
            all: 6_534_400,
        };
        assert_eq!(
            c.to_string(),
            "trainable params: 8,960 || all params: 6,534,400 || trainable%: 0.1371"
        );
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
    }

    #[test]
    fn quant_config_refuses_both_modes_and_fp4() {
        let both = QuantConfig {
            load_in_8bit: true,
            load_in_4bit: true,
            ..Default::default()
        };
        assert!(both.validate().is_err());
        let fp4 = QuantConfig {
            bnb_4bit_quant_type: "fp4".into(),
            ..QuantConfig::nf4(false)
        };
        assert!(fp4.validate().is_err());
        let parsed: QuantConfig = serde_json::from_str(r#"{"load_in_4bit": true}"#).unwrap();
        assert_eq!(parsed, QuantConfig::nf4(false));
    }
}
