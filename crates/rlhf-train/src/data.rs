//! Data files: rows of named columns, validated with the file and row number in every error.
//!
//! [`read_data`] picks the reader by extension:
//!
//! | extension  | reader           | a row is                                                    |
//! |------------|------------------|-------------------------------------------------------------|
//! | `.jsonl`   | [`read_jsonl`]   | one JSON object per line (or a file holding one JSON array) |
//! | `.json`    | [`read_jsonl`]   | the same                                                    |
//! | `.csv`     | [`read_csv`]     | one record under the header row; every field is text        |
//! | `.tsv`     | [`read_tsv`]     | the same, tab-separated                                     |
//! | `.parquet` | [`read_parquet`] | one Arrow row: text, numbers, booleans, lists, structs      |
//!
//! Row numbers in errors count data rows from 1: JSON Lines rows are lines, CSV rows are
//! records after the header (their line is named too, since a quoted field may span lines).
//! Every format fails on a file without rows, with the same message.
//!
//! Deliberate choices, where formats differ:
//! - CSV has no types, so every field is a string; [`Rows::opt_number`] therefore also accepts a
//!   numeric string, and reads an empty or blank string as "absent" (the empty cell of a CSV
//!   whose `margin` column is not filled on every row).
//! - Parquet columns of a type that has no JSON counterpart here (binary, dates, timestamps,
//!   decimals, maps, ...) are read as null with one warning per column, rather than failing
//!   files whose extra columns nobody asked for; a step that needs such a column then fails on
//!   [`Rows::text`] naming the row. Non-finite floats also become null, as JSON has no NaN.
//! - [`DataFiles::resolve`] maps a directory to its `train.*` and `validation.*` files.

mod csv_file;
mod files;
mod parquet_file;
mod prompts;

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::error::{Result, TrainError};

pub use csv_file::{read_csv, read_tsv};
pub use files::{DataFiles, VALIDATION_NAMES};
pub use parquet_file::read_parquet;
pub use prompts::{prompt_rows, read_prompt_rows, PromptRow, PromptSet, PROMPT_COLUMNS};

/// One data row: column name → text (and numbers, such as `margin`).
pub type Row = Map<String, Value>;

/// Rows read from a file, with the file kept for messages.
#[derive(Clone, Debug)]
pub struct Rows {
    /// The file.
    pub path: PathBuf,
    /// The rows in file order.
    pub rows: Vec<Row>,
}

/// The data formats [`read_data`] knows, by extension.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Format {
    /// `.jsonl`, `.json`: JSON Lines, or one JSON array of objects.
    Json,
    /// `.csv`: comma-separated with a header row.
    Csv,
    /// `.tsv`: tab-separated with a header row.
    Tsv,
    /// `.parquet`.
    Parquet,
}

/// The extensions [`read_data`] accepts, for messages.
pub const SUPPORTED_EXTENSIONS: &str = "`.jsonl`, `.json`, `.csv`, `.tsv`, `.parquet`";

impl Format {
    /// The format of `path` by its extension (case-insensitive), if supported.
    fn of(path: &Path) -> Option<Self> {
        let ext = path.extension()?.to_str()?.to_ascii_lowercase();
        match ext.as_str() {
            "jsonl" | "json" => Some(Self::Json),
            "csv" => Some(Self::Csv),
            "tsv" => Some(Self::Tsv),
            "parquet" => Some(Self::Parquet),
            _ => None,
        }
    }
}

/// Reads a data file, choosing the reader by extension (see the [module docs](self)).
///
/// An unknown extension is a [`TrainError::Data`] that lists the supported ones.
pub fn read_data(path: &Path) -> Result<Rows> {
    match Format::of(path) {
        Some(Format::Json) => read_jsonl(path),
        Some(Format::Csv) => read_csv(path),
        Some(Format::Tsv) => read_tsv(path),
        Some(Format::Parquet) => read_parquet(path),
        None => {
            let ext = path.extension().map(|e| format!("`.{}`", e.to_string_lossy()));
            Err(TrainError::Data {
                path: path.to_path_buf(),
                msg: format!(
                    "unknown data format {}; hint: use one of {SUPPORTED_EXTENSIONS} \
                     (compressed files must be decompressed first)",
                    ext.as_deref().unwrap_or("(no extension)")
                ),
            })
        }
    }
}

