//! TensorBoard event files for `report_to = ["tensorboard"]`, written beside `metrics.jsonl`
//! by the same call ([`crate::checkpoint::RunDir::log`]), so every trainer that logs its
//! metrics there reports to TensorBoard too.
//!
//! # What is written, and under which names
//! - Every number of every `metrics.jsonl` record becomes a scalar (`simple_value`, what
//!   `SummaryWriter.add_scalar` writes) at the record's `step`. Trainers built on the shared
//!   loop (SFT, reward, and those that follow transformers' `Trainer`) use transformers'
//!   `rewrite_logs` names: `eval_<name>` → `eval/<name>`, `test_<name>` → `test/<name>`,
//!   anything else → `train/<name>` ([`TagStyle::Trainer`]). PPO follows TRL 0.11, whose
//!   `log_stats` hands its stats to accelerate's TensorBoard tracker unchanged, so its names
//!   stay as logged (`env/reward_mean`, `ppo/loss/policy`; [`TagStyle::AsLogged`]) and its
//!   step is `current_step` (1 after the first `step()`), as TRL's with `log_with="tensorboard"`.
//! - PPO's tensor statistics (`objective/kl_dist`, `objective/logprobs`, `ppo/policy/ratio`,
//!   `ppo/policy/advantages`, `env/reward_dist`, `tokens/*_dist`, ...) become histograms —
//!   TRL 0.11 logs them as histograms to wandb; its TensorBoard tracker drops them. 30
//!   equal-width buckets between the smallest and largest finite value (the bucket count of
//!   `tf.summary.histogram`), in the `HistogramProto` layout `add_histogram` writes.
//! - The run's resolved config (`config.toml`, plus the resolved `logging_dir`) as a text
//!   summary at step 0 under `args/text_summary`, the tag transformers'
//!   `TensorBoardCallback` uses for `add_text("args", ...)`.
//! - A value already written for a tag at a step is not written again (an evaluation record
//!   repeats `epoch` at the training record's step), so each (tag, step) appears once.
//!
//! # Where
//! `logging_dir`, default `<output_dir>/runs/<%b%d_%H-%M-%S>_<host>` as transformers'
//! `default_logdir`; files are `events.out.tfevents.<unix secs>.<host>.<pid>.<n>`.
//!
//! # Resume
//! A resumed run keeps the run's directory (the explicit `logging_dir`, else the newest
//! `<output_dir>/runs/*` holding event files) and appends a new event file, named to sort
//! after the old ones. When metrics are cut back to the checkpoint's step
//! ([`crate::checkpoint::RunDir::truncate_metrics_after`]), every older event file is
//! rewritten without the events after that step and without a damaged or truncated tail (a
//! run killed mid-write), so no step is there twice; scalars that `metrics.jsonl` holds up to
//! the checkpoint but the old files lack (TensorBoard switched on at resume, a damaged
//! record) are written again; then a `SessionLog.START` event at the first new step marks
//! the restart, the documented signal on which TensorBoard's `EventAccumulator` purges
//! orphaned data (`purge_orphaned_data`) — readers that do not purge see clean files anyway.
//!
//! # Format and crates
//! TFRecord framing with masked CRC32C ([`record`]) around `Event` protocol buffers
//! ([`proto`]), encoded with `prost` (derived messages, no build step) and checksummed with the
//! `crc32c` crate. The existing TensorBoard writer crates were not used: `tensorboard-rs`
//! depends on protobuf 2 and image 0.23 and has not been released since 2021; `tboard` has a
//! single 0.1 release on prost 0.12 that needs `protoc` at build time.

pub mod proto;
pub mod record;
mod run;
mod writer;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Result, TrainError};
pub use writer::EventWriter;

/// `report_to` (transformers' `TrainingArguments` name): where metrics are reported besides
/// `metrics.jsonl`, which is always written. `"none"` (the default) or a list of
/// integrations; `"tensorboard"` and `"all"` turn TensorBoard on. A single name may be given
/// as a string (`--report-to tensorboard`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReportTo(Vec<String>);

impl ReportTo {
    /// `["tensorboard"]`.
    pub fn tensorboard() -> Self {
        Self(vec!["tensorboard".into()])
    }

