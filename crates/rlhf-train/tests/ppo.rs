//! PPOTrainer: one whole `step()` against TRL 0.11.4 (`fixtures/parity_tiny.json`,
//! section `ppo_step`), learning on a known reward, and edge cases.

mod common;

use candle_core::{Device, Tensor};
use common::*;
use rlhf_models::{Fwd, GenerationConfig, LoadOptions, Model, ValueHead};
use rlhf_ops::ppo::logprobs_from_logits;
use rlhf_ops::rng::RngStream;
use rlhf_peft::Param;
use rlhf_train::ppo::PpoTrainer;
use rlhf_train::ppo_config::PpoConfig;

fn tiny_no_dropout() -> Model {
    let mut m = Model::load(&fixtures().join("tiny-gpt2"), &LoadOptions::default()).unwrap();
    m.disable_dropout();
    m
}

fn parity_trainer(p: &serde_json::Value) -> PpoTrainer {
    let mut policy = tiny_no_dropout();
    let vh = &p["value_head_init"];
    policy.value_head = Some(ValueHead {
        weight: Param::frozen(Tensor::from_vec(f32s(&vh["weight"][0]), (1, 128), &Device::Cpu).unwrap()),
        bias: Param::frozen(Tensor::from_vec(f32s(&vh["bias"]), 1, &Device::Cpu).unwrap()),
        dropout: 0.0,
    });
    policy.set_trainable(true).unwrap();
    let cfg = PpoConfig {
        batch_size: 2,
        mini_batch_size: 2,
        ppo_epochs: 2,
        learning_rate: 1e-3,
        ..Default::default()
    };
    PpoTrainer::new(cfg, policy, Some(tiny_no_dropout())).unwrap().0
}

fn rows(v: &serde_json::Value) -> Vec<Vec<u32>> {
    v.as_array().unwrap().iter().map(u32s).collect()
}

#[test]
fn one_ppo_step_matches_trl_0_11() {
    let p = &parity()["ppo_step"];
    let mut trainer = parity_trainer(p);
    let (queries, responses) = (rows(&p["queries"]), rows(&p["responses"]));
    let stats = trainer.step(&queries, &responses, &f32s(&p["scores"])).unwrap();
    let close = |got: f64, want: f64, what: &str| {
        assert!(
            (got - want).abs() <= 1e-4 * want.abs().max(1.0),
            "{what}: {got} vs TRL {want}"
        );
    };
    let mut checked = 0;
    for (k, want) in p["stats"].as_object().unwrap() {
        if let Some(w) = want.as_f64() {
            let got = *stats.scalars.get(k).unwrap_or_else(|| panic!("stat {k} missing"));
            close(got, w, k);
            checked += 1;
        } else {
            let mut w = flat(want);
            let mut got = stats
                .tensors
                .get(k)
                .unwrap_or_else(|| panic!("tensor stat {k} missing"))
                .clone();
            if k == "ppo/policy/ratio" {
                // Log-probs are computed at response positions only, so the ratio is 1
                // elsewhere (docs/ppo.md); TRL's other entries are query and padding tokens.
                // Every ratio that moved must be one of TRL's.
                assert_eq!(got.len(), w.len(), "{k} length");
                let moved: Vec<f32> = got.iter().copied().filter(|x| (x - 1.0).abs() > 1e-5).collect();
                assert!(moved.len() >= 10, "{} ratios moved", moved.len());
                for g in moved {
                    let j = w
                        .iter()
                        .position(|x| ((g - x) as f64).abs() <= 1e-4 * (*x as f64).abs().max(1.0))
                        .unwrap_or_else(|| panic!("ratio {g} is not among TRL's {w:?}"));
                    w.remove(j);
                }
                continue;
            }
            if k.starts_with("ppo/policy/") {
                // Rows inside a minibatch follow the shuffling permutation (numpy's in TRL,
                // ours here): compare these per-token stats as sorted multisets.
                w.sort_by(f32::total_cmp);
                got.sort_by(f32::total_cmp);
            }
            assert_eq!(got.len(), w.len(), "{k} length");
            for (i, (g, w)) in got.iter().zip(&w).enumerate() {
                close(*g as f64, *w as f64, &format!("{k}[{i}]"));
            }
        }
    }
    assert!(checked >= 25, "{checked} scalar stats checked");
    close(
        trainer.kl_ctl.value(),
        p["kl_coef_after"].as_f64().unwrap(),
        "kl_coef_after",
    );
    // Log-probs and values of the same batch after the update.
    let seqs: Vec<Vec<u32>> = queries
        .iter()
        .zip(&responses)
        .map(|(q, r)| [q.clone(), r.clone()].concat())
        .collect();
    let (ids, mask) =
        rlhf_train::collate::pad(&seqs, 50256, rlhf_train::collate::PadSide::Right, &Device::Cpu).unwrap();
    let mut fwd = Fwd::eval();
    let model = &trainer.model;
    let hidden = model.forward(&ids, &mask, &mut fwd).unwrap();
    let t = ids.dim(1).unwrap();
    let logits = model.lm_logits(&hidden.narrow(1, 0, t - 1).unwrap(), false).unwrap();
    let lp: Vec<Vec<f32>> = logprobs_from_logits(&logits, &ids.narrow(1, 1, t - 1).unwrap())
        .unwrap()
        .to_vec2()
        .unwrap();
    let v: Vec<Vec<f32>> = model
        .value_head
        .as_ref()
        .unwrap()
        .forward(&hidden, &mut fwd)
        .unwrap()
        .narrow(1, 0, t - 1)
        .unwrap()
        .to_vec2()
        .unwrap();
    let m: Vec<Vec<u32>> = mask.to_vec2().unwrap();
    for (b, (want_lp, want_v)) in rows_f(&p["logprobs_after_step"])
        .iter()
        .zip(rows_f(&p["values_after_step"]))
        .enumerate()
    {
        for k in 0..t - 1 {
            if m[b][k + 1] == 1 {
                close(
                    lp[b][k] as f64,
                    want_lp[k] as f64,
                    &format!("logprob after step [{b}][{k}]"),
                );
            }
            if m[b][k] == 1 {
                close(
                    v[b][k] as f64,
                    want_v[k] as f64,
                    &format!("value after step [{b}][{k}]"),
                );
            }
        }
    }
}

