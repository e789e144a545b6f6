use serde_json::json;

use super::*;
use crate::config::{parse_flags, resolve};

fn args(funcs: &[&str]) -> RewardArgs {
    RewardArgs {
        reward_funcs: funcs.iter().map(|s| s.to_string()).collect(),
        ..RewardArgs::default()
    }
}

fn setting_err(a: &RewardArgs) -> String {
    a.rules(512).unwrap_err().to_string()
}

fn row(prompt: &str, columns: Value) -> PromptRow {
    PromptRow {
        prompt: prompt.into(),
        columns: columns.as_object().unwrap().clone(),
        conversation: None,
    }
}

fn two_prompt_batch() -> RewardBatch {
    let (a, b) = (
        row("2+2=", json!({"solution": "4", "id": 1})),
        row("3+3=", json!({"solution": "6"})),
    );
    RewardBatch::new(
        &[&a, &b],
        2,
        vec!["4".into(), "5 words".into(), r"\boxed{6}".into(), "six".into()],
        vec![vec![1, 2], vec![3], vec![], vec![4, 5, 6]],
    )
    .unwrap()
}

#[test]
fn the_batch_repeats_each_row_per_generation_and_fills_missing_columns_with_null() {
    let b = two_prompt_batch();
    assert_eq!(b.prompts, ["2+2=", "2+2=", "3+3=", "3+3="]);
    assert_eq!(b.columns["solution"], [json!("4"), json!("4"), json!("6"), json!("6")]);
    assert_eq!(b.columns["id"], [json!(1), json!(1), Value::Null, Value::Null]);
    let req: Value = serde_json::from_str(&b.request_json().unwrap()).unwrap();
    assert_eq!(req["completions"][1], json!("5 words"));
    assert_eq!(req["completion_ids"][0], json!([1, 2]));
    assert_eq!(req["solution"][3], json!("6"));
    assert!(!b.request_json().unwrap().contains('\n'));
}

#[test]
fn a_batch_of_the_wrong_size_or_a_clashing_column_is_an_error() {
    let a = row("p", json!({}));
    let err = RewardBatch::new(&[&a], 2, vec!["x".into()], vec![vec![]]).unwrap_err();
    assert!(err.to_string().contains("= 2 completions"), "{err}");
    let a = row("p", json!({"completions": 1}));
    let err = RewardBatch::new(&[&a], 1, vec!["x".into()], vec![vec![]]).unwrap_err();
    assert!(err.to_string().contains("rename the column"), "{err}");
}

#[test]
fn rules_score_a_batch_in_the_order_of_reward_funcs() {
    let a = RewardArgs {
        reward_regex: Some(r"\d".into()),
        reward_target_length: Some(2),
        ..args(&["exact_answer", "regex_match", "length_target", "distinct_words"])
    };
    let mut funcs = RewardFuncs::from_args(&a, Some(&[1.0, 0.5, 1.0, 2.0]), 512, &LoadOptions::default()).unwrap();
    assert_eq!(
        funcs.names(),
        ["exact_answer", "regex_match", "length_target", "distinct_words"]
    );
    let r = funcs.score(&two_prompt_batch()).unwrap();
    assert_eq!(r[0], [Some(1.0), Some(0.0), Some(1.0), Some(0.0)]);
    assert_eq!(r[1], [Some(1.0), Some(1.0), Some(1.0), Some(0.0)]);
    assert_eq!(r[2], [Some(0.0), Some(-0.5), Some(-1.0), Some(-0.5)]);
    assert_eq!(r[3], [Some(0.1), Some(0.2), Some(0.1), Some(0.1)]);
    assert_eq!(funcs.weights, [1.0, 0.5, 1.0, 2.0]);
}

#[test]
fn rewards_per_completion_transposes_and_marks_none_as_nan() {
    let t = rewards_per_completion(&[vec![Some(1.0), None], vec![Some(2.0), Some(3.0)]]);
    assert_eq!(t[0], [1.0, 2.0]);
    assert!(t[1][0].is_nan() && t[1][1] == 3.0);
    // What the GRPO math consumes: a row with one None counts it as 0 (nansum).
    let r = rlhf_ops::rl::rewards::aggregate_rewards(&t, &[1.0, 0.5]).unwrap();
    assert_eq!(r, [2.0, 1.5]);
}