    /// Whether TensorBoard files are written.
    pub fn has_tensorboard(&self) -> bool {
        self.0.iter().any(|n| n == "tensorboard")
    }

    /// Parses integration names: `none`, `all` or `tensorboard` (unknown names are errors).
    pub fn from_names<'a>(names: impl IntoIterator<Item = &'a str>) -> std::result::Result<Self, String> {
        let mut out = Vec::new();
        for name in names {
            let name = name.trim().trim_matches(|c| c == '"' || c == '\'');
            match name {
                "" | "none" => {}
                "all" | "tensorboard" => out.push("tensorboard".to_string()),
                other => {
                    return Err(format!(
                        "`{other}` is not an integration rlhf reports to; use \"tensorboard\" or \"none\" \
                         (metrics.jsonl is always written)"
                    ))
                }
            }
        }
        out.dedup();
        Ok(Self(out))
    }
}

impl Serialize for ReportTo {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        if self.0.is_empty() {
            s.serialize_str("none")
        } else {
            self.0.serialize(s)
        }
    }
}

impl<'de> Deserialize<'de> for ReportTo {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct Names;
        impl<'de> serde::de::Visitor<'de> for Names {
            type Value = ReportTo;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("\"none\", \"tensorboard\" or a list such as [\"tensorboard\"]")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> std::result::Result<ReportTo, E> {
                // `--report-to tensorboard`, `"none"`, or a list spelled as text.
                let inner = v.trim().trim_start_matches('[').trim_end_matches(']');
                ReportTo::from_names(inner.split(',')).map_err(E::custom)
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> std::result::Result<ReportTo, A::Error> {
                let mut names: Vec<String> = Vec::new();
                while let Some(n) = seq.next_element::<String>()? {
                    names.push(n);
                }
                ReportTo::from_names(names.iter().map(String::as_str)).map_err(serde::de::Error::custom)
            }
            fn visit_unit<E: serde::de::Error>(self) -> std::result::Result<ReportTo, E> {
                Ok(ReportTo::default())
            }
            fn visit_none<E: serde::de::Error>(self) -> std::result::Result<ReportTo, E> {
                Ok(ReportTo::default())
            }
        }
        d.deserialize_any(Names)
    }
}

/// The reporting keys of a trainer config (flattened into [`crate::trainer::TrainingArgs`]
/// and [`crate::ppo_run::PpoRunConfig`]; a config with these keys gets TensorBoard through
/// [`crate::trainer::prepare_run_dir`]).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct ReportArgs {
    /// `"none"`, `"tensorboard"` or a list (see [`ReportTo`]).
    pub report_to: ReportTo,
    /// TensorBoard's log directory; default `<output_dir>/runs/<%b%d_%H-%M-%S>_<host>`, and a
    /// resumed run continues the newest such directory.
    pub logging_dir: Option<String>,
}

impl ReportArgs {
    /// The `report_to` and `logging_dir` keys of any serializable config (absent keys take
    /// their defaults), so that each trainer's config needs nothing but the keys.
    pub fn of<C: Serialize>(cfg: &C) -> Result<Self> {
        let v = serde_json::to_value(cfg).map_err(|e| TrainError::Config(e.to_string()))?;
        let mut keys = serde_json::Map::new();
        for k in ["report_to", "logging_dir"] {
            if let Some(x) = v.get(k) {
                keys.insert(k.into(), x.clone());
            }
        }
        serde_json::from_value(serde_json::Value::Object(keys))
            .map_err(|e| TrainError::setting("report_to", e.to_string()))
    }
}

/// How metric names become TensorBoard tags.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TagStyle {
    /// transformers' `rewrite_logs`: `eval_x` → `eval/x`, `test_x` → `test/x`, else `train/x`.
    Trainer,
    /// The names as logged (TRL 0.11's PPO through accelerate's tracker).
    AsLogged,
}

/// The TensorBoard tag of metric `key` under `style`.
pub fn tag_of(style: TagStyle, key: &str) -> String {
    match style {
        TagStyle::AsLogged => key.to_string(),
        TagStyle::Trainer => {
            if let Some(k) = key.strip_prefix("eval_") {
                format!("eval/{k}")
            } else if let Some(k) = key.strip_prefix("test_") {
                format!("test/{k}")
            } else {
                format!("train/{key}")
            }
        }
    }
}

