//! A packed pass runs a prefix that sequences have in common once (the prompt of a
//! preference pair, of a group of completions) and lays the hidden states out as if every
//! sequence had run in full: the same hidden states and the same gradient for every
//! parameter as the unshared pass, in every family — f64 through composed attention, f32
//! through the fused kernel — and no sharing where the pass draws dropout.

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor};
use rlhf_models::{set_prefix_sharing, Family, Fwd, Model, ModelConfig};
use rlhf_ops::dropout::DropoutKeys;

/// Sequences with prefixes in common: a pair sharing 4 tokens, one sharing 2, one
/// repeating a whole sequence plus one token, a chain (the last continues the second, which
/// continues the first), and one sharing nothing.
fn seqs() -> Vec<Vec<u32>> {
    vec![
        vec![3, 1, 4, 1, 5, 9, 2],
        vec![3, 1, 4, 1, 7, 7],
        vec![6, 5],
        vec![6, 5, 2, 8],
        vec![3, 1, 4, 1, 5, 9, 2, 6],
        vec![8, 9, 7],
        vec![3, 1, 4, 1, 7, 7, 5],
    ]
}

fn family_model(family: Family, dtype: DType) -> Model {
    let mut cfg = ModelConfig::llama_family(family, 16, 24, 2, 4, 2, 11, 10_000.0).unwrap();
    if family == Family::Mistral {
        // Shorter than the shared prefixes, so that the window cuts into them.
        cfg.sliding_window = Some(3);
        cfg.sliding_layers = vec![true; 2];
    }
    let mut model = Model::random(cfg, 5, dtype, &Device::Cpu).unwrap();
    model.set_trainable(true).unwrap();
    model
}

fn gpt2_model(dtype: DType, dropout: bool) -> Model {
    let mut cfg = ModelConfig::gpt2(2, 2, 8, 16, 11);
    if !dropout {
        cfg.disable_dropout();
    }
    let mut model = Model::random(cfg, 3, dtype, &Device::Cpu).unwrap();
    model.set_trainable(true).unwrap();
    model
}

fn vals(t: &Tensor) -> Vec<f64> {
    t.flatten_all()
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// Hidden states and gradients of `Σ hidden · w` of one packed pass.
fn run(model: &Model, share: bool, keys: Option<&mut DropoutKeys>) -> (Vec<f64>, GradStore) {
    let _guard = set_prefix_sharing(share);
    let seqs = seqs();
    let refs: Vec<&[u32]> = seqs.iter().map(Vec::as_slice).collect();
    let mut fwd = match keys {
        Some(k) => Fwd::train(k),
        None => Fwd::eval_grad(),
    };
    let h = model.forward_packed(&refs, &mut fwd).unwrap();
    let n: usize = seqs.iter().map(Vec::len).sum();
    assert_eq!(h.dim(0).unwrap(), n);
    let w: Vec<f64> = (0..h.elem_count())
        .map(|i| ((i * 7919) % 13) as f64 / 6.0 - 1.0)
        .collect();
    let w = Tensor::from_vec(w, h.dims(), &Device::Cpu)
        .unwrap()
        .to_dtype(h.dtype())
        .unwrap();
    let g = (&h * w).unwrap().sum_all().unwrap().backward().unwrap();
    (vals(&h), g)
}

fn assert_same(model: &Model, tol: f64, what: &str) {
    let (a, ga) = run(model, true, None);
    let (b, gb) = run(model, false, None);
    let scale = b.iter().fold(1e-12f64, |m, x| m.max(x.abs()));
    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
        assert!(
            (x - y).abs() <= tol * scale,
            "{what}: hidden[{i}]: shared {x} vs unshared {y}"
        );
    }
    let params = model.named_params();
    let mut checked = 0;
    for (name, p) in params {
        // The untied LM head is outside the backbone pass.
        let (x, y) = match (ga.get(p.get(true)), gb.get(p.get(true))) {
            (Some(x), Some(y)) => (vals(x), vals(y)),
            (None, None) if name.starts_with("lm_head") => continue,
            _ => panic!("{what}: {name} got a gradient in one pass only"),
        };
        checked += 1;
        let scale = y.iter().fold(1e-12f64, |m, v| m.max(v.abs()));
        for (i, (u, v)) in x.iter().zip(&y).enumerate() {
            assert!(
                (u - v).abs() <= tol * scale,
                "{what}: {name}[{i}]: shared {u} vs unshared {v}"
            );
        }
    }
    assert!(checked > 10, "{what}: {checked} parameters");
}

#[test]
fn shared_prefixes_give_the_unshared_hidden_states_and_gradients_in_every_family() {
    for (dtype, tol) in [(DType::F64, 1e-10), (DType::F32, 1e-4)] {
        assert_same(&gpt2_model(dtype, false), tol, &format!("gpt2 {dtype:?}"));
        for family in [Family::Llama, Family::Qwen2, Family::Qwen3, Family::Mistral] {
            assert_same(&family_model(family, dtype), tol, &format!("{family:?} {dtype:?}"));
        }
    }
}

#[test]
fn a_pass_that_draws_dropout_runs_every_sequence_in_full() {
    // GPT-2's dropout at 0.1: the masks are per sequence, so sharing would change them.
    let model = gpt2_model(DType::F32, true);
    let keys = DropoutKeys::new(5, (0..7).collect());
    let (a, _) = run(&model, true, Some(&mut keys.clone()));
    let (b, _) = run(&model, false, Some(&mut keys.clone()));
    assert_eq!(a, b);
    // Not vacuous: without dropout the shared pass differs in the last bits somewhere, or
    // equals exactly; either way dropout changes the values.
    let (c, _) = run(&model, true, None);
    assert_ne!(a, c);
}
