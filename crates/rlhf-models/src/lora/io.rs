//! PEFT adapter directories: `adapter_config.json` + `adapter_model.safetensors`, with
//! PEFT's tensor names (peft `save_and_load.py`; REFERENCE.md §4.2):
//!
//! | tensor | key | shape |
//! |---|---|---|
//! | LoRA A of module `M` | `base_model.model.M.lora_A.weight` | `(r, in)` |
//! | LoRA B of module `M` | `base_model.model.M.lora_B.weight` | `(out, r)` |
//! | bias of a targeted `M` (`bias != "none"`) | `base_model.model.M.base_layer.bias` | `(out)` |
//! | any other bias (`bias = "all"`) | `base_model.model.<name>.bias` | |
//! | saved module `score` | `base_model.model.score.weight` | `(num_labels, H)` |
//! | saved module `v_head` (ours) | `base_model.model.v_head.summary.{weight,bias}` | `(1, H)`, `(1)` |
//!
//! `M` is the full module name, e.g. `transformer.h.0.attn.c_attn` (GPT-2) or
//! `model.layers.0.self_attn.q_proj` (Llama family). The loader also takes
//! PEFT's quirks: `modules_to_save` with duplicates, `fan_in_fan_out` either way, targeted
//! biases under peft 0.13's `M.bias`, and adapters without bias tensors.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor};
use rlhf_peft::lora::{LoraBias, ReferenceBias};
use rlhf_peft::{LoraConfig, Param, Proj};

use super::{apply_lora, saved_modules, SavedModule};
use crate::error::{io_err, ModelError, Result};
use crate::heads::{ScoreHead, ValueHead};
use crate::model::Model;
use crate::weights::{save_safetensors, write_atomic, Weights};

/// File name of the adapter config.
pub const ADAPTER_CONFIG: &str = "adapter_config.json";
/// File name of the adapter tensors.
pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";
/// Prefix of every PEFT tensor key (`PeftModel.base_model.model`).
pub const PEFT_PREFIX: &str = "base_model.model.";

/// How to load an adapter.
#[derive(Clone, Debug, Default)]
pub struct AdapterLoadOptions {
    /// Make the adapter's weights trainable (PEFT's `is_trainable`); otherwise everything is
    /// frozen (inference).
    pub is_trainable: bool,
    /// Override the config's `reference_bias` (a PEFT adapter has none: `Original`).
    pub reference_bias: Option<ReferenceBias>,
}

/// PEFT's `save_pretrained`: writes `adapter_config.json` (with `inference_mode: true`, as
/// PEFT writes it) and `adapter_model.safetensors` (f32) into `dir`, each via a temporary
/// file and a rename. The base model is not written.
pub fn save_adapter(model: &Model, dir: &Path) -> Result<()> {
    let cfg = model.lora.as_ref().ok_or_else(|| ModelError::Adapter {
        path: dir.to_path_buf(),
        msg: "the model has no LoRA adapter to save; hint: apply_lora or load_adapter first, or use Model::save".into(),
    })?;
    let mut tensors: BTreeMap<String, Tensor> = BTreeMap::new();
    let mut saved_biases: HashSet<String> = HashSet::new();
    let prefix = model.family().names().prefix;
    for (name, proj) in model.backbone().projections() {
        let Some(l) = proj.lora() else { continue };
        let m = format!("{PEFT_PREFIX}{prefix}.{name}");
        tensors.insert(format!("{m}.lora_A.weight"), l.lora_a.value().clone());
        tensors.insert(format!("{m}.lora_B.weight"), l.lora_b.value().clone());
        if let (Some(b), true) = (proj.bias(), cfg.bias != LoraBias::None) {
            tensors.insert(format!("{m}.base_layer.bias"), b.value().clone());
            saved_biases.insert(format!("{name}.bias"));
        }
    }
    if cfg.bias == LoraBias::All {
        for (name, p) in model.backbone().named_params() {
            if name.ends_with(".bias") && !saved_biases.contains(&name) {
                tensors.insert(format!("{PEFT_PREFIX}{prefix}.{name}"), p.value().clone());
            }
        }
    }
    for m in saved_modules(cfg)? {
        match (m, &model.score_head, &model.value_head) {
            (SavedModule::Score, Some(s), _) => {
                tensors.insert(format!("{PEFT_PREFIX}score.weight"), s.weight.value().clone());
            }
            (SavedModule::ValueHead, _, Some(v)) => {
                tensors.insert(format!("{PEFT_PREFIX}v_head.summary.weight"), v.weight.value().clone());
                tensors.insert(format!("{PEFT_PREFIX}v_head.summary.bias"), v.bias.value().clone());
            }
            _ => {
                return Err(ModelError::Adapter {
                    path: dir.to_path_buf(),
                    msg: format!("modules_to_save lists {m:?}, which the model no longer has"),
                })
            }
        }
    }
    let tensors = tensors
        .into_iter()
        .map(|(k, t)| Ok((k, t.to_dtype(DType::F32)?)))
        .collect::<Result<BTreeMap<_, _>>>()?;
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    save_safetensors(&tensors, &dir.join(ADAPTER_WEIGHTS))?;
    let mut c = cfg.clone();
    c.inference_mode = true;
    write_atomic(&dir.join(ADAPTER_CONFIG), c.to_json()?.as_bytes())
}

