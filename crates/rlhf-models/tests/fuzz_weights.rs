//! Property tests (proptest) for model and adapter directories a user points the tools at:
//! `Model::load` on a tiny valid checkpoint whose `config.json` is random or mutated and whose
//! `model.safetensors` has flipped, inserted or deleted bytes, a cut tail, an edited header, or
//! renamed / reshaped / retyped / dropped tensors; `lora::load_adapter` on the same edits of
//! `fixtures/lora/adapter`. Properties: no panic; every error names the directory's file.
//!
//! Integers in the JSON files include huge ones (2^32, 2^53, `u64::MAX`): a loader must check
//! `n_layer` or `r` against the weights before it allocates per layer or per rank. The inputs
//! that once aborted or panicked are kept as tests at the end; the two that allocate run in a
//! child process limited with `ulimit -v`. `PROPTEST_CASES=N` runs N cases per property
//! (docs/reliability.md).

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use candle_core::{DType, Device};
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use rlhf_models::lora::{load_adapter, AdapterLoadOptions};
use rlhf_models::{LoadOptions, Model, ModelConfig};
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use serde_json::{Map, Value};

type TestResult = Result<(), TestCaseError>;

/// `cases` per property, unless `PROPTEST_CASES` says otherwise; failures are printed, not
/// persisted.
fn config(cases: u32) -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(cases);
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

fn fixtures() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../fixtures"))
}

/// The files of a valid directory: (name, bytes).
type Files = Vec<(&'static str, Vec<u8>)>;

/// A tiny random GPT-2 (1 layer, 2 heads, n_embd 8, 16 positions, 300 tokens; no tokenizer):
/// `config.json` and `model.safetensors`.
fn tiny_checkpoint() -> &'static Files {
    static FILES: OnceLock<Files> = OnceLock::new();
    FILES.get_or_init(|| {
        let dir = tempfile::tempdir().expect("invariant: a temp dir");
        let model = Model::random(ModelConfig::gpt2(1, 2, 8, 16, 300), 0, DType::F32, &Device::Cpu)
            .expect("invariant: a valid config");
        model.save(dir.path()).expect("invariant: the temp dir is writable");
        ["config.json", "model.safetensors"]
            .into_iter()
            .map(|n| (n, std::fs::read(dir.path().join(n)).expect("invariant: just saved")))
            .collect()
    })
}

/// `fixtures/lora/adapter`: `adapter_config.json` and `adapter_model.safetensors`.
fn adapter_files() -> &'static Files {
    static FILES: OnceLock<Files> = OnceLock::new();
    FILES.get_or_init(|| {
        ["adapter_config.json", "adapter_model.safetensors"]
            .into_iter()
            .map(|n| {
                let p = fixtures().join("lora/adapter").join(n);
                (n, std::fs::read(&p).expect("invariant: the fixture exists"))
            })
            .collect()
    })
}

/// fixtures/tiny-gpt2, the adapter's base, loaded once (each case applies to a clone).
fn tiny_gpt2() -> &'static Model {
    static MODEL: OnceLock<Model> = OnceLock::new();
    MODEL.get_or_init(|| Model::load(&fixtures().join("tiny-gpt2"), &LoadOptions::default()).expect("tiny-gpt2 loads"))
}

