//! A packed forward pass (sequences end to end, attention per sequence) computes what the
//! right-padded batch computes at its real tokens: the same scores and the same gradient
//! for every parameter — in f64 through the gather/scatter around composed attention, in
//! f32 through the fused packed attention kernel.

use candle_core::{DType, Device, Tensor};
use rlhf_models::{Fwd, Model, ModelConfig};
use rlhf_peft::Param;

fn model_in(dtype: DType) -> Model {
    model_with(dtype, false)
}

/// Tiny GPT-2 with its dropout (0.1 on embeddings, attention and residuals) kept or off.
fn model_with(dtype: DType, dropout: bool) -> Model {
    let mut cfg = ModelConfig::gpt2(2, 2, 8, 16, 11);
    if !dropout {
        cfg.disable_dropout();
    }
    // The padded batch is filled with id 10, the id the score head pools around.
    cfg.pad_token_id = Some(10);
    let mut model = Model::random(cfg, 3, dtype, &Device::Cpu).unwrap();
    model.ensure_score_head(5).unwrap();
    let s = model.score_head.as_mut().unwrap();
    s.weight = Param::frozen(s.weight.value().to_dtype(dtype).unwrap());
    model.set_trainable(true).unwrap();
    model
}

fn model() -> Model {
    model_in(DType::F64)
}

fn seqs() -> Vec<Vec<u32>> {
    vec![vec![3, 1, 4, 1, 5, 9, 2], vec![6, 5], vec![3], vec![5, 8, 9, 7, 9]]
}

fn padded(seqs: &[Vec<u32>]) -> (Tensor, Tensor) {
    let t = seqs.iter().map(Vec::len).max().unwrap();
    let ids: Vec<Vec<u32>> = seqs
        .iter()
        .map(|s| [s.clone(), vec![10; t - s.len()]].concat())
        .collect();
    let mask: Vec<Vec<u32>> = seqs
        .iter()
        .map(|s| [vec![1; s.len()], vec![0; t - s.len()]].concat())
        .collect();
    (
        Tensor::new(ids, &Device::Cpu).unwrap(),
        Tensor::new(mask, &Device::Cpu).unwrap(),
    )
}

fn fwd(grad: bool) -> Fwd<'static> {
    Fwd {
        grad,
        dropout: None,
        adapters: true,
        sink: None,
    }
}

/// A weighted sum of the scores, so that every sequence's gradient path counts.
fn weighted(scores: &Tensor) -> Tensor {
    let w = Tensor::new(&[[1.0f64], [-2.0], [0.5], [3.0]], &Device::Cpu)
        .unwrap()
        .to_dtype(scores.dtype())
        .unwrap();
    (scores * w).unwrap().sum_all().unwrap()
}

#[test]
fn packed_scores_equal_the_padded_batch() {
    let model = model();
    let seqs = seqs();
    let refs: Vec<&[u32]> = seqs.iter().map(Vec::as_slice).collect();
    let (ids, mask) = padded(&seqs);
    let padded = model.scores(&ids, &mask, &mut fwd(false)).unwrap();
    let packed = model.scores_packed(&refs, &mut fwd(false)).unwrap();
    assert_eq!(packed.dims(), &[4, 1]);
    let (a, b) = (
        padded.flatten_all().unwrap().to_vec1::<f64>().unwrap(),
        packed.flatten_all().unwrap().to_vec1::<f64>().unwrap(),
    );
    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
        // f64: only summation order differs.
        assert!(
            (x - y).abs() <= 1e-12 * (1.0 + x.abs()),
            "sequence {i}: padded {x} vs packed {y}"
        );
    }
}

fn gradients_match(dtype: DType, tol: f64) {
    gradients_match_with(dtype, tol, false)
}

