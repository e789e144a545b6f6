//! Parity with transformers 4.45.2 / TRL 0.11.4 on `fixtures/parity_tiny.json`
//! (dumped from the tiny-gpt2 checkpoint in `fixtures/tiny-gpt2`, f32, eval mode).
//! Tolerance: 1e-4 absolute on logits, log-probs, values and scores.

mod common;

use candle_core::{DType, Device, Tensor, D};
use common::*;
use rlhf_models::{Fwd, ScoreHead, ValueHead};
use rlhf_peft::Param;

const TOL: f32 = 1e-4;

#[test]
fn lm_logits_match_transformers() {
    let model = tiny();
    let p = parity();
    for (s, seq) in p["lm_logits"].as_array().unwrap().iter().enumerate() {
        let ids = u32s(&seq["input_ids"]);
        let t = ids.len();
        let ids_t = Tensor::from_vec(ids, (1, t), &Device::Cpu).unwrap();
        let mask = Tensor::ones((1, t), DType::U32, &Device::Cpu).unwrap();
        let logits = model
            .logits(&ids_t, &mask, &mut Fwd::eval())
            .unwrap()
            .squeeze(0)
            .unwrap();
        let lse = {
            let max = logits.max_keepdim(D::Minus1).unwrap();
            (logits
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
                .unwrap()
        };
        let argmax = logits.argmax(D::Minus1).unwrap().to_vec1::<u32>().unwrap();
        let rows: Vec<Vec<f32>> = logits.to_vec2().unwrap();
        let want5 = f32s2(&seq["logits_first5"]);
        let want_lse = f32s(&seq["logsumexp"]);
        let want_arg = u32s(&seq["argmax"]);
        for pos in 0..t {
            for k in 0..5 {
                assert_close(
                    rows[pos][k],
                    want5[pos][k],
                    TOL,
                    &format!("seq {s} pos {pos} logit {k}"),
                );
            }
            assert_close(lse[pos], want_lse[pos], TOL, &format!("seq {s} pos {pos} logsumexp"));
        }
        assert_eq!(argmax, want_arg, "seq {s} argmax");
    }
}

fn seqcls_model() -> rlhf_models::Model {
    let mut model = tiny();
    let p = parity();
    let w = f32s2(&p["seqcls_padded_batch"]["score_weight"]);
    let w = Tensor::from_vec(w.concat(), (1, 128), &Device::Cpu).unwrap();
    model.score_head = Some(ScoreHead {
        weight: Param::frozen(w),
    });
    model
}

#[test]
fn seqcls_scores_match_transformers_on_a_right_padded_batch() {
    let model = seqcls_model();
    let p = &parity()["seqcls_padded_batch"];
    let ids = tensor2(&u32s2(&p["input_ids"]));
    let mask = tensor2(&u32s2(&p["attention_mask"]));
    let scores = model
        .scores(&ids, &mask, &mut Fwd::eval())
        .unwrap()
        .squeeze(1)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    for (i, (g, w)) in scores.iter().zip(f32s(&p["scores"])).enumerate() {
        assert_close(*g, w, TOL, &format!("score {i}"));
    }
}

#[test]
fn left_and_right_padding_give_the_same_scores() {
    let model = seqcls_model();
    let p = &parity()["seqcls_padded_batch"];
    let ids = u32s2(&p["input_ids"]);
    let mask = u32s2(&p["attention_mask"]);
    let (mut lids, mut lmask) = (Vec::new(), Vec::new());
    for (row, m) in ids.iter().zip(&mask) {
        let n = m.iter().filter(|&&x| x == 1).count();
        let pad = row.len() - n;
        lids.push([vec![50256; pad], row[..n].to_vec()].concat());
        lmask.push([vec![0; pad], vec![1; n]].concat());
    }
    let right = model.scores(&tensor2(&ids), &tensor2(&mask), &mut Fwd::eval()).unwrap();
    let left = model
        .scores(&tensor2(&lids), &tensor2(&lmask), &mut Fwd::eval())
        .unwrap();
    let diff = (right - left)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(diff < 1e-5, "left vs right padding differ by {diff}");
}

#[test]
fn response_logprobs_match_transformers() {
    let model = tiny();
    let p = &parity()["response_logprobs"];
    let q = u32s(&p["query_ids"]);
    let r = u32s(&p["response_ids"]);
    let ids: Vec<u32> = [q.clone(), r.clone()].concat();
    let t = ids.len();
    let ids_t = Tensor::from_vec(ids.clone(), (1, t), &Device::Cpu).unwrap();
    let mask = Tensor::ones((1, t), DType::U32, &Device::Cpu).unwrap();
    let logits = model
        .logits(&ids_t, &mask, &mut Fwd::eval())
        .unwrap()
        .squeeze(0)
        .unwrap();
    let lp: Vec<Vec<f32>> = log_softmax(&logits).to_vec2().unwrap();
    let want = f32s(&p["plain_model_response_logprobs"]);
    for (k, w) in want.iter().enumerate() {
        let pos = q.len() - 1 + k;
        assert_close(lp[pos][ids[pos + 1] as usize], *w, TOL, &format!("response token {k}"));
    }
}

#[test]
fn trl_batched_forward_pass_logprobs_and_values_match() {
    let mut model = tiny();
    let p = &parity()["response_logprobs"];
    let w = f32s2(&p["value_head"]["weight"]).concat();
    let b = f32s(&p["value_head"]["bias"]);
    model.value_head = Some(ValueHead {
        weight: Param::frozen(Tensor::from_vec(w, (1, 128), &Device::Cpu).unwrap()),
        bias: Param::frozen(Tensor::from_vec(b, 1, &Device::Cpu).unwrap()),
        dropout: 0.1,
    });
    let fp = &p["trl_batched_forward_pass"];
    let ids = u32s2(&fp["input_ids"]);
    let mask = u32s2(&fp["attention_mask"]);
    let resp_mask = u32s2(&fp["masks"]);
    let mut fwd = Fwd::eval();
    let hidden = model.forward(&tensor2(&ids), &tensor2(&mask), &mut fwd).unwrap();
    let logits = model.lm_logits(&hidden, false).unwrap();
    let values: Vec<Vec<f32>> = model
        .value_head
        .as_ref()
        .unwrap()
        .forward(&hidden, &mut fwd)
        .unwrap()
        .to_vec2()
        .unwrap();
    let lp = log_softmax(&logits);
    let want_lp = f32s2(&fp["logprobs"]);
    let want_v = f32s2(&fp["values"]);
    for row in 0..ids.len() {
        let lp_row: Vec<Vec<f32>> = lp.get(row).unwrap().to_vec2().unwrap();
        for t in 0..ids[row].len() - 1 {
            // Padding positions get different position ids in TRL (arange) and here (from
            // the mask); only real positions are compared, as TRL's masks use only those.
            if mask[row][t] == 1 && mask[row][t + 1] == 1 {
                let got = lp_row[t][ids[row][t + 1] as usize];
                assert_close(got, want_lp[row][t], TOL, &format!("logprob row {row} t {t}"));
            }
            if mask[row][t] == 1 {
                assert_close(values[row][t], want_v[row][t], TOL, &format!("value row {row} t {t}"));
            }
        }
        assert!(resp_mask[row].iter().zip(&mask[row][1..]).all(|(r, m)| r <= m));
    }
}

#[test]
fn packed_scores_match_transformers_on_the_padded_batch() {
    let model = seqcls_model();
    let p = &parity()["seqcls_padded_batch"];
    let seqs: Vec<Vec<u32>> = u32s2(&p["input_ids"])
        .into_iter()
        .zip(u32s2(&p["attention_mask"]))
        .map(|(row, m)| {
            row.into_iter()
                .zip(m)
                .filter(|(_, m)| *m == 1)
                .map(|(id, _)| id)
                .collect()
        })
        .collect();
    let refs: Vec<&[u32]> = seqs.iter().map(Vec::as_slice).collect();
    let scores = model
        .scores_packed(&refs, &mut Fwd::eval())
        .unwrap()
        .squeeze(1)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    for (i, (g, w)) in scores.iter().zip(f32s(&p["scores"])).enumerate() {
        assert_close(*g, w, TOL, &format!("packed score {i}"));
    }
}
