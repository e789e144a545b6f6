//! The online trainers' scoring pass runs packed (real tokens only, each prompt's rows once
//! for its group of completions) and gives what the padded `[prompt; completion]` batch
//! gives under its attention mask and `arange` positions: the same per-token log-probs and
//! entropies (zero outside the completion mask) and the same gradient for every parameter,
//! with left-padded prompts, completions cut at EOS, a truncated row masked out, and in
//! train mode with dropout (drawn per sequence, so both layouts drop the same units). f64 through composed attention
//! (1e-9), f32 through the fused kernels (1e-4 relative to the largest entry).

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor};
use rlhf_models::{Family, Fwd, Model, ModelConfig};
use rlhf_ops::dropout::DropoutKeys;
use rlhf_train::online::buffer::{completion_logps, Buffer};

const PAD: u32 = 0;
const EOS: u32 = 1;

fn buffer(mask_truncated: bool) -> Buffer {
    // Two groups of one prompt (lengths 3 and 2: the second left-padded), completions cut
    // at EOS at different places, and one that never ends.
    let prompts = [
        vec![5, 6, 7],
        vec![5, 6, 7],
        vec![5, 6, 7],
        vec![8, 9],
        vec![8, 9],
        vec![4, 9, 9],
    ];
    let completions = [
        vec![2, 3, EOS, 4],
        vec![2, 4, 4, 4],
        vec![EOS, 3, 3, 3],
        vec![3, 3, 3, EOS],
        vec![3, 2, EOS, EOS],
        vec![6, 6, 2, EOS],
    ];
    Buffer::new(&prompts, &completions, &[EOS], PAD, mask_truncated)
        .unwrap()
        .0
}

fn models(dtype: DType) -> Vec<(String, Model)> {
    let mut out = Vec::new();
    let mut gpt2 = ModelConfig::gpt2(2, 2, 8, 32, 11);
    gpt2.disable_dropout();
    out.push(("gpt2".to_string(), gpt2));
    for family in [Family::Llama, Family::Qwen2, Family::Mistral] {
        let mut cfg = ModelConfig::llama_family(family, 16, 24, 2, 4, 2, 11, 10_000.0).unwrap();
        if family == Family::Mistral {
            cfg.sliding_window = Some(3);
            cfg.sliding_layers = vec![true; 2];
        }
        cfg.tie_word_embeddings = true;
        out.push((format!("{family:?}"), cfg));
    }
    out.into_iter()
        .map(|(name, cfg)| {
            let mut m = Model::random(cfg, 9, dtype, &Device::Cpu).unwrap();
            m.set_trainable(true).unwrap();
            (name, m)
        })
        .collect()
}

fn vals(t: &Tensor) -> Vec<f64> {
    t.flatten_all()
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// Log-probs, entropies and the gradients of a weighted sum of both.
fn run(model: &Model, buf: &Buffer, packed: bool, keys: Option<&mut DropoutKeys>) -> (Vec<f64>, Vec<f64>, GradStore) {
    let rows: Vec<usize> = (0..buf.len()).collect();
    let mut x = buf.tensors(&rows, &Device::Cpu).unwrap();
    assert!(x.packed.is_some());
    if !packed {
        x.packed = None;
    }
    let mut fwd = match keys {
        Some(k) => Fwd::train(k),
        None => Fwd::eval_grad(),
    };
    let (lp, ent) = completion_logps(model, &x, 0.7, &mut fwd).unwrap();
    let w = Tensor::arange(0f64, lp.elem_count() as f64, &Device::Cpu)
        .unwrap()
        .affine(0.37, -1.0)
        .unwrap()
        .sin()
        .unwrap()
        .reshape(lp.dims())
        .unwrap()
        .to_dtype(lp.dtype())
        .unwrap();
    let loss = ((&lp * &w).unwrap().sum_all().unwrap() + (&ent * 0.3).unwrap().sum_all().unwrap()).unwrap();
    let g = loss.backward().unwrap();
    (vals(&lp), vals(&ent), g)
}

fn close(what: &str, a: &[f64], b: &[f64], tol: f64) {
    assert_eq!(a.len(), b.len(), "{what}");
    let scale = b.iter().fold(1e-12f64, |m, x| m.max(x.abs()));
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!((x - y).abs() <= tol * scale, "{what}[{i}]: packed {x} vs padded {y}");
    }
}

