//! Data files end to end: the same preference rows from JSON Lines, CSV and Parquet; the
//! errors of malformed, truncated and empty files; split resolution in a directory.
//!
//! `tests/data/pairs.jsonl` and `tests/data/pairs.csv` are written by hand to hold the rows of
//! [`expected`]; the Parquet version is written by [`write_parquet`] from the same table.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow_array::{ArrayRef, Float64Array, RecordBatch, StringArray};
use parquet::arrow::ArrowWriter;
use rlhf_train::data::{read_csv, read_data, read_parquet, DataFiles};

/// A preference row: prompt, chosen, rejected, margin.
type Pair = (&'static str, &'static str, &'static str, Option<f64>);

/// The rows of `tests/data/pairs.*`.
fn expected() -> Vec<Pair> {
    vec![
        ("What is 2+2?", "4", "5", Some(1.5)),
        ("Greet me in Japanese", "こんにちは 👋", "héllo", Some(0.25)),
        (
            "Quote, please",
            "He said \"hi, there\"",
            "line one\nline two",
            Some(2.0),
        ),
        ("", "yes", "no", None),
    ]
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data").join(name)
}

fn write_parquet(path: &Path, columns: Vec<(&str, ArrayRef)>) {
    let batch = RecordBatch::try_from_iter(columns).unwrap();
    let mut writer = ArrowWriter::try_new(std::fs::File::create(path).unwrap(), batch.schema(), None).unwrap();
    writer.write(&batch).unwrap();
    writer.close().unwrap();
}

/// `pairs.parquet` in `dir`, from [`expected`].
fn pairs_parquet(dir: &Path) -> PathBuf {
    let rows = expected();
    let text = |f: fn(&Pair) -> &'static str| -> ArrayRef {
        Arc::new(StringArray::from(rows.iter().map(f).collect::<Vec<_>>()))
    };
    let path = dir.join("pairs.parquet");
    write_parquet(
        &path,
        vec![
            ("prompt", text(|r| r.0)),
            ("chosen", text(|r| r.1)),
            ("rejected", text(|r| r.2)),
            (
                "margin",
                Arc::new(Float64Array::from(rows.iter().map(|r| r.3).collect::<Vec<_>>())),
            ),
        ],
    );
    path
}

fn error_of(result: rlhf_train::Result<impl std::fmt::Debug>) -> String {
    result.unwrap_err().to_string()
}

#[test]
fn jsonl_csv_and_parquet_versions_of_a_file_give_the_same_rows() {
    let dir = tempfile::tempdir().unwrap();
    for path in [fixture("pairs.jsonl"), fixture("pairs.csv"), pairs_parquet(dir.path())] {
        let rows = read_data(&path).unwrap();
        rows.require_columns(&["prompt", "chosen", "rejected"]).unwrap();
        assert_eq!(rows.len(), expected().len(), "{}", path.display());
        for (i, (prompt, chosen, rejected, margin)) in expected().into_iter().enumerate() {
            let got = (
                rows.text(i, "prompt").unwrap(),
                rows.text(i, "chosen").unwrap(),
                rows.text(i, "rejected").unwrap(),
                rows.opt_number(i, "margin").unwrap(),
            );
            assert_eq!(
                got,
                (prompt, chosen, rejected, margin),
                "{} row {}",
                path.display(),
                i + 1
            );
        }
    }
}

#[test]
fn a_csv_with_a_wrong_header_fails_with_the_missing_column_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pairs.csv");
    std::fs::write(&path, "prompt,good,bad\nq,a,b\n").unwrap();
    let rows = read_csv(&path).unwrap();
    let err = error_of(rows.require_columns(&["prompt", "chosen", "rejected"]));
    assert!(err.contains("pairs.csv"), "{err}");
    assert!(err.contains("missing columns `chosen`, `rejected`"), "{err}");
    assert!(err.contains("`good`") && err.contains("`bad`"), "{err}");
    assert!(
        err.contains("hint: this step needs the columns `prompt`, `chosen`, `rejected`"),
        "{err}"
    );
}

#[test]
fn a_csv_row_with_an_extra_field_is_an_error_naming_the_row_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pairs.csv");
    std::fs::write(&path, "prompt,chosen,rejected\nq,\"a\nb\",c\nq,yes, I think so,no\n").unwrap();
    let err = error_of(read_data(&path));
    assert!(err.contains("pairs.csv: row 2: line 4: expected 3 fields"), "{err}");
    assert!(err.contains("found 4") && err.contains("double quotes"), "{err}");
}

#[test]
fn a_truncated_parquet_file_is_an_error_naming_the_file_with_a_hint() {
    let dir = tempfile::tempdir().unwrap();
    let path = pairs_parquet(dir.path());
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let err = error_of(read_parquet(&path));
    assert!(
        err.contains("pairs.parquet") && err.contains("cannot read Parquet"),
        "{err}"
    );
    assert!(err.contains("hint: the file may be truncated"), "{err}");
    // A file of another format under the Parquet extension fails the same way.
    std::fs::copy(fixture("pairs.csv"), &path).unwrap();
    assert!(error_of(read_data(&path)).contains("hint: the file may be truncated"));
}