/// The error of a data set without rows, the same for every format; `detail` may say more.
pub(crate) fn no_rows(path: &Path, detail: &str) -> TrainError {
    TrainError::Data {
        path: path.to_path_buf(),
        msg: format!("no rows: the file is empty{detail}"),
    }
}

/// The IO error of `path`.
pub(crate) fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> TrainError + '_ {
    move |source| TrainError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Reads a JSON Lines file: one JSON object per line; blank lines are skipped.
///
/// A file whose first character is `[` is read as one JSON array of objects instead (what
/// `json.dump(rows)` writes); its rows are the array's elements, counted from 1.
pub fn read_jsonl(path: &Path) -> Result<Rows> {
    let bytes = std::fs::read(path).map_err(io_err(path))?;
    let bytes = bytes.strip_prefix(b"\xef\xbb\xbf").unwrap_or(&bytes);
    let rows = if bytes.trim_ascii_start().starts_with(b"[") {
        json_array(path, bytes)?
    } else {
        json_lines(path, bytes)?
    };
    if rows.is_empty() {
        return Err(no_rows(path, ""));
    }
    Ok(Rows {
        path: path.to_path_buf(),
        rows,
    })
}

fn json_lines(path: &Path, bytes: &[u8]) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    for (i, line) in bytes.split(|&b| b == b'\n').enumerate() {
        let row = i + 1;
        let err = |msg: String| TrainError::Row {
            path: path.to_path_buf(),
            row,
            msg,
        };
        let line = std::str::from_utf8(line)
            .map_err(|e| err(format!("not valid UTF-8 ({e}); hint: re-encode the file as UTF-8")))?;
        let line = line.trim_end_matches('\r');
        if line.trim().is_empty() {
            continue;
        }
        let v: Value = serde_json::from_str(line).map_err(|e| err(format!("malformed JSON: {e}")))?;
        match v {
            Value::Object(m) => rows.push(m),
            other => return Err(err(format!("expected a JSON object, found {}", kind(&other)))),
        }
    }
    Ok(rows)
}