fn compare(model: &Model, buf: &Buffer, tol: f64, what: &str) {
    let (lp_a, ent_a, ga) = run(model, buf, true, None);
    let (lp_b, ent_b, gb) = run(model, buf, false, None);
    close(&format!("{what} logps"), &lp_a, &lp_b, tol);
    close(&format!("{what} entropy"), &ent_a, &ent_b, tol);
    // Zero outside the completion mask.
    let mask: Vec<f64> = buf.completion_mask.iter().flatten().map(|&m| f64::from(m)).collect();
    assert!(lp_a.iter().zip(&mask).all(|(l, m)| *m != 0.0 || *l == 0.0), "{what}");
    let mut checked = 0;
    for (name, p) in model.named_params() {
        match (ga.get(p.get(true)), gb.get(p.get(true))) {
            (Some(x), Some(y)) => close(&format!("{what} {name}"), &vals(x), &vals(y), tol),
            (None, None) => continue,
            _ => panic!("{what}: {name} has a gradient in one pass only"),
        }
        checked += 1;
    }
    assert!(checked > 10, "{what}: {checked}");
}

#[test]
fn the_packed_scoring_pass_equals_the_padded_batch() {
    for (dtype, tol) in [(DType::F64, 1e-9), (DType::F32, 1e-4)] {
        for (name, model) in models(dtype) {
            for mask_truncated in [false, true] {
                let buf = buffer(mask_truncated);
                compare(
                    &model,
                    &buf,
                    tol,
                    &format!("{name} {dtype:?} mask_truncated={mask_truncated}"),
                );
            }
        }
    }
}

#[test]
fn with_dropout_the_packed_pass_drops_what_the_padded_batch_drops() {
    // Every dropout site of GPT-2 at 0.1: no sharing then, and the same masks.
    for (dtype, tol) in [(DType::F64, 1e-9), (DType::F32, 1e-4)] {
        let cfg = ModelConfig::gpt2(2, 2, 8, 32, 11);
        let mut model = Model::random(cfg, 9, dtype, &Device::Cpu).unwrap();
        model.set_trainable(true).unwrap();
        let buf = buffer(false);
        let keys = DropoutKeys::new(3, (0..6).collect());
        let (a, ea, ga) = run(&model, &buf, true, Some(&mut keys.clone()));
        let (b, eb, gb) = run(&model, &buf, false, Some(&mut keys.clone()));
        close("dropout logps", &a, &b, tol);
        close("dropout entropy", &ea, &eb, tol);
        for (name, p) in model.named_params() {
            if let (Some(x), Some(y)) = (ga.get(p.get(true)), gb.get(p.get(true))) {
                close(&format!("dropout {name}"), &vals(x), &vals(y), tol);
            }
        }
        // Not vacuous: the masks change the log-probs.
        let (c, _, _) = run(&model, &buf, true, None);
        assert!(a.iter().zip(&c).any(|(x, y)| (x - y).abs() > 1e-3));
    }
}

#[test]
fn rows_whose_masks_are_not_left_padded_prompts_run_padded() {
    let mut buf = buffer(false);
    buf.prompt_mask[0] = vec![1, 0, 1];
    let x = buf.tensors(&[0, 1], &Device::Cpu).unwrap();
    assert!(x.packed.is_none());
    assert!(buf.tensors(&[1, 2], &Device::Cpu).unwrap().packed.is_some());
}