#[test]
fn empty_files_in_every_format_are_the_no_rows_error() {
    let dir = tempfile::tempdir().unwrap();
    for (name, content) in [
        ("empty.jsonl", ""),
        ("blank.jsonl", "\n \n"),
        ("empty.json", "[]"),
        ("empty.csv", ""),
        ("header_only.csv", "prompt,chosen,rejected\n"),
        ("empty.tsv", ""),
        ("empty.parquet", ""),
    ] {
        let path = dir.path().join(name);
        std::fs::write(&path, content).unwrap();
        let err = error_of(read_data(&path));
        assert!(
            err.contains(name) && err.contains("no rows: the file is empty"),
            "{name}: {err}"
        );
    }
    // A Parquet file with a schema and no rows.
    let path = dir.path().join("no_rows.parquet");
    write_parquet(&path, vec![("text", Arc::new(StringArray::from(Vec::<&str>::new())))]);
    let err = error_of(read_data(&path));
    assert!(err.contains("no rows: the file is empty"), "{err}");
}

#[test]
fn a_directory_resolves_to_its_train_and_validation_files() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(fixture("pairs.jsonl"), dir.path().join("train.jsonl")).unwrap();
    std::fs::copy(fixture("pairs.csv"), dir.path().join("validation.csv")).unwrap();
    std::fs::copy(fixture("pairs.csv"), dir.path().join("test.csv")).unwrap();
    std::fs::write(dir.path().join("README.md"), "# pairs\n").unwrap();
    std::fs::write(dir.path().join("train.md"), "not data\n").unwrap();
    let files = DataFiles::resolve(dir.path()).unwrap();
    assert_eq!(
        files,
        DataFiles {
            train: dir.path().join("train.jsonl"),
            validation: Some(dir.path().join("validation.csv")),
        }
    );
    assert_eq!(read_data(&files.train).unwrap().len(), 4);
    assert_eq!(read_data(&files.validation.unwrap()).unwrap().len(), 4);
}

#[test]
fn the_validation_split_falls_back_through_valid_val_eval_and_test() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("train.csv"), "text\na\n").unwrap();
    assert_eq!(DataFiles::resolve(dir.path()).unwrap().validation, None);
    for name in ["test.parquet", "eval.jsonl", "val.tsv", "valid.json"] {
        std::fs::write(dir.path().join(name), "").unwrap();
        let files = DataFiles::resolve(dir.path()).unwrap();
        assert_eq!(files.validation, Some(dir.path().join(name)));
    }
}

#[test]
fn a_plain_file_resolves_to_a_train_split_alone() {
    let path = fixture("pairs.csv");
    let files = DataFiles::resolve(&path).unwrap();
    assert_eq!((files.train, files.validation), (path, None));
}

#[test]
fn a_directory_without_train_is_an_error_listing_what_it_holds() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("pairs.jsonl"), "{}\n").unwrap();
    std::fs::write(dir.path().join("train.txt"), "a\n").unwrap();
    std::fs::create_dir(dir.path().join("train")).unwrap();
    let err = error_of(DataFiles::resolve(dir.path()));
    assert!(err.contains("no `train.*` data file"), "{err}");
    assert!(
        err.contains("(it holds: `pairs.jsonl`, `train/`, `train.txt`)"),
        "{err}"
    );
    assert!(err.contains("`.jsonl`") && err.contains("`.parquet`"), "{err}");
}

#[test]
fn two_files_for_one_split_are_an_error_naming_both() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("train.jsonl"), "{}\n").unwrap();
    std::fs::write(dir.path().join("train.csv"), "a\n1\n").unwrap();
    let err = error_of(DataFiles::resolve(dir.path()));
    assert!(
        err.contains("`train.csv`, `train.jsonl` all hold the `train` split"),
        "{err}"
    );
}

#[test]
fn a_missing_path_is_an_io_error_naming_it() {
    let err = error_of(DataFiles::resolve(Path::new("/nonexistent/pairs")));
    assert!(err.contains("/nonexistent/pairs"), "{err}");
}

#[test]
fn an_unknown_extension_is_an_error_listing_the_supported_ones() {
    let dir = tempfile::tempdir().unwrap();
    for name in ["pairs.txt", "pairs.jsonl.gz", "pairs"] {
        let path = dir.path().join(name);
        std::fs::write(&path, "{}\n").unwrap();
        let err = error_of(read_data(&path));
        assert!(err.contains(name) && err.contains("unknown data format"), "{err}");
        assert!(err.contains("`.jsonl`, `.json`, `.csv`, `.tsv`, `.parquet`"), "{err}");
    }
}
