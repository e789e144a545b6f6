//! `rlhf grpo` and `rlhf rloo` from the command line: `--help` lists their keys, bad keys
//! are clear errors, and a run with a rule reward raises that reward on held-out prompts
//! (its own evaluation at the last step against the initial policy's, same sampling streams).

use std::path::{Path, PathBuf};
use std::process::Command;

use rlhf_models::{LoadOptions, Model};
use rlhf_train::data::read_prompt_rows;
use rlhf_train::grpo_config::GrpoConfig;
use rlhf_train::online::run::evaluate;
use rlhf_train::reward_fns::RewardFuncs;

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

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn help_lists_the_online_keys() {
    let (ok, out, _) = rlhf(&["grpo", "--help"]);
    assert!(ok);
    for key in [
        "--num-generations",
        "--max-completion-length",
        "--reward-funcs",
        "--reward-command",
        "--reward-model-name-or-path",
        "--beta",
        "--loss-type",
        "--use-peft",
    ] {
        assert!(out.contains(key), "grpo --help lacks {key}:\n{out}");
    }
    let (ok, out, _) = rlhf(&["rloo", "--help"]);
    assert!(
        ok && out.contains("--normalize-advantages") && out.contains("--reward-clip-range"),
        "{out}"
    );
}

#[test]
fn a_misspelt_key_is_an_error_naming_the_fix() {
    let (ok, _, err) = rlhf(&["grpo", "--num-generation", "4"]);
    assert!(!ok);
    assert!(err.contains("num_generations"), "{err}");
}

#[test]
fn rlhf_grpo_raises_a_rule_reward_on_prompts_it_never_saw() {
    let tmp = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(fixtures().join("data/ppo_prompts.jsonl")).unwrap();
    let mut seen = std::collections::BTreeSet::new();
    let unique: Vec<&str> = text.lines().filter(|l| seen.insert(*l)).collect();
    let (train, eval) = (tmp.path().join("train.jsonl"), tmp.path().join("eval.jsonl"));
    std::fs::write(&train, unique[..150].join("\n") + "\n").unwrap();
    std::fs::write(&eval, unique[unique.len() - 30..].join("\n") + "\n").unwrap();
    let model = fixtures().join("tiny-gpt2");
    let out = tmp.path().join("run");
    let flags = [
        "--model-name-or-path",
        s(&model),
        "--train-file",
        s(&train),
        "--eval-file",
        s(&eval),
        "--eval-strategy",
        "steps",
        "--eval-steps",
        "1000",
        "--output-dir",
        s(&out),
        "--reward-funcs",
        "regex_match",
        "--reward-regex",
        r"\d",
        "--num-generations",
        "8",
        "--num-generations-eval",
        "4",
        "--per-device-train-batch-size",
        "16",
        "--per-device-eval-batch-size",
        "16",
        "--max-completion-length",
        "12",
        "--learning-rate",
        "1e-2",
        "--lr-scheduler-type",
        "constant",
        "--max-steps",
        "25",
        "--quiet",
    ];
    let (ok, stdout, err) = rlhf(&[&["grpo"], &flags[..]].concat());
    assert!(ok, "{err}");
    let after: f64 = stdout
        .lines()
        .find_map(|l| l.strip_prefix("eval reward "))
        .unwrap_or_else(|| panic!("no eval reward in:\n{stdout}"))
        .trim()
        .parse()
        .unwrap();
    // The initial policy under the run's own evaluation (same prompts, streams, settings).
    let values = rlhf_train::config::parse_flags(&flags.iter().map(|f| f.to_string()).collect::<Vec<_>>()).unwrap();
    let cfg: GrpoConfig = rlhf_train::config::resolve(&values, "flags").unwrap();
    let plan = cfg.plan(1).unwrap().online;
    let policy = Model::load(&model, &LoadOptions::default()).unwrap();
    let tok = policy.tokenizer().unwrap();
    let set = read_prompt_rows(&eval).unwrap();
    let ids: Vec<Vec<u32>> = set
        .rows
        .iter()
        .map(|r| tok.encode_special(&r.prompt, true).unwrap())
        .collect();
    let mut funcs = RewardFuncs::from_args(&cfg.online.rewards, None, 12, &LoadOptions::default()).unwrap();
    let gen = plan.generation_config(policy.eos_token_ids(), tok.pad_token_id);
    let before = evaluate(&policy, &set.rows, &ids, &mut funcs, &plan, &gen, cfg.args.seed).unwrap()["reward"];
    assert!(after > before + 0.25, "held-out reward {before:.3} -> {after:.3}");
    assert!(out.join("final/model.safetensors").is_file());
}
