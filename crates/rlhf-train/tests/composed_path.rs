//! With the fused CPU kernels switched off (`rlhf_ops::kernels::set_fast_kernels(false)`),
//! every op takes its composed path — the path other devices and dtypes use — and the
//! model, a reward step, a PPO-style log-prob step and generation must give what the fast
//! path gives: logits and losses within 1e-4, every gradient within 1e-4 of its scale,
//! parameters after an AdamW step within 1e-6, the same greedy tokens. GPT-2 and every
//! Llama family.

mod common;

use candle_core::{DType, Device, Tensor};
use common::fixtures;
use rlhf_models::{Fwd, GenerationConfig, LoadOptions, Model};
use rlhf_ops::kernels::set_fast_kernels;
use rlhf_ops::ppo::lm_head_logprobs_and_entropy;
use rlhf_ops::rng::RngStream;
use rlhf_ops::sink::GradSink;
use rlhf_train::optim::{AdamConfig, AdamW, Grads};
use rlhf_train::reward::{pair_loss, Pair};
use rlhf_train::trainer::trainable_params;

const MODELS: [&str; 5] = [
    "tiny-gpt2",
    "families/tiny-llama-seqcls",
    "families/tiny-qwen2-seqcls",
    "families/tiny-qwen3-seqcls",
    "families/tiny-mistral-seqcls",
];

fn reward_model(dir: &str) -> Model {
    let mut m = Model::load(&fixtures().join(dir), &LoadOptions::default()).unwrap();
    m.ensure_score_head(3).unwrap();
    m.disable_dropout();
    m.set_trainable(true).unwrap();
    m
}

fn pairs(vocab: u32) -> Vec<Pair> {
    let seq = |n: usize, k: u32| {
        (0..n as u32)
            .map(|i| (i * 37 + k * 11 + 5) % vocab)
            .collect::<Vec<u32>>()
    };
    (0..3)
        .map(|k| Pair {
            chosen: seq(7 + 3 * k as usize, k),
            rejected: seq(4 + 2 * k as usize, k + 7),
            margin: None,
        })
        .collect()
}

/// Loss and gradients (in parameter order) of one reward step, and the parameters after an
/// AdamW step from the fast path's gradients (so that only the optimizer's path differs).
fn reward_step(dir: &str, fast: bool, fast_grads: Option<&Grads>) -> (f32, Vec<Vec<f32>>, Grads, Vec<Vec<f32>>) {
    let _guard = set_fast_kernels(fast);
    let model = reward_model(dir);
    let ps = pairs(model.cfg().vocab_size.min(2000) as u32);
    let refs: Vec<&Pair> = ps.iter().collect();
    let out = pair_loss(&model, &refs, None, &mut Fwd::eval_grad()).unwrap();
    let store = out.loss.backward().unwrap();
    let params = trainable_params(&model);
    let vars: Vec<_> = params.iter().map(|(_, v)| v).collect();
    let mut grads = Grads::new(vars.len());
    grads.add(&vars, &store).unwrap();
    let g: Vec<Vec<f32>> = params
        .iter()
        .map(|(_, v)| {
            store
                .get(v.as_tensor())
                .map_or(vec![], |t| t.flatten_all().unwrap().to_vec1().unwrap())
        })
        .collect();
    let mut opt = AdamW::new(params.clone(), AdamConfig::default());
    opt.step(fast_grads.unwrap_or(&grads), 1e-3).unwrap();
    let after = params
        .iter()
        .map(|(_, v)| v.as_tensor().flatten_all().unwrap().to_vec1().unwrap())
        .collect();
    (out.loss.to_scalar::<f32>().unwrap(), g, grads, after)
}

fn close_rel(a: &[f32], b: &[f32], tol: f32, what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: sizes");
    let scale = b.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-6);
    let worst = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    assert!(worst <= tol * scale, "{what}: differs by {worst} (scale {scale})");
}

