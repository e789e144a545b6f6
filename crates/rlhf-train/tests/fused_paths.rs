//! The fast training paths give the gradients of the composed ones: token embeddings and the
//! tied LM head delivering their gradients through a `GradSink` and the fused LM-head
//! log-prob kernel, summed by `Grads`, equal candle's dense graph gradients through
//! `lm_logits` + the composed `logprobs_from_logits` / `entropy_from_logits`, for every
//! trainable parameter (1e-4 relative to the largest entry in f32; 1e-6 in f64, where the
//! sums themselves are kept in f32).

use candle_core::{DType, Device, Tensor};
use rlhf_models::{Fwd, Model, ModelConfig};
use rlhf_ops::ppo::{entropy_from_logits, lm_head_logprobs_and_entropy, logprobs_from_logits};
use rlhf_ops::sink::GradSink;
use rlhf_train::optim::Grads;
use rlhf_train::trainer::trainable_params;

fn config() -> ModelConfig {
    let mut cfg = ModelConfig::gpt2(2, 2, 16, 32, 97);
    cfg.intermediate_size = 512;
    cfg
}

fn grads(model: &Model, fast: bool) -> Vec<Vec<f32>> {
    let dev = Device::Cpu;
    let ids = Tensor::new(&[[5u32, 9, 9, 40, 96, 0], [50, 51, 3, 3, 7, 8]], &dev).unwrap();
    let mask = Tensor::new(&[[0u32, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]], &dev).unwrap();
    let labels = ids.narrow(1, 1, 5).unwrap();
    let weights = Tensor::new(&[[0.3f32, -1.0, 0.5, 2.0, 1.0], [1.0, 0.2, -0.7, 0.1, 0.9]], &dev)
        .unwrap()
        .to_dtype(model.dtype())
        .unwrap();
    let params = trainable_params(model);
    let vars: Vec<_> = params.iter().map(|(_, v)| v).collect();
    let sink = GradSink::new();
    let mut fwd = Fwd::eval_grad();
    if fast {
        fwd = fwd.with_sink(&sink);
    }
    let hidden = model.forward(&ids, &mask, &mut fwd).unwrap();
    let h = hidden.narrow(1, 0, 5).unwrap();
    let (lp, ent) = if fast {
        let w = model.lm_head_weight(true).unwrap();
        lm_head_logprobs_and_entropy(&h, w, &labels, Some(&sink)).unwrap()
    } else {
        let logits = model.lm_logits(&h, true).unwrap();
        (
            logprobs_from_logits(&logits, &labels).unwrap(),
            entropy_from_logits(&logits).unwrap(),
        )
    };
    let loss = ((&lp * &weights).unwrap().sum_all().unwrap() + (ent * 0.3).unwrap().sum_all().unwrap()).unwrap();
    let mut g = Grads::new(vars.len());
    g.add(&vars, &loss.backward().unwrap()).unwrap();
    g.add_sink(&vars, sink.take()).unwrap();
    g.sums
        .into_iter()
        .map(|s| s.expect("every parameter has a gradient"))
        .collect()
}

fn compare(dtype: DType, tol: f64) {
    let mut model = Model::random(config(), 7, dtype, &Device::Cpu).unwrap();
    model.set_trainable(true).unwrap();
    let names: Vec<String> = trainable_params(&model).into_iter().map(|(n, _)| n).collect();
    assert!(names.iter().any(|n| n.contains("wte")) && names.iter().any(|n| n.contains("wpe")));
    let (fast, slow) = (grads(&model, true), grads(&model, false));
    for ((name, a), b) in names.iter().zip(&fast).zip(&slow) {
        let scale = b.iter().fold(0f64, |m, x| m.max(x.abs() as f64)).max(1e-3);
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            assert!(
                ((x - y) as f64).abs() <= tol * scale,
                "{name}[{i}]: fast {x} vs composed {y} ({dtype:?})"
            );
        }
    }
}

#[test]
fn sinks_and_the_fused_head_give_the_graph_gradients_f32() {
    compare(DType::F32, 1e-4);
}

#[test]
fn sinks_and_the_fused_head_give_the_graph_gradients_f64() {
    compare(DType::F64, 1e-6);
}