/// The error names `dir` (all of its files are inside it).
fn names_dir(msg: &str, dir: &Path) -> TestResult {
    prop_assert!(
        msg.contains(&dir.display().to_string()),
        "error does not name a file of {}: {msg}",
        dir.display()
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Edits of JSON files

/// Any JSON value; integers mostly small, sometimes huge (`n_layer` or `r` of 2^32 and more).
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        3 => (0..=64u64).prop_map(Value::from),
        1 => any::<i64>().prop_map(Value::from),
        1 => prop::sample::select(vec![u64::MAX, 1 << 32, 1 << 53, i64::MAX as u64]).prop_map(Value::from),
        2 => any::<f64>().prop_map(|x| serde_json::Number::from_f64(x).map_or(Value::Null, Value::Number)),
        1 => prop::sample::select(vec![0.0, -0.0, 0.5, 1.0, -1.0, 1e-300, 1e300]).prop_map(Value::from),
        1 => Just(Value::Null),
        1 => any::<bool>().prop_map(Value::Bool),
        2 => prop::collection::vec(any::<char>(), 0..12).prop_map(|c| Value::String(c.into_iter().collect())),
        2 => prop::sample::select(vec![
            "gpt2", "llama", "gelu", "gelu_new", "relu", "swiglu", "LORA", "lora_only", "all", "none",
            "all-linear", "c_attn", "c_proj", "score", "v_head", "classifier", "gaussian", "pissa", "CAUSAL_LM",
        ])
        .prop_map(Value::from),
    ];
    leaf.prop_recursive(2, 8, 3, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map("[a-z_]{1,6}", inner, 0..3)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A change to one key of a JSON object.
#[derive(Clone, Debug)]
enum JsonEdit {
    Set(String, Value),
    Remove(String),
}

/// Edits of `keys` (or other keys).
fn json_edits(keys: &'static [&'static str]) -> impl Strategy<Value = Vec<JsonEdit>> {
    let key = prop_oneof![
        6 => prop::sample::select(keys.to_vec()).prop_map(String::from),
        1 => "[a-z_]{1,10}",
    ];
    let edit = prop_oneof![
        4 => (key.clone(), json_value()).prop_map(|(k, v)| JsonEdit::Set(k, v)),
        1 => key.prop_map(JsonEdit::Remove),
    ];
    prop::collection::vec(edit, 1..5)
}

fn edit_json(bytes: &[u8], edits: &[JsonEdit]) -> Vec<u8> {
    let mut m: Map<String, Value> = serde_json::from_slice(bytes).expect("invariant: a valid fixture");
    for e in edits {
        match e {
            JsonEdit::Set(k, v) => m.insert(k.clone(), v.clone()),
            JsonEdit::Remove(k) => m.remove(k),
        };
    }
    serde_json::to_vec_pretty(&m).expect("invariant: JSON serialises")
}

const CONFIG_KEYS: &[&str] = &[
    "n_layer",
    "n_head",
    "n_embd",
    "n_inner",
    "n_positions",
    "vocab_size",
    "activation_function",
    "layer_norm_epsilon",
    "scale_attn_weights",
    "scale_attn_by_inverse_layer_idx",
    "reorder_and_upcast_attn",
    "tie_word_embeddings",
    "attn_pdrop",
    "embd_pdrop",
    "resid_pdrop",
    "summary_dropout_prob",
    "eos_token_id",
    "bos_token_id",
    "pad_token_id",
    "num_labels",
    "id2label",
    "model_type",
    "architectures",
];

const ADAPTER_KEYS: &[&str] = &[
    "r",
    "lora_alpha",
    "lora_dropout",
    "bias",
    "target_modules",
    "modules_to_save",
    "fan_in_fan_out",
    "init_lora_weights",
    "use_rslora",
    "use_dora",
    "lora_bias",
    "peft_type",
    "task_type",
    "base_model_name_or_path",
    "inference_mode",
    "layers_to_transform",
    "layers_pattern",
    "rank_pattern",
    "alpha_pattern",
    "exclude_modules",
    "target_parameters",
    "trainable_token_indices",
    "layer_replication",
    "megatron_config",
    "loftq_config",
    "reference_bias",
];

// ---------------------------------------------------------------------------------------
// Edits of safetensors files

/// One edit of a file's bytes; positions are fractions of the length.
#[derive(Clone, Debug)]
enum ByteEdit {
    Truncate(f64),
    Set(f64, u8),
    Insert(f64, Vec<u8>),
    Delete(f64, usize),
    /// A little-endian u64 written over 8 bytes (the header length is one).
    U64(f64, u64),
}

fn byte_edits() -> impl Strategy<Value = Vec<ByteEdit>> {
    let at = || prop_oneof![3 => 0.0..1.0f64, 1 => 0.0..0.01f64];
    let edit = prop_oneof![
        at().prop_map(ByteEdit::Truncate),
        (at(), any::<u8>()).prop_map(|(p, b)| ByteEdit::Set(p, b)),
        (at(), prop::collection::vec(any::<u8>(), 1..32)).prop_map(|(p, b)| ByteEdit::Insert(p, b)),
        (at(), 1..64usize).prop_map(|(p, n)| ByteEdit::Delete(p, n)),
        (at(), prop_oneof![any::<u64>(), Just(0), Just(u64::MAX), 0..4096u64]).prop_map(|(p, v)| ByteEdit::U64(p, v)),
    ];
    prop::collection::vec(edit, 1..4)
}

fn apply_bytes(bytes: &mut Vec<u8>, edits: &[ByteEdit]) {
    let at = |p: f64, len: usize| ((p * len as f64) as usize).min(len);
    for e in edits {
        match e {
            ByteEdit::Truncate(p) => bytes.truncate(at(*p, bytes.len())),
            ByteEdit::Set(p, b) => {
                if !bytes.is_empty() {
                    let i = at(*p, bytes.len() - 1);
                    bytes[i] = *b;
                }
            }
            ByteEdit::Insert(p, b) => {
                let i = at(*p, bytes.len());
                bytes.splice(i..i, b.iter().copied());
            }
            ByteEdit::Delete(p, n) => {
                let i = at(*p, bytes.len());
                bytes.drain(i..(i + n).min(bytes.len()));
            }
            ByteEdit::U64(p, v) => {
                if bytes.len() >= 8 {
                    let i = at(*p, bytes.len() - 8);
                    bytes[i..i + 8].copy_from_slice(&v.to_le_bytes());
                }
            }
        }
    }
}

/// A change to the header JSON (kept well-formed, its length field updated), the data kept.
#[derive(Clone, Debug)]
enum HeaderEdit {
    /// Sets field `dtype`, `shape` or `data_offsets` of the tensor at this index to a value.
    Field(prop::sample::Index, &'static str, Value),
    /// Renames the tensor at this index.
    Rename(prop::sample::Index, String),
    /// Adds a `__metadata__` entry.
    Metadata(Value),
}

fn header_edits(names: &'static [&'static str]) -> impl Strategy<Value = Vec<HeaderEdit>> {
    let shape = prop_oneof![
        prop::collection::vec(0..20u64, 0..4).prop_map(Value::from),
        json_value(),
    ];
    let offsets = prop_oneof![
        (0..100_000u64, 0..100_000u64).prop_map(|(a, b)| Value::from(vec![a, b])),
        (any::<u64>(), any::<u64>()).prop_map(|(a, b)| Value::from(vec![a, b])),
        json_value(),
    ];
    let dtype = prop_oneof![
        prop::sample::select(vec![
            "F32", "F16", "BF16", "F64", "I64", "U8", "BOOL", "F8_E4M3", "F4", "XYZ"
        ])
        .prop_map(Value::from),
        json_value(),
    ];
    let edit = prop_oneof![
        (any::<prop::sample::Index>(), shape).prop_map(|(i, v)| HeaderEdit::Field(i, "shape", v)),
        (any::<prop::sample::Index>(), offsets).prop_map(|(i, v)| HeaderEdit::Field(i, "data_offsets", v)),
        (any::<prop::sample::Index>(), dtype).prop_map(|(i, v)| HeaderEdit::Field(i, "dtype", v)),
        (any::<prop::sample::Index>(), tensor_name(names)).prop_map(|(i, n)| HeaderEdit::Rename(i, n)),
        json_value().prop_map(HeaderEdit::Metadata),
    ];
    prop::collection::vec(edit, 1..4)
}

/// Tensor names a loader treats specially, other tensors' names, and random ones.
fn tensor_name(names: &'static [&'static str]) -> impl Strategy<Value = String> {
    prop_oneof![
        2 => prop::sample::select(names.to_vec()).prop_map(String::from),
        1 => "[a-z_.]{0,12}",
    ]
}

