//! Saving writes a Hugging Face directory that loads back to identical outputs.

mod common;

use candle_core::{DType, Device, Tensor};
use common::*;
use rlhf_models::{Fwd, Model};

fn ids_mask() -> (Tensor, Tensor) {
    let ids = Tensor::new(
        &[[12982u32, 25, 15902, 0, 198], [464, 2068, 7586, 50256, 50256]],
        &Device::Cpu,
    )
    .unwrap();
    let mask = Tensor::new(&[[1u32, 1, 1, 1, 1], [1, 1, 1, 0, 0]], &Device::Cpu).unwrap();
    (ids, mask)
}

#[test]
fn save_then_load_gives_identical_logits_values_and_scores() {
    let mut model = tiny();
    model.ensure_value_head(1).unwrap();
    model.ensure_score_head(2).unwrap();
    let dir = tempfile::tempdir().unwrap();
    model.save(dir.path()).unwrap();
    let back = Model::load(dir.path(), &Default::default()).unwrap();
    let (ids, mask) = ids_mask();
    let mut fwd = Fwd::eval();
    let a = model.logits(&ids, &mask, &mut fwd).unwrap();
    let b = back.logits(&ids, &mask, &mut fwd).unwrap();
    assert_eq!(
        a.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        b.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    );
    let sa = model
        .scores(&ids, &mask, &mut fwd)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let sb = back
        .scores(&ids, &mask, &mut fwd)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert_eq!(sa, sb);
    let h = model.forward(&ids, &mask, &mut fwd).unwrap();
    let va = model.value_head.as_ref().unwrap().forward(&h, &mut fwd).unwrap();
    let vb = back.value_head.as_ref().unwrap().forward(&h, &mut fwd).unwrap();
    assert_eq!(
        va.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        vb.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    );
}

#[test]
fn saved_directory_has_the_transformers_layout() {
    let mut model = tiny();
    model.ensure_score_head(0).unwrap();
    let dir = tempfile::tempdir().unwrap();
    model.save(dir.path()).unwrap();
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ] {
        assert!(dir.path().join(f).is_file(), "{f} missing");
    }
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["architectures"][0], "GPT2ForSequenceClassification");
    assert_eq!(cfg["num_labels"], 1);
    assert_eq!(cfg["pad_token_id"], 50256);
    let bytes = std::fs::read(dir.path().join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let names = st.names();
    assert!(names.contains(&"transformer.h.1.attn.c_attn.weight"));
    assert!(names.contains(&"score.weight"));
    assert_eq!(
        st.tensor("transformer.h.0.attn.c_attn.weight").unwrap().shape(),
        &[128, 384]
    );
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    assert_eq!(
        meta.metadata().as_ref().unwrap().get("format").map(String::as_str),
        Some("pt")
    );
}

#[test]
fn bf16_weights_stay_close_to_f32() {
    let f32m = tiny();
    let bf = Model::load(
        &tiny_dir(),
        &rlhf_models::LoadOptions {
            dtype: DType::BF16,
            device: Device::Cpu,
            revision: None,
        },
    )
    .unwrap();
    let (ids, mask) = ids_mask();
    let a = f32m.logits(&ids, &mask, &mut Fwd::eval()).unwrap();
    let b = bf.logits(&ids, &mask, &mut Fwd::eval()).unwrap();
    let diff = (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    // bf16 keeps 8 bits of mantissa: logits of magnitude ~1 move by a few 1e-2 at most.
    assert!(diff < 0.1, "bf16 logits differ from f32 by {diff}");
}

#[test]
fn train_mode_dropout_is_seeded() {
    let model = tiny();
    let (ids, mask) = ids_mask();
    let run = |seed| {
        let mut keys = rlhf_ops::dropout::DropoutKeys::new(seed, (0..ids.dim(0).unwrap() as u64).collect());
        let mut fwd = Fwd {
            grad: false,
            dropout: Some(&mut keys),
            adapters: true,
            sink: None,
        };
        model
            .logits(&ids, &mask, &mut fwd)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    };
    let eval = model
        .logits(&ids, &mask, &mut Fwd::eval())
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert_eq!(run(1), run(1));
    assert_ne!(run(1), run(2));
    assert_ne!(run(1), eval);
}