/// Scores and gradients of the padded batch and the packed rows; with `dropout`, both in
/// train mode with the same per-example keys (masks follow each sequence's own tokens, so
/// the two layouts drop the same units).
fn gradients_match_with(dtype: DType, tol: f64, dropout: bool) {
    let model = model_with(dtype, dropout);
    let seqs = seqs();
    let refs: Vec<&[u32]> = seqs.iter().map(Vec::as_slice).collect();
    let (ids, mask) = padded(&seqs);
    let keys = rlhf_ops::dropout::DropoutKeys::new(5, vec![40, 2, 17, 3]);
    let (mut k1, mut k2) = (keys.clone(), keys);
    let (mut f1, mut f2) = match dropout {
        true => (Fwd::train(&mut k1), Fwd::train(&mut k2)),
        false => (fwd(true), fwd(true)),
    };
    let padded = model.scores(&ids, &mask, &mut f1).unwrap();
    let packed = model.scores_packed(&refs, &mut f2).unwrap();
    let vals = |t: &Tensor| {
        t.flatten_all()
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .to_vec1::<f64>()
            .unwrap()
    };
    for (i, (x, y)) in vals(&padded).iter().zip(vals(&packed)).enumerate() {
        assert!(
            (x - y).abs() <= tol * (1.0 + x.abs()),
            "score {i}: padded {x} vs packed {y}"
        );
    }
    let g_pad = weighted(&padded).backward().unwrap();
    let g_pack = weighted(&packed).backward().unwrap();
    let params = model.named_params();
    assert!(params.len() > 20);
    for (name, p) in params {
        let get = |g: &candle_core::backprop::GradStore| {
            vals(
                g.get(p.get(true))
                    .unwrap_or_else(|| panic!("{name} received no gradient")),
            )
        };
        let (a, b) = (get(&g_pad), get(&g_pack));
        let scale = a.iter().fold(1e-12f64, |m, x| m.max(x.abs()));
        for (i, (x, y)) in a.iter().zip(&b).enumerate() {
            assert!((x - y).abs() <= tol * scale, "{name}[{i}]: padded {x} vs packed {y}");
        }
    }
}

#[test]
fn packed_gradients_equal_the_padded_batch_for_every_parameter() {
    // f64, composed attention: only summation order differs.
    gradients_match(DType::F64, 1e-10);
}

#[test]
fn fused_packed_attention_gives_the_padded_batch_scores_and_gradients_in_f32() {
    // f32, the fused kernel: f32 rounding of sums in another order.
    gradients_match(DType::F32, 1e-4);
}

#[test]
fn with_dropout_the_packed_rows_drop_what_the_padded_batch_drops() {
    // f64, composed attention, every dropout site of GPT-2 at 0.1.
    gradients_match_with(DType::F64, 1e-10, true);
    // f32, the fused kernel's own keep factors.
    gradients_match_with(DType::F32, 1e-4, true);
    // Not vacuous: the masks change the scores.
    let model = model_with(DType::F64, true);
    let refs: Vec<Vec<u32>> = seqs();
    let refs: Vec<&[u32]> = refs.iter().map(Vec::as_slice).collect();
    let mut keys = rlhf_ops::dropout::DropoutKeys::new(5, vec![40, 2, 17, 3]);
    let train = model.scores_packed(&refs, &mut Fwd::train(&mut keys)).unwrap();
    let eval = model.scores_packed(&refs, &mut fwd(false)).unwrap();
    let diff = (train - eval)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    assert!(diff > 1e-3, "{diff}");
}

#[test]
fn packing_refuses_empty_and_overlong_sequences() {
    let model = model();
    let err = model
        .scores_packed(&[&[1, 2], &[]], &mut fwd(false))
        .unwrap_err()
        .to_string();
    assert!(err.contains("sequence 1") && err.contains("no tokens"), "{err}");
    let long = vec![1u32; 17];
    let err = model.scores_packed(&[&long], &mut fwd(false)).unwrap_err().to_string();
    assert!(err.contains("17 tokens") && err.contains("n_positions (16)"), "{err}");
    let err = model.scores_packed(&[], &mut fwd(false)).unwrap_err().to_string();
    assert!(err.contains("empty batch"), "{err}");
}
