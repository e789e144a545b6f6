//! [`EventWriter`]: one run's TensorBoard directory — appending events, and cutting older
//! files back to a checkpoint's step on resume.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use prost::Message;
use serde_json::Value;

use super::proto::{event, session_log, summary_value, Event, SessionLog, Summary, SummaryValue};
use super::{event_files, file_secs, histogram, host, proto, record, tag_of, TagStyle};
use crate::error::{Result, TrainError};

/// Distinguishes event files a process opens within one second.
static FILE_UID: AtomicU64 = AtomicU64::new(0);

/// The temporary name of a file being rewritten (no `tfevents` in it, so that TensorBoard
/// never reads a leftover).
const REWRITE_TMP: &str = ".rlhf-rewrite.tmp";

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> TrainError + '_ {
    move |source| TrainError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// The writer of one TensorBoard log directory. Its event file is created on the first
/// event; every call flushes, so a killed run loses at most the record it was writing.
#[derive(Debug)]
pub struct EventWriter {
    dir: PathBuf,
    style: TagStyle,
    file: Option<(PathBuf, BufWriter<File>)>,
    /// The last step written for each tag (in any file of the directory).
    last_step: BTreeMap<String, i64>,
    /// The time field a new file's name needs to sort after the directory's older files.
    not_before_secs: u64,
}

