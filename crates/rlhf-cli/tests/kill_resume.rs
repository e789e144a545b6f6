//! Crash safety of the training commands, end to end through the `rlhf` binary.
//!
//! For `rlhf sft`, `rlhf reward` and `rlhf ppo`: a run killed with SIGKILL at a random-ish
//! moment after its first checkpoint, then rerun with `--resume-from-checkpoint latest`, ends
//! with the `metrics.jsonl` (wall-clock keys aside) and the `final/model.safetensors` bytes of
//! an uninterrupted run with the same flags. The kill delay is printed; set
//! `RLHF_KILL_DELAY_MS` to replay one. A run sent SIGINT (Ctrl-C) or SIGTERM instead stops
//! after its current step with status 130 / 143, saves that step as a checkpoint and names it
//! with the resume flag; resumed, it ends the same way. Also: an output directory that holds a run is refused
//! without `--overwrite-output-dir`, and a diverging run stops naming the step and the last
//! good checkpoint, leaving the earlier checkpoints intact. See docs/reliability.md.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

fn fixtures() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../fixtures"))
}

fn path(p: &Path) -> String {
    p.display().to_string()
}

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

fn rlhf(cmd: &str, flags: &[String], out: &Path, extra: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_rlhf"));
    c.arg(cmd).args(flags).arg("--output-dir").arg(out).args(extra);
    c
}

fn output(mut c: Command) -> Output {
    c.output().expect("invariant: the rlhf binary runs")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn run_ok(c: Command) {
    let o = output(c);
    assert!(o.status.success(), "run failed:\n{}", stderr(&o));
}

/// The first `n` preference pairs of the fixture data.
fn pairs(n: usize, dst: &Path) -> PathBuf {
    let text = std::fs::read_to_string(fixtures().join("data/prefs_train.jsonl")).unwrap();
    let lines: Vec<&str> = text.lines().take(n).collect();
    std::fs::write(dst, lines.join("\n") + "\n").unwrap();
    dst.to_path_buf()
}

/// The first `n` pairs as SFT rows: prompt + chosen completion.
fn sft_rows(n: usize, dst: &Path) -> PathBuf {
    let text = std::fs::read_to_string(fixtures().join("data/prefs_train.jsonl")).unwrap();
    let rows: Vec<String> = text
        .lines()
        .take(n)
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            serde_json::json!({"prompt": v["prompt"], "completion": v["chosen"]}).to_string()
        })
        .collect();
    std::fs::write(dst, rows.join("\n") + "\n").unwrap();
    dst.to_path_buf()
}

/// A reward model for PPO: tiny-gpt2 with a fresh score head.
fn reward_model(dst: &Path) -> PathBuf {
    let mut m = rlhf_models::Model::load(&fixtures().join("tiny-gpt2"), &Default::default()).unwrap();
    m.ensure_score_head(0).unwrap();
    m.save(dst).unwrap();
    dst.to_path_buf()
}

/// Metrics lines without wall-clock keys (`samples_per_second`, `time/*`).
fn metrics(run: &Path) -> Vec<Value> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let mut v: Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}"));
            v.as_object_mut()
                .unwrap()
                .retain(|k, _| k != "samples_per_second" && !k.starts_with("time/"));
            v
        })
        .collect()
}

/// Steps of the complete `checkpoint-<step>/` directories of a run, ascending.
fn checkpoints(run: &Path) -> Vec<u64> {
    let mut steps: Vec<u64> = std::fs::read_dir(run)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.strip_prefix("checkpoint-")?.parse().ok())
        .collect();
    steps.sort_unstable();
    steps
}

/// A delay in `0..max_ms`: `RLHF_KILL_DELAY_MS` if set, else from the clock.
fn kill_delay(max_ms: u64) -> u64 {
    if let Some(ms) = std::env::var("RLHF_KILL_DELAY_MS").ok().and_then(|s| s.parse().ok()) {
        return ms;
    }
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos() as u64);
    nanos % max_ms
}