fn apply_header(bytes: &[u8], edits: &[HeaderEdit]) -> Vec<u8> {
    let n = u64::from_le_bytes(bytes[..8].try_into().expect("invariant: 8 bytes")) as usize;
    let mut header: Map<String, Value> = serde_json::from_slice(&bytes[8..8 + n]).expect("invariant: valid header");
    let data = &bytes[8 + n..];
    for e in edits {
        let mut names: Vec<String> = header.keys().filter(|k| *k != "__metadata__").cloned().collect();
        names.sort();
        match e {
            HeaderEdit::Field(i, field, v) if !names.is_empty() => {
                let name = &names[i.index(names.len())];
                if let Some(Value::Object(t)) = header.get_mut(name) {
                    t.insert(field.to_string(), v.clone());
                }
            }
            HeaderEdit::Rename(i, to) if !names.is_empty() => {
                let name = names[i.index(names.len())].clone();
                if let Some(t) = header.remove(&name) {
                    header.insert(to.clone(), t);
                }
            }
            HeaderEdit::Metadata(v) => {
                header.insert("__metadata__".into(), serde_json::json!({ "k": v }));
            }
            _ => {}
        }
    }
    let h = serde_json::to_vec(&header).expect("invariant: JSON serialises");
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&h);
    out.extend_from_slice(data);
    out
}

