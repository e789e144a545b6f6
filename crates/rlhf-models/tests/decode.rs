//! The packed decoder against the composed forward: logits after a prompt and after each
//! appended token equal the full forward's (f32 to 1e-4 of the largest logit; bf16 panels
//! within bf16 rounding), LoRA adapters are applied, generation gives the same tokens as
//! the composed path, and bad input is an error.

mod common;

use candle_core::{DType, Device, Tensor};
use common::*;
use rlhf_models::lora::{apply_lora, quantize, QuantConfig};
use rlhf_models::{generate, generate_composed, Decoder, Fwd, GenerationConfig, LoadOptions, Model};
use rlhf_ops::packed::PackedFormat;
use rlhf_ops::rng::RngStream;
use rlhf_peft::lora::{InitLoraWeights, TargetModules};
use rlhf_peft::LoraConfig;

/// Last-position logits of the full forward over each sequence alone, `(V)` each.
fn full_logits(model: &Model, seqs: &[Vec<u32>]) -> Vec<Vec<f32>> {
    seqs.iter()
        .map(|s| {
            let t = s.len();
            let ids = Tensor::from_vec(s.clone(), (1, t), &Device::Cpu).unwrap();
            let mask = Tensor::ones((1, t), DType::U32, &Device::Cpu).unwrap();
            let l = model.logits(&ids, &mask, &mut Fwd::eval()).unwrap();
            l.get(0).unwrap().get(t - 1).unwrap().to_vec1().unwrap()
        })
        .collect()
}

/// Largest difference relative to the largest reference logit.
fn rel_diff(got: &[f32], want: &[f32]) -> f32 {
    let scale = want.iter().fold(0f32, |m, x| m.max(x.abs()));
    let diff = got.iter().zip(want).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    diff / scale
}

fn prompts() -> Vec<Vec<u32>> {
    vec![
        vec![464, 3290, 318, 257],
        vec![15496],
        vec![40, 588, 4771, 13, 632, 318, 11, 290, 40],
    ]
}

/// Prefills, then appends a few tokens to some rows, checking every logit row against the
/// full forward of the sequence so far.
fn check_against_full_forward(model: &Model, format: PackedFormat, tol: f32) {
    let mut seqs = prompts();
    let mut dec = Decoder::new(model.backbone(), seqs.len(), 32, format)
        .unwrap()
        .expect("f32 CPU model");
    let v = model.cfg().vocab_size;
    let logits = dec.prefill(&seqs).unwrap();
    for (row, want) in full_logits(model, &seqs).iter().enumerate() {
        let d = rel_diff(&logits[row * v..(row + 1) * v], want);
        assert!(d <= tol, "{format:?}: prefill row {row}: {d}");
    }
    // Rows 0 and 2 go on; row 1 has finished (as after EOS) and is left alone.
    for (step, toks) in [[11u32, 287], [1110, 50256], [0, 7]].iter().enumerate() {
        let rows = [0usize, 2];
        let logits = dec.step(&rows, toks).unwrap();
        for (&r, &t) in rows.iter().zip(toks) {
            seqs[r].push(t);
        }
        let want = full_logits(model, &[seqs[0].clone(), seqs[2].clone()]);
        for (i, want) in want.iter().enumerate() {
            let d = rel_diff(&logits[i * v..(i + 1) * v], want);
            assert!(d <= tol, "{format:?}: step {step} entry {i}: {d}");
        }
    }
    assert_eq!(dec.lens(), &[7, 1, 12]);
}

#[test]
fn f32_decoding_equals_the_full_forward() {
    check_against_full_forward(&tiny(), PackedFormat::F32, 1e-4);
}

#[test]
fn bf16_decoding_is_within_bf16_rounding_of_the_full_forward() {
    // Operands rounded to 8-bit significands (relative error 2⁻⁹ each) through two layers
    // and the LM head: a few 1e-3 of the largest logit.
    check_against_full_forward(&tiny(), PackedFormat::Bf16, 2e-2);
}

#[test]
fn decoding_applies_lora_adapters() {
    let mut model = tiny();
    let cfg = LoraConfig {
        r: 4,
        lora_alpha: 8.0,
        target_modules: Some(TargetModules::One("all-linear".into())),
        init_lora_weights: InitLoraWeights::Bool(false),
        ..Default::default()
    };
    apply_lora(&mut model, &cfg, 3).unwrap();
    // The adapters change the logits (not initialised to zero), so matching the full
    // forward with adapters shows they are in the packed weights.
    let base = full_logits(&tiny(), &prompts());
    let adapted = full_logits(&model, &prompts());
    assert!(rel_diff(&adapted[0], &base[0]) > 1e-3);
    check_against_full_forward(&model, PackedFormat::F32, 1e-4);
}

#[test]
fn quantized_bases_and_other_dtypes_use_the_composed_path() {
    let mut model = tiny();
    quantize(&mut model, &QuantConfig::int8()).unwrap();
    assert!(Decoder::new(model.backbone(), 1, 8, PackedFormat::F32)
        .unwrap()
        .is_none());
    let opts = LoadOptions {
        dtype: DType::BF16,
        ..Default::default()
    };
    let bf16_model = Model::load(&tiny_dir(), &opts).unwrap();
    assert!(Decoder::new(bf16_model.backbone(), 1, 8, PackedFormat::F32)
        .unwrap()
        .is_none());
}

#[test]
fn generation_gives_the_tokens_of_the_composed_path() {
    let model = tiny();
    let ps = prompts();
    for cfg in [
        GenerationConfig {
            max_new_tokens: 12,
            do_sample: false,
            eos_token_id: vec![],
            ..Default::default()
        },
        GenerationConfig {
            max_new_tokens: 16,
            ..Default::default()
        },
        // An EOS that rows emit early: finished rows stop while others go on.
        GenerationConfig {
            max_new_tokens: 16,
            temperature: 3.0,
            eos_token_id: vec![13],
            min_new_tokens: 2,
            ..Default::default()
        },
    ] {
        for seed in 0..3 {
            let fast = generate(model.backbone(), &ps, &cfg, &mut RngStream::new(seed)).unwrap();
            let oracle = generate_composed(model.backbone(), &ps, &cfg, &mut RngStream::new(seed)).unwrap();
            assert_eq!(fast, oracle, "{cfg:?} seed {seed}");
        }
    }
}

#[test]
fn bad_input_is_an_error() {
    let model = tiny();
    let mut dec = Decoder::new(model.backbone(), 2, 4, PackedFormat::F32)
        .unwrap()
        .unwrap();
    assert!(dec.prefill(&[vec![1, 2], vec![]]).is_err());
    dec.prefill(&[vec![1, 2, 3], vec![4]]).unwrap();
    let err = dec.step(&[0, 1], &[5]).unwrap_err().to_string();
    assert!(err.contains("2 rows but 1 tokens"), "{err}");
    let err = dec.step(&[2], &[5]).unwrap_err().to_string();
    assert!(err.contains("row 2"), "{err}");
    let err = dec.step(&[1], &[60_000]).unwrap_err().to_string();
    assert!(err.contains("outside the vocabulary"), "{err}");
    dec.step(&[0], &[5]).unwrap();
    let err = dec.step(&[0], &[5]).unwrap_err().to_string();
    assert!(err.contains("row 0 is full"), "{err}");
}
