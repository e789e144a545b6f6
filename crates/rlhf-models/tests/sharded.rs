//! A checkpoint sharded with `model.safetensors.index.json` loads like the single file.

mod common;

use std::collections::BTreeMap;

use candle_core::{Device, Tensor};
use common::*;
use rlhf_models::{Fwd, Model};

#[test]
fn a_sharded_checkpoint_gives_the_same_logits() {
    let model = tiny();
    let dir = tempfile::tempdir().unwrap();
    model.save(dir.path()).unwrap();
    // Re-write the weights as two shards plus an index, as transformers does for big models.
    let bytes = std::fs::read(dir.path().join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut shards: [BTreeMap<String, Tensor>; 2] = Default::default();
    let mut weight_map = serde_json::Map::new();
    for (i, (name, view)) in st.tensors().into_iter().enumerate() {
        let t = Tensor::from_raw_buffer(view.data(), candle_core::DType::F32, view.shape(), &Device::Cpu).unwrap();
        let file = format!("model-0000{}-of-00002.safetensors", i % 2 + 1);
        weight_map.insert(name.clone(), file.into());
        shards[i % 2].insert(name, t);
    }
    for (i, shard) in shards.iter().enumerate() {
        let path = dir.path().join(format!("model-0000{}-of-00002.safetensors", i + 1));
        rlhf_models::weights::save_safetensors(shard, &path).unwrap();
    }
    std::fs::remove_file(dir.path().join("model.safetensors")).unwrap();
    let index = serde_json::json!({"metadata": {"total_size": bytes.len()}, "weight_map": weight_map});
    std::fs::write(dir.path().join("model.safetensors.index.json"), index.to_string()).unwrap();
    let back = Model::load(dir.path(), &Default::default()).unwrap();
    let ids = Tensor::new(&[[464u32, 2068, 7586]], &Device::Cpu).unwrap();
    let mask = Tensor::new(&[[1u32, 1, 1]], &Device::Cpu).unwrap();
    let a = model
        .logits(&ids, &mask, &mut Fwd::eval())
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let b = back
        .logits(&ids, &mask, &mut Fwd::eval())
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert_eq!(a, b);
}
