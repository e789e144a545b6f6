//! Parity with PEFT 0.21.2 / transformers 5.23 on `fixtures/lora/lora_reference.json` and the
//! adapter directories beside it (generator described in `fixtures/lora/README.md`, parts a
//! and b: tiny-gpt2, f32, eval mode). Tolerances from that README: logits 1e-5, logsumexp
//! 2e-5, scores 1e-5, gradients 1e-5 abs + 1e-4 rel; argmax exact.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, D};
use common::*;
use rlhf_models::lora::{load_adapter, merge_and_unload, save_adapter, AdapterLoadOptions, PEFT_PREFIX};
use rlhf_models::{Fwd, Model, ScoreHead};
use rlhf_peft::lora::ReferenceBias;
use rlhf_peft::{Param, Proj};
use serde_json::Value;

fn lora_dir() -> PathBuf {
    fixtures().join("lora")
}

fn reference() -> Value {
    let text = std::fs::read_to_string(lora_dir().join("lora_reference.json")).expect("lora_reference.json");
    serde_json::from_str(&text).expect("valid json")
}

fn with_adapter(name: &str, opts: &AdapterLoadOptions) -> Model {
    let mut model = tiny();
    load_adapter(&mut model, &lora_dir().join(name), opts).expect("adapter loads");
    model
}

/// PEFT's disabled-adapter reference keeps the adapter's biases: `reference_bias = "trained"`.
fn peft_like() -> AdapterLoadOptions {
    AdapterLoadOptions {
        is_trainable: false,
        reference_bias: Some(ReferenceBias::Trained),
    }
}

fn seq_ids(r: &Value, s: usize) -> Vec<u32> {
    u32s(&r["sequences"][s]["input_ids"])
}