/// A well-formed file with wrong content: tensors renamed, reshaped (data resized to fit),
/// retyped, dropped, added.
#[derive(Clone, Debug)]
enum TensorEdit {
    Rename(prop::sample::Index, String),
    Reshape(prop::sample::Index, Vec<usize>),
    Retype(prop::sample::Index, Dtype),
    Drop(prop::sample::Index),
    Add(String, Vec<usize>),
}

fn tensor_edits(names: &'static [&'static str]) -> impl Strategy<Value = Vec<TensorEdit>> {
    let shape = || prop::collection::vec(0..9usize, 0..4);
    let dtype = prop::sample::select(vec![
        Dtype::F32,
        Dtype::F16,
        Dtype::BF16,
        Dtype::F64,
        Dtype::I64,
        Dtype::I32,
        Dtype::U8,
        Dtype::BOOL,
        Dtype::F8_E4M3,
    ]);
    let i = any::<prop::sample::Index>;
    let edit = prop_oneof![
        (i(), tensor_name(names)).prop_map(|(i, n)| TensorEdit::Rename(i, n)),
        (i(), shape()).prop_map(|(i, s)| TensorEdit::Reshape(i, s)),
        (i(), dtype).prop_map(|(i, d)| TensorEdit::Retype(i, d)),
        i().prop_map(TensorEdit::Drop),
        (tensor_name(names), shape()).prop_map(|(n, s)| TensorEdit::Add(n, s)),
    ];
    prop::collection::vec(edit, 1..4)
}

fn apply_tensors(bytes: &[u8], edits: &[TensorEdit]) -> Vec<u8> {
    let st = SafeTensors::deserialize(bytes).expect("invariant: a valid file");
    let mut tensors: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| (n, v.dtype(), v.shape().to_vec(), v.data().to_vec()))
        .collect();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    let size = |dtype: Dtype, shape: &[usize]| shape.iter().product::<usize>() * dtype.bitsize() / 8;
    let fit = |data: &mut Vec<u8>, len: usize| data.resize(len, 0x3c);
    for e in edits {
        let n = tensors.len();
        match e {
            TensorEdit::Rename(i, to) if n > 0 => {
                let from = tensors[i.index(n)].0.clone();
                if from != *to {
                    tensors.retain(|t| t.0 != *to);
                    if let Some(t) = tensors.iter_mut().find(|t| t.0 == from) {
                        t.0 = to.clone();
                    }
                }
            }
            TensorEdit::Reshape(i, shape) if n > 0 => {
                let t = &mut tensors[i.index(n)];
                t.2 = shape.clone();
                fit(&mut t.3, size(t.1, shape));
            }
            TensorEdit::Retype(i, dtype) if n > 0 => {
                let t = &mut tensors[i.index(n)];
                t.1 = *dtype;
                fit(&mut t.3, size(*dtype, &t.2));
            }
            TensorEdit::Drop(i) if n > 0 => {
                tensors.remove(i.index(n));
            }
            TensorEdit::Add(name, shape) => {
                tensors.retain(|t| t.0 != *name);
                tensors.push((
                    name.clone(),
                    Dtype::F32,
                    shape.clone(),
                    vec![0; size(Dtype::F32, shape)],
                ));
            }
            _ => {}
        }
    }
    let views: Vec<(String, TensorView)> = tensors
        .iter()
        .map(|(n, d, s, b)| {
            (
                n.clone(),
                TensorView::new(*d, s.clone(), b).expect("invariant: sized to fit"),
            )
        })
        .collect();
    safetensors::serialize(views, None).expect("invariant: valid views")
}

