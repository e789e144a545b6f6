//! `report_to = ["tensorboard"]`: tiny SFT, reward and PPO runs write event files that an
//! independent reader ([`reader`]) decodes back — framing, checksums, messages — finding every
//! value of `metrics.jsonl` at its step, once; a run killed mid-write resumes into the same
//! directory without repeated steps.

mod common;
#[path = "tensorboard/reader.rs"]
mod reader;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use common::*;
use reader::{Event, Payload};
use rlhf_train::reward::RewardConfig;
use rlhf_train::tensorboard::{ReportArgs, ReportTo};
use rlhf_train::trainer::TrainingArgs;
use serde_json::Value;

fn tensorboard() -> ReportArgs {
    ReportArgs {
        report_to: ReportTo::tensorboard(),
        logging_dir: None,
    }
}

/// The only logging directory under `<run>/runs/`.
fn logging_dir(run: &Path) -> PathBuf {
    let dirs: Vec<PathBuf> = std::fs::read_dir(run.join("runs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(dirs.len(), 1, "{dirs:?}");
    dirs[0].clone()
}

/// Every scalar of the events: (tag, step) → the values written (one if not repeated).
fn scalars(events: &[Event]) -> BTreeMap<(String, i64), Vec<f32>> {
    let mut out: BTreeMap<(String, i64), Vec<f32>> = BTreeMap::new();
    for e in events {
        for v in &e.values {
            if let Payload::Scalar(x) = v.payload {
                out.entry((v.tag.clone(), e.step)).or_default().push(x);
            }
        }
    }
    out
}

fn raw_metrics(run: &Path) -> Vec<Value> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The event files hold exactly the numbers of `metrics.jsonl`: each at its record's step
/// under `tag(key)`, written once, and no other scalar.
fn assert_mirrors_metrics(run: &Path, events: &[Event], tag: impl Fn(&str) -> String) {
    let mut want: BTreeMap<(String, i64), f32> = BTreeMap::new();
    for m in raw_metrics(run) {
        let step = m["step"].as_i64().unwrap();
        for (k, v) in m.as_object().unwrap().iter().filter(|(k, _)| *k != "step") {
            let Some(x) = v.as_f64() else { continue };
            let old = want.insert((tag(k), step), x as f32);
            assert!(old.is_none_or(|o| o == x as f32), "{k} at step {step} logged twice");
        }
    }
    let got = scalars(events);
    for ((t, step), x) in &want {
        assert_eq!(got.get(&(t.clone(), *step)), Some(&vec![*x]), "{t} at step {step}");
    }
    let extra: Vec<_> = got.keys().filter(|k| !want.contains_key(*k)).collect();
    assert!(extra.is_empty(), "scalars not in metrics.jsonl: {extra:?}");
}

/// transformers' `rewrite_logs`.
fn trainer_tag(k: &str) -> String {
    match k.strip_prefix("eval_") {
        Some(rest) => format!("eval/{rest}"),
        None => format!("train/{k}"),
    }
}

/// The `args` text: the resolved config at step 0, once.
fn assert_config_text(events: &[Event]) {
    let texts: Vec<(i64, &Payload)> = events
        .iter()
        .flat_map(|e| e.values.iter().map(move |v| (e.step, v)))
        .filter(|(_, v)| v.tag == "args/text_summary")
        .map(|(s, v)| (s, &v.payload))
        .collect();
    assert_eq!(texts.len(), 1, "{texts:?}");
    let (step, Payload::Text { plugin, text }) = texts[0] else {
        panic!("args is not text: {texts:?}")
    };
    assert_eq!((step, plugin.as_str()), (0, "text"));
    for key in ["report_to = [\"tensorboard\"]", "logging_dir = ", "learning_rate = "] {
        assert!(text.contains(key), "{key} not in {text}");
    }
}

fn reward_cfg(model: &Path, data: &Path, eval: &Path, out: &Path) -> RewardConfig {
    RewardConfig {
        model_name_or_path: model.display().to_string(),
        train_file: Some(data.display().to_string()),
        eval_file: Some(eval.display().to_string()),
        max_length: Some(128),
        args: TrainingArgs {
            output_dir: out.display().to_string(),
            quiet: true,
            per_device_train_batch_size: 4,
            max_steps: 6,
            save_steps: 3,
            logging_steps: 1,
            eval_strategy: "steps".into(),
            eval_steps: Some(2),
            report: tensorboard(),
            ..RewardConfig::default().args
        },
        ..RewardConfig::default()
    }
}

/// How a killed run left its event file.
#[derive(Clone, Copy, Debug)]
enum Damage {
    /// Cut inside the first record of step 5.
    CutAtStep5,
    /// A flipped byte in the first record of step 2: steps 2 and 3 are lost from the file
    /// and come back from `metrics.jsonl`.
    FlippedAtStep2,
}

/// `full`'s run as a killed run would have left it at step 5 (checkpoint 3, metrics to step
/// 5, the event file damaged), in `part`.
fn killed_copy(full: &Path, part: &Path, damage: Damage) {
    let ckpt = part.join("checkpoint-3");
    std::fs::create_dir_all(&ckpt).unwrap();
    for e in std::fs::read_dir(full.join("checkpoint-3")).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), ckpt.join(e.file_name())).unwrap();
    }
    std::fs::copy(full.join("config.toml"), part.join("config.toml")).unwrap();
    let lines: Vec<String> = raw_metrics(full)
        .iter()
        .filter(|m| m["step"].as_u64().unwrap() <= 5)
        .map(|m| m.to_string() + "\n")
        .collect();
    std::fs::write(part.join("metrics.jsonl"), lines.concat()).unwrap();
    let tb = logging_dir(full);
    let files = reader::event_files(&tb);
    assert_eq!(files.len(), 1);
    let mut bytes = std::fs::read(&files[0]).unwrap();
    let recs = reader::records(&bytes, "full");
    let first_at = |step: i64| recs.iter().find(|(_, d)| reader::decode(d).step == step).unwrap().0;
    match damage {
        Damage::CutAtStep5 => bytes.truncate(first_at(5) + 20),
        Damage::FlippedAtStep2 => bytes[first_at(2) + 14] ^= 0x40,
    }
    let dst = part.join("runs").join(tb.file_name().unwrap());
    std::fs::create_dir_all(&dst).unwrap();
    std::fs::write(dst.join(files[0].file_name().unwrap()), bytes).unwrap();
}

