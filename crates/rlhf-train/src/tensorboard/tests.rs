use std::collections::BTreeMap;

use serde_json::json;

use super::proto::{event, summary_value, Event};
use super::*;
use crate::config::{parse_flags, resolve, to_toml};
use crate::trainer::TrainingArgs;

fn flags(s: &str) -> serde_json::Map<String, serde_json::Value> {
    parse_flags(&s.split_whitespace().map(String::from).collect::<Vec<_>>()).unwrap()
}

#[test]
fn report_to_takes_none_a_name_or_a_list_and_refuses_other_integrations() {
    let args = |m| resolve::<TrainingArgs>(&m, "flags");
    assert!(!args(flags("")).unwrap().report.report_to.has_tensorboard());
    assert!(args(flags("--report-to tensorboard"))
        .unwrap()
        .report
        .report_to
        .has_tensorboard());
    assert!(args(flags("--report-to all"))
        .unwrap()
        .report
        .report_to
        .has_tensorboard());
    assert!(!args(flags("--report-to none"))
        .unwrap()
        .report
        .report_to
        .has_tensorboard());
    let mut list = serde_json::Map::new();
    list.insert("report_to".into(), json!(["tensorboard"]));
    list.insert("logging_dir".into(), json!("tb"));
    let a = args(list).unwrap();
    assert!(a.report.report_to.has_tensorboard() && a.report.logging_dir.as_deref() == Some("tb"));
    let text = to_toml(&a).unwrap();
    assert!(text.contains("report_to = [\"tensorboard\"]"), "{text}");
    assert!(to_toml(&TrainingArgs::default())
        .unwrap()
        .contains("report_to = \"none\""));
    let err = args(flags("--report-to wandb")).unwrap_err().to_string();
    assert!(
        err.contains("`report_to`") && err.contains("`wandb` is not an integration"),
        "{err}"
    );
}

#[test]
fn report_args_are_read_from_any_config_with_their_keys() {
    let a = ReportArgs::of(&json!({"report_to": ["tensorboard"], "learning_rate": 1.0})).unwrap();
    assert!(a.report_to.has_tensorboard() && a.logging_dir.is_none());
    assert_eq!(ReportArgs::of(&json!({"seed": 1})).unwrap(), ReportArgs::default());
}

#[test]
fn trainer_tags_follow_transformers_rewrite_logs() {
    let t = |k| tag_of(TagStyle::Trainer, k);
    assert_eq!(t("loss"), "train/loss");
    assert_eq!(t("eval_accuracy"), "eval/accuracy");
    assert_eq!(t("test_loss"), "test/loss");
    assert_eq!(t("epoch"), "train/epoch");
    assert_eq!(tag_of(TagStyle::AsLogged, "ppo/loss/policy"), "ppo/loss/policy");
}

#[test]
fn a_histogram_counts_every_finite_value_once() {
    let xs: Vec<f32> = (0..100)
        .map(|i| (i as f32 * 0.37).sin())
        .chain([f32::NAN, f32::INFINITY])
        .collect();
    let h = histogram(&xs).unwrap();
    assert_eq!((h.num, h.bucket.iter().sum::<f64>()), (100.0, 100.0));
    assert_eq!(h.bucket.len(), 30);
    assert!(h.bucket_limit.windows(2).all(|w| w[0] < w[1]));
    assert_eq!(h.bucket_limit.last(), Some(&h.max));
    let finite: Vec<f64> = xs[..100].iter().map(|&x| x as f64).collect();
    assert_eq!(h.min, finite.iter().copied().fold(f64::INFINITY, f64::min));
    assert!((h.sum - finite.iter().sum::<f64>()).abs() < 1e-12);
    // Each value lies in its bucket: (limit[i-1], limit[i]] (the first from min).
    for &x in &finite {
        let i = h.bucket_limit.iter().position(|&l| x <= l).unwrap();
        assert!(i == 0 || x > h.bucket_limit[i - 1]);
    }
    let c = histogram(&[2.0, 2.0, 2.0]).unwrap();
    assert_eq!(
        (c.bucket_limit, c.bucket, c.min, c.max),
        (vec![2.0], vec![3.0], 2.0, 2.0)
    );
    assert!(histogram(&[f32::NAN]).is_none());
}

/// Every event of a log directory, through the crate's reader; every file must be intact.
fn events(dir: &Path) -> Vec<Event> {
    let mut out = Vec::new();
    for f in event_files(dir).unwrap() {
        let (e, tail) = read_event_file(&f).unwrap();
        assert_eq!(tail, record::Tail::Clean, "{}", f.display());
        out.extend(e);
    }
    out
}

fn scalars(events: &[Event]) -> Vec<(String, i64, f32)> {
    let mut out = Vec::new();
    for e in events {
        if let Some(event::What::Summary(s)) = &e.what {
            for v in &s.value {
                if let Some(summary_value::Value::SimpleValue(x)) = v.value {
                    out.push((v.tag.clone(), e.step, x));
                }
            }
        }
    }
    out
}