/// Names in the tiny checkpoint and names `Model::load` looks for.
const MODEL_NAMES: &[&str] = &[
    "transformer.wte.weight",
    "transformer.wpe.weight",
    "transformer.h.0.attn.c_attn.weight",
    "transformer.h.0.ln_1.bias",
    "transformer.ln_f.weight",
    "wte.weight",
    "h.1.ln_1.weight",
    "lm_head.weight",
    "score.weight",
    "score.bias",
    "v_head.summary.weight",
    "v_head.summary.bias",
    "transformer.h.0.attn.bias",
];

/// Names in the fixture adapter and names `load_adapter` looks for.
const ADAPTER_NAMES: &[&str] = &[
    "base_model.model.transformer.h.0.attn.c_attn.lora_A.weight",
    "base_model.model.transformer.h.0.attn.c_attn.lora_B.weight",
    "base_model.model.transformer.h.1.attn.c_attn.lora_A.weight",
    "base_model.model.transformer.h.0.attn.c_attn.base_layer.bias",
    "base_model.model.transformer.h.0.attn.c_attn.bias",
    "base_model.model.transformer.h.0.mlp.c_fc.lora_A.weight",
    "base_model.model.transformer.h.5.attn.c_attn.lora_A.weight",
    "base_model.model.transformer.ln_f.bias",
    "base_model.model.score.weight",
    "base_model.model.v_head.summary.weight",
    "base_model.model.v_head.summary.bias",
    "transformer.h.0.attn.c_attn.lora_A.weight",
];

/// How a safetensors file is damaged.
#[derive(Clone, Debug)]
enum Damage {
    Bytes(Vec<ByteEdit>),
    Header(Vec<HeaderEdit>),
    Tensors(Vec<TensorEdit>),
    None,
}

fn damage(names: &'static [&'static str]) -> impl Strategy<Value = Damage> {
    prop_oneof![
        3 => byte_edits().prop_map(Damage::Bytes),
        3 => header_edits(names).prop_map(Damage::Header),
        3 => tensor_edits(names).prop_map(Damage::Tensors),
        1 => Just(Damage::None),
    ]
}

fn damaged(valid: &[u8], d: &Damage) -> Vec<u8> {
    match d {
        Damage::Bytes(e) => {
            let mut b = valid.to_vec();
            apply_bytes(&mut b, e);
            b
        }
        Damage::Header(e) => apply_header(valid, e),
        Damage::Tensors(e) => apply_tensors(valid, e),
        Damage::None => valid.to_vec(),
    }
}

/// How a JSON file is damaged: edited keys, or its bytes.
#[derive(Clone, Debug)]
enum JsonDamage {
    Keys(Vec<JsonEdit>),
    Bytes(Vec<ByteEdit>),
    Replace(Value),
}

fn json_damage(keys: &'static [&'static str]) -> impl Strategy<Value = JsonDamage> {
    prop_oneof![
        6 => json_edits(keys).prop_map(JsonDamage::Keys),
        2 => byte_edits().prop_map(JsonDamage::Bytes),
        1 => json_value().prop_map(JsonDamage::Replace),
    ]
}

fn damaged_json(valid: &[u8], d: &JsonDamage) -> Vec<u8> {
    match d {
        JsonDamage::Keys(e) => edit_json(valid, e),
        JsonDamage::Bytes(e) => {
            let mut b = valid.to_vec();
            apply_bytes(&mut b, e);
            b
        }
        JsonDamage::Replace(v) => serde_json::to_vec(v).expect("invariant: JSON serialises"),
    }
}