#[test]
fn a_reward_run_reports_every_metric_and_resumes_after_a_killed_write() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    tiny_seqcls(&model);
    let (data, eval) = (tmp.path().join("pairs.jsonl"), tmp.path().join("val.jsonl"));
    head_jsonl("prefs_train.jsonl", 24, &data);
    head_jsonl("prefs_val.jsonl", 8, &eval);
    let full = tmp.path().join("full");
    rlhf_train::reward::train(&reward_cfg(&model, &data, &eval, &full)).unwrap();
    let tb = logging_dir(&full);
    // transformers' default_logdir: `%b%d_%H-%M-%S_<host>`.
    let name = tb.file_name().unwrap().to_string_lossy().into_owned();
    assert!(
        name.len() > 16 && name.as_bytes()[..3].iter().all(u8::is_ascii_alphabetic) && &name[5..6] == "_",
        "{name}"
    );
    let events = reader::read_dir(&tb);
    assert_mirrors_metrics(&full, &events, trainer_tag);
    assert_config_text(&events);
    let got = scalars(&events);
    for tag in [
        "train/loss",
        "train/accuracy",
        "train/grad_norm",
        "train/learning_rate",
        "train/epoch",
    ] {
        assert_eq!(got.keys().filter(|(t, _)| t == tag).count(), 6, "{tag}");
    }
    assert_eq!(got.keys().filter(|(t, _)| t == "eval/accuracy").count(), 3);

    for damage in [Damage::CutAtStep5, Damage::FlippedAtStep2] {
        let part = tmp.path().join(format!("{damage:?}"));
        killed_copy(&full, &part, damage);
        let mut cfg = reward_cfg(&model, &data, &eval, &part);
        cfg.args.resume_from_checkpoint = Some("latest".into());
        rlhf_train::reward::train(&cfg).unwrap();
        assert_eq!(metrics(&part), metrics(&full), "{damage:?}");
        let resumed_tb = logging_dir(&part);
        assert_eq!(resumed_tb.file_name(), tb.file_name(), "{damage:?}: a new logging dir");
        let files = reader::event_files(&resumed_tb);
        assert_eq!(files.len(), 2, "{damage:?}");
        assert!(
            reader::read_file(&files[0]).iter().all(|e| e.step <= 3),
            "{damage:?}: the killed run's file keeps steps after the checkpoint"
        );
        let events = reader::read_dir(&resumed_tb);
        assert_mirrors_metrics(&part, &events, trainer_tag);
        assert_config_text(&events);
        let starts: Vec<i64> = events
            .iter()
            .filter(|e| e.session_status == Some(1))
            .map(|e| e.step)
            .collect();
        assert_eq!(starts, vec![4], "{damage:?}");
        // Same values as the uninterrupted run, wall-clock throughput aside.
        let same = |m: BTreeMap<(String, i64), Vec<f32>>| -> BTreeMap<(String, i64), Vec<f32>> {
            m.into_iter()
                .filter(|((t, _), _)| t != "train/samples_per_second")
                .collect()
        };
        assert_eq!(same(scalars(&events)), same(got.clone()), "{damage:?}");
    }
}

