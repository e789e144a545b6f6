//! RewardTrainer: parity with TRL on `fixtures/parity_tiny.json` (`reward_loss`), gradient
//! accumulation invariance, learning on held-out pairs, exact resume, and bad input.

mod common;

use std::collections::BTreeMap;

use candle_core::{Device, Tensor};
use common::*;
use rlhf_models::Fwd;
use rlhf_train::reward::{pair_loss, train, Pair, RewardConfig};
use rlhf_train::trainer::TrainingArgs;

#[test]
fn reward_loss_matches_trl_compute_loss() {
    let dir = tempfile::tempdir().unwrap();
    let mut model = tiny_seqcls(dir.path());
    model.set_trainable(true).unwrap();
    let p = &parity()["reward_loss"];
    let unpad = |ids: &serde_json::Value, mask: &serde_json::Value| -> Vec<Vec<u32>> {
        ids.as_array()
            .unwrap()
            .iter()
            .zip(mask.as_array().unwrap())
            .map(|(i, m)| {
                let n = u32s(m).iter().sum::<u32>() as usize;
                u32s(i)[..n].to_vec()
            })
            .collect()
    };
    let chosen = unpad(&p["batch"]["input_ids_chosen"], &p["batch"]["attention_mask_chosen"]);
    let rejected = unpad(
        &p["batch"]["input_ids_rejected"],
        &p["batch"]["attention_mask_rejected"],
    );
    // TRL 0.11's batch is prompt + response without EOS; ours appends EOS (TRL 1.x).
    let tok = model.tokenizer().unwrap();
    for (row, c) in p["rows"].as_array().unwrap().iter().zip(&chosen) {
        let ids =
            rlhf_train::score::reward_tokens(&model, row["prompt"].as_str().unwrap(), row["chosen"].as_str().unwrap())
                .unwrap();
        assert_eq!(&ids[..ids.len() - 1], c.as_slice());
        assert_eq!(ids.last(), Some(&tok.eos_token_id));
    }
    let pairs: Vec<Pair> = chosen
        .into_iter()
        .zip(rejected)
        .map(|(chosen, rejected)| Pair {
            chosen,
            rejected,
            margin: None,
        })
        .collect();
    let refs: Vec<&Pair> = pairs.iter().collect();
    let out = pair_loss(&model, &refs, None, &mut Fwd::eval_grad()).unwrap();
    let close = |a: f32, b: f32, what: &str| assert!((a - b).abs() <= 1e-4, "{what}: {a} vs {b}");
    close(
        out.loss.to_scalar::<f32>().unwrap(),
        p["loss"].as_f64().unwrap() as f32,
        "loss",
    );
    for (i, (c, w)) in out.chosen.iter().zip(f32s(&p["rewards_chosen"])).enumerate() {
        close(*c, w, &format!("chosen reward {i}"));
    }
    for (i, (r, w)) in out.rejected.iter().zip(f32s(&p["rewards_rejected"])).enumerate() {
        close(*r, w, &format!("rejected reward {i}"));
    }
    let grads = out.loss.backward().unwrap();
    let named = model.named_params();
    let g = |name: &str| {
        grads
            .get(named.iter().find(|(n, _)| n == name).unwrap().1.get(true))
            .unwrap()
            .clone()
    };
    let gs = g("score.weight").flatten_all().unwrap().to_vec1::<f32>().unwrap();
    for (i, (a, b)) in gs.iter().zip(f32s(&p["grad_score_weight"][0])).enumerate() {
        close(*a, b, &format!("score grad {i}"));
    }
    let norm = |t: &Tensor| t.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap() as f64;
    let wte = norm(&g("transformer.wte.weight")).sqrt();
    close(wte as f32, p["grad_wte_norm"].as_f64().unwrap() as f32, "wte grad norm");
    let total: f64 = named
        .iter()
        .filter_map(|(_, prm)| grads.get(prm.get(true)))
        .map(norm)
        .sum::<f64>()
        .sqrt();
    let want = p["grad_global_norm"].as_f64().unwrap();
    assert!(
        (total - want).abs() <= 1e-4 * want,
        "global grad norm {total} vs {want}"
    );
}

fn base_cfg(model: &std::path::Path, train_file: &std::path::Path, out: &std::path::Path) -> RewardConfig {
    RewardConfig {
        model_name_or_path: model.display().to_string(),
        train_file: Some(train_file.display().to_string()),
        max_length: Some(128),
        args: TrainingArgs {
            output_dir: out.display().to_string(),
            quiet: true,
            logging_steps: 1,
            learning_rate: 1e-4,
            disable_dropout: true,
            ..RewardConfig::default().args
        },
        ..RewardConfig::default()
    }
}

fn weights(dir: &std::path::Path) -> BTreeMap<String, Vec<f32>> {
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(n, v)| {
            let t = Tensor::from_raw_buffer(v.data(), candle_core::DType::F32, v.shape(), &Device::Cpu).unwrap();
            (n, t.flatten_all().unwrap().to_vec1::<f32>().unwrap())
        })
        .collect()
}

