//! Where the splits of a data set live: one file, or a directory of `train.*` and
//! `validation.*` files (the layout of a Hugging Face data set repository's split files).

use std::path::{Path, PathBuf};

use super::{io_err, Format, SUPPORTED_EXTENSIONS};
use crate::error::{Result, TrainError};

/// Names accepted for the validation split, in order of preference.
pub const VALIDATION_NAMES: [&str; 5] = ["validation", "valid", "val", "eval", "test"];

/// The data files of a run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DataFiles {
    /// The training split.
    pub train: PathBuf,
    /// The validation split, if the directory has one.
    pub validation: Option<PathBuf>,
}

impl DataFiles {
    /// Resolves `path`: a file is the training split alone; a directory must hold one
    /// `train.<ext>` and may hold a validation split named after the first of
    /// [`VALIDATION_NAMES`] present (`validation.csv`, else `valid.*`, `val.*`, `eval.*`,
    /// `test.*`). Only supported extensions count (see [`super::read_data`]).
    ///
    /// A directory without `train.*` is an error listing what it holds; two files for one
    /// split (`train.jsonl` and `train.csv`) are an error naming both.
    pub fn resolve(path: &Path) -> Result<Self> {
        if !std::fs::metadata(path).map_err(io_err(path))?.is_dir() {
            return Ok(Self {
                train: path.to_path_buf(),
                validation: None,
            });
        }
        let entries = list(path)?;
        let Some(train) = split(path, &entries, "train")? else {
            return Err(TrainError::Data {
                path: path.to_path_buf(),
                msg: format!(
                    "no `train.*` data file in this directory (it holds: {}); hint: name the training \
                     split `train` with one of the extensions {SUPPORTED_EXTENSIONS}, or pass the file itself",
                    listing(&entries)
                ),
            });
        };
        let mut validation = None;
        for name in VALIDATION_NAMES {
            validation = split(path, &entries, name)?;
            if validation.is_some() {
                break;
            }
        }
        Ok(Self { train, validation })
    }
}

/// A directory entry: its name, and whether it is a file (symbolic links followed).
struct Entry {
    name: String,
    is_file: bool,
}

/// The entries of `dir`, sorted by name.
fn list(dir: &Path) -> Result<Vec<Entry>> {
    let mut entries = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io_err(dir))? {
        let entry = entry.map_err(io_err(dir))?;
        entries.push(Entry {
            name: entry.file_name().to_string_lossy().into_owned(),
            is_file: entry.path().is_file(),
        });
    }
    entries.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(entries)
}

/// The one data file of split `stem` in `dir`, if any.
fn split(dir: &Path, entries: &[Entry], stem: &str) -> Result<Option<PathBuf>> {
    let found: Vec<&str> = entries
        .iter()
        .filter(|e| e.is_file && Path::new(&e.name).file_stem().is_some_and(|s| s == stem))
        .filter(|e| Format::of(Path::new(&e.name)).is_some())
        .map(|e| e.name.as_str())
        .collect();
    match found.as_slice() {
        [] => Ok(None),
        [one] => Ok(Some(dir.join(one))),
        several => Err(TrainError::Data {
            path: dir.to_path_buf(),
            msg: format!(
                "{} all hold the `{stem}` split; hint: keep one of them, or pass the file itself",
                several.iter().map(|n| format!("`{n}`")).collect::<Vec<_>>().join(", ")
            ),
        }),
    }
}

/// The entries for a message: directories end in `/`; at most 20 are named.
fn listing(entries: &[Entry]) -> String {
    if entries.is_empty() {
        return "nothing".into();
    }
    let mut names: Vec<String> = entries
        .iter()
        .take(20)
        .map(|e| format!("`{}{}`", e.name, if e.is_file { "" } else { "/" }))
        .collect();
    if entries.len() > 20 {
        names.push(format!("and {} more", entries.len() - 20));
    }
    names.join(", ")
}
