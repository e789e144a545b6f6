//! Llama, Qwen2, Qwen3 and Mistral against transformers 5.23: logits on single,
//! right- and left-padded batches, greedy generation one by one and batched, the loss and
//! the gradient of every parameter, and reward scores of the sequence-classification
//! checkpoints. Reference: `fixtures/families/references/tiny-<family>.{json,safetensors}`,
//! made by `family_fixtures.py` (see `fixtures/families/README.md`). Tolerances from that
//! README: f32 logits and scores 1e-4 absolute, loss 1e-5, gradient norms 1e-4 relative,
//! full gradients 1e-4 absolute + 1e-3 relative; greedy ids exact.

mod common;

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, D};
use common::{assert_close, f32s, fixtures, tensor2, u32s, u32s2};
use rlhf_models::heads::pooled_index;
use rlhf_models::{Fwd, GenerationConfig, LoadOptions, Model};
use rlhf_ops::rng::RngStream;
use serde_json::Value;

const FAMILIES: [&str; 4] = ["llama", "qwen2", "qwen3", "mistral"];
const TOL: f32 = 1e-4;

fn load(dir: &str) -> Model {
    Model::load(&fixtures().join("families").join(dir), &LoadOptions::default()).unwrap()
}

fn reference(fam: &str) -> Value {
    let p = fixtures().join(format!("families/references/tiny-{fam}.json"));
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn reference_tensors(fam: &str) -> HashMap<String, Tensor> {
    let p = fixtures().join(format!("families/references/tiny-{fam}.safetensors"));
    candle_core::safetensors::load(p, &Device::Cpu)
        .unwrap()
        .into_iter()
        .collect()
}

/// log-softmax statistics of one position: the first five logits, the logsumexp, the argmax.
fn stats(logits: &[f32]) -> (Vec<f32>, f32, u32) {
    let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let lse = max + logits.iter().map(|&x| ((x - max) as f64).exp()).sum::<f64>().ln() as f32;
    let arg = rlhf_models::generate::argmax(logits);
    (logits[..5].to_vec(), lse, arg)
}

/// Compares one row of logits per real position with the fixture's summaries.
fn check_rows(got: &[Vec<f32>], want: &Value, what: &str) {
    let (first5, lse, arg, margin) = (
        &want["first5"],
        &want["logsumexp"],
        u32s(&want["argmax"]),
        f32s(&want["margin_top1_top2"]),
    );
    assert_eq!(got.len(), arg.len(), "{what}: positions");
    for (pos, l) in got.iter().enumerate() {
        let (f5, g_lse, g_arg) = stats(l);
        for (j, (g, w)) in f5.iter().zip(f32s(&first5[pos])).enumerate() {
            assert_close(*g, w, TOL, &format!("{what} pos {pos} logit {j}"));
        }
        assert_close(g_lse, f32s(lse)[pos], TOL, &format!("{what} pos {pos} logsumexp"));
        if margin[pos] > 1e-4 {
            assert_eq!(g_arg, arg[pos], "{what} pos {pos} argmax");
        }
    }
}

/// Logits of the real positions of each row.
fn real_rows(model: &Model, ids: &[Vec<u32>], mask: &[Vec<u32>]) -> Vec<Vec<Vec<f32>>> {
    let logits = model.logits(&tensor2(ids), &tensor2(mask), &mut Fwd::eval()).unwrap();
    let all: Vec<Vec<Vec<f32>>> = logits.to_vec3().unwrap();
    all.into_iter()
        .zip(mask)
        .map(|(rows, m)| {
            rows.into_iter()
                .zip(m)
                .filter(|(_, &m)| m == 1)
                .map(|(r, _)| r)
                .collect()
        })
        .collect()
}

#[test]
fn logits_match_transformers_alone_and_in_padded_batches() {
    for fam in FAMILIES {
        let model = load(&format!("tiny-{fam}"));
        let r = &reference(fam)["lm_logits"];
        for (i, seq) in u32s2(&r["sequences"]).iter().enumerate() {
            let rows = real_rows(&model, std::slice::from_ref(seq), &[vec![1; seq.len()]]);
            check_rows(&rows[0], &r["single"][i], &format!("{fam} single {i}"));
        }
        for side in ["right_padded", "left_padded"] {
            let b = &r[side];
            let rows = real_rows(&model, &u32s2(&b["input_ids"]), &u32s2(&b["attention_mask"]));
            for (i, got) in rows.iter().enumerate() {
                check_rows(got, &b["rows"][i], &format!("{fam} {side} {i}"));
            }
        }
    }
}

#[test]
fn greedy_generation_matches_transformers_one_by_one_and_batched() {
    for fam in FAMILIES {
        let model = load(&format!("tiny-{fam}"));
        let g = &reference(fam)["greedy"];
        let eos = u32s(&g["eos_token_id"]);
        assert_eq!(model.eos_token_ids(), eos, "{fam}: the generation config's EOS list");
        let cfg = GenerationConfig {
            max_new_tokens: g["max_new_tokens"].as_u64().unwrap() as usize,
            do_sample: false,
            eos_token_id: eos.clone(),
            pad_token_id: g["pad_token_id"].as_u64().unwrap() as u32,
            ..Default::default()
        };
        let prompts = u32s2(&g["prompts"]);
        let cut = |ids: Vec<u32>| -> Vec<u32> {
            match ids.iter().position(|t| eos.contains(t)) {
                Some(p) => ids[..=p].to_vec(),
                None => ids,
            }
        };
        for (i, p) in prompts.iter().enumerate() {
            let want = cut(u32s(&g["one_by_one"][i]["new_ids"]));
            for (path, out) in [
                (
                    "decoder",
                    model
                        .generate(std::slice::from_ref(p), &cfg, &mut RngStream::new(0))
                        .unwrap(),
                ),
                (
                    "composed",
                    rlhf_models::generate_composed(
                        model.backbone(),
                        std::slice::from_ref(p),
                        &cfg,
                        &mut RngStream::new(0),
                    )
                    .unwrap(),
                ),
            ] {
                assert_eq!(out.response_ids[0], want, "{fam} prompt {i} ({path}, one by one)");
            }
        }
        let batched = model.generate(&prompts, &cfg, &mut RngStream::new(0)).unwrap();
        let composed =
            rlhf_models::generate_composed(model.backbone(), &prompts, &cfg, &mut RngStream::new(0)).unwrap();
        for (i, row) in g["batched_left_padded"]["rows"].as_array().unwrap().iter().enumerate() {
            let want = cut(u32s(&row["new_ids"]));
            assert_eq!(batched.response_ids[i], want, "{fam} batched row {i} (decoder)");
            assert_eq!(composed.response_ids[i], want, "{fam} batched row {i} (composed)");
        }
    }
}

/// Mean cross entropy over the shifted labels that are not -100, as transformers' loss.
fn causal_lm_loss(model: &Model, ids: &[Vec<u32>], mask: &[Vec<u32>], labels: &[Vec<i64>]) -> Tensor {
    let logits = model
        .logits(&tensor2(ids), &tensor2(mask), &mut Fwd::eval_grad())
        .unwrap();
    let (b, t, _) = logits.dims3().unwrap();
    let logp = candle_nn_free_log_softmax(&logits.narrow(1, 0, t - 1).unwrap());
    let mut picks = Vec::new();
    for (row, lab) in labels.iter().enumerate() {
        for (pos, &l) in lab.iter().enumerate().skip(1) {
            if l >= 0 {
                picks.push((row, pos - 1, l as u32));
            }
        }
    }
    let flat = logp.reshape((b * (t - 1), ())).unwrap();
    let idx: Vec<u32> = picks.iter().map(|&(r, p, _)| (r * (t - 1) + p) as u32).collect();
    let rows = flat.index_select(&Tensor::new(idx, &Device::Cpu).unwrap(), 0).unwrap();
    let lab: Vec<u32> = picks.iter().map(|&(_, _, l)| l).collect();
    let picked = rows
        .gather(&Tensor::new(lab, &Device::Cpu).unwrap().unsqueeze(1).unwrap(), 1)
        .unwrap();
    (picked.sum_all().unwrap().neg().unwrap() / picks.len() as f64).unwrap()
}

fn candle_nn_free_log_softmax(x: &Tensor) -> Tensor {
    let max = x.max_keepdim(D::Minus1).unwrap().detach();
    let s = x.broadcast_sub(&max).unwrap();
    let lse = s.exp().unwrap().sum_keepdim(D::Minus1).unwrap().log().unwrap();
    s.broadcast_sub(&lse).unwrap()
}

#[test]
fn every_parameter_gets_transformers_gradient() {
    for fam in FAMILIES {
        let mut model = load(&format!("tiny-{fam}"));
        model.set_trainable(true).unwrap();
        let g = &reference(fam)["gradients"];
        let labels: Vec<Vec<i64>> = g["labels"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r.as_array().unwrap().iter().map(|x| x.as_i64().unwrap()).collect())
            .collect();
        let loss = causal_lm_loss(&model, &u32s2(&g["input_ids"]), &u32s2(&g["attention_mask"]), &labels);
        let got_loss = loss.to_scalar::<f32>().unwrap();
        assert_close(
            got_loss,
            g["loss"].as_f64().unwrap() as f32,
            1e-5,
            &format!("{fam} loss"),
        );
        let grads = loss.backward().unwrap();
        let full = reference_tensors(fam);
        let norms = g["grad_l2_norm"].as_object().unwrap();
        let mut total = 0f64;
        let mut seen = 0;
        for (name, p) in model.named_params() {
            let grad = grads
                .get(p.get(true))
                .unwrap_or_else(|| panic!("{fam}: {name} has no gradient"));
            let n = grad
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_dtype(DType::F64)
                .unwrap()
                .to_scalar::<f64>()
                .unwrap();
            total += n;
            let want = norms
                .get(&name)
                .unwrap_or_else(|| panic!("{fam}: {name} is not a transformers parameter"))
                .as_f64()
                .unwrap();
            let rel = (n.sqrt() - want).abs() / want.max(1e-12);
            assert!(
                rel < 1e-4,
                "{fam} {name}: grad norm {} vs {want} (rel {rel:.2e})",
                n.sqrt()
            );
            if let Some(w) = full.get(&format!("grad.{name}")) {
                let diff = (grad - w).unwrap().abs().unwrap();
                let bound = ((w.abs().unwrap() * 1e-3).unwrap() + 1e-4).unwrap();
                let bad = diff
                    .gt(&bound)
                    .unwrap()
                    .to_dtype(DType::F32)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
                assert_eq!(bad, 0.0, "{fam} {name}: full gradient differs");
            }
            seen += 1;
        }
        assert_eq!(seen, norms.len(), "{fam}: every transformers parameter is one of ours");
        let global = g["global_grad_norm"].as_f64().unwrap();
        assert!(
            (total.sqrt() - global).abs() / global < 1e-4,
            "{fam}: global norm {} vs {global}",
            total.sqrt()
        );
    }
}

#[test]
fn reward_scores_match_transformers_on_single_and_padded_batches() {
    for fam in FAMILIES {
        let r = &reference(fam)["seqcls"];
        for cfg in r["configs"].as_array().unwrap() {
            let mut model = load(&format!("tiny-{fam}-seqcls"));
            let label = format!("{fam} {}", cfg["label"].as_str().unwrap());
            model.backbone_mut().cfg.pad_token_id = cfg["config_pad_token_id"].as_u64().map(|v| v as u32);
            let pad = model.pad_token_id();
            for (case, want) in r["cases"]
                .as_array()
                .unwrap()
                .iter()
                .zip(cfg["single"].as_array().unwrap())
            {
                let ids = u32s(&case["input_ids"]);
                let name = case["name"].as_str().unwrap();
                assert_eq!(
                    pooled_index(&ids, pad),
                    want["pooled_index"].as_u64().unwrap() as usize,
                    "{label} {name}"
                );
                let s = model
                    .scores(
                        &tensor2(std::slice::from_ref(&ids)),
                        &tensor2(&[vec![1; ids.len()]]),
                        &mut Fwd::eval(),
                    )
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap();
                assert_close(
                    s[0],
                    want["score"].as_f64().unwrap() as f32,
                    TOL,
                    &format!("{label} {name}"),
                );
            }
            for side in ["batched_right_padded", "batched_left_padded"] {
                let b = &cfg[side];
                let (ids, mask) = (u32s2(&b["input_ids"]), u32s2(&b["attention_mask"]));
                for (i, (row, want)) in ids.iter().zip(u32s(&b["pooled_index"])).enumerate() {
                    assert_eq!(pooled_index(row, pad), want as usize, "{label} {side} row {i}");
                }
                let got = model.scores(&tensor2(&ids), &tensor2(&mask), &mut Fwd::eval()).unwrap();
                let got: Vec<f32> = got.flatten_all().unwrap().to_vec1().unwrap();
                for (i, (g, w)) in got.iter().zip(f32s(&b["scores"])).enumerate() {
                    assert_close(*g, w, TOL, &format!("{label} {side} row {i}"));
                }
            }
        }
    }
}