impl EventWriter {
    /// Opens `dir` (created if missing). A directory holding event files belongs to another
    /// run unless `resuming`: it is refused, or emptied of event files with `overwrite`.
    pub fn open(dir: &Path, resuming: bool, overwrite: bool) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let stale = dir.join(REWRITE_TMP);
        if stale.exists() {
            std::fs::remove_file(&stale).map_err(io(&stale))?;
        }
        let existing = event_files(dir)?;
        if !existing.is_empty() && !resuming {
            if !overwrite {
                return Err(TrainError::Data {
                    path: dir.to_path_buf(),
                    msg: "the TensorBoard logging_dir already holds event files of another run\n\
                          hint: choose another --logging-dir (or leave it unset for a new one under \
                          <output_dir>/runs/), pass --overwrite-output-dir to replace them, or \
                          --resume-from-checkpoint to continue that run"
                        .into(),
                });
            }
            for f in &existing {
                std::fs::remove_file(f).map_err(io(f))?;
            }
        }
        let mut w = Self {
            dir: dir.to_path_buf(),
            style: TagStyle::Trainer,
            file: None,
            last_step: BTreeMap::new(),
            not_before_secs: 0,
        };
        for f in event_files(dir)? {
            w.not_before_secs = w.not_before_secs.max(file_secs(&f).map_or(0, |s| s + 1));
            for e in super::read_event_file(&f)?.0 {
                w.note(&e);
            }
        }
        Ok(w)
    }

    /// The log directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The event file this writer appends to (`None` before its first event).
    pub fn file(&self) -> Option<&Path> {
        self.file.as_ref().map(|(p, _)| p.as_path())
    }

    /// Sets how metric names become tags.
    pub fn set_style(&mut self, style: TagStyle) {
        self.style = style;
    }

    /// Writes the numbers (and text) of one `metrics.jsonl` record as scalars at its `step`
    /// under [`tag_of`] names; a record without `step` is not written.
    pub fn log_metrics(&mut self, record: &Value) -> Result<()> {
        let Some((step, values)) = self.metric_values(record, |w, tag, step| w.seen(tag, step)) else {
            return Ok(());
        };
        for v in &values {
            self.last_step.insert(v.tag.clone(), step);
        }
        self.write_summary(step, values)?;
        self.flush()
    }

    /// Writes each tensor statistic as a histogram at `step` (names as given; tensors with no
    /// finite value are skipped).
    pub fn log_histograms(&mut self, step: u64, tensors: &BTreeMap<String, Vec<f32>>) -> Result<()> {
        let step = step as i64;
        let mut values = Vec::new();
        for (name, xs) in tensors {
            let Some(h) = histogram(xs).filter(|_| !self.seen(name, step)) else {
                continue;
            };
            self.last_step.insert(name.clone(), step);
            values.push(SummaryValue {
                tag: name.clone(),
                metadata: None,
                value: Some(summary_value::Value::Histo(h)),
            });
        }
        self.write_summary(step, values)?;
        self.flush()
    }

    /// Writes `text` (rendered as Markdown by TensorBoard) under `<tag>/text_summary` at
    /// `step`, as `SummaryWriter.add_text` does; skipped when that tag already has it.
    pub fn log_text(&mut self, tag: &str, text: &str, step: u64) -> Result<()> {
        let v = text_value(tag, text);
        if self.seen(&v.tag, step as i64) {
            return Ok(());
        }
        self.last_step.insert(v.tag.clone(), step as i64);
        self.write_summary(step as i64, vec![v])?;
        self.flush()
    }

    /// Resumes at `step`: cuts every other event file of the directory back to its events up
    /// to `step` and its intact records (rewriting it atomically), writes again the scalars of
    /// `metrics` (the run's `metrics.jsonl` records, already cut back) that no file holds, and
    /// writes a `SessionLog.START` at `step + 1`.
    pub fn truncate_after(&mut self, step: u64, metrics: &[Value]) -> Result<()> {
        self.flush()?;
        let step = step as i64;
        let own = self.file().map(Path::to_path_buf);
        self.last_step.clear();
        // (tag → steps) of every value the files keep.
        let mut present: BTreeMap<String, BTreeSet<i64>> = BTreeMap::new();
        for path in event_files(&self.dir)? {
            let rewrite = own.as_deref() != Some(path.as_path());
            for e in self.cut_back(&path, step, rewrite)? {
                self.note(&e);
                if let Some(event::What::Summary(s)) = &e.what {
                    for v in &s.value {
                        present.entry(v.tag.clone()).or_default().insert(e.step);
                    }
                }
            }
        }
        for m in metrics {
            let in_files = |_: &Self, tag: &str, s: i64| present.get(tag).is_some_and(|steps| steps.contains(&s));
            if let Some((s, values)) = self.metric_values(m, in_files) {
                for v in &values {
                    let last = self.last_step.entry(v.tag.clone()).or_insert(s);
                    *last = (*last).max(s);
                    present.entry(v.tag.clone()).or_default().insert(s);
                }
                self.write_summary(s, values)?;
            }
        }
        let start = SessionLog {
            status: session_log::Status::Start as i32,
        };
        self.write_event(step + 1, event::What::SessionLog(start))?;
        self.flush()
    }

    /// The events of `path` up to `step`, read until its first damaged or incomplete record;
    /// with `rewrite`, the file is replaced by those events' records when anything was left
    /// out.
    fn cut_back(&self, path: &Path, step: i64, rewrite: bool) -> Result<Vec<Event>> {
        let bytes = std::fs::read(path).map_err(io(path))?;
        let (records, tail) = record::read_records(&bytes);
        let (mut kept, mut events) = (Vec::new(), Vec::new());
        let mut damaged = tail != record::Tail::Clean;
        for r in &records {
            match Event::decode(*r) {
                Ok(e) if e.step <= step => {
                    kept.push(*r);
                    events.push(e);
                }
                Ok(_) => {}
                Err(_) => {
                    damaged = true;
                    break;
                }
            }
        }
        if rewrite && (damaged || kept.len() < records.len()) {
            let why = if damaged {
                " (the rest was damaged or cut off)"
            } else {
                ""
            };
            tracing::warn!(
                "{}: resuming at step {step}: kept {} of its events{why}",
                path.display(),
                kept.len()
            );
            self.rewrite(path, &kept)?;
        }
        Ok(events)
    }

    /// The step and the summary values of a metrics record, without those `skip` rejects.
    fn metric_values(
        &self,
        record: &Value,
        skip: impl Fn(&Self, &str, i64) -> bool,
    ) -> Option<(i64, Vec<SummaryValue>)> {
        let obj = record.as_object()?;
        let step = obj.get("step")?.as_u64()? as i64;
        let mut values = Vec::new();
        for (key, v) in obj.iter().filter(|(k, _)| k.as_str() != "step") {
            let tag = tag_of(self.style, key);
            let value = match v {
                Value::Number(n) => n.as_f64().map(|x| scalar_value(&tag, x)),
                Value::Bool(b) => Some(scalar_value(&tag, f64::from(u8::from(*b)))),
                Value::String(s) => Some(text_value(&tag, s)),
                _ => None,
            };
            if let Some(value) = value.filter(|v| !skip(self, &v.tag, step)) {
                values.push(value);
            }
        }
        Some((step, values))
    }

    /// Whether `tag` already has a value at `step` or later.
    fn seen(&self, tag: &str, step: i64) -> bool {
        self.last_step.get(tag).is_some_and(|&s| s >= step)
    }

    /// Records the tags of an event read back from a file.
    fn note(&mut self, e: &Event) {
        if let Some(event::What::Summary(s)) = &e.what {
            for v in &s.value {
                let last = self.last_step.entry(v.tag.clone()).or_insert(e.step);
                *last = (*last).max(e.step);
            }
        }
    }

    fn write_summary(&mut self, step: i64, value: Vec<SummaryValue>) -> Result<()> {
        if value.is_empty() {
            return Ok(());
        }
        self.write_event(step, event::What::Summary(Summary { value }))
    }

    fn write_event(&mut self, step: i64, what: event::What) -> Result<()> {
        let e = Event {
            wall_time: now(),
            step,
            what: Some(what),
        };
        let bytes = e.encode_to_vec();
        let (path, f) = self.open_file()?;
        record::write_record(f, &bytes).map_err(io(path))
    }

    /// The open event file, created (with its `file_version` event) on first use.
    fn open_file(&mut self) -> Result<(&Path, &mut BufWriter<File>)> {
        if self.file.is_none() {
            let secs = (now() as u64).max(self.not_before_secs);
            let (host, pid) = (host(), std::process::id());
            let path = loop {
                let uid = FILE_UID.fetch_add(1, Ordering::Relaxed);
                let p = self
                    .dir
                    .join(format!("events.out.tfevents.{secs:010}.{host}.{pid}.{uid}"));
                if !p.exists() {
                    break p;
                }
            };
            let f = File::create_new(&path).map_err(io(&path))?;
            let mut f = BufWriter::new(f);
            let version = Event {
                wall_time: now(),
                step: 0,
                what: Some(event::What::FileVersion("brain.Event:2".into())),
            };
            record::write_record(&mut f, &version.encode_to_vec()).map_err(io(&path))?;
            self.file = Some((path, f));
        }
        let (p, f) = self.file.as_mut().expect("invariant: the file was opened above");
        Ok((p.as_path(), f))
    }

    fn flush(&mut self) -> Result<()> {
        match &mut self.file {
            Some((p, f)) => f.flush().map_err(io(p)),
            None => Ok(()),
        }
    }

    /// Replaces `path` by a file of `records` (via a temporary file and a rename).
    fn rewrite(&self, path: &Path, records: &[&[u8]]) -> Result<()> {
        let tmp = self.dir.join(REWRITE_TMP);
        {
            let mut f = BufWriter::new(File::create(&tmp).map_err(io(&tmp))?);
            for r in records {
                record::write_record(&mut f, r).map_err(io(&tmp))?;
            }
            let f = f.into_inner().map_err(|e| io(&tmp)(e.into_error()))?;
            f.sync_all().map_err(io(&tmp))?;
        }
        std::fs::rename(&tmp, path).map_err(io(path))
    }
}

/// A scalar summary value (`add_scalar`'s `simple_value`).
fn scalar_value(tag: &str, x: f64) -> SummaryValue {
    SummaryValue {
        tag: tag.to_string(),
        metadata: None,
        value: Some(summary_value::Value::SimpleValue(x as f32)),
    }
}

/// A text summary value as `add_text` writes it: tag `<tag>/text_summary`, a 1-element
/// `DT_STRING` tensor, metadata naming the `text` plugin.
fn text_value(tag: &str, text: &str) -> SummaryValue {
    let plugin = proto::PluginData {
        plugin_name: "text".into(),
        content: proto::TextPluginData { version: 0 }.encode_to_vec(),
    };
    SummaryValue {
        tag: format!("{tag}/text_summary"),
        metadata: Some(proto::SummaryMetadata {
            plugin_data: Some(plugin),
        }),
        value: Some(summary_value::Value::Tensor(proto::TensorProto {
            dtype: proto::DT_STRING,
            tensor_shape: Some(proto::TensorShapeProto {
                dim: vec![proto::Dim { size: 1 }],
            }),
            string_val: vec![text.as_bytes().to_vec()],
        })),
    }
}
