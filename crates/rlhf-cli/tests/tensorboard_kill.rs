//! `--report-to tensorboard` through the `rlhf` binary: a reward run killed with SIGKILL after
//! its first checkpoint (maybe mid-write), then resumed, leaves intact event files in the same
//! `logging_dir` that hold every number of its `metrics.jsonl`, each at its step, once.
//! `RLHF_KILL_DELAY_MS` replays a kill delay, as in `kill_resume.rs`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rlhf_train::tensorboard::proto::{event, summary_value};
use rlhf_train::tensorboard::{event_files, read_event_file, record::Tail};
use serde_json::Value;

fn fixtures() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../fixtures"))
}

fn rlhf(out: &Path, data: &Path, extra: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_rlhf"));
    c.arg("reward")
        .arg("--model-name-or-path")
        .arg(fixtures().join("tiny-gpt2"))
        .arg("--train-file")
        .arg(data)
        .arg("--output-dir")
        .arg(out)
        .args([
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
            "--report-to",
            "tensorboard",
            "--quiet",
        ])
        .args(extra);
    c
}

fn has_checkpoint(run: &Path) -> bool {
    std::fs::read_dir(run)
        .into_iter()
        .flatten()
        .flatten()
        .any(|e| e.file_name().to_string_lossy().starts_with("checkpoint-"))
}

fn kill_delay(max_ms: u64) -> u64 {
    if let Some(ms) = std::env::var("RLHF_KILL_DELAY_MS").ok().and_then(|s| s.parse().ok()) {
        return ms;
    }
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos() as u64);
    nanos % max_ms
}

#[test]
fn a_killed_run_resumes_into_the_same_tensorboard_run_without_repeated_steps() {
    let tmp = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(fixtures().join("data/prefs_train.jsonl")).unwrap();
    let data = tmp.path().join("pairs.jsonl");
    std::fs::write(&data, text.lines().take(24).collect::<Vec<_>>().join("\n") + "\n").unwrap();
    let run = tmp.path().join("run");

    let mut child = rlhf(&run, &data, &[])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while !has_checkpoint(&run) {
        assert!(
            child.try_wait().unwrap().is_none(),
            "exited before its first checkpoint"
        );
        assert!(start.elapsed() < Duration::from_secs(120), "no checkpoint");
        std::thread::sleep(Duration::from_millis(5));
    }
    let delay = kill_delay(400);
    std::thread::sleep(Duration::from_millis(delay));
    child.kill().unwrap();
    child.wait().unwrap();
    eprintln!("killed {delay} ms after the first checkpoint (RLHF_KILL_DELAY_MS={delay} replays it)");
    let o = rlhf(&run, &data, &["--resume-from-checkpoint", "latest"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    let dirs: Vec<PathBuf> = std::fs::read_dir(run.join("runs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(
        dirs.len(),
        1,
        "the resumed run continues the killed run's logging_dir: {dirs:?}"
    );
    let mut got: BTreeMap<(String, i64), Vec<f32>> = BTreeMap::new();
    for f in event_files(&dirs[0]).unwrap() {
        let (events, tail) = read_event_file(&f).unwrap();
        assert_eq!(tail, Tail::Clean, "{}", f.display());
        for e in events {
            let Some(event::What::Summary(s)) = e.what else {
                continue;
            };
            for v in s.value {
                if let Some(summary_value::Value::SimpleValue(x)) = v.value {
                    got.entry((v.tag, e.step)).or_default().push(x);
                }
            }
        }
    }
    let mut want: BTreeMap<(String, i64), Vec<f32>> = BTreeMap::new();
    for line in std::fs::read_to_string(run.join("metrics.jsonl")).unwrap().lines() {
        let m: Value = serde_json::from_str(line).unwrap();
        let step = m["step"].as_i64().unwrap();
        for (k, v) in m.as_object().unwrap() {
            if let (false, Some(x)) = (k == "step", v.as_f64()) {
                want.insert((format!("train/{k}"), step), vec![x as f32]);
            }
        }
    }
    assert_eq!(want.len(), 8 * 10, "{:?}", want.keys().collect::<Vec<_>>());
    assert_eq!(got, want);
}
