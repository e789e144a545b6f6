//! Every trainable parameter receives the right gradient: candle autograd against central
//! finite differences, in f64 on a small random GPT-2 with a value and a score head,
//! a left-padded batch and every activation. (Guards against ops that silently cut the
//! graph, such as candle-nn's fused layer_norm / softmax.)

use candle_core::{DType, Device, Tensor};
use rlhf_models::{Fwd, Model, ModelConfig};
use rlhf_ops::nn::Activation;
use rlhf_peft::Param;

fn scalar_loss(model: &Model, ids: &Tensor, mask: &Tensor, grad: bool) -> Tensor {
    let mut fwd = Fwd {
        grad,
        dropout: None,
        adapters: true,
        sink: None,
    };
    let hidden = model.forward(ids, mask, &mut fwd).unwrap();
    let logits = model.lm_logits(&hidden, grad).unwrap().to_dtype(DType::F64).unwrap();
    let values = model
        .value_head
        .as_ref()
        .unwrap()
        .forward(&hidden, &mut fwd)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap();
    let scores = model
        .score_head
        .as_ref()
        .unwrap()
        .forward(&hidden, ids, model.pad_token_id(), grad)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap();
    // A fixed, position-dependent weighting so that every output matters differently.
    let n = logits.elem_count();
    let w: Vec<f64> = (0..n).map(|i| ((i * 7919 % 97) as f64 / 97.0) - 0.5).collect();
    let w = Tensor::from_vec(w, logits.shape(), &Device::Cpu).unwrap();
    let l1 = (logits * w).unwrap().sum_all().unwrap();
    let l2 = values.sqr().unwrap().sum_all().unwrap();
    let l3 = (scores * 3.0).unwrap().sum_all().unwrap();
    ((l1 + l2).unwrap() + l3).unwrap()
}

fn set_entry(p: &Param, idx: usize, value: f64) {
    let t = p.value();
    let mut v = t.flatten_all().unwrap().to_vec1::<f64>().unwrap();
    v[idx] = value;
    let new = Tensor::from_vec(v, t.shape(), t.device()).unwrap();
    p.var().unwrap().set(&new).unwrap();
}

fn check(activation: Activation) {
    let mut cfg = ModelConfig::gpt2(2, 2, 8, 16, 11);
    cfg.hidden_act = activation;
    cfg.disable_dropout();
    let mut model = Model::random(cfg, 3, DType::F64, &Device::Cpu).unwrap();
    model.ensure_value_head(4).unwrap();
    model.ensure_score_head(5).unwrap();
    let f64p = |p: &Param| Param::frozen(p.value().to_dtype(DType::F64).unwrap());
    let v = model.value_head.as_mut().unwrap();
    (v.weight, v.bias) = (f64p(&v.weight), f64p(&v.bias));
    let s = model.score_head.as_mut().unwrap();
    s.weight = f64p(&s.weight);
    model.set_trainable(true).unwrap();
    let ids = Tensor::new(&[[3u32, 1, 4, 1, 5], [0, 0, 9, 2, 6]], &Device::Cpu).unwrap();
    let mask = Tensor::new(&[[1u32, 1, 1, 1, 1], [0, 0, 1, 1, 1]], &Device::Cpu).unwrap();
    let grads = scalar_loss(&model, &ids, &mask, true).backward().unwrap();
    let params = model.named_params();
    assert!(params.len() > 20);
    for (name, p) in params {
        let g = grads
            .get(p.get(true))
            .unwrap_or_else(|| panic!("{name} received no gradient"));
        let g = g.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let n = g.len();
        for k in 0..4 {
            let idx = (k * 2654435761usize + name.len()) % n;
            let orig = p.value().flatten_all().unwrap().to_vec1::<f64>().unwrap()[idx];
            let h = 1e-5;
            set_entry(p, idx, orig + h);
            let up = scalar_loss(&model, &ids, &mask, false).to_scalar::<f64>().unwrap();
            set_entry(p, idx, orig - h);
            let down = scalar_loss(&model, &ids, &mask, false).to_scalar::<f64>().unwrap();
            set_entry(p, idx, orig);
            let fd = (up - down) / (2.0 * h);
            let err = (g[idx] - fd).abs();
            assert!(
                err <= 1e-6 + 1e-4 * fd.abs(),
                "{name}[{idx}]: autograd {} vs finite difference {fd}",
                g[idx]
            );
        }
    }
}

#[test]
fn every_parameter_gets_the_finite_difference_gradient_gelu_new() {
    check(Activation::GeluTanh);
}

#[test]
fn every_parameter_gets_the_finite_difference_gradient_gelu_erf_and_relu() {
    check(Activation::GeluErf);
    check(Activation::Relu);
}