/// Writes `files` to a fresh directory.
fn write_dir(files: &[(&str, Vec<u8>)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("invariant: a temp dir");
    for (name, bytes) in files {
        std::fs::write(dir.path().join(name), bytes).expect("invariant: the temp dir is writable");
    }
    dir
}

// ---------------------------------------------------------------------------------------
// Properties

proptest! {
    #![proptest_config(config(8000))]

    /// `Model::load` on a damaged config.json and/or model.safetensors: loads, or fails naming
    /// a file of the directory; never panics.
    #[test]
    fn a_damaged_checkpoint_fails_naming_its_file(
        cfg in prop_oneof![1 => Just(None), 2 => json_damage(CONFIG_KEYS).prop_map(Some)],
        weights in damage(MODEL_NAMES),
    ) {
        let [(c, cfg_bytes), (w, w_bytes)] = &tiny_checkpoint()[..] else { unreachable!("two files") };
        let cfg_bytes = cfg.as_ref().map_or_else(|| cfg_bytes.clone(), |d| damaged_json(cfg_bytes, d));
        let dir = write_dir(&[(c, cfg_bytes), (w, damaged(w_bytes, &weights))]);
        match Model::load(dir.path(), &LoadOptions::default()) {
            Ok(m) => {
                // Whatever loaded must fit its config.
                prop_assert_eq!(m.backbone().layers.len(), m.cfg().num_hidden_layers);
            }
            Err(e) => names_dir(&e.to_string(), dir.path())?,
        }
    }
}

proptest! {
    #![proptest_config(config(1000))]

    /// `load_adapter` on a damaged adapter_config.json and/or adapter_model.safetensors
    /// (fixtures/lora/adapter): applies, or fails naming a file of the adapter directory and
    /// leaves the model unchanged; never panics.
    #[test]
    fn a_damaged_adapter_fails_naming_its_file(
        cfg in prop_oneof![1 => Just(None), 2 => json_damage(ADAPTER_KEYS).prop_map(Some)],
        weights in damage(ADAPTER_NAMES),
        is_trainable in any::<bool>(),
    ) {
        let [(c, cfg_bytes), (w, w_bytes)] = &adapter_files()[..] else { unreachable!("two files") };
        let cfg_bytes = cfg.as_ref().map_or_else(|| cfg_bytes.clone(), |d| damaged_json(cfg_bytes, d));
        let w_bytes = damaged(w_bytes, &weights);
        let dir = write_dir(&[(c, cfg_bytes), (w, w_bytes)]);
        let mut model = tiny_gpt2().clone();
        let opts = AdapterLoadOptions { is_trainable, reference_bias: None };
        match load_adapter(&mut model, dir.path(), &opts) {
            Ok(_) => prop_assert!(model.lora.is_some()),
            Err(e) => {
                names_dir(&e.to_string(), dir.path())?;
                prop_assert!(model.lora.is_none(), "a failed load changed the model");
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Inputs that once panicked, aborted or loaded a broken model (docs/reliability.md).

/// An adapter whose config saves `score` while the base has no score head, and whose
/// `base_model.model.score.weight` is a scalar (shape `[]`), is a shape error (it used to
/// panic with "index out of bounds" in `load_adapter`).
#[test]
fn a_scalar_score_weight_in_an_adapter_is_an_error() {
    let [(c, cfg), (w, weights)] = &adapter_files()[..] else {
        unreachable!("two files")
    };
    let cfg = edit_json(
        cfg,
        &[JsonEdit::Set("modules_to_save".into(), serde_json::json!(["score"]))],
    );
    let weights = apply_tensors(
        weights,
        &[TensorEdit::Add("base_model.model.score.weight".into(), vec![])],
    );
    let dir = write_dir(&[(c, cfg), (w, weights)]);
    let mut model = tiny_gpt2().clone();
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        load_adapter(&mut model, dir.path(), &AdapterLoadOptions::default()).map_err(|e| e.to_string())
    }));
    match r {
        Ok(Err(msg)) => assert!(
            msg.contains("adapter_model.safetensors") && msg.contains("score.weight"),
            "{msg}"
        ),
        Ok(Ok(_)) => panic!("a scalar score.weight was accepted"),
        Err(_) => panic!("load_adapter panicked"),
    }
}

/// Runs the ignored test `name` of this binary in a child process limited to 2 GiB of
/// address space (`ulimit -v`), so that an allocation of terabytes fails at once; returns
/// whether the child succeeded, and its output.
fn in_limited_child(name: &str) -> (bool, String) {
    let exe = std::env::current_exe().expect("invariant: the test binary exists");
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "ulimit -v 2097152; exec '{}' --exact {name} --ignored --nocapture --test-threads 1",
            exe.display()
        ))
        .env("RLHF_FUZZ_CHILD", "1")
        .output()
        .expect("invariant: sh runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// A config.json with a huge `n_layer` (2^40, 2^62) is "tensor `h.1.ln_1.weight` is missing"
/// (`Gpt2::from_weights` used to reserve `n_layer` blocks first: "memory allocation of ...
/// bytes failed" / "capacity overflow").
#[test]
fn a_huge_n_layer_is_a_missing_tensor_error() {
    let (ok, out) = in_limited_child("huge_n_layer_child");
    assert!(ok, "{out}");
}

/// The body of [`a_huge_n_layer_is_a_missing_tensor_error`], run in a limited child.
#[test]
#[ignore = "run by a_huge_n_layer_is_a_missing_tensor_error in a memory-limited child"]
fn huge_n_layer_child() {
    assert!(
        std::env::var("RLHF_FUZZ_CHILD").is_ok(),
        "run through its parent test only"
    );
    for n_layer in [1u64 << 40, 1 << 62] {
        let [(c, cfg), (w, weights)] = &tiny_checkpoint()[..] else {
            unreachable!("two files")
        };
        let cfg = edit_json(cfg, &[JsonEdit::Set("n_layer".into(), Value::from(n_layer))]);
        let dir = write_dir(&[(c, cfg), (w, weights.clone())]);
        let err = Model::load(dir.path(), &LoadOptions::default())
            .err()
            .map(|e| e.to_string());
        assert!(
            err.as_deref()
                .is_some_and(|e| e.contains("h.1.ln_1.weight") && e.contains("missing")),
            "{err:?}"
        );
    }
}

/// An adapter_config.json with `"r": 4294967296` is the shape error naming `lora_A.weight`
/// (`load_adapter` used to call `apply_lora`, which draws `r × in` factors, before comparing
/// `r` with the file's tensors, and the allocation aborted the process).
#[test]
fn a_huge_adapter_rank_is_a_shape_error() {
    let (ok, out) = in_limited_child("huge_adapter_rank_child");
    assert!(ok, "{out}");
}

/// The body of [`a_huge_adapter_rank_is_a_shape_error`], run in a limited child.
#[test]
#[ignore = "run by a_huge_adapter_rank_is_a_shape_error in a memory-limited child"]
fn huge_adapter_rank_child() {
    assert!(
        std::env::var("RLHF_FUZZ_CHILD").is_ok(),
        "run through its parent test only"
    );
    let [(c, cfg), (w, weights)] = &adapter_files()[..] else {
        unreachable!("two files")
    };
    let cfg = edit_json(cfg, &[JsonEdit::Set("r".into(), Value::from(1u64 << 32))]);
    let dir = write_dir(&[(c, cfg), (w, weights.clone())]);
    let mut model = tiny_gpt2().clone();
    let err = load_adapter(&mut model, dir.path(), &AdapterLoadOptions::default())
        .err()
        .map(|e| e.to_string());
    assert!(err.as_deref().is_some_and(|e| e.contains("lora_A.weight")), "{err:?}");
}

/// When the base has no value head, the adapter's `v_head.summary.{weight,bias}` are checked
/// against `(1, H)` and `(1)`: a `(3, 5)` value head is an error naming the tensor (it used to
/// load and fail only at the first forward pass).
#[test]
fn a_value_head_of_the_wrong_shape_in_an_adapter_is_an_error() {
    let [(c, cfg), (w, weights)] = &adapter_files()[..] else {
        unreachable!("two files")
    };
    let cfg = edit_json(
        cfg,
        &[JsonEdit::Set("modules_to_save".into(), serde_json::json!(["v_head"]))],
    );
    let weights = apply_tensors(
        weights,
        &[
            TensorEdit::Add("base_model.model.v_head.summary.weight".into(), vec![3, 5]),
            TensorEdit::Add("base_model.model.v_head.summary.bias".into(), vec![2]),
        ],
    );
    let dir = write_dir(&[(c, cfg), (w, weights)]);
    let mut model = tiny_gpt2().clone();
    let err = load_adapter(&mut model, dir.path(), &AdapterLoadOptions::default())
        .err()
        .map(|e| e.to_string());
    assert!(
        err.as_deref()
            .is_some_and(|e| e.contains("v_head.summary.weight") && e.contains("[1, 128]")),
        "{err:?}"
    );
}