#[test]
fn names_follow_trl_and_the_order_model_rules_command() {
    let a = RewardArgs {
        reward_model_name_or_path: Some("runs/rm/final/".into()),
        reward_command: Some("python my_reward.py --fast".into()),
        ..args(&["think_format_reward", "get_soft_overlong_punishment"])
    };
    assert_eq!(
        a.names(),
        [
            "final",
            "think_format_reward",
            "soft_overlong_punishment_reward",
            "my_reward"
        ]
    );
    let err = check_weights(Some(&[1.0, 1.0]), 4).unwrap_err().to_string();
    assert!(err.contains("2 weight(s) for 4 reward function(s)"), "{err}");
    assert!(check_weights(Some(&[1.0, f64::NAN]), 2).is_err());
    assert_eq!(check_weights(None, 3).unwrap(), [1.0; 3]);
}

#[test]
fn every_bad_reward_setting_is_an_error_with_the_fix() {
    let cases: Vec<(RewardArgs, &str)> = vec![
        (RewardArgs::default(), "no reward function"),
        (args(&["distinct_word"]), "did you mean `distinct_words`"),
        (args(&["accuracy_reward"]), "math_verify"),
        (args(&["regex_match"]), "needs a pattern"),
        (
            RewardArgs {
                reward_regex: Some("(".into()),
                ..args(&["regex_match"])
            },
            "`(`",
        ),
        (args(&["length_target"]), "at least 1 token"),
        (
            RewardArgs {
                reward_target_length: Some(0),
                ..args(&["length_target"])
            },
            "at least 1 token",
        ),
        (
            RewardArgs {
                reward_regex: Some("x".into()),
                ..args(&["distinct_words"])
            },
            "does not list `regex_match`",
        ),
        (
            RewardArgs {
                reward_answer_column: Some("gold".into()),
                ..args(&["distinct_words"])
            },
            "does not list `exact_answer`",
        ),
        (
            RewardArgs {
                soft_punish_cache: 1000,
                ..args(&["get_soft_overlong_punishment"])
            },
            "1..=max_completion_length (512)",
        ),
        (
            args(&["distinct_words", "distinct_words"]),
            "two reward functions are named",
        ),
        (
            RewardArgs {
                reward_command: Some("  ".into()),
                ..RewardArgs::default()
            },
            "is empty",
        ),
        (
            RewardArgs {
                reward_command_timeout: 0.0,
                ..args(&["distinct_words"])
            },
            "positive number of seconds",
        ),
    ];
    for (a, want) in cases {
        let err = setting_err(&a);
        assert!(err.contains(want), "{want}: {err}");
    }
}

#[test]
fn reward_keys_parse_from_flags_and_toml_forms() {
    #[derive(Serialize, Deserialize, Default)]
    struct Only {
        #[serde(flatten)]
        r: RewardArgs,
    }
    let flags: Vec<String> = "--reward-funcs distinct_words,think_format_reward --reward-command python_r.py \
                              --reward-regex 123 --reward-target-length 64"
        .split_whitespace()
        .map(String::from)
        .collect();
    let o: Only = resolve(&parse_flags(&flags).unwrap(), "flags").unwrap();
    assert_eq!(o.r.reward_funcs, ["distinct_words", "think_format_reward"]);
    assert_eq!(o.r.reward_command.as_deref(), Some("python_r.py"));
    assert_eq!(o.r.reward_regex.as_deref(), Some("123"));
    assert_eq!(o.r.reward_target_length, Some(64));
    let toml: toml::Table =
        toml::from_str("reward_funcs = [\"exact_answer\"]\nreward_answer_column = \"gold\"").unwrap();
    let Value::Object(m) = serde_json::to_value(toml).unwrap() else {
        panic!()
    };
    let o: Only = resolve(&m, "grpo.toml").unwrap();
    assert_eq!(o.r.reward_funcs, ["exact_answer"]);
    assert_eq!(o.r.reward_answer_column.as_deref(), Some("gold"));
}

// ---- the external command (sh scripts, no Python) ----

/// A reward command running `script` (sh) from a temp dir, with a short timeout.
fn command(dir: &tempfile::TempDir, script: &str, timeout: f64) -> RewardFuncs {
    let path = dir.path().join("reward.sh");
    std::fs::write(&path, script).unwrap();
    let a = RewardArgs {
        reward_command: Some(format!("sh {}", path.display())),
        reward_command_timeout: timeout,
        ..RewardArgs::default()
    };
    RewardFuncs::from_args(&a, None, 512, &LoadOptions::default()).unwrap()
}

