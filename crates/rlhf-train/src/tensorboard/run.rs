//! The run directory's side of reporting: [`RunDir`] holds the TensorBoard writer (shared by
//! its clones) and feeds it from `log`, `write_config` and `truncate_metrics_after`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use serde_json::Value;

use super::{default_logging_dir, newest_logging_dir, EventWriter, ReportArgs, TagStyle};
use crate::checkpoint::RunDir;
use crate::error::Result;

impl RunDir {
    /// Turns on the integrations of `report`: with TensorBoard, opens its `logging_dir` (or
    /// the default; a resumed run continues the newest `<output_dir>/runs/*` that holds
    /// event files). See [`EventWriter::open`] for `resuming` and `overwrite`.
    pub fn with_reporting(mut self, report: &ReportArgs, resuming: bool, overwrite: bool) -> Result<Self> {
        // With several ranks only rank 0 writes the run directory, event files included.
        if !report.report_to.has_tensorboard() || !crate::dist::world().is_main() {
            return Ok(self);
        }
        let dir = match &report.logging_dir {
            Some(d) => PathBuf::from(d),
            None => resuming
                .then(|| newest_logging_dir(&self.root))
                .flatten()
                .unwrap_or_else(|| default_logging_dir(&self.root)),
        };
        let writer = EventWriter::open(&dir, resuming, overwrite)?;
        self.tensorboard = Some(Arc::new(Mutex::new(writer)));
        Ok(self)
    }

    /// Sets how metric names become TensorBoard tags (default [`TagStyle::Trainer`]).
    pub fn with_tag_style(self, style: TagStyle) -> Self {
        if let Some(mut w) = self.writer() {
            w.set_style(style);
        }
        self
    }

    /// The TensorBoard log directory, when reporting to TensorBoard.
    pub fn tensorboard_dir(&self) -> Option<PathBuf> {
        self.writer().map(|w| w.dir().to_path_buf())
    }

    /// Writes tensor statistics as TensorBoard histograms at `step` (nothing without
    /// TensorBoard; `metrics.jsonl` holds scalars only).
    pub fn log_histograms(&self, step: u64, tensors: &BTreeMap<String, Vec<f32>>) -> Result<()> {
        match self.writer() {
            Some(mut w) => w.log_histograms(step, tensors),
            None => Ok(()),
        }
    }

    /// [`RunDir::log`]'s TensorBoard half.
    pub(crate) fn report_metrics(&self, record: &Value) -> Result<()> {
        match self.writer() {
            Some(mut w) => w.log_metrics(record),
            None => Ok(()),
        }
    }

    /// [`RunDir::write_config`]'s TensorBoard half: the resolved config, with the resolved
    /// `logging_dir`, as the `args` text at step 0.
    pub(crate) fn report_config(&self, toml: &str) -> Result<()> {
        let Some(mut w) = self.writer() else {
            return Ok(());
        };
        let mut text = toml.trim_end().to_string();
        if !toml.lines().any(|l| l.starts_with("logging_dir")) {
            let dir = toml::Value::String(w.dir().display().to_string());
            text.push_str(&format!("\nlogging_dir = {dir}"));
        }
        w.log_text("args", &format!("```toml\n{text}\n```"), 0)
    }

    /// [`RunDir::truncate_metrics_after`]'s TensorBoard half (`metrics` is the cut-back
    /// `metrics.jsonl`): see [`EventWriter::truncate_after`].
    pub(crate) fn report_truncate(&self, step: u64, metrics: &Path) -> Result<()> {
        let Some(mut w) = self.writer() else {
            return Ok(());
        };
        let records: Vec<Value> = std::fs::read_to_string(metrics)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        w.truncate_after(step, &records)
    }

    fn writer(&self) -> Option<MutexGuard<'_, EventWriter>> {
        // A panic while writing leaves the writer usable: at worst its last record is cut off.
        self.tensorboard
            .as_ref()
            .map(|w| w.lock().unwrap_or_else(std::sync::PoisonError::into_inner))
    }
}
