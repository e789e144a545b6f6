//! CSV and TSV files: the header row names the columns; every field is read as text.
//!
//! Quoting follows RFC 4180 (`"a, b"`, `"say ""hi"""`, a quoted field may span lines); a UTF-8
//! byte-order mark before the header is skipped; blank lines are skipped. Rows are counted from
//! 1 after the header, and errors also name the line where the row starts.

use std::path::Path;

use csv::{ByteRecord, ErrorKind, Position, ReaderBuilder};
use serde_json::Value;

use super::{io_err, no_rows, Row, Rows};
use crate::error::{Result, TrainError};

/// Reads a comma-separated file with a header row; every field becomes a JSON string.
pub fn read_csv(path: &Path) -> Result<Rows> {
    read_delimited(path, b',')
}

/// Reads a tab-separated file with a header row; every field becomes a JSON string.
pub fn read_tsv(path: &Path) -> Result<Rows> {
    read_delimited(path, b'\t')
}

fn read_delimited(path: &Path, delimiter: u8) -> Result<Rows> {
    let file = std::fs::File::open(path).map_err(io_err(path))?;
    let mut reader = ReaderBuilder::new()
        .delimiter(delimiter)
        .has_headers(true)
        .flexible(false)
        .from_reader(file);
    let header = reader
        .byte_headers()
        .map_err(|e| csv_err(path, e, delimiter, &[]))?
        .clone();
    if header.is_empty() {
        return Err(no_rows(path, ""));
    }
    let names = column_names(path, &header)?;
    let mut rows = Vec::new();
    for record in reader.byte_records() {
        let record = record.map_err(|e| csv_err(path, e, delimiter, &names))?;
        let (row, line) = locate(record.position());
        let mut fields = Row::new();
        for (name, field) in names.iter().zip(record.iter()) {
            let text = std::str::from_utf8(field).map_err(|e| TrainError::Row {
                path: path.to_path_buf(),
                row,
                msg: format!(
                    "line {line}: column `{name}` is not valid UTF-8 ({e}); hint: re-encode the file as UTF-8"
                ),
            })?;
            fields.insert(name.clone(), Value::String(text.to_owned()));
        }
        rows.push(fields);
    }
    if rows.is_empty() {
        return Err(no_rows(path, " (a header row but no data rows)"));
    }
    Ok(Rows {
        path: path.to_path_buf(),
        rows,
    })
}

/// The header's column names: UTF-8, each once.
fn column_names(path: &Path, header: &ByteRecord) -> Result<Vec<String>> {
    let err = |msg: String| TrainError::Data {
        path: path.to_path_buf(),
        msg,
    };
    let mut names: Vec<String> = Vec::with_capacity(header.len());
    for field in header {
        let name = std::str::from_utf8(field).map_err(|e| {
            err(format!(
                "the header row is not valid UTF-8 ({e}); hint: re-encode the file as UTF-8"
            ))
        })?;
        if names.iter().any(|n| n == name) {
            return Err(err(format!(
                "the header row names column `{name}` twice; hint: rename one of them"
            )));
        }
        names.push(name.to_owned());
    }
    Ok(names)
}

/// The 1-based data row (the header is record 0) and line of a record.
fn locate(pos: Option<&Position>) -> (usize, u64) {
    pos.map_or((0, 0), |p| (p.record() as usize, p.line()))
}

fn csv_err(path: &Path, e: csv::Error, delimiter: u8, names: &[String]) -> TrainError {
    let (row, line) = locate(e.position());
    let text = e.to_string();
    match e.into_kind() {
        ErrorKind::Io(source) => TrainError::Io {
            path: path.to_path_buf(),
            source,
        },
        ErrorKind::UnequalLengths { expected_len, len, .. } => TrainError::Row {
            path: path.to_path_buf(),
            row,
            msg: format!(
                "line {line}: expected {expected_len} fields as in the header ({}), found {len}; \
                 hint: a field that contains {} must be in double quotes",
                names.iter().map(|n| format!("`{n}`")).collect::<Vec<_>>().join(", "),
                if delimiter == b'\t' { "a tab" } else { "a comma" },
            ),
        },
        _ => TrainError::Data {
            path: path.to_path_buf(),
            msg: format!("malformed CSV: {text}"),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(bytes: &[u8]) -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), bytes).unwrap();
        f
    }

    #[test]
    fn every_field_is_text_and_quotes_follow_rfc_4180() {
        let f = write(b"\xef\xbb\xbfa,b\n\"x, \"\"y\"\"\",1.5\n\n,\n");
        let rows = read_csv(f.path()).unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows.text(0, "a").unwrap(), "x, \"y\"");
        assert_eq!(rows.text(0, "b").unwrap(), "1.5");
        assert_eq!(rows.opt_number(0, "b").unwrap(), Some(1.5));
        assert_eq!(
            (rows.text(1, "a").unwrap(), rows.opt_number(1, "b").unwrap()),
            ("", None)
        );
    }

    #[test]
    fn a_row_after_a_multi_line_field_is_named_with_its_line() {
        let f = write(b"a,b\n\"1\n2\",3\n4\n");
        let err = read_csv(f.path()).unwrap_err().to_string();
        assert!(err.contains("row 2: line 4: expected 2 fields"), "{err}");
    }

    #[test]
    fn a_short_row_is_an_error_naming_the_row() {
        let f = write(b"a,b\n1,2\n3\n");
        let err = read_csv(f.path()).unwrap_err().to_string();
        assert!(
            err.contains("row 2: line 3: expected 2 fields as in the header (`a`, `b`), found 1"),
            "{err}"
        );
    }

    #[test]
    fn non_utf8_names_the_row_line_and_column() {
        let f = write(b"a,b\n1,2\n3,\xff\n");
        let err = read_csv(f.path()).unwrap_err().to_string();
        assert!(err.contains("row 2: line 3: column `b` is not valid UTF-8"), "{err}");
        let f = write(b"a,\xff\n1,2\n");
        let err = read_csv(f.path()).unwrap_err().to_string();
        assert!(err.contains("the header row is not valid UTF-8"), "{err}");
    }

    #[test]
    fn a_column_named_twice_in_the_header_is_an_error() {
        let f = write(b"text,text\n1,2\n");
        let err = read_csv(f.path()).unwrap_err().to_string();
        assert!(err.contains("names column `text` twice"), "{err}");
    }

    #[test]
    fn tsv_fields_are_split_on_tabs_only() {
        let f = write(b"prompt\tchosen\nq, r\ta\n");
        let rows = read_tsv(f.path()).unwrap();
        assert_eq!(
            (rows.text(0, "prompt").unwrap(), rows.text(0, "chosen").unwrap()),
            ("q, r", "a")
        );
        let f = write(b"prompt\tchosen\nq\tr\ts\n");
        let err = read_tsv(f.path()).unwrap_err().to_string();
        assert!(err.contains("row 1: line 2") && err.contains("a tab"), "{err}");
    }
}