#[test]
fn an_sft_run_reports_under_transformers_tags() {
    let tmp = tempfile::tempdir().unwrap();
    let rows = tmp.path().join("sft.jsonl");
    let text = std::fs::read_to_string(fixtures().join("data/prefs_train.jsonl")).unwrap();
    let lines: Vec<String> = text
        .lines()
        .take(8)
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            serde_json::json!({"prompt": v["prompt"], "completion": v["chosen"]}).to_string() + "\n"
        })
        .collect();
    std::fs::write(&rows, lines.concat()).unwrap();
    let run = tmp.path().join("run");
    let explicit = tmp.path().join("tb");
    let cfg = rlhf_train::sft::SftConfig {
        model_name_or_path: fixtures().join("tiny-gpt2").display().to_string(),
        train_file: Some(rows.display().to_string()),
        eval_file: Some(rows.display().to_string()),
        max_length: Some(64),
        args: TrainingArgs {
            output_dir: run.display().to_string(),
            quiet: true,
            per_device_train_batch_size: 4,
            max_steps: 2,
            logging_steps: 1,
            eval_strategy: "steps".into(),
            report: ReportArgs {
                report_to: ReportTo::tensorboard(),
                logging_dir: Some(explicit.display().to_string()),
            },
            ..rlhf_train::sft::SftConfig::default().args
        },
        ..rlhf_train::sft::SftConfig::default()
    };
    rlhf_train::sft::train(&cfg).unwrap();
    assert!(!run.join("runs").exists(), "an explicit logging_dir is used as given");
    let events = reader::read_dir(&explicit);
    assert_mirrors_metrics(&run, &events, trainer_tag);
    assert_config_text(&events);
    let got = scalars(&events);
    assert!(got.contains_key(&("train/loss".into(), 2)) && got.contains_key(&("eval/loss".into(), 2)));
    // A fresh run into a logging_dir that holds another run's events is refused.
    let mut again = cfg.clone();
    again.args.output_dir = tmp.path().join("run2").display().to_string();
    let err = rlhf_train::sft::train(&again).err().unwrap().to_string();
    assert!(
        err.contains("already holds event files") && err.contains("hint"),
        "{err}"
    );
}

#[test]
fn a_ppo_run_reports_trl_names_and_tensor_statistics_as_histograms() {
    let tmp = tempfile::tempdir().unwrap();
    let rm = tmp.path().join("rm");
    tiny_seqcls(&rm);
    let run = tmp.path().join("ppo");
    let cfg = rlhf_train::ppo_run::PpoRunConfig {
        model_name_or_path: fixtures().join("tiny-gpt2").display().to_string(),
        reward_model_path: rm.display().to_string(),
        train_file: fixtures().join("data/ppo_prompts.jsonl").display().to_string(),
        output_dir: run.display().to_string(),
        max_new_tokens: 4,
        save_steps: 0,
        log_samples: 0,
        quiet: true,
        ppo: rlhf_train::ppo_config::PpoConfig {
            batch_size: 4,
            mini_batch_size: 2,
            ppo_epochs: 1,
            steps: 8,
            ..Default::default()
        },
        report: tensorboard(),
        ..Default::default()
    };
    rlhf_train::ppo_run::train(&cfg).unwrap();
    let events = reader::read_dir(&logging_dir(&run));
    // TRL 0.11 logs through accelerate's tracker: the names as logged, step = current_step.
    assert_mirrors_metrics(&run, &events, str::to_string);
    assert_config_text(&events);
    let mut histos: BTreeMap<(String, i64), f64> = BTreeMap::new();
    for e in &events {
        for v in &e.values {
            if let Payload::Histo {
                min,
                max,
                num,
                limits,
                counts,
                ..
            } = &v.payload
            {
                assert_eq!(counts.iter().sum::<f64>(), *num, "{}", v.tag);
                assert_eq!(limits.len(), counts.len());
                assert!(min <= max && limits.last() == Some(max), "{}", v.tag);
                assert!(limits.windows(2).all(|w| w[0] < w[1]), "{}", v.tag);
                assert!(histos.insert((v.tag.clone(), e.step), *num).is_none());
            }
        }
    }
    for step in [1, 2] {
        for tag in [
            "env/reward_dist",
            "objective/kl_dist",
            "objective/logprobs",
            "objective/ref_logprobs",
            "ppo/policy/advantages",
            "ppo/policy/ratio",
            "tokens/queries_dist",
            "tokens/responses_dist",
        ] {
            let n = histos.get(&(tag.to_string(), step));
            assert!(n.is_some_and(|&n| n >= 4.0), "{tag} at step {step}: {n:?}");
        }
        assert_eq!(histos[&("env/reward_dist".to_string(), step)], 4.0);
    }
}