#[test]
fn a_reward_step_on_the_composed_path_equals_the_fused_one() {
    for dir in MODELS {
        let (lf, gf, grads, pf) = reward_step(dir, true, None);
        let (lc, gc, _, pc) = reward_step(dir, false, Some(&grads));
        assert!((lf - lc).abs() < 1e-4, "{dir}: loss {lf} vs {lc}");
        for (i, ((a, b), (x, y))) in gf.iter().zip(&gc).zip(pf.iter().zip(&pc)).enumerate() {
            close_rel(b, a, 1e-4, &format!("{dir} gradient {i}"));
            let worst = x.iter().zip(y).fold(0f32, |m, (p, q)| m.max((p - q).abs()));
            assert!(worst < 1e-6, "{dir} parameter {i} after AdamW differs by {worst}");
        }
    }
}

/// Log-probs of fixed tokens through the LM head and their gradient w.r.t. the head.
fn logprob_step(dir: &str, fast: bool) -> (Vec<f32>, Vec<f32>) {
    let _guard = set_fast_kernels(fast);
    let mut model = Model::load(&fixtures().join(dir), &LoadOptions::default()).unwrap();
    model.disable_dropout();
    model.set_trainable(true).unwrap();
    let v = model.cfg().vocab_size.min(2000) as u32;
    let ids = Tensor::new(
        &[[1u32, 5 % v, 9 % v, 40 % v, 77 % v], [3, 8, 13, 21, 34]],
        &Device::Cpu,
    )
    .unwrap();
    let mask = Tensor::ones((2, 5), DType::U32, &Device::Cpu).unwrap();
    let sink = GradSink::new();
    let mut fwd = Fwd::eval_grad().with_sink(&sink);
    let hidden = model.forward(&ids, &mask, &mut fwd).unwrap();
    let h = hidden.narrow(1, 0, 4).unwrap();
    let labels = ids.narrow(1, 1, 4).unwrap();
    let w = model.lm_head_weight(true).unwrap();
    let (lp, _) = lm_head_logprobs_and_entropy(&h, w, &labels, Some(&sink)).unwrap();
    let store = lp.sum_all().unwrap().backward().unwrap();
    let params = trainable_params(&model);
    let vars: Vec<_> = params.iter().map(|(_, v)| v).collect();
    let mut grads = Grads::new(vars.len());
    grads.add(&vars, &store).unwrap();
    grads.add_sink(&vars, sink.take()).unwrap();
    (lp.flatten_all().unwrap().to_vec1().unwrap(), vec![grads.norm() as f32])
}

#[test]
fn log_probs_and_their_gradients_on_the_composed_path_equal_the_fused_ones() {
    for dir in ["tiny-gpt2", "families/tiny-llama", "families/tiny-qwen3"] {
        let (a, ga) = logprob_step(dir, true);
        let (b, gb) = logprob_step(dir, false);
        close_rel(&b, &a, 1e-5, &format!("{dir} log-probs"));
        close_rel(&gb, &ga, 1e-4, &format!("{dir} gradient norm"));
    }
}

#[test]
fn generation_on_the_composed_path_gives_the_same_tokens() {
    for dir in ["tiny-gpt2", "families/tiny-qwen2", "families/tiny-mistral"] {
        let model = Model::load(&fixtures().join(dir), &LoadOptions::default()).unwrap();
        let cfg = GenerationConfig {
            max_new_tokens: 6,
            do_sample: false,
            eos_token_id: vec![],
            pad_token_id: model.pad_token_id().unwrap(),
            ..Default::default()
        };
        let prompts = vec![vec![3u32, 17, 29], vec![11u32, 2, 5, 7, 13]];
        let fast = model.generate(&prompts, &cfg, &mut RngStream::new(0)).unwrap();
        let _guard = set_fast_kernels(false);
        let composed = model.generate(&prompts, &cfg, &mut RngStream::new(0)).unwrap();
        assert_eq!(fast.response_ids, composed.response_ids, "{dir}");
    }
}