/// PEFT's `PeftModel.from_pretrained(model, dir, is_trainable)`: applies the adapter in
/// `dir` to `model`. Targeted biases and saved modules in the file replace the model's
/// (the model's values are kept as originals for passes with adapters disabled; biases
/// only with `reference_bias = "original"`). A saved `score` the base lacks is created
/// from the file (`num_labels` from its shape).
///
/// Returns warnings (e.g. `base_model_name_or_path` names another model). On error the
/// model is unchanged. Errors name the file and tensor: a tensor whose shape does not fit,
/// a key naming no module of the model, a targeted module without its factors, unsupported
/// config features.
pub fn load_adapter(model: &mut Model, dir: &Path, opts: &AdapterLoadOptions) -> Result<Vec<String>> {
    let cfg_path = dir.join(ADAPTER_CONFIG);
    let text = std::fs::read_to_string(&cfg_path).map_err(io_err(&cfg_path))?;
    let mut cfg = LoraConfig::from_json(&text).map_err(|e| adapter_err(&cfg_path, e.to_string()))?;
    if let Some(rb) = opts.reference_bias {
        cfg.reference_bias = rb;
    }
    let mut warnings = Vec::new();
    if let Some(w) = base_mismatch(cfg.base_model_name_or_path.as_deref(), dir, model.source_dir()) {
        warnings.push(w);
    }
    let wpath = dir.join(ADAPTER_WEIGHTS);
    if !wpath.is_file() && dir.join("adapter_model.bin").is_file() {
        return Err(adapter_err(
            &wpath,
            "missing; only adapter_model.bin (a pickle) is there\nhint: re-save the adapter with save_pretrained(..., safe_serialization=True)".into(),
        ));
    }
    let mut w = Weights::from_file(&wpath, DType::F32, model.device())?;
    if let Some(name) = w.skipped().first() {
        return Err(adapter_err(&wpath, format!("tensor `{name}` is not a float tensor")));
    }
    let mut t: BTreeMap<String, Tensor> = BTreeMap::new();
    for key in w.remaining() {
        let Some(short) = key.strip_prefix(PEFT_PREFIX) else {
            return Err(adapter_err(
                &wpath,
                format!("tensor `{key}` is not a PEFT adapter key (expected the prefix `{PEFT_PREFIX}`)"),
            ));
        };
        let tensor = w.take_any(&key).expect("invariant: the name comes from remaining()");
        t.insert(short.to_string(), tensor);
    }

    let mut m = model.clone();
    let saved = saved_modules(&cfg).map_err(|e| adapter_err(&cfg_path, e.to_string()))?;
    let h = m.cfg().hidden_size;
    let family = m.family();
    let (prefix, defaults) = (family.names().prefix, family.default_lora_targets());
    for s in &saved {
        match s {
            SavedModule::Score if m.score_head.is_none() => {
                let ws = need(&t, "score.weight", &wpath)?;
                let num_labels = match ws.dims() {
                    &[n, cols] if n > 0 && cols == h => n,
                    dims => {
                        return Err(adapter_err(
                            &wpath,
                            format!(
                                "tensor `{PEFT_PREFIX}score.weight` has shape {dims:?}, but this model needs [num_labels, {h}] with num_labels >= 1 (H = {h} from the model)\nhint: the adapter was trained on a different base model, or re-save it from a reward model"
                            ),
                        ))
                    }
                };
                m.set_num_labels(num_labels);
                m.score_head = Some(ScoreHead {
                    weight: Param::frozen(ws.clone()),
                });
                warnings.push(
                    "the base model has no score head: the adapter's `score.weight` is used, also with adapters disabled"
                        .into(),
                );
            }
            SavedModule::ValueHead if m.value_head.is_none() => {
                let wv = need(&t, "v_head.summary.weight", &wpath)?.clone();
                let bv = need(&t, "v_head.summary.bias", &wpath)?.clone();
                // The later shape check compares the head with itself when it came from the
                // file, so check it against the model here.
                check_shape(&wpath, "v_head.summary.weight", &wv, &[1, h])?;
                check_shape(&wpath, "v_head.summary.bias", &bv, &[1])?;
                let dropout = m.cfg().summary_dropout_prob;
                m.value_head = Some(ValueHead {
                    weight: Param::frozen(wv),
                    bias: Param::frozen(bv),
                    dropout,
                });
            }
            _ => {}
        }
    }
    // Every factor is checked against `r` and the model before `apply_lora` allocates
    // `r × in` factors: `r` comes from the file, and a huge one must be a shape error, not
    // an aborted allocation.
    for (name, proj) in m.backbone().projections() {
        let module = format!("{prefix}.{name}");
        if cfg.is_target(&module, defaults) {
            for f in factors(&cfg, &module, proj.shape()) {
                f.check(&t, &wpath)?;
            }
        }
    }
    apply_lora(&mut m, &cfg, 0).map_err(|e| adapter_err(&cfg_path, e.to_string()))?;
    let keep = cfg.reference_bias == ReferenceBias::Original;
    for (name, proj) in m.backbone_mut().projections_mut() {
        let shape = proj.shape();
        let Proj::Lora(l) = proj else { continue };
        let module = format!("{prefix}.{name}");
        let [fa, fb] = factors(&cfg, &module, shape);
        for (f, p) in [(fa, &mut l.lora_a), (fb, &mut l.lora_b)] {
            f.check(&t, &wpath)?;
            if let Some(v) = t.remove(&f.key) {
                p.assign(&v)?;
            }
        }
        // PEFT >= 0.14 writes the targeted bias as `M.base_layer.bias`; 0.13 as `M.bias`.
        let bias = t
            .remove(&format!("{module}.base_layer.bias"))
            .or_else(|| t.remove(&format!("{module}.bias")));
        if let Some(bv) = bias {
            assign_bias(proj.bias_mut(), &bv, keep, &wpath, &format!("{module}.base_layer.bias"))?;
        }
    }
    for (name, p) in m.backbone_mut().named_params_mut() {
        let key = format!("{prefix}.{name}");
        if let (true, Some(bv)) = (name.ends_with(".bias"), t.remove(&key)) {
            assign_bias(Some(p), &bv, keep, &wpath, &key)?;
        }
    }
    for s in saved {
        let names: &[&str] = match s {
            SavedModule::Score => &["score.weight"],
            SavedModule::ValueHead => &["v_head.summary.weight", "v_head.summary.bias"],
        };
        let params = super::head_params_mut(&mut m, s);
        for (key, p) in names.iter().zip(params) {
            let v = t.remove(*key).ok_or_else(|| {
                adapter_err(
                    &wpath,
                    format!("`{PEFT_PREFIX}{key}` is missing, but modules_to_save lists it"),
                )
            })?;
            check_shape(&wpath, key, &v, p.value().dims())?;
            p.assign(&v)?;
        }
    }
    if !t.is_empty() {
        let keys: Vec<String> = t.keys().take(4).map(|k| format!("`{PEFT_PREFIX}{k}`")).collect();
        return Err(adapter_err(
            &wpath,
            format!(
                "{} tensor(s) match no adapted module of this model: {}\nhint: the adapter was trained on a different architecture (n_layer), or its target_modules / modules_to_save / bias do not match its tensors",
                t.len(),
                keys.join(", ")
            ),
        ));
    }
    if !opts.is_trainable {
        m.set_trainable(false)?;
    }
    *model = m;
    Ok(warnings)
}

