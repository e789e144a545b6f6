//! Reading `fixtures/algorithms/*.json` (made by `algo_fixtures.py` with trl 1.16.0; see
//! `fixtures/algorithms/README.md`) for the GRPO / RLOO / DPO parity tests.
//!
//! Tolerances (the README's): advantages 1e-5 absolute; rewards and stds 1e-6; losses and
//! metrics 1e-4 relative or 1e-6 absolute near 0; counts (clip ratios, accuracies)
//! exactly, up to f32 rounding of the fraction.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde_json::Value;

/// The repository root.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// `fixtures/algorithms/<name>.json`.
pub fn load(name: &str) -> Value {
    let path = repo().join("fixtures/algorithms").join(format!("{name}.json"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A number, with `null` as NaN (the fixtures' convention for `None` rewards).
pub fn num(v: &Value) -> f64 {
    if v.is_null() {
        f64::NAN
    } else {
        v.as_f64().unwrap_or_else(|| panic!("expected a number, got {v}"))
    }
}

/// A flat array of numbers (`null` → NaN).
pub fn f64s(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap_or_else(|| panic!("expected an array, got {v}"))
        .iter()
        .map(num)
        .collect()
}

/// A 2-D array of numbers (`null` → NaN).
pub fn rows(v: &Value) -> Vec<Vec<f64>> {
    v.as_array().expect("2-D array").iter().map(f64s).collect()
}

/// A 2-D array of token ids.
pub fn ids(v: &Value) -> Vec<Vec<u32>> {
    rows(v)
        .into_iter()
        .map(|r| r.into_iter().map(|x| x as u32).collect())
        .collect()
}

/// A 1-D or 2-D numeric array as a tensor of `dtype`.
pub fn tensor(v: &Value, dtype: DType) -> Tensor {
    let items = v.as_array().expect("array");
    let t = if items.first().is_some_and(Value::is_array) {
        let r = rows(v);
        let (b, t) = (r.len(), r[0].len());
        Tensor::from_vec(r.concat(), (b, t), &Device::Cpu)
    } else {
        let x = f64s(v);
        let n = x.len();
        Tensor::from_vec(x, n, &Device::Cpu)
    };
    t.and_then(|t| t.to_dtype(dtype)).expect("fixture tensor")
}

/// A JSON file of the fixture's model directory (`meta.model`), if it is there.
pub fn model_file(fixture: &Value, name: &str) -> Option<Value> {
    let model = fixture["meta"]["model"].as_str()?;
    let text = std::fs::read_to_string(repo().join(model).join(name)).ok()?;
    serde_json::from_str(&text).ok()
}

/// An id or a list of ids.
fn id_list(v: &Value) -> Vec<u32> {
    match v {
        Value::Array(items) => items.iter().filter_map(Value::as_u64).map(|x| x as u32).collect(),
        other => other.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
    }
}

/// The EOS ids and the pad id TRL used: from the model's `config.json` and
/// `generation_config.json` (pad falls back to the first EOS, as in TRL); without the
/// model directory, read off the batch itself (the left-padding value of the prompts, and
/// the token that ends each completion whose mask stops early).
pub fn eos_and_pad(fixture: &Value, batch: &Value) -> (Vec<u32>, u32) {
    let mut eos = Vec::new();
    let mut pad = None;
    for name in ["config.json", "generation_config.json"] {
        if let Some(cfg) = model_file(fixture, name) {
            for id in id_list(&cfg["eos_token_id"]) {
                if !eos.contains(&id) {
                    eos.push(id);
                }
            }
            pad = pad.or_else(|| id_list(&cfg["pad_token_id"]).first().copied());
        }
    }
    if eos.is_empty() {
        let completion = ids(&batch["completion_ids"]);
        for (row, mask) in completion.iter().zip(rows(&batch["completion_mask"])) {
            let kept = mask.iter().filter(|&&m| m != 0.0).count();
            if kept > 0 && kept < mask.len() && !eos.contains(&row[kept - 1]) {
                eos.push(row[kept - 1]);
            }
        }
        let prompt = ids(&batch["prompt_ids"]);
        pad = prompt
            .iter()
            .zip(rows(&batch["prompt_mask"]))
            .find_map(|(p, m)| m.iter().position(|&x| x == 0.0).map(|i| p[i]));
    }
    assert!(
        !eos.is_empty(),
        "no EOS id: neither the model directory nor the batch gives one"
    );
    let pad = pad.unwrap_or(eos[0]);
    (eos, pad)
}

/// Whether `got` matches `want` within `rel` relative or `abs` absolute; NaN matches NaN.
pub fn close(got: f64, want: f64, rel: f64, abs: f64) -> bool {
    (got.is_nan() && want.is_nan()) || (got - want).abs() <= abs.max(rel * want.abs())
}

/// Asserts [`close`] with the metric tolerance (1e-4 relative, 1e-6 absolute).
pub fn assert_metric(case: &str, name: &str, got: f64, want: f64) {
    assert!(close(got, want, 1e-4, 1e-6), "{case}: {name} = {got}, TRL {want}");
}

/// Asserts element-wise [`close`].
pub fn assert_all(case: &str, name: &str, got: &[f64], want: &[f64], rel: f64, abs: f64) {
    assert_eq!(got.len(), want.len(), "{case}: {name} length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(close(*g, *w, rel, abs), "{case}: {name}[{i}] = {g}, TRL {w}");
    }
}

/// Asserts that `got` holds exactly the metric names of TRL's `logged` dict (minus the
/// Trainer's own `loss`, `grad_norm`, `epoch`, `step`, `learning_rate`) with matching
/// values.
pub fn assert_logged(case: &str, got: &std::collections::BTreeMap<String, f64>, logged: &Value) {
    let skip = ["loss", "grad_norm", "epoch", "step", "learning_rate"];
    let logged = logged.as_object().expect("logged is an object");
    let want: Vec<&String> = logged.keys().filter(|k| !skip.contains(&k.as_str())).collect();
    let mut got_names: Vec<&String> = got.keys().collect();
    got_names.sort();
    let mut want_names = want.clone();
    want_names.sort();
    assert_eq!(got_names, want_names, "{case}: metric names");
    for name in want {
        if is_count(name) {
            // k / n: exact up to TRL's f32 rounding of the fraction (and 9 printed digits).
            let (g, w) = (got[name], num(&logged[name]));
            assert!(close(g, w, 1e-7, 1e-9), "{case}: count {name} = {g}, TRL {w}");
        } else {
            assert_metric(case, name, got[name], num(&logged[name]));
        }
    }
}

/// Metrics that are fractions of counted tokens, rows or groups.
pub fn is_count(name: &str) -> bool {
    name.starts_with("clip_ratio/")
        || [
            "cispo_clip_ratio",
            "rewards/accuracies",
            "frac_reward_zero_std",
            "completions/clipped_ratio",
            "mean_token_accuracy",
        ]
        .contains(&name)
}

/// A scalar tensor as `f64`.
pub fn scalar(t: &Tensor) -> f64 {
    t.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap()
}