#[test]
fn gradient_accumulation_one_by_eight_equals_eight_by_one() {
    let tmp = tempfile::tempdir().unwrap();
    let model_dir = tmp.path().join("model");
    tiny_seqcls(&model_dir);
    let data = tmp.path().join("pairs.jsonl");
    head_jsonl("prefs_train.jsonl", 8, &data);
    // lr 1 and eps 1 make Adam's first update ≈ g / (|g| + 1): linear in the gradient for
    // small gradients, so parameter changes compare the accumulated gradients themselves.
    let run = |bs: usize, ga: usize, name: &str| {
        let mut cfg = base_cfg(&model_dir, &data, &tmp.path().join(name));
        cfg.args.per_device_train_batch_size = bs;
        cfg.args.gradient_accumulation_steps = ga;
        cfg.args.max_steps = 1;
        cfg.args.learning_rate = 1.0;
        cfg.args.adam_epsilon = 1.0;
        cfg.args.max_grad_norm = 0.0;
        weights(&train(&cfg).unwrap().final_dir)
    };
    let a = run(8, 1, "a");
    let b = run(1, 8, "b");
    let base = weights(&model_dir);
    let mut worst = 0f32;
    for (name, wa) in &a {
        for ((x, y), w0) in wa.iter().zip(&b[name]).zip(&base[name]) {
            worst = worst.max(((x - w0) - (y - w0)).abs());
        }
    }
    assert!(worst < 2e-6, "8x1 and 1x8 updates differ by {worst}");
}

#[test]
fn resume_from_a_checkpoint_continues_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let model_dir = tmp.path().join("model");
    tiny_seqcls(&model_dir);
    let data = tmp.path().join("pairs.jsonl");
    head_jsonl("prefs_train.jsonl", 24, &data);
    let mut cfg = base_cfg(&model_dir, &data, &tmp.path().join("full"));
    cfg.args.per_device_train_batch_size = 4;
    cfg.args.max_steps = 6;
    cfg.args.save_steps = 3;
    cfg.args.disable_dropout = false; // dropout on: its stream must resume too
    train(&cfg).unwrap();
    let full = metrics(&tmp.path().join("full"));
    // A second run directory that stopped after step 3 (its checkpoint, its metrics so far).
    let part = tmp.path().join("part");
    std::fs::create_dir_all(&part).unwrap();
    let copy = |from: &std::path::Path, to: &std::path::Path| {
        std::fs::create_dir_all(to).unwrap();
        for e in std::fs::read_dir(from).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    };
    copy(&tmp.path().join("full/checkpoint-3"), &part.join("checkpoint-3"));
    let first3: Vec<String> = std::fs::read_to_string(tmp.path().join("full/metrics.jsonl"))
        .unwrap()
        .lines()
        .take(3)
        .map(String::from)
        .collect();
    std::fs::write(part.join("metrics.jsonl"), first3.join("\n") + "\n").unwrap();
    std::fs::copy(tmp.path().join("full/config.toml"), part.join("config.toml")).unwrap();
    let mut resumed = cfg.clone();
    resumed.args.output_dir = part.display().to_string();
    resumed.args.resume_from_checkpoint = Some("latest".into());
    train(&resumed).unwrap();
    assert_eq!(metrics(&part), full);
    assert_eq!(weights(&part.join("final")), weights(&tmp.path().join("full/final")));
}

/// Held-out accuracy after one epoch on 480 training pairs.
fn held_out_accuracy(bf16: bool) -> f64 {
    let tmp = tempfile::tempdir().unwrap();
    let train_file = tmp.path().join("train.jsonl");
    head_jsonl("prefs_train.jsonl", 480, &train_file);
    let mut cfg = base_cfg(&fixtures().join("tiny-gpt2"), &train_file, &tmp.path().join("rm"));
    cfg.eval_file = Some(fixtures().join("data/prefs_val.jsonl").display().to_string());
    cfg.args.learning_rate = 5e-4;
    cfg.args.num_train_epochs = 1.0;
    cfg.args.logging_steps = 10;
    cfg.args.eval_strategy = "steps".into();
    cfg.args.eval_steps = Some(1000);
    cfg.args.bf16 = bf16;
    train(&cfg).unwrap().eval.unwrap()["accuracy"]
}

#[test]
fn a_reward_model_learns_the_preference_rule_on_held_out_pairs() {
    let acc = held_out_accuracy(false);
    // Chance is 0.5; TRL reaches 0.91 after a full epoch of 2,000 pairs.
    assert!(acc >= 0.75, "eval accuracy {acc}");
}

#[test]
fn a_reward_model_learns_with_bf16_matrix_products() {
    // bf16 operands, f32 sums, weights and optimizer: the same rule is learned.
    let acc = held_out_accuracy(true);
    assert!(acc >= 0.75, "eval accuracy {acc}");
    // The run's setting does not outlive it.
    assert_eq!(
        rlhf_ops::precision::matmul_precision(),
        rlhf_ops::precision::MatmulPrecision::Highest
    );
}

#[test]
fn bad_reward_input_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let model_dir = fixtures().join("tiny-gpt2");
    let cases: [(&str, &str, &str); 4] = [
        ("empty.jsonl", "", "empty"),
        (
            "malformed.jsonl",
            "{\"prompt\": \"a\", \"chosen\": \"b\", \"rejected\": \"c\"}\n{\"prompt\": ",
            "row 2",
        ),
        (
            "nochosen.jsonl",
            "{\"prompt\": \"a\", \"rejected\": \"c\"}\n",
            "`chosen`",
        ),
        (
            "long.jsonl",
            "{\"prompt\": \"a\", \"chosen\": \"b b b b b b\", \"rejected\": \"c\"}\n",
            "max_length",
        ),
    ];
    for (i, (name, text, want)) in cases.iter().enumerate() {
        let f = tmp.path().join(name);
        std::fs::write(&f, text).unwrap();
        let mut cfg = base_cfg(&model_dir, &f, &tmp.path().join(format!("out{i}")));
        cfg.max_length = Some(4);
        let err = train(&cfg).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains(want) && err.contains(name), "{name}: {err}");
    }
}
