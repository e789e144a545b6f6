//! The `rlhf` binary end to end on the tiny fixture checkpoint.

use std::path::PathBuf;
use std::process::Command;

fn fixtures() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../fixtures"))
}

fn rlhf(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_rlhf"))
        .args(args)
        .output()
        .expect("runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

#[test]
fn generate_json_gives_one_object_per_prompt_and_is_seeded() {
    let model = fixtures().join("tiny-gpt2");
    let args = [
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        "Hello there",
        "--prompt",
        "User: Hi!",
        "--max-new-tokens",
        "6",
        "--seed",
        "3",
        "--top-k",
        "50",
        "--json",
    ];
    let (ok, out, err) = rlhf(&args);
    assert!(ok, "{err}");
    let lines: Vec<serde_json::Value> = out.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[0]["prompt"], "Hello there");
    assert_eq!(lines[0]["prompt_ids"], serde_json::json!([15496, 612]));
    assert_eq!(lines[1]["completion_ids"].as_array().unwrap().len(), 6);
    assert!(lines[0]["completion"].is_string());
    assert_eq!(rlhf(&args).1, out, "same seed, same output");
}

#[test]
fn score_prints_pair_rewards_and_accuracy_and_refuses_models_without_a_score_head() {
    let dir = tempfile::tempdir().unwrap();
    let mut model = rlhf_models::Model::load(&fixtures().join("tiny-gpt2"), &Default::default()).unwrap();
    model.ensure_score_head(0).unwrap();
    model.save(dir.path()).unwrap();
    let data = dir.path().join("pairs.jsonl");
    std::fs::write(
        &data,
        "{\"prompt\": \"User: Hi\\nAssistant:\", \"chosen\": \" Hello!\", \"rejected\": \" Go away.\"}\n\
         {\"text\": \"just a text\"}\n\
         {\"prompt\": \"Q:\", \"chosen\": \" yes\", \"rejected\": \" no\"}\n",
    )
    .unwrap();
    let (ok, out, err) = rlhf(&[
        "score",
        "--model",
        dir.path().to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--json",
    ]);
    assert!(ok, "{err}");
    let lines: Vec<serde_json::Value> = out.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 4);
    assert_eq!(lines[0]["row"], 0);
    assert!(lines[0]["reward_chosen"].is_number() && lines[0]["reward_rejected"].is_number());
    assert!(lines[1]["reward"].is_number());
    assert_eq!(lines[3]["rows"], 2);
    assert!(lines[3]["accuracy"].is_number());

    let plain = fixtures().join("tiny-gpt2");
    let (ok, _, err) = rlhf(&[
        "score",
        "--model",
        plain.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
    ]);
    assert!(!ok);
    assert!(err.contains("no score head") && err.contains("hint"), "{err}");
}

#[test]
fn bad_data_and_bad_model_dirs_are_errors_not_panics() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("bad.jsonl");
    std::fs::write(&data, "{\"text\": \"ok\"}\n{oops}\n").unwrap();
    let model = fixtures().join("tiny-gpt2");
    let mut m = rlhf_models::Model::load(&model, &Default::default()).unwrap();
    m.ensure_score_head(0).unwrap();
    m.save(dir.path()).unwrap();
    let (ok, _, err) = rlhf(&[
        "score",
        "--model",
        dir.path().to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
    ]);
    assert!(!ok && err.contains("bad.jsonl: row 2: malformed JSON"), "{err}");
    let (ok, _, err) = rlhf(&["generate", "--model", "/no/such/dir", "--prompt", "x"]);
    assert!(
        !ok && err.contains("/no/such/dir") && !err.contains("panicked"),
        "{err}"
    );
}

#[test]
fn a_range_error_names_the_config_file_or_flag_that_set_it_before_any_model_is_loaded() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("reward.toml");
    std::fs::write(&cfg, "model_name_or_path = \"/nonexistent\"\nlearning_rate = -1\n").unwrap();
    let out = dir.path().join("out");
    let (c, o) = (cfg.to_str().unwrap(), out.to_str().unwrap());
    let (ok, _, err) = rlhf(&["reward", "--config", c, "--output-dir", o]);
    assert!(!ok);
    assert!(
        err.contains(&format!(
            "{c}: config key `learning_rate`: must be a non-negative number, got -1"
        )),
        "{err}"
    );
    let (_, _, err) = rlhf(&["reward", "--config", c, "--learning-rate", "-2", "--output-dir", o]);
    assert!(err.contains("flags: config key `learning_rate`"), "{err}");
    // PPO's length sampler is checked before the (here missing) models are loaded.
    let ppo = [
        "ppo",
        "--model-name-or-path",
        "/nonexistent",
        "--reward-model-path",
        "/nonexistent",
        "--train-file",
        "/nonexistent.jsonl",
        "--output-min-length",
        "8",
        "--output-max-length",
        "4",
        "--output-dir",
        o,
    ];
    let (ok, _, err) = rlhf(&ppo);
    assert!(!ok);
    assert!(
        err.contains("flags: config key `output_min_length`: (8) must be below output_max_length (4)"),
        "{err}"
    );
    assert!(!out.exists(), "a refused run created its output directory");
}