fn flat(v: &serde_json::Value) -> Vec<f32> {
    match v {
        serde_json::Value::Array(a) => a.iter().flat_map(flat).collect(),
        x => vec![x.as_f64().unwrap() as f32],
    }
}

fn rows_f(v: &serde_json::Value) -> Vec<Vec<f32>> {
    v.as_array().unwrap().iter().map(f32s).collect()
}

/// The fraction of response tokens that repeat the token before them: a reward a tiny
/// random GPT-2 can learn fast (its residual stream already carries the current token).
/// +1 per occurrence of token 3.
fn token_reward(response: &[u32]) -> f32 {
    response.iter().filter(|&&t| t == 3).count() as f32
}

#[test]
fn ppo_raises_a_known_reward_while_kl_stays_bounded() {
    // A GPT-2 with a 16-token vocabulary, so that pure sampling (top_k 0, top_p 1, as TRL's
    // PPO examples) meets the rewarded token from the first step (chance 1/16).
    let cfg = rlhf_models::ModelConfig::gpt2(2, 4, 64, 64, 16);
    let mut policy = Model::random(cfg.clone(), 1, candle_core::DType::F32, &Device::Cpu).unwrap();
    policy.set_trainable(true).unwrap();
    let reference = Model::random(cfg, 1, candle_core::DType::F32, &Device::Cpu).unwrap();
    let ppo = PpoConfig {
        batch_size: 32,
        mini_batch_size: 8,
        ppo_epochs: 4,
        learning_rate: 1e-3,
        ..Default::default()
    };
    let (mut trainer, fresh) = PpoTrainer::new(ppo, policy, Some(reference)).unwrap();
    assert!(fresh, "a plain LM gets a fresh value head");
    let gen = GenerationConfig {
        max_new_tokens: 8,
        eos_token_id: vec![],
        pad_token_id: 0,
        ..Default::default()
    };
    let mut rng = RngStream::new(7);
    let (mut means, mut kls) = (Vec::new(), Vec::new());
    for _ in 0..15 {
        let queries: Vec<Vec<u32>> = (0..32)
            .map(|_| (0..4).map(|_| rng.below(16) as u32).collect())
            .collect();
        let responses = trainer.generate(&queries, &gen, None, 32, &mut rng).unwrap();
        let scores: Vec<f32> = responses.iter().map(|r| token_reward(r)).collect();
        means.push(scores.iter().sum::<f32>() / 32.0);
        kls.push(trainer.step(&queries, &responses, &scores).unwrap().scalars["objective/kl"]);
    }
    let early = (means[0] + means[1] + means[2]) / 3.0;
    let late = (means[12] + means[13] + means[14]) / 3.0;
    // Chance is 8/16 = 0.5 per response, with a noise of ~0.12 on a 32-sample mean; the
    // threshold asks for a shift of ten noise widths. The KL-regularised optimum (β = 0.2)
    // is near 7 occurrences; the sequence KL stays bounded on the way.
    assert!(late > early + 1.2, "mean reward {early:.3} -> {late:.3} ({means:?})");
    assert!(kls.iter().all(|k| k.is_finite() && *k < 25.0), "KL {kls:?}");
}

#[test]
fn edge_cases_eos_only_ragged_wrong_batch_and_nan_scores() {
    let p = &parity()["ppo_step"];
    let mut trainer = parity_trainer(p);
    let q = rows(&p["queries"]);
    // A response that is only EOS next to a longer one.
    let stats = trainer
        .step(&q, &[vec![50256], vec![314, 1842, 21274]], &[1.0, -1.0])
        .unwrap();
    assert!(stats.scalars["ppo/loss/total"].is_finite());
    assert_eq!(stats.tensors["tokens/responses_dist"], vec![1.0, 3.0]);
    let err = trainer.step(&q[..1], &[vec![1]], &[0.0]).unwrap_err().to_string();
    assert!(err.contains("expected batch_size = 2"), "{err}");
    let err = trainer
        .step(&q, &[vec![1], vec![2]], &[f32::NAN, 0.0])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("score 0 is NaN") && err.contains("nothing was updated"),
        "{err}"
    );
}