fn json_array(path: &Path, bytes: &[u8]) -> Result<Vec<Row>> {
    let values: Vec<Value> = serde_json::from_slice(bytes).map_err(|e| TrainError::Data {
        path: path.to_path_buf(),
        msg: format!("malformed JSON array: {e}; hint: write one JSON object per line (JSON Lines)"),
    })?;
    values
        .into_iter()
        .enumerate()
        .map(|(i, v)| match v {
            Value::Object(m) => Ok(m),
            other => Err(TrainError::Row {
                path: path.to_path_buf(),
                row: i + 1,
                msg: format!("expected a JSON object, found {}", kind(&other)),
            }),
        })
        .collect()
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// The start of `s` for a message: at most 40 characters, quoted.
fn preview(s: &str) -> String {
    match s.char_indices().nth(40) {
        Some((end, _)) => format!("{:?}...", &s[..end]),
        None => format!("{s:?}"),
    }
}

impl Rows {
    /// Number of rows.
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    /// Whether there are no rows.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    fn row_err(&self, idx: usize, msg: String) -> TrainError {
        TrainError::Row {
            path: self.path.clone(),
            row: idx + 1,
            msg,
        }
    }

    /// Checks that the first row has every column in `required` (CSV and Parquet rows all
    /// share the header's or schema's columns; a JSON Lines row is checked again by
    /// [`Rows::text`]).
    ///
    /// The error names every missing column, the columns present, a present column that
    /// differs only in case or surrounding spaces, and the columns this step needs.
    pub fn require_columns(&self, required: &[&str]) -> Result<()> {
        let Some(first) = self.rows.first() else {
            return Err(no_rows(&self.path, ""));
        };
        let missing: Vec<&str> = required.iter().copied().filter(|c| !first.contains_key(*c)).collect();
        if missing.is_empty() {
            return Ok(());
        }
        let quoted = |cols: &[&str]| cols.iter().map(|c| format!("`{c}`")).collect::<Vec<_>>().join(", ");
        let mut msg = format!(
            "missing column{} {} (columns present: {})",
            if missing.len() > 1 { "s" } else { "" },
            quoted(&missing),
            self.columns(0).join(", ")
        );
        for m in &missing {
            if let Some(near) = first.keys().find(|k| k.trim().eq_ignore_ascii_case(m)) {
                msg.push_str(&format!("; `{near}` differs from `{m}` only in case or spaces"));
            }
        }
        msg.push_str(&format!(
            "; hint: this step needs the columns {}; rename the file's columns to match",
            quoted(required)
        ));
        Err(TrainError::Data {
            path: self.path.clone(),
            msg,
        })
    }

    /// The text in column `col` of row `idx` (0-based), or an error naming the row.
    pub fn text(&self, idx: usize, col: &str) -> Result<&str> {
        match self.rows[idx].get(col) {
            Some(Value::String(s)) => Ok(s),
            Some(other) => Err(self.row_err(idx, format!("column `{col}` must be a string, found {}", kind(other)))),
            None => Err(self.row_err(
                idx,
                format!(
                    "missing column `{col}` (columns present: {})",
                    self.columns(idx).join(", ")
                ),
            )),
        }
    }

    /// The text in column `col` if present (an error if present but not a string).
    pub fn opt_text(&self, idx: usize, col: &str) -> Result<Option<&str>> {
        match self.rows[idx].get(col) {
            None | Some(Value::Null) => Ok(None),
            Some(_) => self.text(idx, col).map(Some),
        }
    }

    /// The number in column `col` if present.
    ///
    /// A string holding a finite number (`"1.5"`, as every CSV field is text) counts as that
    /// number; an empty or blank string counts as absent (an empty CSV cell).
    pub fn opt_number(&self, idx: usize, col: &str) -> Result<Option<f64>> {
        match self.rows[idx].get(col) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Number(n)) => Ok(n.as_f64()),
            Some(Value::String(s)) if s.trim().is_empty() => Ok(None),
            Some(Value::String(s)) => match s.trim().parse::<f64>() {
                Ok(x) if x.is_finite() => Ok(Some(x)),
                _ => Err(self.row_err(
                    idx,
                    format!("column `{col}` must be a finite number, found the text {}", preview(s)),
                )),
            },
            Some(other) => Err(self.row_err(idx, format!("column `{col}` must be a number, found {}", kind(other)))),
        }
    }

    /// Whether row `idx` has column `col`.
    pub fn has(&self, idx: usize, col: &str) -> bool {
        self.rows[idx].get(col).is_some_and(|v| !v.is_null())
    }

    fn columns(&self, idx: usize) -> Vec<String> {
        self.rows[idx].keys().map(|k| format!("`{k}`")).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(text: &str) -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), text).unwrap();
        f
    }

    fn one_row(row: Value) -> Rows {
        Rows {
            path: "mem.jsonl".into(),
            rows: vec![row.as_object().unwrap().clone()],
        }
    }

    #[test]
    fn malformed_json_names_the_row() {
        let f = write("{\"text\": \"a\"}\n{\"text\": \n");
        let err = read_jsonl(f.path()).unwrap_err().to_string();
        assert!(err.contains("row 2") && err.contains("malformed JSON"), "{err}");
    }

    #[test]
    fn an_empty_file_is_an_error() {
        let f = write("\n\n");
        let err = read_jsonl(f.path()).unwrap_err().to_string();
        assert!(err.contains("empty"), "{err}");
    }

    #[test]
    fn a_missing_column_lists_the_present_ones() {
        let f = write("{\"prompt\": \"p\", \"chosen\": \"c\"}\n");
        let rows = read_jsonl(f.path()).unwrap();
        let err = rows.text(0, "rejected").unwrap_err().to_string();
        assert!(
            err.contains("row 1") && err.contains("`rejected`") && err.contains("`chosen`"),
            "{err}"
        );
    }

    #[test]
    fn non_utf8_names_the_row() {
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), b"{\"text\": \"ok\"}\n{\"text\": \"\xff\"}\n").unwrap();
        let err = read_jsonl(f.path()).unwrap_err().to_string();
        assert!(err.contains("row 2") && err.contains("UTF-8"), "{err}");
    }

    #[test]
    fn a_byte_order_mark_before_the_first_line_is_skipped() {
        let f = write("\u{feff}{\"text\": \"a\"}\n");
        let rows = read_jsonl(f.path()).unwrap();
        assert_eq!(rows.text(0, "text").unwrap(), "a");
    }

    #[test]
    fn a_json_array_of_objects_is_read_as_rows() {
        let f = write("[\n  {\"text\": \"a\"},\n  {\"text\": \"b\"}\n]\n");
        let rows = read_jsonl(f.path()).unwrap();
        assert_eq!(
            (rows.text(0, "text").unwrap(), rows.text(1, "text").unwrap()),
            ("a", "b")
        );
        let f = write("[{\"text\": \"a\"}, 3]");
        let err = read_jsonl(f.path()).unwrap_err().to_string();
        assert!(err.contains("row 2") && err.contains("a number"), "{err}");
        let f = write("[]");
        let err = read_jsonl(f.path()).unwrap_err().to_string();
        assert!(err.contains("no rows"), "{err}");
    }

    #[test]
    fn opt_number_reads_numeric_strings_and_treats_blank_ones_as_absent() {
        let rows = one_row(serde_json::json!({"a": "1.5", "b": " -2 ", "c": "", "d": 3, "e": null}));
        assert_eq!(rows.opt_number(0, "a").unwrap(), Some(1.5));
        assert_eq!(rows.opt_number(0, "b").unwrap(), Some(-2.0));
        assert_eq!(rows.opt_number(0, "c").unwrap(), None);
        assert_eq!(rows.opt_number(0, "d").unwrap(), Some(3.0));
        assert_eq!(rows.opt_number(0, "e").unwrap(), None);
        assert_eq!(rows.opt_number(0, "absent").unwrap(), None);
    }

    #[test]
    fn opt_number_rejects_text_and_non_finite_strings_naming_the_row() {
        let rows = one_row(serde_json::json!({"a": "high", "b": "NaN", "c": true}));
        for col in ["a", "b", "c"] {
            let err = rows.opt_number(0, col).unwrap_err().to_string();
            assert!(err.contains("row 1") && err.contains(&format!("`{col}`")), "{err}");
        }
        assert!(rows.opt_number(0, "a").unwrap_err().to_string().contains("\"high\""));
    }

    #[test]
    fn require_columns_names_every_missing_column_and_the_present_ones() {
        let rows = one_row(serde_json::json!({"prompt": "p", "chosen": "c"}));
        rows.require_columns(&["prompt", "chosen"]).unwrap();
        let err = rows.require_columns(&["chosen", "rejected"]).unwrap_err().to_string();
        assert!(
            err.starts_with("mem.jsonl: missing column `rejected` (columns present: "),
            "{err}"
        );
        assert!(err.contains("`prompt`") && err.contains("hint: this step needs the columns `chosen`, `rejected`"));
        let err = rows.require_columns(&["x", "y"]).unwrap_err().to_string();
        assert!(err.contains("missing columns `x`, `y`"), "{err}");
    }

    #[test]
    fn require_columns_points_at_a_column_that_differs_only_in_case() {
        let rows = one_row(serde_json::json!({"Chosen": "c", "rejected ": "r"}));
        let err = rows.require_columns(&["chosen", "rejected"]).unwrap_err().to_string();
        assert!(err.contains("`Chosen` differs from `chosen`"), "{err}");
        assert!(err.contains("`rejected ` differs from `rejected`"), "{err}");
    }

    #[test]
    fn the_format_follows_the_extension_in_any_case() {
        assert_eq!(Format::of(Path::new("a/b.JSONL")), Some(Format::Json));
        assert_eq!(Format::of(Path::new("b.json")), Some(Format::Json));
        assert_eq!(Format::of(Path::new("b.Csv")), Some(Format::Csv));
        assert_eq!(Format::of(Path::new("b.tsv")), Some(Format::Tsv));
        assert_eq!(Format::of(Path::new("b.parquet")), Some(Format::Parquet));
        assert_eq!(Format::of(Path::new("b.jsonl.gz")), None);
        assert_eq!(Format::of(Path::new("jsonl")), None);
    }

    #[test]
    fn a_long_text_is_cut_in_messages() {
        assert_eq!(preview("ab"), "\"ab\"");
        assert_eq!(preview(&"é".repeat(50)), format!("{:?}...", "é".repeat(40)));
    }
}