#[test]
fn a_command_gets_one_json_line_per_batch_and_stays_alive_between_batches() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("requests.log");
    let script = format!(
        "n=0\nwhile IFS= read -r line; do\n  n=$((n+1))\n  printf '%s\\n' \"$line\" >> '{}'\n  \
         printf '[%d, null, 0.5, -1e-3]\\n' \"$n\"\ndone\n",
        log.display()
    );
    let mut funcs = command(&dir, &script, 10.0);
    assert_eq!(funcs.names(), ["reward"]);
    let batch = two_prompt_batch();
    assert_eq!(
        funcs.score(&batch).unwrap()[0],
        [Some(1.0), None, Some(0.5), Some(-1e-3)]
    );
    // The counter proves the same process answered the second batch.
    assert_eq!(funcs.score(&batch).unwrap()[0][0], Some(2.0));
    let sent = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<&str> = sent.lines().collect();
    assert_eq!(lines.len(), 2);
    let req: Value = serde_json::from_str(lines[0]).unwrap();
    assert_eq!(
        req,
        json!({
            "prompts": ["2+2=", "2+2=", "3+3=", "3+3="],
            "completions": ["4", "5 words", "\\boxed{6}", "six"],
            "completion_ids": [[1, 2], [3], [], [4, 5, 6]],
            "solution": ["4", "4", "6", "6"],
            "id": [1, 1, null, null],
        })
    );
}

fn command_err(script: &str, timeout: f64) -> String {
    let dir = tempfile::tempdir().unwrap();
    let mut funcs = command(&dir, script, timeout);
    let err = funcs.score(&two_prompt_batch()).unwrap_err().to_string();
    // Once failed, the command stays failed.
    let again = funcs.score(&two_prompt_batch()).unwrap_err().to_string();
    assert!(again.contains("stopped earlier"), "{again}");
    err
}

#[test]
fn a_crashing_command_is_named_with_its_exit_status_stderr_and_the_request() {
    let err = command_err("read -r line\necho 'cannot score: boom' >&2\nexit 3\n", 10.0);
    for want in [
        "reward function `reward`",
        "command `sh ",
        "exit status: 3",
        "cannot score: boom",
        "request sent: {\"prompts\":",
    ] {
        assert!(err.contains(want), "{want}: {err}");
    }
}

#[test]
fn a_missing_program_is_reported_from_the_shell() {
    let dir = tempfile::tempdir().unwrap();
    let a = RewardArgs {
        reward_command: Some("rlhf-no-such-reward-program --x".into()),
        ..RewardArgs::default()
    };
    let mut funcs = RewardFuncs::from_args(&a, None, 512, &LoadOptions::default()).unwrap();
    let err = funcs.score(&two_prompt_batch()).unwrap_err().to_string();
    assert!(err.contains("exit status: 127") && err.contains("not found"), "{err}");
    drop(dir);
}

#[test]
fn a_command_that_does_not_answer_in_time_is_stopped() {
    let start = std::time::Instant::now();
    let err = command_err("read -r line\nexec sleep 30\n", 0.3);
    assert!(
        err.contains("no answer within 0.3 s") && err.contains("reward_command_timeout"),
        "{err}"
    );
    assert!(start.elapsed().as_secs_f64() < 10.0);
}

#[test]
fn malformed_answers_say_what_came_back_and_what_is_expected() {
    for (answer, want) in [
        ("this is a log line", "not JSON"),
        ("[1, 2]", "2 values for 4 completions"),
        ("[1, \"x\", 2, 3]", "entry 1"),
        ("{\"rewards\": [1, 2, 3, 4]}", "not a JSON array"),
    ] {
        let err = command_err(
            &format!("while read -r line; do printf '%s\\n' '{answer}'; done\n"),
            10.0,
        );
        assert!(err.contains("malformed answer") && err.contains(want), "{want}: {err}");
        assert!(
            err.contains("write logs to stderr") && err.contains("request sent"),
            "{err}"
        );
    }
}

#[test]
fn a_command_that_exits_without_answering_is_an_error() {
    let err = command_err("exit 0\n", 10.0);
    assert!(
        err.contains("closed its stdout without answering") || err.contains("cannot send the request"),
        "{err}"
    );
}
