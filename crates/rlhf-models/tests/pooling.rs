//! The score head pools where transformers 5.x pools: the rightmost token whose id is not
//! `pad_token_id`. Reference: `fixtures/families/gpt2_pooling.json` (transformers 5.23,
//! `GPT2ForSequenceClassification` over `fixtures/tiny-gpt2` with pad = EOS = 50256 and the
//! score weight of `gpt2_pooling_score.safetensors`; made by `family_fixtures.py`, see
//! `fixtures/families/README.md`): single texts, right- and left-padded batches, texts with
//! and without a trailing EOS, with EOS inside and ending in two EOS.

mod common;

use candle_core::{DType, Device, Tensor};
use common::{assert_close, f32s, fixtures, tensor2, tiny, u32s, u32s2};
use rlhf_models::heads::pooled_index;
use rlhf_models::{Fwd, Model, ScoreHead};
use rlhf_peft::Param;
use serde_json::Value;

/// f32 scores: 1e-4 absolute (fixtures/families/README.md, "Tolerances").
const TOL: f32 = 1e-4;

fn pooling() -> Value {
    let text = std::fs::read_to_string(fixtures().join("families/gpt2_pooling.json")).expect("gpt2_pooling.json");
    serde_json::from_str(&text).expect("valid json")
}

/// tiny-gpt2 with the fixture's score head and `pad_token_id` from the fixture's config.
fn reward_model(cfg: &Value) -> Model {
    let mut model = tiny();
    let st = fixtures().join("families/gpt2_pooling_score.safetensors");
    let w = candle_core::safetensors::load(&st, &Device::Cpu).expect("score weight");
    let w = w.values().next().expect("one tensor").to_dtype(DType::F32).unwrap();
    let from_json = pooling()["score_weight"]
        .as_array()
        .expect("rows")
        .iter()
        .flat_map(f32s)
        .collect::<Vec<_>>();
    assert_eq!(
        w.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        from_json,
        "the two copies of score.weight agree"
    );
    model.score_head = Some(ScoreHead {
        weight: Param::frozen(w),
    });
    model.backbone_mut().cfg.pad_token_id = cfg["config_pad_token_id"].as_u64().map(|v| v as u32);
    model
}

fn scores(model: &Model, ids: &[Vec<u32>], mask: &[Vec<u32>]) -> Vec<f32> {
    model
        .scores(&tensor2(ids), &tensor2(mask), &mut Fwd::eval())
        .unwrap()
        .squeeze(1)
        .unwrap()
        .to_vec1()
        .unwrap()
}

#[test]
fn single_texts_score_like_transformers_at_the_same_token() {
    let p = pooling();
    for cfg in p["configs"].as_array().unwrap() {
        let model = reward_model(cfg);
        let pad = model.pad_token_id();
        for (case, want) in p["cases"]
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
                "{name}: pooled index"
            );
            let got = scores(&model, std::slice::from_ref(&ids), &[vec![1; ids.len()]]);
            assert_close(got[0], want["score"].as_f64().unwrap() as f32, TOL, name);
        }
    }
}

#[test]
fn padded_batches_pool_the_rightmost_non_pad_token_on_either_side() {
    let p = pooling();
    for cfg in p["configs"].as_array().unwrap() {
        let model = reward_model(cfg);
        let label = cfg["label"].as_str().unwrap();
        // Right padding: transformers' scores as they are.
        let right = &cfg["batched_right_padded"];
        let (ids, mask) = (u32s2(&right["input_ids"]), u32s2(&right["attention_mask"]));
        let want_idx = u32s(&right["pooled_index"]);
        for (r, row) in ids.iter().enumerate() {
            assert_eq!(
                pooled_index(row, model.pad_token_id()),
                want_idx[r] as usize,
                "{label} right row {r}"
            );
        }
        for (r, (g, w)) in scores(&model, &ids, &mask)
            .iter()
            .zip(f32s(&right["scores"]))
            .enumerate()
        {
            assert_close(*g, w, TOL, &format!("{label}: right-padded row {r}"));
        }
        // Left padding: positions come from the mask here, which transformers gets by passing
        // `position_ids = cumsum(mask) - 1` (GPT-2's positions are absolute).
        let left = &cfg["batched_left_padded"];
        let (ids, mask) = (u32s2(&left["input_ids"]), u32s2(&left["attention_mask"]));
        let want_idx = u32s(&left["pooled_index"]);
        for (r, row) in ids.iter().enumerate() {
            assert_eq!(
                pooled_index(row, model.pad_token_id()),
                want_idx[r] as usize,
                "{label} left row {r}"
            );
        }
        let got = scores(&model, &ids, &mask);
        for (r, (g, w)) in got
            .iter()
            .zip(f32s(&left["scores_with_position_ids_cumsum"]))
            .enumerate()
        {
            assert_close(*g, w, TOL, &format!("{label}: left-padded row {r}"));
        }
        // And the packed path reads the same token of each unpadded text.
        let seqs: Vec<Vec<u32>> = p["cases"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| u32s(&c["input_ids"]))
            .collect();
        let refs: Vec<&[u32]> = seqs.iter().map(Vec::as_slice).collect();
        let packed: Vec<f32> = model
            .scores_packed(&refs, &mut Fwd::eval())
            .unwrap()
            .squeeze(1)
            .unwrap()
            .to_vec1()
            .unwrap();
        for (r, (g, w)) in packed.iter().zip(f32s(&right["scores"])).enumerate() {
            assert_close(*g, w, TOL, &format!("{label}: packed row {r}"));
        }
    }
}

#[test]
fn a_trailing_eos_is_not_the_scored_token_when_pad_is_eos() {
    assert_eq!(pooled_index(&[5, 6, 7, 50256], Some(50256)), 2);
    assert_eq!(pooled_index(&[5, 50256, 7], Some(50256)), 2);
    assert_eq!(pooled_index(&[5, 50256, 50256], Some(50256)), 0);
    // Every token padding: index 0, as transformers' argmax over zeros.
    assert_eq!(pooled_index(&[50256, 50256], Some(50256)), 0);
    // No pad id: the last token.
    assert_eq!(pooled_index(&[5, 6, 50256], None), 2);
}

#[test]
fn a_batch_without_a_pad_id_is_refused_but_one_row_scores_at_its_last_token() {
    let mut model = tiny();
    model.score_head = Some(ScoreHead {
        weight: Param::frozen(Tensor::ones((1, 128), DType::F32, &Device::Cpu).unwrap()),
    });
    let mut hidden_model = model.clone();
    hidden_model.tokenizer = None;
    hidden_model.backbone_mut().cfg.pad_token_id = None;
    hidden_model.backbone_mut().cfg.eos_token_id = vec![];
    assert_eq!(hidden_model.pad_token_id(), None);
    let two = vec![vec![1u32, 2, 3], vec![4, 5, 6]];
    let err = hidden_model
        .scores(&tensor2(&two), &tensor2(&[vec![1; 3], vec![1; 3]]), &mut Fwd::eval())
        .unwrap_err()
        .to_string();
    assert!(err.contains("pad_token_id"), "{err}");
    let one = scores(&hidden_model, &[vec![1, 2, 3]], &[vec![1; 3]]);
    let full = scores(&model, &[vec![1, 2, 3]], &[vec![1; 3]]);
    assert_close(one[0], full[0], 1e-6, "one row without a pad id");
}
