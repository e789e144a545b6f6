//! `rlhf ppo`'s loop: checkpoints, exact resume, and a clear error for a policy used as a
//! reward model.

mod common;

use common::*;
use rlhf_train::ppo_config::PpoConfig;
use rlhf_train::ppo_run::{train, PpoRunConfig};

fn cfg(rm: &std::path::Path, out: &std::path::Path) -> PpoRunConfig {
    PpoRunConfig {
        model_name_or_path: fixtures().join("tiny-gpt2").display().to_string(),
        reward_model_path: rm.display().to_string(),
        train_file: fixtures().join("data/ppo_prompts.jsonl").display().to_string(),
        output_dir: out.display().to_string(),
        max_new_tokens: 6,
        save_steps: 2,
        log_samples: 0,
        quiet: true,
        ppo: PpoConfig {
            batch_size: 4,
            mini_batch_size: 2,
            ppo_epochs: 2,
            steps: 16,
            learning_rate: 1e-4,
            ..Default::default()
        },
        ..Default::default()
    }
}

fn without_times(v: Vec<serde_json::Value>) -> Vec<serde_json::Value> {
    v.into_iter()
        .map(|mut x| {
            x.as_object_mut().unwrap().retain(|k, _| !k.starts_with("time/"));
            x
        })
        .collect()
}

#[test]
fn a_resumed_ppo_run_reproduces_the_uninterrupted_one() {
    let tmp = tempfile::tempdir().unwrap();
    let rm = tmp.path().join("rm");
    tiny_seqcls(&rm);
    let full_dir = tmp.path().join("full");
    let out = train(&cfg(&rm, &full_dir)).unwrap();
    assert_eq!(out.reward_means.len(), 4);
    assert!(full_dir.join("checkpoint-2/trainer_state.json").is_file());
    assert!(full_dir.join("final/model.safetensors").is_file());
    let full = without_times(metrics(&full_dir));
    // A run directory holding only checkpoint-2 and the metrics up to step 2.
    let part = tmp.path().join("part");
    std::fs::create_dir_all(part.join("checkpoint-2")).unwrap();
    for e in std::fs::read_dir(full_dir.join("checkpoint-2")).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), part.join("checkpoint-2").join(e.file_name())).unwrap();
    }
    let lines: Vec<String> = std::fs::read_to_string(full_dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .take(2)
        .map(String::from)
        .collect();
    std::fs::write(part.join("metrics.jsonl"), lines.join("\n") + "\n").unwrap();
    let mut resumed = cfg(&rm, &part);
    resumed.resume_from_checkpoint = Some("latest".into());
    train(&resumed).unwrap();
    assert_eq!(without_times(metrics(&part)), full);
    let w = |d: &std::path::Path| std::fs::read(d.join("final/model.safetensors")).unwrap();
    assert_eq!(w(&part), w(&full_dir), "final weights differ after resume");
}

#[test]
fn a_reward_model_without_a_score_head_is_refused_before_any_work() {
    let tmp = tempfile::tempdir().unwrap();
    let err = train(&cfg(&fixtures().join("tiny-gpt2"), &tmp.path().join("o")))
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("no score head") && err.contains("hint"), "{err}");
    let mut c = cfg(&fixtures().join("tiny-gpt2"), &tmp.path().join("o2"));
    c.ppo.mini_batch_size = 8;
    let err = train(&c).err().unwrap().to_string();
    assert!(
        err.contains("mini_batch_size") && err.contains("larger than batch_size"),
        "{err}"
    );
}
