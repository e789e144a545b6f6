//! The run directory: resolved `config.toml`, `metrics.jsonl`, atomic `checkpoint-<step>/`
//! directories (written under a temporary name, then renamed), rotation, and resume; with
//! `report_to = ["tensorboard"]` the metrics and config also go to TensorBoard
//! ([`crate::tensorboard`]).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::{Device, Tensor};
use serde_json::Value;

use crate::error::{Result, TrainError};

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> TrainError + '_ {
    move |source| TrainError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A training run's output directory.
#[derive(Clone, Debug)]
pub struct RunDir {
    /// The directory.
    pub root: PathBuf,
    /// The TensorBoard writer ([`RunDir::with_reporting`]), shared by clones.
    pub(crate) tensorboard: Option<Arc<Mutex<crate::tensorboard::EventWriter>>>,
}

impl RunDir {
    /// Creates (or reopens) `root`. A directory that already holds a run is refused unless
    /// `overwrite` (its checkpoints and metrics are then removed) or `resuming`. Temporary
    /// directories of a run killed while saving are removed. With several ranks, rank 0 does
    /// this and every rank gets its outcome ([`crate::dist::Collective::on_main`]).
    pub fn prepare(root: &Path, overwrite: bool, resuming: bool) -> Result<Self> {
        crate::dist::world().on_main(|| Self::prepare_here(root, overwrite, resuming))?;
        Ok(Self {
            root: root.to_path_buf(),
            tensorboard: None,
        })
    }

    fn prepare_here(root: &Path, overwrite: bool, resuming: bool) -> Result<()> {
        let holds_run = root.join("metrics.jsonl").exists() || root.join("config.toml").exists();
        if holds_run && !resuming {
            if !overwrite {
                return Err(TrainError::Data {
                    path: root.to_path_buf(),
                    msg: "the output directory already holds a run\n\
                          hint: pass --overwrite-output-dir to replace it, --resume-from-checkpoint latest to continue it, \
                          or choose another --output-dir"
                        .into(),
                });
            }
            for entry in std::fs::read_dir(root).map_err(io(root))? {
                let p = entry.map_err(io(root))?.path();
                let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_string();
                if name.starts_with("checkpoint-") || name == "final" || name == "plots" {
                    std::fs::remove_dir_all(&p).map_err(io(&p))?;
                } else if name == "metrics.jsonl" || name == "config.toml" {
                    std::fs::remove_file(&p).map_err(io(&p))?;
                }
            }
        }
        std::fs::create_dir_all(root).map_err(io(root))?;
        // Left by a run killed while it saved: never a checkpoint (the name), and no longer useful.
        for entry in std::fs::read_dir(root).map_err(io(root))? {
            let p = entry.map_err(io(root))?.path();
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            if p.is_dir() && name.ends_with(".tmp") && (name.starts_with(".checkpoint-") || name == ".final.tmp") {
                std::fs::remove_dir_all(&p).map_err(io(&p))?;
            }
        }
        Ok(())
    }

    /// Writes the resolved config and reports it as text to TensorBoard (rank 0).
    pub fn write_config(&self, toml: &str) -> Result<()> {
        crate::dist::world().on_main(|| {
            write_atomic(&self.root.join("config.toml"), toml.as_bytes())?;
            self.report_config(toml)
        })
    }

    /// Appends one metrics object to `metrics.jsonl` and reports it to TensorBoard (rank 0;
    /// other ranks write nothing).
    pub fn log(&self, obj: &Value) -> Result<()> {
        if !crate::dist::world().is_main() {
            return Ok(());
        }
        let path = self.root.join("metrics.jsonl");
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(io(&path))?;
        writeln!(f, "{obj}").map_err(io(&path))?;
        self.report_metrics(obj)
    }

    /// Drops metrics lines (and TensorBoard events) logged after `step` (used when resuming
    /// from a checkpoint; rank 0).
    pub fn truncate_metrics_after(&self, step: u64) -> Result<()> {
        crate::dist::world().on_main(|| self.truncate_metrics_here(step))
    }

    fn truncate_metrics_here(&self, step: u64) -> Result<()> {
        let path = self.root.join("metrics.jsonl");
        let Ok(text) = std::fs::read_to_string(&path) else {
            return self.report_truncate(step, &path);
        };
        let kept: String = text
            .lines()
            .filter(|l| {
                serde_json::from_str::<Value>(l)
                    .ok()
                    .and_then(|v| v.get("step").and_then(Value::as_u64))
                    .is_some_and(|s| s <= step)
            })
            .map(|l| format!("{l}\n"))
            .collect();
        write_atomic(&path, kept.as_bytes())?;
        self.report_truncate(step, &path)
    }