/// Buckets of a histogram (`tf.summary.histogram`'s default count).
const BUCKETS: usize = 30;

/// A histogram of the finite `values`: [`BUCKETS`] equal-width buckets from their minimum to
/// their maximum (one bucket when all are equal); `None` when no value is finite.
pub fn histogram(values: &[f32]) -> Option<proto::HistogramProto> {
    let xs: Vec<f64> = values.iter().filter(|x| x.is_finite()).map(|&x| x as f64).collect();
    if xs.is_empty() {
        return None;
    }
    let min = xs.iter().copied().fold(f64::INFINITY, f64::min);
    let max = xs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let (bucket_limit, bucket) = if max > min {
        let width = (max - min) / BUCKETS as f64;
        let mut counts = vec![0.0; BUCKETS];
        for &x in &xs {
            let i = (((x - min) / width) as usize).min(BUCKETS - 1);
            counts[i] += 1.0;
        }
        let mut limits: Vec<f64> = (1..=BUCKETS).map(|i| min + i as f64 * width).collect();
        limits[BUCKETS - 1] = max;
        (limits, counts)
    } else {
        (vec![max], vec![xs.len() as f64])
    };
    Some(proto::HistogramProto {
        min,
        max,
        num: xs.len() as f64,
        sum: xs.iter().sum(),
        sum_squares: xs.iter().map(|x| x * x).sum(),
        bucket_limit,
        bucket,
    })
}

/// transformers' `default_logdir` under `output_dir`: `runs/<%b%d_%H-%M-%S>_<host>`, local time.
pub fn default_logging_dir(output_dir: &Path) -> PathBuf {
    let time = chrono::Local::now().format("%b%d_%H-%M-%S");
    output_dir.join("runs").join(format!("{time}_{}", host()))
}

/// This machine's host name, safe in a file name.
fn host() -> String {
    gethostname::gethostname()
        .to_string_lossy()
        .chars()
        .map(|c| {
            if c == '/' || c == '\\' || c.is_control() {
                '_'
            } else {
                c
            }
        })
        .collect()
}

/// Whether `path` names an event file (TensorBoard's rule: `tfevents` in the file name).
fn is_event_file(path: &Path) -> bool {
    path.is_file()
        && path
            .file_name()
            .is_some_and(|n| n.to_string_lossy().contains("tfevents"))
}

/// The event files of `dir`, sorted by name (the order TensorBoard reads them in).
pub fn event_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(TrainError::Io {
                path: dir.to_path_buf(),
                source,
            })
        }
    };
    let mut out: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| is_event_file(p))
        .collect();
    out.sort();
    Ok(out)
}

/// The `<unix secs>` field of an event file's name.
fn file_secs(path: &Path) -> Option<u64> {
    let name = path.file_name()?.to_string_lossy().into_owned();
    name.split("tfevents.").nth(1)?.split('.').next()?.parse().ok()
}

/// The newest `<output_dir>/runs/*` directory holding event files (by the time in their
/// names), which a resumed run continues.
pub fn newest_logging_dir(output_dir: &Path) -> Option<PathBuf> {
    let runs = std::fs::read_dir(output_dir.join("runs")).ok()?;
    runs.flatten()
        .map(|e| e.path())
        .filter(|p| p.is_dir())
        .filter_map(|d| {
            let newest = event_files(&d).ok()?.iter().filter_map(|f| file_secs(f)).max()?;
            Some((newest, d))
        })
        .max()
        .map(|(_, d)| d)
}

/// The intact events of an event file, in order, and how the file ends (a record that does
/// not decode as an `Event` counts as damage and ends the events).
pub fn read_event_file(path: &Path) -> Result<(Vec<proto::Event>, record::Tail)> {
    let bytes = std::fs::read(path).map_err(|source| TrainError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let (records, mut tail) = record::read_records(&bytes);
    let mut events = Vec::with_capacity(records.len());
    let mut offset = 0u64;
    for r in records {
        match <proto::Event as prost::Message>::decode(r) {
            Ok(e) => events.push(e),
            Err(_) => {
                tail = record::Tail::Corrupt { offset };
                break;
            }
        }
        offset += r.len() as u64 + 16;
    }
    Ok((events, tail))
}

#[cfg(test)]
mod tests;