fn adapter_err(path: &Path, msg: String) -> ModelError {
    ModelError::Adapter {
        path: path.to_path_buf(),
        msg,
    }
}

/// One LoRA factor a targeted module needs from the file: its key (without the PEFT
/// prefix) and the shape `r` and the model give it.
struct Factor<'a> {
    key: String,
    module: &'a str,
    shape: [usize; 2],
    cfg: &'a LoraConfig,
    in_out: (usize, usize),
}

/// `lora_A.weight` `(r, in)` and `lora_B.weight` `(out, r)` of `module`.
fn factors<'a>(cfg: &'a LoraConfig, module: &'a str, (i, o): (usize, usize)) -> [Factor<'a>; 2] {
    let f = |suffix: &str, shape| Factor {
        key: format!("{module}.{suffix}"),
        module,
        shape,
        cfg,
        in_out: (i, o),
    };
    [f("lora_A.weight", [cfg.r, i]), f("lora_B.weight", [o, cfg.r])]
}

impl Factor<'_> {
    /// The factor is in the file, with its shape.
    fn check(&self, t: &BTreeMap<String, Tensor>, path: &Path) -> Result<()> {
        let (key, module, shape) = (&self.key, self.module, self.shape);
        let v = t.get(key).ok_or_else(|| {
            adapter_err(
                path,
                format!("`{PEFT_PREFIX}{key}` is missing, but target_modules selects `{module}`\nhint: the adapter is incomplete or its config does not belong to it"),
            )
        })?;
        if v.dims() == shape {
            return Ok(());
        }
        let ((i, o), r) = (self.in_out, self.cfg.r);
        let base = self.cfg.base_model_name_or_path.as_deref().unwrap_or_default();
        Err(adapter_err(
            path,
            format!(
                "tensor `{PEFT_PREFIX}{key}` has shape {:?}, but this model needs {shape:?} (r = {r} from {ADAPTER_CONFIG}; in = {i}, out = {o} from the model)\nhint: the adapter was trained on a different base model (base_model_name_or_path: `{base}`), or `r` in {ADAPTER_CONFIG} does not match its tensors",
                v.dims()
            ),
        ))
    }
}