    /// Completed checkpoints, oldest first.
    pub fn checkpoints(&self) -> Vec<(u64, PathBuf)> {
        let mut out: Vec<(u64, PathBuf)> = std::fs::read_dir(&self.root)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().to_string();
                let step = name.strip_prefix("checkpoint-")?.parse::<u64>().ok()?;
                let p = e.path();
                p.join("trainer_state.json").is_file().then_some((step, p))
            })
            .collect();
        out.sort();
        out
    }

    /// The `config.toml` a run resumed from `ckpt` was started with: this directory's, or
    /// that of the checkpoint's own run directory; `None` when neither has one.
    pub fn saved_config(&self, ckpt: &Path) -> Option<PathBuf> {
        let here = self.root.join("config.toml");
        let beside = ckpt.parent().map(|run| run.join("config.toml"));
        std::iter::once(here).chain(beside).find(|p| p.is_file())
    }

    /// `checkpoint-<step>/` if it is complete.
    pub fn complete_checkpoint(&self, step: u64) -> Option<PathBuf> {
        let dir = self.root.join(format!("checkpoint-{step}"));
        dir.join("trainer_state.json").is_file().then_some(dir)
    }

    /// Resolves `--resume-from-checkpoint`: `latest` or a path.
    pub fn resolve_checkpoint(&self, spec: &str) -> Result<PathBuf> {
        if spec == "latest" {
            return self
                .checkpoints()
                .pop()
                .map(|(_, p)| p)
                .ok_or_else(|| TrainError::Data {
                    path: self.root.clone(),
                    msg: "no complete checkpoint-<step>/ to resume from".into(),
                });
        }
        let p = PathBuf::from(spec);
        if p.join("trainer_state.json").is_file() {
            Ok(p)
        } else {
            Err(TrainError::Data {
                path: p,
                msg: "not a checkpoint directory (no trainer_state.json)".into(),
            })
        }
    }

    /// Writes `checkpoint-<step>/` atomically: `write` fills a temporary directory, which is
    /// then renamed into place; afterwards only the newest `limit` checkpoints are kept.
    /// If anything fails, earlier checkpoints are untouched. With several ranks, rank 0
    /// writes and every rank returns once the checkpoint is complete.
    pub fn save_checkpoint(
        &self,
        step: u64,
        limit: Option<usize>,
        write: impl FnOnce(&Path) -> Result<()>,
    ) -> Result<PathBuf> {
        let dst = self.root.join(format!("checkpoint-{step}"));
        crate::dist::world().on_main(|| {
            write_dir_atomic(&self.root.join(format!(".checkpoint-{step}.tmp")), &dst, write)?;
            if let Some(limit) = limit.filter(|&l| l > 0) {
                let all = self.checkpoints();
                for (_, p) in all.iter().take(all.len().saturating_sub(limit)) {
                    std::fs::remove_dir_all(p).map_err(io(p))?;
                }
            }
            Ok(())
        })?;
        Ok(dst)
    }

    /// Writes `final/` atomically (a temporary directory renamed into place; rank 0).
    pub fn save_final(&self, write: impl FnOnce(&Path) -> Result<()>) -> Result<PathBuf> {
        let dir = self.root.join("final");
        crate::dist::world().on_main(|| write_dir_atomic(&self.root.join(".final.tmp"), &dir, write))?;
        Ok(dir)
    }
}

/// Fills `tmp` with `write`, then renames it to `dst` (replacing an older `dst`); on failure
/// `tmp` is removed and `dst` is untouched.
fn write_dir_atomic(tmp: &Path, dst: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    if tmp.exists() {
        std::fs::remove_dir_all(tmp).map_err(io(tmp))?;
    }
    std::fs::create_dir_all(tmp).map_err(io(tmp))?;
    if let Err(e) = write(tmp) {
        let _ = std::fs::remove_dir_all(tmp);
        return Err(e);
    }
    if dst.exists() {
        std::fs::remove_dir_all(dst).map_err(io(dst))?;
    }
    std::fs::rename(tmp, dst).map_err(io(dst))
}

/// Writes a file via a temporary name and a rename (the model crate's writer).
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<()> {
    Ok(rlhf_models::weights::write_atomic(path, data)?)
}

/// Saves named tensors to a safetensors file.
pub fn save_tensors(tensors: &BTreeMap<String, Tensor>, path: &Path) -> Result<()> {
    Ok(rlhf_models::weights::save_safetensors(tensors, path)?)
}

/// Loads every tensor of a safetensors file (f32).
pub fn load_tensors(path: &Path) -> Result<BTreeMap<String, Tensor>> {
    let bytes = std::fs::read(path).map_err(io(path))?;
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| TrainError::Checkpoint(format!("{}: {e}", path.display())))?;
    let mut out = BTreeMap::new();
    for (name, view) in st.tensors() {
        if view.dtype() != safetensors::Dtype::F32 {
            return Err(TrainError::Checkpoint(format!(
                "{}: tensor `{name}` is not f32",
                path.display()
            )));
        }
        let t = Tensor::from_raw_buffer(view.data(), candle_core::DType::F32, view.shape(), &Device::Cpu)?;
        out.insert(name, t);
    }
    Ok(out)
}