/// Waits until `run` holds a complete checkpoint; `child` must not exit before.
fn wait_for_first_checkpoint(cmd: &str, child: &mut Child, run: &Path) {
    let start = Instant::now();
    // A checkpoint directory appears by rename, complete, so its presence is enough.
    while checkpoints(run).is_empty() {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("{cmd}: exited ({status}) before its first checkpoint");
        }
        assert!(start.elapsed() < Duration::from_secs(120), "{cmd}: no checkpoint");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The resumed run `part` (resumed from `checkpoint-<resumed_from>`) ends like `full`: the same
/// metrics from the checkpoint's step on and in all, and the same final weights, byte for byte.
fn assert_resumed_equals_uninterrupted(cmd: &str, full: &Path, part: &Path, resumed_from: u64, how: &str) {
    let (want, got) = (metrics(full), metrics(part));
    let after = |m: &[Value]| -> Vec<Value> {
        m.iter()
            .filter(|v| v["step"].as_u64().is_some_and(|s| s >= resumed_from))
            .cloned()
            .collect()
    };
    assert!(
        !after(&want).is_empty(),
        "{cmd}: no metrics from step {resumed_from} on"
    );
    assert_eq!(
        after(&got),
        after(&want),
        "{cmd}: metrics from checkpoint-{resumed_from} on differ"
    );
    assert_eq!(got, want, "{cmd}: metrics.jsonl differs");
    let weights = |run: &Path| std::fs::read(run.join("final/model.safetensors")).unwrap();
    assert!(
        weights(part) == weights(full),
        "{cmd}: final/model.safetensors differs after {how} + resume"
    );
}

/// Runs `cmd` uninterrupted, then again in a fresh directory killed (SIGKILL) a random-ish
/// delay after its first checkpoint appears, then resumed; the two runs must agree.
fn killed_and_resumed_equals_uninterrupted(cmd: &str, flags: &[String], tmp: &Path, max_delay_ms: u64) {
    let full = tmp.join("full");
    run_ok(rlhf(cmd, flags, &full, &[]));

    let part = tmp.join("part");
    let mut child = rlhf(cmd, flags, &part, &[])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("invariant: the rlhf binary starts");
    wait_for_first_checkpoint(cmd, &mut child, &part);
    let delay = kill_delay(max_delay_ms);
    std::thread::sleep(Duration::from_millis(delay));
    let finished = child.try_wait().unwrap().is_some();
    child.kill().unwrap(); // SIGKILL; an error only if it already exited
    child.wait().unwrap();
    let resumed_from = *checkpoints(&part).last().unwrap();
    eprintln!(
        "{cmd}: killed {delay} ms after the first checkpoint (RLHF_KILL_DELAY_MS={delay} replays it){}; \
         resuming from checkpoint-{resumed_from}",
        if finished { ", but it had already finished" } else { "" }
    );

    run_ok(rlhf(cmd, flags, &part, &["--resume-from-checkpoint", "latest"]));
    let how = format!("a kill after {delay} ms");
    assert_resumed_equals_uninterrupted(cmd, &full, &part, resumed_from, &how);
}

/// Runs `cmd` uninterrupted, then again in a fresh directory sent `signal` (`INT` or `TERM`,
/// through `kill`) as soon as its first checkpoint appears: it must stop after its current
/// step with the shell's status for the signal, naming the checkpoint it saved and how to
/// resume; resumed, it must end like the uninterrupted run.
fn stopped_by_signal_and_resumed_equals_uninterrupted(cmd: &str, flags: &[String], tmp: &Path, signal: &str) {
    let full = tmp.join("full");
    run_ok(rlhf(cmd, flags, &full, &[]));

    let part = tmp.join("part");
    let mut child = rlhf(cmd, flags, &part, &[])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("invariant: the rlhf binary starts");
    wait_for_first_checkpoint(cmd, &mut child, &part);
    let sent = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(child.id().to_string())
        .status()
        .expect("invariant: kill runs");
    assert!(sent.success(), "{cmd}: kill -{signal} failed");
    let o = child.wait_with_output().unwrap();
    let err = stderr(&o);
    let code = if signal == "INT" { 130 } else { 143 };
    assert_eq!(o.status.code(), Some(code), "{cmd}: {err}");
    let stopped_at = *checkpoints(&part).last().unwrap();
    let ckpt = part.join(format!("checkpoint-{stopped_at}"));
    assert!(
        err.contains(&format!("stopped by SIG{signal} after step {stopped_at} of"))
            && err.contains(&path(&ckpt))
            && err.contains("--resume-from-checkpoint latest")
            && !err.contains("error:"),
        "{cmd}: {err}"
    );
    assert!(!part.join("final").exists(), "{cmd}: an interrupted run wrote final/");
    eprintln!("{cmd}: stopped by SIG{signal} at step {stopped_at}");

    run_ok(rlhf(cmd, flags, &part, &["--resume-from-checkpoint", "latest"]));
    let how = format!("SIG{signal}");
    assert_resumed_equals_uninterrupted(cmd, &full, &part, stopped_at, &how);
}

/// 8 SFT steps on the tiny model, a checkpoint every 2, dropout on.
fn sft_flags(tmp: &Path) -> Vec<String> {
    let data = sft_rows(24, &tmp.join("sft.jsonl"));
    args(&[
        "--model-name-or-path",
        &path(&fixtures().join("tiny-gpt2")),
        "--train-file",
        &path(&data),
        "--per-device-train-batch-size",
        "4",
        "--max-steps",
        "8",
        "--save-steps",
        "2",
        "--logging-steps",
        "1",
        "--max-length",
        "128",
        "--learning-rate",
        "1e-3",
        "--disable-dropout",
        "false",
        "--seed",
        "7",
        "--quiet",
    ])
}

/// 8 reward-model steps on the tiny model, a checkpoint every 2, dropout on.
fn reward_flags(tmp: &Path) -> Vec<String> {
    let data = pairs(24, &tmp.join("pairs.jsonl"));
    args(&[
        "--model-name-or-path",
        &path(&fixtures().join("tiny-gpt2")),
        "--train-file",
        &path(&data),
        "--per-device-train-batch-size",
        "4",
        "--max-steps",
        "8",
        "--save-steps",
        "2",
        "--logging-steps",
        "1",
        "--max-length",
        "128",
        "--learning-rate",
        "5e-4",
        "--disable-dropout",
        "false",
        "--seed",
        "7",
        "--quiet",
    ])
}

/// 6 PPO steps on the tiny model (batches of 4), a checkpoint every 2.
fn ppo_flags(tmp: &Path) -> Vec<String> {
    let rm = reward_model(&tmp.join("rm"));
    args(&[
        "--model-name-or-path",
        &path(&fixtures().join("tiny-gpt2")),
        "--reward-model-path",
        &path(&rm),
        "--train-file",
        &path(&fixtures().join("data/ppo_prompts.jsonl")),
        "--batch-size",
        "4",
        "--mini-batch-size",
        "2",
        "--ppo-epochs",
        "2",
        "--steps",
        "24",
        "--max-new-tokens",
        "6",
        "--save-steps",
        "2",
        "--log-samples",
        "0",
        "--learning-rate",
        "1e-4",
        "--seed",
        "3",
        "--quiet",
    ])
}

#[test]
fn a_killed_sft_run_resumes_to_the_uninterrupted_result() {
    let tmp = tempfile::tempdir().unwrap();
    killed_and_resumed_equals_uninterrupted("sft", &sft_flags(tmp.path()), tmp.path(), 1500);
}

#[test]
fn a_killed_reward_run_resumes_to_the_uninterrupted_result() {
    let tmp = tempfile::tempdir().unwrap();
    killed_and_resumed_equals_uninterrupted("reward", &reward_flags(tmp.path()), tmp.path(), 1000);
}

#[test]
fn a_killed_ppo_run_resumes_to_the_uninterrupted_result() {
    let tmp = tempfile::tempdir().unwrap();
    killed_and_resumed_equals_uninterrupted("ppo", &ppo_flags(tmp.path()), tmp.path(), 1500);
}

#[test]
fn a_ctrl_c_sft_run_saves_a_checkpoint_and_resumes_to_the_uninterrupted_result() {
    let tmp = tempfile::tempdir().unwrap();
    stopped_by_signal_and_resumed_equals_uninterrupted("sft", &sft_flags(tmp.path()), tmp.path(), "INT");
}

#[test]
fn a_ctrl_c_reward_run_saves_a_checkpoint_and_resumes_to_the_uninterrupted_result() {
    let tmp = tempfile::tempdir().unwrap();
    stopped_by_signal_and_resumed_equals_uninterrupted("reward", &reward_flags(tmp.path()), tmp.path(), "INT");
}

#[test]
fn a_sigterm_ppo_run_saves_a_checkpoint_and_resumes_to_the_uninterrupted_result() {
    let tmp = tempfile::tempdir().unwrap();
    stopped_by_signal_and_resumed_equals_uninterrupted("ppo", &ppo_flags(tmp.path()), tmp.path(), "TERM");
}

#[test]
fn an_output_dir_that_holds_a_run_is_refused_without_overwrite_output_dir() {
    let tmp = tempfile::tempdir().unwrap();
    let data = pairs(8, &tmp.path().join("pairs.jsonl"));
    let run = tmp.path().join("run");
    let reward_flags = |max_steps: &str| {
        args(&[
            "--model-name-or-path",
            &path(&fixtures().join("tiny-gpt2")),
            "--train-file",
            &path(&data),
            "--per-device-train-batch-size",
            "4",
            "--max-steps",
            max_steps,
            "--save-steps",
            "1",
            "--max-length",
            "128",
            "--quiet",
        ])
    };
    let flags = reward_flags("2");
    run_ok(rlhf("reward", &flags, &run, &[]));
    let before = std::fs::read(run.join("metrics.jsonl")).unwrap();
    let ppo_flags = args(&[
        "--model-name-or-path",
        "unused",
        "--reward-model-path",
        "unused",
        "--train-file",
        "unused",
        "--batch-size",
        "4",
        "--mini-batch-size",
        "2",
    ]);
    for (cmd, f) in [("reward", &flags), ("sft", &flags), ("ppo", &ppo_flags)] {
        let o = output(rlhf(cmd, f, &run, &[]));
        let err = stderr(&o);
        assert!(
            !o.status.success()
                && err.contains(&path(&run))
                && err.contains("already holds a run")
                && err.contains("--overwrite-output-dir"),
            "{cmd}: {err}"
        );
    }
    assert_eq!(
        std::fs::read(run.join("metrics.jsonl")).unwrap(),
        before,
        "refused run was modified"
    );
    assert_eq!(checkpoints(&run), [1]);
    // With the flag the old run is replaced: a run of one step leaves no checkpoint-1.
    run_ok(rlhf("reward", &reward_flags("1"), &run, &["--overwrite-output-dir"]));
    assert_eq!(metrics(&run).len(), 1);
    assert!(checkpoints(&run).is_empty(), "{:?}", checkpoints(&run));
}

#[test]
fn a_diverging_run_names_the_step_and_the_last_good_checkpoint_and_keeps_it() {
    let tmp = tempfile::tempdir().unwrap();
    let data = pairs(24, &tmp.path().join("pairs.jsonl"));
    let run = tmp.path().join("run");
    // Warm-up: step 1 at lr 0, step 2 at 1e30 (weights ~1e30), step 3's layer norms overflow.
    let flags = args(&[
        "--model-name-or-path",
        &path(&fixtures().join("tiny-gpt2")),
        "--train-file",
        &path(&data),
        "--per-device-train-batch-size",
        "4",
        "--max-steps",
        "8",
        "--save-steps",
        "1",
        "--logging-steps",
        "1",
        "--max-length",
        "128",
        "--learning-rate",
        "1e30",
        "--warmup-steps",
        "2",
        "--max-grad-norm",
        "0",
        "--quiet",
    ]);
    let o = output(rlhf("reward", &flags, &run, &[]));
    let err = stderr(&o);
    let last_good = run.join("checkpoint-2");
    assert!(!o.status.success(), "{err}");
    assert!(
        err.contains("step 3: non-finite")
            && err.contains("last good checkpoint")
            && err.contains(&path(&last_good))
            && err.contains("hint"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    // The broken state is not saved; the checkpoints before it are complete and loadable.
    assert_eq!(checkpoints(&run), [1, 2]);
    assert!(!run.join("final").exists() && !run.join(".checkpoint-3.tmp").exists());
    for step in [1u64, 2] {
        let ckpt = run.join(format!("checkpoint-{step}"));
        let state: Value =
            serde_json::from_str(&std::fs::read_to_string(ckpt.join("trainer_state.json")).unwrap()).unwrap();
        assert_eq!(state["global_step"], step);
        let m = rlhf_models::Model::load(&ckpt, &Default::default()).unwrap();
        for (name, p) in m.named_params() {
            let t = p.value().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert!(
                t.iter().all(|x| x.is_finite()),
                "checkpoint-{step}: `{name}` is not finite"
            );
        }
        assert!(ckpt.join("optimizer.safetensors").is_file());
    }
    assert_eq!(metrics(&run).len(), 2, "no metrics line for the diverged step");
}

/// Fixed bug (crates/rlhf-cli/src/main.rs printed `{e:#}`, which appends the error's source chain;
/// `TrainError::Io` / `ModelError::Io` / `ModelError::Json` in crates/rlhf-train/src/error.rs
/// and crates/rlhf-models/src/error.rs already print their `source` field, which thiserror
/// also exposes as the source): the cause is printed twice, e.g. `error: /nonexistent.toml:
/// No such file or directory (os error 2): No such file or directory (os error 2)`.
#[test]
fn an_io_error_names_its_cause_once() {
    let tmp = tempfile::tempdir().unwrap();
    let model = path(&fixtures().join("tiny-gpt2"));
    let cases: [(&[&str], &str); 3] = [
        (&["--config", "/nonexistent/reward.toml"], "No such file or directory"),
        (
            &[
                "--model-name-or-path",
                &model,
                "--train-file",
                "/nonexistent/pairs.jsonl",
            ],
            "No such file or directory",
        ),
        (
            &["--model-name-or-path", "/nonexistent/model", "--train-file", "x.jsonl"],
            "no such directory",
        ),
    ];
    for (i, (extra, cause)) in cases.into_iter().enumerate() {
        let o = output(rlhf("reward", &args(extra), &tmp.path().join(format!("o{i}")), &[]));
        let err = stderr(&o);
        assert!(!o.status.success(), "{err}");
        assert_eq!(err.matches(cause).count(), 1, "{err}");
    }
}

#[test]
fn resuming_with_other_training_flags_is_refused_listing_each_key() {
    let tmp = tempfile::tempdir().unwrap();
    let data = pairs(8, &tmp.path().join("pairs.jsonl"));
    let run = tmp.path().join("run");
    let flags = args(&[
        "--model-name-or-path",
        &path(&fixtures().join("tiny-gpt2")),
        "--train-file",
        &path(&data),
        "--per-device-train-batch-size",
        "4",
        "--max-steps",
        "3",
        "--save-steps",
        "1",
        "--learning-rate",
        "1e-3",
        "--quiet",
    ]);
    run_ok(rlhf("reward", &flags, &run, &[]));
    let before = std::fs::read(run.join("metrics.jsonl")).unwrap();
    let resume = ["--resume-from-checkpoint", "latest"];
    let o = output(rlhf(
        "reward",
        &flags,
        &run,
        &[&resume[..], &["--learning-rate", "2e-3", "--seed", "9"]].concat(),
    ));
    let err = stderr(&o);
    assert!(!o.status.success(), "{err}");
    for part in [
        format!("{}: cannot resume: 2 setting(s) differ", path(&run.join("config.toml"))),
        "learning_rate: 0.001 (saved) → 0.002 (now)".into(),
        "seed: 42 (saved) → 9 (now)".into(),
        "--overwrite-output-dir".into(),
    ] {
        assert!(err.contains(&part), "{part}: {err}");
    }
    assert_eq!(
        std::fs::read(run.join("metrics.jsonl")).unwrap(),
        before,
        "refused resume changed the run"
    );
    // Cadence and quietness may change: they leave the weights alone.
    run_ok(rlhf(
        "reward",
        &flags,
        &run,
        &[&resume[..], &["--save-steps", "5", "--logging-steps", "2"]].concat(),
    ));
}