#[test]
fn metrics_become_scalars_once_per_tag_and_step() {
    let tmp = tempfile::tempdir().unwrap();
    let mut w = EventWriter::open(tmp.path(), false, false).unwrap();
    assert!(w.file().is_none(), "no file before the first event");
    w.log_text("args", "lr = 1", 0).unwrap();
    w.log_metrics(&json!({"step": 1, "epoch": 0.5, "loss": 0.25, "note": "hi"}))
        .unwrap();
    w.log_metrics(&json!({"step": 1, "epoch": 0.5, "eval_loss": 0.75}))
        .unwrap();
    w.log_metrics(&json!({"epoch": 1.0})).unwrap();
    w.log_text("args", "lr = 2", 0).unwrap();
    let mut t = BTreeMap::new();
    t.insert("ppo/policy/ratio".to_string(), vec![1.0f32, 1.5]);
    w.log_histograms(1, &t).unwrap();
    let ev = events(tmp.path());
    assert_eq!(ev[0].what, Some(event::What::FileVersion("brain.Event:2".into())));
    assert_eq!(
        scalars(&ev),
        vec![
            ("train/epoch".into(), 1, 0.5),
            ("train/loss".into(), 1, 0.25),
            ("eval/loss".into(), 1, 0.75)
        ]
    );
    let tags: Vec<&str> = ev
        .iter()
        .filter_map(|e| match &e.what {
            Some(event::What::Summary(s)) => Some(s),
            _ => None,
        })
        .flat_map(|s| s.value.iter().map(|v| v.tag.as_str()))
        .collect();
    assert_eq!(
        tags.iter().filter(|t| t.ends_with("text_summary")).count(),
        2,
        "{tags:?}"
    );
    assert!(tags.contains(&"args/text_summary") && tags.contains(&"train/note/text_summary"));
    assert!(tags.contains(&"ppo/policy/ratio"));
}

#[test]
fn resuming_cuts_older_files_back_to_the_checkpoint_and_mends_a_damaged_tail() {
    let tmp = tempfile::tempdir().unwrap();
    let records: Vec<serde_json::Value> = (1..=5).map(|s| json!({"step": s, "loss": s as f64})).collect();
    let old = {
        let mut w = EventWriter::open(tmp.path(), false, false).unwrap();
        for r in &records {
            w.log_metrics(r).unwrap();
        }
        w.file().unwrap().to_path_buf()
    };
    // A killed run: half a record at the end.
    let mut bytes = std::fs::read(&old).unwrap();
    let mut half = Vec::new();
    record::write_record(&mut half, b"a record cut off by a kill").unwrap();
    bytes.extend_from_slice(&half[..20]);
    std::fs::write(&old, &bytes).unwrap();
    assert!(matches!(
        read_event_file(&old).unwrap().1,
        record::Tail::Truncated { .. }
    ));

    let mut w = EventWriter::open(tmp.path(), true, false).unwrap();
    // metrics.jsonl cut back to step 3 also holds a key the event file never got.
    let mut kept: Vec<serde_json::Value> = records[..3].to_vec();
    kept[1]["accuracy"] = json!(0.5);
    w.truncate_after(3, &kept).unwrap();
    w.log_metrics(&json!({"step": 4, "loss": 40.0})).unwrap();
    let new = w.file().unwrap().to_path_buf();
    assert!(new > old, "the new file sorts after the old one");
    let (old_events, tail) = read_event_file(&old).unwrap();
    assert_eq!(tail, record::Tail::Clean);
    assert!(old_events.iter().all(|e| e.step <= 3));
    let ev = events(tmp.path());
    assert_eq!(
        scalars(&ev),
        vec![
            ("train/loss".into(), 1, 1.0),
            ("train/loss".into(), 2, 2.0),
            ("train/loss".into(), 3, 3.0),
            ("train/accuracy".into(), 2, 0.5),
            ("train/loss".into(), 4, 40.0),
        ]
    );
    let start = ev
        .iter()
        .find(|e| matches!(e.what, Some(event::What::SessionLog(_))))
        .unwrap();
    assert_eq!(start.step, 4);
    // A fresh run into the same directory is refused, or replaces it with overwrite.
    let err = EventWriter::open(tmp.path(), false, false).unwrap_err().to_string();
    assert!(err.contains("already holds event files"), "{err}");
    EventWriter::open(tmp.path(), false, true).unwrap();
    assert!(event_files(tmp.path()).unwrap().is_empty());
}

#[test]
fn a_resumed_run_continues_the_newest_logging_dir() {
    let tmp = tempfile::tempdir().unwrap();
    for (name, secs) in [
        ("Jan01_00-00-00_h", 1_700_000_000u64),
        ("Dec31_00-00-00_h", 1_600_000_000),
    ] {
        let d = tmp.path().join("runs").join(name);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join(format!("events.out.tfevents.{secs}.h.1.0")), b"").unwrap();
    }
    std::fs::create_dir_all(tmp.path().join("runs/empty")).unwrap();
    assert_eq!(
        newest_logging_dir(tmp.path()),
        Some(tmp.path().join("runs/Jan01_00-00-00_h"))
    );
    let d = default_logging_dir(Path::new("out"));
    assert!(d.starts_with("out/runs"));
}