fn need<'a>(t: &'a BTreeMap<String, Tensor>, key: &str, path: &Path) -> Result<&'a Tensor> {
    t.get(key).ok_or_else(|| {
        adapter_err(
            path,
            format!("`{PEFT_PREFIX}{key}` is missing, but modules_to_save lists it and the base model has none"),
        )
    })
}

fn check_shape(path: &Path, key: &str, t: &Tensor, want: &[usize]) -> Result<()> {
    if t.dims() == want {
        return Ok(());
    }
    Err(adapter_err(
        path,
        format!(
            "tensor `{PEFT_PREFIX}{key}` has shape {:?}, but this model needs {want:?}\nhint: the adapter was trained on a different base model",
            t.dims()
        ),
    ))
}

/// Replaces a bias with the adapter's, first keeping the model's value as the original when
/// the reference uses originals.
fn assign_bias(p: Option<&mut Param>, v: &Tensor, keep: bool, path: &Path, key: &str) -> Result<()> {
    let Some(p) = p else {
        return Err(adapter_err(
            path,
            format!("`{PEFT_PREFIX}{key}`: the model's module has no bias"),
        ));
    };
    check_shape(path, key, v, p.value().dims())?;
    if keep {
        p.keep_original()?;
    }
    Ok(p.assign(v)?)
}

/// A warning when `base_model_name_or_path` does not name the model's directory: neither the
/// path (as is, or relative to the adapter directory or its parent) resolves to it, nor do
/// their last components agree (a hub id such as `gpt2` against a local `.../gpt2`).
fn base_mismatch(base: Option<&str>, adapter_dir: &Path, model_dir: Option<&Path>) -> Option<String> {
    let (base, model_dir) = (base?, model_dir?);
    if base.is_empty() {
        return None;
    }
    let canon = |p: &Path| std::fs::canonicalize(p).ok();
    let target = canon(model_dir);
    let mut candidates: Vec<PathBuf> = vec![PathBuf::from(base), adapter_dir.join(base)];
    if let Some(parent) = adapter_dir.parent() {
        candidates.push(parent.join(base));
    }
    if target.is_some() && candidates.iter().any(|c| canon(c) == target) {
        return None;
    }
    let last = |p: &Path| p.components().next_back().map(|c| c.as_os_str().to_owned());
    let model_name = target.as_deref().map_or_else(|| last(model_dir), last);
    if last(Path::new(base)).is_some() && last(Path::new(base)) == model_name {
        return None;
    }
    Some(format!(
        "{}: the adapter was trained on `{base}` (base_model_name_or_path) but is applied to `{}`; loading anyway",
        adapter_dir.display(),
        model_dir.display()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_names_match_by_resolved_path_or_last_component() {
        let d = Path::new("/nonexistent/adapters/a1");
        assert!(base_mismatch(Some("../tiny-gpt2"), d, Some(Path::new("/x/tiny-gpt2"))).is_none());
        assert!(base_mismatch(Some("gpt2"), d, Some(Path::new("/models/gpt2"))).is_none());
        assert!(base_mismatch(None, d, Some(Path::new("/models/gpt2"))).is_none());
        assert!(base_mismatch(Some("gpt2-medium"), d, Some(Path::new("/models/gpt2"))).is_some());
    }
}
