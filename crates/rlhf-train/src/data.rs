//! Data files: rows of named text columns, validated with the file and row number in
//! every error.

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::error::{Result, TrainError};

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

/// Reads a JSON Lines file: one JSON object per line; blank lines are skipped.
pub fn read_jsonl(path: &Path) -> Result<Rows> {
    let bytes = std::fs::read(path).map_err(|source| TrainError::Io {
        path: path.to_path_buf(),
        source,
    })?;
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
    if rows.is_empty() {
        return Err(TrainError::Data {
            path: path.to_path_buf(),
            msg: "no rows: the file is empty".into(),
        });
    }
    Ok(Rows {
        path: path.to_path_buf(),
        rows,
    })
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
    pub fn opt_number(&self, idx: usize, col: &str) -> Result<Option<f64>> {
        match self.rows[idx].get(col) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Number(n)) => Ok(n.as_f64()),
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
}
