//! Generation invariants on tiny-gpt2: the KV-cache path equals the full forward, batching
//! with left padding equals one-by-one generation, seeds make sampling reproducible, and
//! rows stop at EOS independently.

mod common;

use candle_core::{DType, Device, Tensor, D};
use common::*;
use rlhf_models::{generate, Fwd, GenerationConfig, Model};
use rlhf_ops::rng::RngStream;

fn prompts(model: &Model) -> Vec<Vec<u32>> {
    let tok = model.tokenizer().unwrap();
    [
        "User: Hi!\nAssistant:",
        "User: Can you tell me something about chess?\nAssistant:",
        "Hello",
    ]
    .iter()
    .map(|t| tok.encode(t).unwrap())
    .collect()
}

fn greedy(n: usize) -> GenerationConfig {
    GenerationConfig {
        max_new_tokens: n,
        do_sample: false,
        eos_token_id: vec![],
        ..Default::default()
    }
}

#[test]
fn greedy_with_cache_equals_argmax_of_the_full_forward() {
    let model = tiny();
    let prompt = prompts(&model).remove(1);
    let out = generate(
        model.backbone(),
        std::slice::from_ref(&prompt),
        &greedy(12),
        &mut RngStream::new(0),
    )
    .unwrap();
    let resp = &out.response_ids[0];
    assert_eq!(resp.len(), 12);
    let mut seq = prompt.clone();
    for &tok in resp {
        let t = seq.len();
        let ids = Tensor::from_vec(seq.clone(), (1, t), &Device::Cpu).unwrap();
        let mask = Tensor::ones((1, t), DType::U32, &Device::Cpu).unwrap();
        let logits = model.logits(&ids, &mask, &mut Fwd::eval()).unwrap();
        let next = logits
            .get(0)
            .unwrap()
            .get(t - 1)
            .unwrap()
            .argmax(D::Minus1)
            .unwrap()
            .to_scalar::<u32>()
            .unwrap();
        assert_eq!(
            next, tok,
            "cached generation diverged from the full forward at length {t}"
        );
        seq.push(tok);
    }
}

#[test]
fn batched_left_padded_generation_equals_one_by_one() {
    let model = tiny();
    let ps = prompts(&model);
    let batched = generate(model.backbone(), &ps, &greedy(10), &mut RngStream::new(0)).unwrap();
    for (i, p) in ps.iter().enumerate() {
        let single = generate(
            model.backbone(),
            std::slice::from_ref(p),
            &greedy(10),
            &mut RngStream::new(0),
        )
        .unwrap();
        assert_eq!(batched.response_ids[i], single.response_ids[0], "row {i}");
        assert_eq!(&batched.prompt_ids[i], p);
    }
}

#[test]
fn the_same_seed_gives_the_same_samples() {
    let model = tiny();
    let ps = prompts(&model);
    let cfg = GenerationConfig {
        max_new_tokens: 16,
        top_k: 50,
        top_p: 0.95,
        temperature: 0.9,
        ..Default::default()
    };
    let a = generate(model.backbone(), &ps, &cfg, &mut RngStream::new(42)).unwrap();
    let b = generate(model.backbone(), &ps, &cfg, &mut RngStream::new(42)).unwrap();
    let c = generate(model.backbone(), &ps, &cfg, &mut RngStream::new(43)).unwrap();
    assert_eq!(a, b);
    assert_ne!(a.response_ids, c.response_ids);
}

#[test]
fn rows_stop_at_eos_independently_and_min_new_tokens_delays_it() {
    let model = tiny();
    let ps = prompts(&model);
    let free = generate(model.backbone(), &ps, &greedy(10), &mut RngStream::new(0)).unwrap();
    // Make row 0's third greedy token the "EOS": row 0 stops there, keeping it; rows that
    // never produce it run to max_new_tokens.
    let eos = free.response_ids[0][2];
    let cfg = GenerationConfig {
        eos_token_id: vec![eos],
        pad_token_id: 0,
        ..greedy(10)
    };
    let out = generate(model.backbone(), &ps, &cfg, &mut RngStream::new(0)).unwrap();
    let first = free.response_ids[0].iter().position(|&t| t == eos).unwrap();
    assert_eq!(out.response_ids[0], free.response_ids[0][..=first].to_vec());
    for (i, r) in out.response_ids.iter().enumerate().skip(1) {
        let cut = free.response_ids[i]
            .iter()
            .position(|&t| t == eos)
            .map_or(10, |p| p + 1);
        assert_eq!(r, &free.response_ids[i][..cut].to_vec(), "row {i}");
    }
    let late = GenerationConfig {
        min_new_tokens: first + 1,
        ..cfg
    };
    let out = generate(model.backbone(), &ps[..1], &late, &mut RngStream::new(0)).unwrap();
    assert!(out.response_ids[0].len() > first + 1 || !out.response_ids[0][..=first].contains(&eos));
}

#[test]
fn a_prompt_longer_than_n_positions_is_a_clear_error() {
    let model = tiny();
    let long = vec![464u32; 250];
    let err = generate(model.backbone(), &[long], &greedy(10), &mut RngStream::new(0))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("n_positions 256") && err.contains("prompt 0 has 250 tokens"),
        "{err}"
    );
}