fn logits_of(model: &Model, ids: &[u32], fwd: &mut Fwd) -> Tensor {
    let t = ids.len();
    let ids_t = Tensor::from_vec(ids.to_vec(), (1, t), &Device::Cpu).unwrap();
    let mask = Tensor::ones((1, t), DType::U32, &Device::Cpu).unwrap();
    model.logits(&ids_t, &mask, fwd).unwrap().squeeze(0).unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// Compares `(T, V)` logits with a fixture record: first five logits, logsumexp, argmax.
fn check_logits(logits: &Tensor, want: &Value, what: &str) {
    let max = logits.max_keepdim(D::Minus1).unwrap();
    let lse = (logits
        .broadcast_sub(&max)
        .unwrap()
        .exp()
        .unwrap()
        .sum_keepdim(D::Minus1)
        .unwrap()
        .log()
        .unwrap()
        + max)
        .unwrap()
        .squeeze(1)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let rows: Vec<Vec<f32>> = logits.to_vec2().unwrap();
    let (want5, want_lse) = (f32s2(&want["logits_first5"]), f32s(&want["logsumexp"]));
    for (pos, row) in rows.iter().enumerate() {
        for k in 0..5 {
            assert_close(row[k], want5[pos][k], 1e-5, &format!("{what} pos {pos} logit {k}"));
        }
        assert_close(lse[pos], want_lse[pos], 2e-5, &format!("{what} pos {pos} logsumexp"));
    }
    let argmax = logits.argmax(D::Minus1).unwrap().to_vec1::<u32>().unwrap();
    assert_eq!(argmax, u32s(&want["argmax"]), "{what} argmax");
}

#[test]
fn base_model_logits_match_the_lora_fixture() {
    let (model, r) = (tiny(), reference());
    for s in 0..2 {
        let logits = logits_of(&model, &seq_ids(&r, s), &mut Fwd::eval());
        check_logits(&logits, &r["base_model_no_adapter"][s], &format!("base seq {s}"));
    }
}

fn check_causal_adapter(dir: &str, key: &str) {
    let r = reference();
    let model = with_adapter(dir, &peft_like());
    let merged = merge_and_unload(&model).unwrap();
    for s in 0..2 {
        let ids = seq_ids(&r, s);
        let rec = &r[key];
        check_logits(
            &logits_of(&model, &ids, &mut Fwd::eval()),
            &rec["enabled"][s],
            &format!("{key} enabled {s}"),
        );
        let disabled = logits_of(&model, &ids, &mut Fwd::eval().without_adapters());
        check_logits(&disabled, &rec["disabled"][s], &format!("{key} disabled {s}"));
        check_logits(
            &logits_of(&merged, &ids, &mut Fwd::eval()),
            &rec["merged"][s],
            &format!("{key} merged {s}"),
        );
    }
}

#[test]
fn adapter_enabled_disabled_and_merged_logits_match_peft() {
    check_causal_adapter("adapter", "causal_lm");
}

#[test]
fn rslora_adapter_enabled_disabled_and_merged_logits_match_peft() {
    check_causal_adapter("adapter_rslora", "causal_lm_rslora");
}

#[test]
fn with_the_default_reference_bias_adapters_disabled_is_exactly_the_base_model() {
    let r = reference();
    let (model, base) = (with_adapter("adapter", &AdapterLoadOptions::default()), tiny());
    for s in 0..2 {
        let ids = seq_ids(&r, s);
        let disabled = logits_of(&model, &ids, &mut Fwd::eval().without_adapters());
        assert_eq!(max_diff(&disabled, &logits_of(&base, &ids, &mut Fwd::eval())), 0.0);
        check_logits(
            &disabled,
            &r["base_model_no_adapter"][s],
            &format!("disabled = base, seq {s}"),
        );
    }
}

/// The PEFT key of one of our parameter names.
fn peft_key(model: &Model, name: &str) -> String {
    let module = name.rsplit_once('.').map_or(name, |(m, _)| m);
    let is_lora = model
        .backbone()
        .projections()
        .iter()
        .any(|(n, p)| format!("transformer.{n}") == module && p.lora().is_some());
    match name.strip_suffix(".bias") {
        Some(m) if is_lora => format!("{PEFT_PREFIX}{m}.base_layer.bias"),
        _ => format!("{PEFT_PREFIX}{name}"),
    }
}

/// HF's `labels=input_ids` loss: mean over the `T-1` positions of CE(logits[t], ids[t+1]).
fn causal_lm_loss(model: &Model, ids: &[u32]) -> Tensor {
    let logits = logits_of(model, ids, &mut Fwd::eval_grad());
    let t = ids.len();
    let lp = log_softmax(&logits.narrow(0, 0, t - 1).unwrap());
    let next = Tensor::from_vec(ids[1..].to_vec(), (t - 1, 1), &Device::Cpu).unwrap();
    let picked = lp.gather(&next, 1).unwrap();
    (picked.mean_all().unwrap() * -1.0).unwrap()
}

fn check_gradients(dir: &str, key: &str) {
    let r = reference();
    let rec = &r[key]["grad"];
    let opts = AdapterLoadOptions {
        is_trainable: true,
        reference_bias: None,
    };
    let model = with_adapter(dir, &opts);
    let loss = causal_lm_loss(&model, &seq_ids(&r, 0));
    let loss_v = loss.to_scalar::<f32>().unwrap();
    assert_close(
        loss_v,
        rec["loss"].as_f64().unwrap() as f32,
        2e-5,
        &format!("{key} loss"),
    );
    let grads = loss.backward().unwrap();
    let want = rec["grads"].as_object().unwrap();
    let mut seen = 0;
    for (name, p) in model.named_params() {
        if !p.is_trainable() {
            continue;
        }
        let pk = peft_key(&model, &name);
        let w = want
            .get(&pk)
            .unwrap_or_else(|| panic!("{pk} is trainable here but not in PEFT"));
        let w: Vec<f32> = match w {
            Value::Array(a) if a.first().is_some_and(Value::is_array) => f32s2(w).concat(),
            _ => f32s(w),
        };
        let g = grads
            .get(p.get(true))
            .unwrap_or_else(|| panic!("{name} got no gradient"));
        let g = g.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(g.len(), w.len(), "{pk}");
        for (i, (a, b)) in g.iter().zip(&w).enumerate() {
            assert!(
                (a - b).abs() <= 1e-5 + 1e-4 * b.abs(),
                "{key} {pk}[{i}]: {a} vs PEFT {b}"
            );
        }
        seen += 1;
    }
    assert_eq!(seen, want.len(), "every PEFT gradient has a trainable counterpart");
}

#[test]
fn gradients_of_lora_factors_and_biases_match_peft() {
    check_gradients("adapter", "causal_lm");
}

#[test]
fn rslora_gradients_match_peft() {
    check_gradients("adapter_rslora", "causal_lm_rslora");
}

#[test]
fn merged_c_attn_weight_matches_peft_corner_sum_and_sum_of_squares() {
    let r = reference();
    for (dir, key) in [("adapter", "causal_lm"), ("adapter_rslora", "causal_lm_rslora")] {
        let merged = merge_and_unload(&with_adapter(dir, &AdapterLoadOptions::default())).unwrap();
        let Proj::Dense(d) = &merged.backbone().projections()[0].1 else {
            panic!("merged projection is dense")
        };
        // PEFT's numbers are of the `Conv1D` weight `(in, out)`; inside it is `(out, in)`.
        let w: Vec<Vec<f32>> = d.weight.value().t().unwrap().to_vec2().unwrap();
        let rec = &r[key]["merged_c_attn_weight_h0"];
        assert_eq!((w.len(), w[0].len()), (128, 384));
        for (i, row) in f32s2(&rec["corner_4x4"]).iter().enumerate() {
            for (j, want) in row.iter().enumerate() {
                assert_close(w[i][j], *want, 1e-7, &format!("{key} corner [{i}][{j}]"));
            }
        }
        let flat: Vec<f64> = w.concat().iter().map(|&v| v as f64).collect();
        let (sum, sq): (f64, f64) = (flat.iter().sum(), flat.iter().map(|v| v * v).sum());
        assert!((sum - rec["sum"].as_f64().unwrap()).abs() < 1e-4, "{key} sum {sum}");
        assert!((sq - rec["sum_sq"].as_f64().unwrap()).abs() < 1e-4, "{key} sum_sq {sq}");
    }
}

fn seqcls_batch(r: &Value) -> (Tensor, Tensor) {
    let p = &r["seq_cls"];
    (tensor2(&u32s2(&p["input_ids"])), tensor2(&u32s2(&p["attention_mask"])))
}

fn scores(model: &Model, ids: &Tensor, mask: &Tensor, fwd: &mut Fwd) -> Vec<f32> {
    model
        .scores(ids, mask, fwd)
        .unwrap()
        .squeeze(1)
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn check_scores(got: &[f32], want: &Value, what: &str) {
    for (i, (g, w)) in got.iter().zip(f32s(want)).enumerate() {
        assert_close(*g, w, 1e-5, &format!("{what} score {i}"));
    }
}

/// tiny-gpt2 as `GPT2ForSequenceClassification` with the fixture's original score head.
fn seqcls_base(r: &Value) -> Model {
    let mut model = tiny();
    let w = f32s2(&r["seq_cls"]["score_weight_original"]).concat();
    model.score_head = Some(ScoreHead {
        weight: Param::frozen(Tensor::from_vec(w, (1, 128), &Device::Cpu).unwrap()),
    });
    model
}

#[test]
fn seqcls_scores_enabled_disabled_merged_and_reloaded_match_peft() {
    let r = reference();
    let (ids, mask) = seqcls_batch(&r);
    let p = &r["seq_cls"];
    let mut model = seqcls_base(&r);
    let warnings = load_adapter(&mut model, &lora_dir().join("adapter_seqcls"), &Default::default()).unwrap();
    assert!(warnings.is_empty(), "{warnings:?}");
    check_scores(&scores(&model, &ids, &mask, &mut Fwd::eval()), &p["scores"], "enabled");
    let off = scores(&model, &ids, &mask, &mut Fwd::eval().without_adapters());
    check_scores(&off, &p["scores_adapter_disabled"], "disabled");
    let merged = merge_and_unload(&model).unwrap();
    check_scores(
        &scores(&merged, &ids, &mask, &mut Fwd::eval()),
        &p["scores_merged"],
        "merged",
    );
    let tmp = tempfile::tempdir().unwrap();
    save_adapter(&model, tmp.path()).unwrap();
    let mut reloaded = seqcls_base(&r);
    load_adapter(&mut reloaded, tmp.path(), &Default::default()).unwrap();
    check_scores(
        &scores(&reloaded, &ids, &mask, &mut Fwd::eval()),
        &p["scores_reloaded_from_disk"],
        "reloaded",
    );
    // One by one, unpadded.
    for (i, want) in f32s(&p["scores_unpadded_one_by_one"]).iter().enumerate() {
        let row: Vec<u32> = u32s2(&p["input_ids"])[i]
            .iter()
            .copied()
            .take_while(|&t| t != 50256)
            .collect();
        let n = row.len();
        let ids1 = Tensor::from_vec(row, (1, n), &Device::Cpu).unwrap();
        let m1 = Tensor::ones((1, n), DType::U32, &Device::Cpu).unwrap();
        assert_close(
            scores(&model, &ids1, &m1, &mut Fwd::eval())[0],
            *want,
            1e-5,
            &format!("row {i} alone"),
        );
    }
}

#[test]
fn seqcls_adapter_supplies_the_score_head_to_a_base_without_one() {
    let r = reference();
    let (ids, mask) = seqcls_batch(&r);
    let mut model = tiny();
    assert!(model.score_head.is_none());
    let warnings = load_adapter(&mut model, &lora_dir().join("adapter_seqcls"), &Default::default()).unwrap();
    assert_eq!(
        warnings.len(),
        1,
        "one warning about the missing original head: {warnings:?}"
    );
    check_scores(
        &scores(&model, &ids, &mask, &mut Fwd::eval()),
        &r["seq_cls"]["scores"],
        "enabled",
    );
    let w: Vec<Vec<f32>> = model.score_head.as_ref().unwrap().weight.value().to_vec2().unwrap();
    let want = f32s2(&r["seq_cls"]["score_weight_adapter"]);
    assert_eq!(w, want, "the head is the adapter's score.weight");
}

/// Key → shape of a safetensors file.
fn keys_and_shapes(path: &Path) -> BTreeMap<String, Vec<usize>> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors().into_iter().map(|(k, v)| (k, v.shape().to_vec())).collect()
}

#[test]
fn a_saved_adapter_has_peft_keys_shapes_and_config_keys_and_reloads_to_identical_outputs() {
    let r = reference();
    for (dir, key) in [("adapter", "causal_lm"), ("adapter_seqcls", "seq_cls")] {
        let mut model = tiny();
        let opts = AdapterLoadOptions {
            is_trainable: true,
            reference_bias: None,
        };
        load_adapter(&mut model, &lora_dir().join(dir), &opts).unwrap();
        let tmp = tempfile::tempdir().unwrap();
        save_adapter(&model, tmp.path()).unwrap();
        let ours = keys_and_shapes(&tmp.path().join("adapter_model.safetensors"));
        let want: BTreeMap<String, Vec<usize>> = r[key]["safetensors_keys"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, v)| {
                (
                    k.clone(),
                    v["shape"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|d| d.as_u64().unwrap() as usize)
                        .collect(),
                )
            })
            .collect();
        assert_eq!(ours, want, "{dir}: keys and shapes");
        assert_eq!(
            ours,
            keys_and_shapes(&lora_dir().join(dir).join("adapter_model.safetensors"))
        );
        let read = |p: PathBuf| -> Value { serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap() };
        let (cfg, fixture_cfg) = (
            read(tmp.path().join("adapter_config.json")),
            read(lora_dir().join(dir).join("adapter_config.json")),
        );
        for (k, v) in fixture_cfg.as_object().unwrap() {
            assert_eq!(cfg.get(k), Some(v), "{dir}: config key {k} is written back as read");
        }
        let mut reloaded = tiny();
        load_adapter(&mut reloaded, tmp.path(), &Default::default()).unwrap();
        let ids = seq_ids(&r, 0);
        for adapters in [true, false] {
            let fwd = || Fwd {
                adapters,
                ..Fwd::eval()
            };
            let (a, b) = (
                logits_of(&model, &ids, &mut fwd()),
                logits_of(&reloaded, &ids, &mut fwd()),
            );
            assert_eq!(
                max_diff(&a, &b),
                0.0,
                "{dir}: reloaded logits are identical (adapters {adapters})"
            );
        }
    }
}
