//! Property tests (proptest: generated inputs, shrunk on failure) for everything a user hands
//! the trainers before any training: data files in every format and config flags / TOML files.
//!
//! Properties: no input panics; every data error names the file, and a row error names a row
//! that exists (the exact row where the test knows it); every config error names its source
//! (the TOML file, or `flags`) and, for a bad key, the key. `cargo fuzz` needs nightly, hence
//! proptest; `PROPTEST_CASES=N` runs N cases per property instead of the counts below
//! (docs/reliability.md).

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use arrow_array::builder::{ListBuilder, StringBuilder};
use arrow_array::{ArrayRef, Float64Array, Int64Array, RecordBatch, StringArray};
use parquet::arrow::ArrowWriter;
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use rlhf_models::{LoadOptions, Model};
use rlhf_train::config::{parse_flags, read_toml, resolve};
use rlhf_train::data::{read_csv, read_data, read_jsonl, read_parquet, read_tsv, DataFiles, Rows};
use rlhf_train::ppo_config::PpoConfig;
use rlhf_train::ppo_run::{read_prompts, PpoRunConfig};
use rlhf_train::reward::{prepare_pairs, RewardConfig};
use rlhf_train::sft::{prepare_examples, SftConfig};
use rlhf_train::TrainError;
use serde_json::{Map, Value};

type TestResult = Result<(), TestCaseError>;

/// `cases` per property, unless `PROPTEST_CASES` says otherwise. Failures are not persisted
/// to `proptest-regressions/` (the shrunk input is printed instead).
fn config(cases: u32) -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(cases);
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// tiny-gpt2 (its tokenizer turns rows into pairs and examples), loaded once.
fn model() -> &'static Model {
    static MODEL: OnceLock<Model> = OnceLock::new();
    MODEL.get_or_init(|| {
        let dir = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../fixtures/tiny-gpt2"));
        Model::load(&dir, &LoadOptions::default()).expect("tiny-gpt2 loads")
    })
}

// ---------------------------------------------------------------------------------------
// Checks

/// The error names `file`; a row error names a row in `1..=max_row`.
fn names_file(err: &TrainError, file: &Path, max_row: usize) -> TestResult {
    let msg = err.to_string();
    prop_assert!(
        msg.contains(&file.display().to_string()),
        "error does not name {}: {msg}",
        file.display()
    );
    if let TrainError::Row { row, .. } = err {
        prop_assert!((1..=max_row).contains(row), "row {row} outside 1..={max_row}: {msg}");
    }
    Ok(())
}

/// A row accessor's error names the file and exactly row `idx + 1`.
fn names_row<T>(r: rlhf_train::Result<T>, rows: &Rows, idx: usize) -> TestResult {
    if let Err(e) = r {
        let msg = e.to_string();
        let want = format!("{}: row {}: ", rows.path.display(), idx + 1);
        prop_assert!(msg.starts_with(&want), "expected `{want}...`, got: {msg}");
    }
    Ok(())
}

/// JSON equality, numbers within a relative 1e-15 or below the smallest normal f64
/// (serde_json's default float parsing may differ from the shortest representation in the
/// last bit, and in more for subnormals).
fn same_json(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => match (x.as_f64(), y.as_f64()) {
            (Some(x), Some(y)) => {
                x == y || (x - y).abs() <= 1e-15 * x.abs().max(y.abs()) || (x - y).abs() < f64::MIN_POSITIVE
            }
            _ => x == y,
        },
        (Value::Array(x), Value::Array(y)) => x.len() == y.len() && x.iter().zip(y).all(|(a, b)| same_json(a, b)),
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len() && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| same_json(v, w)))
        }
        _ => a == b,
    }
}

/// The columns the trainers read (and near misses).
const COLUMNS: &[&str] = &[
    "prompt",
    "chosen",
    "rejected",
    "margin",
    "text",
    "completion",
    "query",
    "Chosen",
    " rejected",
];

/// Everything a trainer does with rows before training: every accessor on every row and
/// column, the column check, and the reward / SFT / PPO preparation. Errors must name the
/// file (and the row). (`read_prompts` reads the file itself, by extension.)
fn exercise(rows: &Rows) -> TestResult {
    let n = rows.len();
    for i in 0..n {
        for col in COLUMNS {
            names_row(rows.text(i, col), rows, i)?;
            names_row(rows.opt_text(i, col), rows, i)?;
            names_row(rows.opt_number(i, col), rows, i)?;
            let _ = rows.has(i, col);
        }
    }
    if let Err(e) = rows.require_columns(&["chosen", "rejected"]) {
        names_file(&e, &rows.path, n)?;
    }
    if let Err(e) = prepare_pairs(model(), rows, Some(64)) {
        names_file(&e, &rows.path, n)?;
    }
    let sft = SftConfig {
        max_length: Some(64),
        ..SftConfig::default()
    };
    if let Err(e) = prepare_examples(model(), rows, &sft) {
        names_file(&e, &rows.path, n)?;
    }
    Ok(())
}

/// Every reader on `bytes` saved as `name`: no panic, errors name the file; rows read are
/// exercised.
fn read_everything(dir: &Path, name: &str, bytes: &[u8]) -> TestResult {
    let path = dir.join(name);
    std::fs::write(&path, bytes).expect("invariant: the temp dir is writable");
    // A JSON Lines row is a line, a CSV row starts on a line (`\r` ends one too), a JSON
    // array's row is an element: none outnumbers the line ends and commas.
    let max_row = 1 + bytes.iter().filter(|&&b| matches!(b, b'\n' | b'\r' | b',')).count();
    type Reader = fn(&Path) -> rlhf_train::Result<Rows>;
    let readers: [Reader; 5] = [read_data, read_jsonl, read_csv, read_tsv, read_parquet];
    for read in readers {
        match no_panic(|| read(&path))? {
            Ok(rows) => {
                prop_assert!(!rows.is_empty(), "a reader returned no rows without an error");
                exercise(&rows)?;
            }
            Err(e) => names_file(&e, &path, max_row)?,
        }
    }
    if let Err(e) = no_panic(|| read_prompts(&path))? {
        names_file(&e, &path, max_row)?;
    }
    Ok(())
}

/// `f()`, or a failed case naming the panic's message.
fn no_panic<T>(f: impl FnOnce() -> T) -> Result<T, TestCaseError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).map_err(|payload| {
        let msg = payload
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default();
        TestCaseError::fail(format!("panicked: {msg}"))
    })
}

// ---------------------------------------------------------------------------------------
// Generators

/// Pieces of JSON, CSV, TOML and Parquet that random concatenation turns into near-valid files.
const FRAGMENTS: &[&[u8]] = &[
    b"{",
    b"}",
    b"[",
    b"]",
    b"\"",
    b":",
    b",",
    b"\n",
    b"\r\n",
    b"\t",
    b" ",
    b"\"prompt\"",
    b"\"chosen\"",
    b"\"rejected\"",
    b"\"margin\"",
    b"\"text\"",
    b"\"query\"",
    b"prompt,chosen,rejected,margin\n",
    b"prompt\tchosen\trejected\n",
    b"\"a, \"\"b\"\"\"",
    b"1.5",
    b"-1e400",
    b"null",
    b"true",
    b"\xef\xbb\xbf",
    b"\xff\xfe",
    b"\\u0000",
    b"\\ud800",
    b"\0",
    b"PAR1",
    b"\x15\x04\x15",
    b"=",
    b"learning_rate",
    b"[table]",
    b"'''",
    b"nan",
    b"1979-05-27T07:32:00Z",
];

/// Arbitrary bytes, or a random concatenation of [`FRAGMENTS`].
fn bytes() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..400),
        prop::collection::vec(prop::sample::select(FRAGMENTS.to_vec()), 0..48).prop_map(|v| v.concat()),
    ]
}

/// Any string, control characters, quotes and newlines included.
fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::collection::vec(any::<char>(), 0..24).prop_map(String::from_iter),
        prop::sample::select(vec![
            "", " ", "1.5", " -2 ", "NaN", "inf", "1e39", "a,b", "\"", "\r\n", "\u{feff}"
        ])
        .prop_map(String::from),
    ]
}

/// A finite JSON number of any magnitude.
fn number() -> impl Strategy<Value = Value> {
    prop_oneof![
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_map(|x| serde_json::Number::from_f64(x).map_or(Value::Null, Value::Number)),
        prop::sample::select(vec![0.0, -0.0, 1.5, 1e39, -1e300, f64::MAX, f64::MIN_POSITIVE]).prop_map(Value::from),
    ]
}

/// Any JSON value, mostly strings (the type the trainers want), nested up to 3 deep.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        6 => text().prop_map(Value::String),
        2 => number(),
        1 => Just(Value::Null),
        1 => any::<bool>().prop_map(Value::Bool),
    ];
    leaf.prop_recursive(3, 12, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map("[a-z]{0,6}", inner, 0..4).prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A row: a few of [`COLUMNS`] (or other names) with any values.
fn row() -> impl Strategy<Value = Map<String, Value>> {
    let name = prop_oneof![
        8 => prop::sample::select(COLUMNS.to_vec()).prop_map(String::from),
        1 => "[a-zA-Z _]{0,8}",
    ];
    prop::collection::btree_map(name, json_value(), 0..7).prop_map(|m| m.into_iter().collect())
}

/// How generated rows are written.
#[derive(Clone, Copy, Debug)]
enum Layout {
    JsonLines,
    JsonArray,
    Csv,
    Tsv,
}

/// `rows` in `layout`; CSV cells are the strings, or the JSON text of other values.
fn write_rows(rows: &[Map<String, Value>], layout: Layout) -> Vec<u8> {
    let json = |v: &Map<String, Value>| Value::Object(v.clone()).to_string();
    match layout {
        Layout::JsonLines => rows.iter().map(json).collect::<Vec<_>>().join("\n").into_bytes(),
        Layout::JsonArray => format!("[{}]", rows.iter().map(json).collect::<Vec<_>>().join(",\n")).into_bytes(),
        Layout::Csv | Layout::Tsv => {
            let mut header: Vec<&String> = Vec::new();
            for r in rows {
                for k in r.keys() {
                    if !header.contains(&k) {
                        header.push(k);
                    }
                }
            }
            let delimiter = if matches!(layout, Layout::Tsv) { b'\t' } else { b',' };
            let mut w = csv::WriterBuilder::new().delimiter(delimiter).from_writer(Vec::new());
            w.write_record(&header).expect("invariant: writing to memory");
            for r in rows {
                let cells: Vec<String> = header
                    .iter()
                    .map(|k| match r.get(*k) {
                        None => String::new(),
                        Some(Value::String(s)) => s.clone(),
                        Some(v) => v.to_string(),
                    })
                    .collect();
                w.write_record(&cells).expect("invariant: writing to memory");
            }
            w.into_inner().expect("invariant: writing to memory")
        }
    }
}

/// A valid Parquet file of preference rows with text, float, integer and list columns.
fn parquet_bytes(compression: Compression) -> Vec<u8> {
    let mut tags = ListBuilder::new(StringBuilder::new());
    for t in [vec![Some("a"), None], vec![], vec![Some("b")]] {
        tags.append_value(t);
    }
    let columns: Vec<(&str, ArrayRef)> = vec![
        (
            "prompt",
            Arc::new(StringArray::from(vec![Some("User: hi\nAssistant:"), None, Some("Q:")])),
        ),
        ("chosen", Arc::new(StringArray::from(vec![" Hello!", " Sure.", " yes"]))),
        (
            "rejected",
            Arc::new(StringArray::from(vec![" Go away.", " No.", " no"])),
        ),
        (
            "margin",
            Arc::new(Float64Array::from(vec![Some(1.5), None, Some(f64::NAN)])),
        ),
        ("n", Arc::new(Int64Array::from(vec![1, 2, 3]))),
        ("tags", Arc::new(tags.finish())),
    ];
    let batch = RecordBatch::try_from_iter(columns).expect("invariant: columns of one length");
    let props = WriterProperties::builder().set_compression(compression).build();
    let mut buf = Vec::new();
    let mut w = ArrowWriter::try_new(&mut buf, batch.schema(), Some(props)).expect("invariant: valid schema");
    w.write(&batch).expect("invariant: valid batch");
    w.close().expect("invariant: writing to memory");
    buf
}

/// Valid files of every format, to be truncated and mutated: (file name, bytes).
fn valid_files() -> &'static [(&'static str, Vec<u8>)] {
    static FILES: OnceLock<Vec<(&'static str, Vec<u8>)>> = OnceLock::new();
    FILES.get_or_init(|| {
        let rows: Vec<Map<String, Value>> = (0..3)
            .map(|i| {
                let v = serde_json::json!({"prompt": format!("User: q{i}\nAssistant:"), "chosen": " Sure, \"ok\".",
                                           "rejected": " No.", "margin": i as f64 * 0.5, "query": "Q"});
                v.as_object().cloned().expect("invariant: an object")
            })
            .collect();
        vec![
            ("d.jsonl", write_rows(&rows, Layout::JsonLines)),
            ("d.json", write_rows(&rows, Layout::JsonArray)),
            ("d.csv", write_rows(&rows, Layout::Csv)),
            ("d.tsv", write_rows(&rows, Layout::Tsv)),
            ("d.parquet", parquet_bytes(Compression::UNCOMPRESSED)),
            ("s.parquet", parquet_bytes(Compression::SNAPPY)),
        ]
    })
}

/// One edit of a file's bytes; positions are fractions of the length so that shrinking
/// keeps them in range.
#[derive(Clone, Debug)]
enum Mutation {
    Truncate(f64),
    Set(f64, u8),
    Insert(f64, Vec<u8>),
    Delete(f64, usize),
    /// Overwrites 4 bytes with a little-endian integer (lengths and offsets in Parquet).
    Int(f64, u32),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let at = 0.0..1.0f64;
    prop_oneof![
        at.clone().prop_map(Mutation::Truncate),
        (at.clone(), any::<u8>()).prop_map(|(p, b)| Mutation::Set(p, b)),
        (at.clone(), bytes()).prop_map(|(p, b)| Mutation::Insert(p, b)),
        (at.clone(), 1..64usize).prop_map(|(p, n)| Mutation::Delete(p, n)),
        (
            at,
            prop_oneof![any::<u32>(), Just(0), Just(u32::MAX), Just(i32::MAX as u32), 1..64u32]
        )
            .prop_map(|(p, v)| Mutation::Int(p, v)),
    ]
}

fn apply(bytes: &mut Vec<u8>, m: &Mutation) {
    let at = |p: f64, len: usize| ((p * len as f64) as usize).min(len);
    match m {
        Mutation::Truncate(p) => bytes.truncate(at(*p, bytes.len())),
        Mutation::Set(p, b) => {
            if !bytes.is_empty() {
                let i = at(*p, bytes.len() - 1);
                bytes[i] = *b;
            }
        }
        Mutation::Insert(p, b) => {
            let i = at(*p, bytes.len());
            bytes.splice(i..i, b.iter().copied());
        }
        Mutation::Delete(p, n) => {
            let i = at(*p, bytes.len());
            bytes.drain(i..(i + n).min(bytes.len()));
        }
        Mutation::Int(p, v) => {
            if bytes.len() >= 4 {
                let i = at(*p, bytes.len() - 4);
                bytes[i..i + 4].copy_from_slice(&v.to_le_bytes());
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Data properties

proptest! {
    #![proptest_config(config(4000))]

    /// Arbitrary bytes under every extension (and none): no panic, errors name the file.
    #[test]
    fn arbitrary_bytes_in_any_data_file_are_an_error_naming_it_or_rows(
        data in bytes(),
        ext in prop::sample::select(vec!["jsonl", "json", "csv", "tsv", "parquet", "txt", ""]),
    ) {
        let dir = tempfile::tempdir().expect("invariant: a temp dir");
        let name = if ext.is_empty() { "data".to_string() } else { format!("data.{ext}") };
        read_everything(dir.path(), &name, &data)?;
    }
}

proptest! {
    #![proptest_config(config(4000))]

    /// Rows of random JSON values (wrong types, missing and near-miss columns, odd text) in
    /// JSON Lines, a JSON array, CSV or TSV: every accessor and every trainer's preparation
    /// fails naming the file and the exact row, or succeeds.
    #[test]
    fn structured_but_wrong_rows_fail_naming_the_file_and_row(
        rows in prop::collection::vec(row(), 1..6),
        layout in prop::sample::select(vec![Layout::JsonLines, Layout::JsonArray, Layout::Csv, Layout::Tsv]),
    ) {
        let dir = tempfile::tempdir().expect("invariant: a temp dir");
        let ext = match layout {
            Layout::JsonLines => "jsonl",
            Layout::JsonArray => "json",
            Layout::Csv => "csv",
            Layout::Tsv => "tsv",
        };
        let path = dir.path().join(format!("rows.{ext}"));
        std::fs::write(&path, write_rows(&rows, layout)).expect("invariant: the temp dir is writable");
        match read_data(&path) {
            Ok(read) => {
                // Every generated row is a row of the file, in order (row i + 1 is rows[i]).
                prop_assert_eq!(read.len(), rows.len());
                if matches!(layout, Layout::JsonLines | Layout::JsonArray) {
                    let same = read.rows.iter().zip(&rows).all(|(a, b)| same_json(&a.clone().into(), &b.clone().into()));
                    prop_assert!(same, "read {:?}", read.rows);
                }
                exercise(&read)?;
                if let Err(e) = read_prompts(&path) {
                    names_file(&e, &path, rows.len())?;
                }
            }
            Err(e) => {
                // Only a CSV whose rows have no column at all has nothing to read.
                prop_assert!(matches!(layout, Layout::Csv | Layout::Tsv), "{}", e);
                names_file(&e, &path, rows.len())?;
            }
        }
    }
}

proptest! {
    #![proptest_config(config(6000))]

    /// Valid JSON Lines, JSON, CSV, TSV and Parquet (plain and Snappy) files, truncated and
    /// mutated: no panic, errors name the file.
    #[test]
    fn truncated_and_mutated_data_files_fail_naming_the_file(
        which in 0..6usize,
        edits in prop::collection::vec(mutation(), 1..4),
    ) {
        let (name, valid) = &valid_files()[which];
        let mut data = valid.clone();
        for m in &edits {
            apply(&mut data, m);
        }
        let dir = tempfile::tempdir().expect("invariant: a temp dir");
        read_everything(dir.path(), name, &data)?;
    }
}

proptest! {
    #![proptest_config(config(1000))]

    /// A `dataset_name` directory holding any mix of split files (and directories named like
    /// files): it resolves, or the error names the directory.
    #[test]
    fn any_dataset_directory_resolves_or_names_itself(
        entries in prop::collection::btree_set(
            prop::sample::select(vec![
                "train.jsonl", "train.csv", "TRAIN.JSONL", "train", "train.txt", "train.jsonl.gz",
                "validation.json", "valid.tsv", "val.parquet", "eval.csv", "test.jsonl", "test.csv",
                ".train.jsonl", "train.tsv/", "validation.parquet/", "x/",
            ]),
            0..7,
        ),
    ) {
        let dir = tempfile::tempdir().expect("invariant: a temp dir");
        for e in &entries {
            let p = dir.path().join(e.trim_end_matches('/'));
            if e.ends_with('/') {
                std::fs::create_dir_all(&p).expect("invariant: the temp dir is writable");
            } else {
                std::fs::write(&p, "{\"text\": \"a\"}\n").expect("invariant: the temp dir is writable");
            }
        }
        match DataFiles::resolve(dir.path()) {
            Ok(files) => {
                prop_assert!(files.train.is_file(), "{:?}", files);
                prop_assert!(files.validation.as_deref().is_none_or(Path::is_file), "{:?}", files);
            }
            Err(e) => names_file(&e, dir.path(), 0)?,
        }
    }
}

// ---------------------------------------------------------------------------------------
// Config properties

/// Every config key of the three trainers.
fn known_keys() -> &'static [String] {
    static KEYS: OnceLock<Vec<String>> = OnceLock::new();
    KEYS.get_or_init(|| {
        let mut keys = std::collections::BTreeSet::new();
        for v in [
            serde_json::to_value(RewardConfig::default()),
            serde_json::to_value(SftConfig::default()),
            serde_json::to_value(PpoRunConfig::default()),
        ] {
            if let Ok(Value::Object(m)) = v {
                keys.extend(m.keys().cloned());
            }
        }
        keys.into_iter().collect()
    })
}

/// A key: a known one, a near miss (a letter dropped, upper case, kebab case), or random.
fn key() -> impl Strategy<Value = String> {
    let known = || prop::sample::select(known_keys().to_vec());
    prop_oneof![
        6 => known(),
        1 => (known(), any::<prop::sample::Index>()).prop_map(|(k, i)| {
            let mut k = k;
            k.remove(i.index(k.len()));
            k
        }),
        1 => known().prop_map(|k| k.to_uppercase()),
        1 => known().prop_map(|k| k.replace('_', "-")),
        1 => "[a-z_]{1,12}",
        1 => text(),
    ]
}

/// A TOML value: mostly of the types configs hold, any value in range or not.
fn toml_value() -> impl Strategy<Value = toml::Value> {
    let leaf = prop_oneof![
        any::<i64>().prop_map(toml::Value::Integer),
        prop::sample::select(vec![0i64, 1, -1, 2, 1 << 32, i64::MAX]).prop_map(toml::Value::Integer),
        any::<f64>().prop_map(toml::Value::Float),
        prop::sample::select(vec![0.0, -1e-4, 1e30, f64::NAN, f64::INFINITY, 0.5, 1.0]).prop_map(toml::Value::Float),
        any::<bool>().prop_map(toml::Value::Boolean),
        text().prop_map(toml::Value::String),
        prop::sample::select(vec![
            "linear",
            "constant",
            "cosine",
            "no",
            "steps",
            "epoch",
            "kl",
            "abs",
            "full",
            "latest",
            "all-linear",
            "c_attn",
            "lora_only",
            "none",
        ])
        .prop_map(|s| toml::Value::String(s.into())),
    ];
    leaf.prop_recursive(2, 8, 3, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..3).prop_map(toml::Value::Array),
            prop::collection::btree_map("[a-z]{1,4}", inner, 0..3)
                .prop_map(|m| toml::Value::Table(m.into_iter().collect())),
        ]
    })
}

/// Resolves `values` into each trainer's config and validates it: errors name `source` and,
/// when they blame a key, a key of `values`; validation errors name a config key.
fn resolve_all(values: &Map<String, Value>, source: &str) -> TestResult {
    fn one<T: serde::Serialize + serde::de::DeserializeOwned + Default>(
        values: &Map<String, Value>,
        source: &str,
        validate: impl Fn(&T) -> rlhf_train::Result<()>,
    ) -> TestResult {
        match resolve::<T>(values, source) {
            Ok(cfg) => {
                if let Err(e) = validate(&cfg) {
                    let msg = e.to_string();
                    prop_assert!(msg.starts_with("config key `"), "{msg}");
                }
            }
            Err(e) => {
                let msg = e.to_string();
                prop_assert!(msg.starts_with(&format!("{source}: ")), "does not name {source}: {msg}");
                prop_assert!(
                    values.keys().any(|k| msg.contains(&format!("`{k}`"))),
                    "names none of the keys {:?}: {msg}",
                    values.keys().collect::<Vec<_>>()
                );
            }
        }
        Ok(())
    }
    one::<RewardConfig>(values, source, |c| c.args.validate())?;
    one::<SftConfig>(values, source, |c| c.args.validate())?;
    one::<PpoRunConfig>(values, source, |c| c.ppo.validate())
}

/// A command-line token: a flag (known, near miss or random; maybe `--key=value`) or a value.
fn flag_token() -> impl Strategy<Value = String> {
    let value = prop_oneof![
        prop::sample::select(vec![
            "true",
            "false",
            "nan",
            "inf",
            "-inf",
            "1e30",
            "-1",
            "0",
            "1e-4",
            "18446744073709551616",
            "[1, 2]",
            "[\"c_attn\"]",
            "{a = 1}",
            "\"quoted\"",
            "linear",
            "latest",
            "",
            "-",
            "--",
            "=",
            "1979-05-27",
        ])
        .prop_map(String::from),
        any::<i64>().prop_map(|x| x.to_string()),
        any::<f64>().prop_map(|x| x.to_string()),
        text(),
    ];
    prop_oneof![
        3 => key().prop_map(|k| format!("--{}", k.replace('_', "-"))),
        1 => (key(), value.clone()).prop_map(|(k, v)| format!("--{}={v}", k.replace('_', "-"))),
        3 => value,
    ]
}

proptest! {
    #![proptest_config(config(10000))]

    /// Random command lines: parsing fails naming the stray argument, or every trainer's
    /// config resolves or fails naming `flags` and the key.
    #[test]
    fn random_flags_fail_naming_the_source_and_key(args in prop::collection::vec(flag_token(), 0..10)) {
        match parse_flags(&args) {
            Ok(values) => resolve_all(&values, "flags")?,
            Err(e) => {
                let msg = e.to_string();
                prop_assert!(msg.starts_with("unexpected argument `"), "{msg}");
                prop_assert!(args.iter().any(|a| msg.contains(&format!("`{a}`"))), "{msg}");
            }
        }
    }
}

proptest! {
    #![proptest_config(config(5000))]

    /// Random keys and values written as a TOML config file: reading and resolving fail
    /// naming the file (and the key), or give a config that validates or names its bad key.
    #[test]
    fn random_keys_and_values_in_a_config_file_fail_naming_the_file_and_key(
        table in prop::collection::btree_map(key(), toml_value(), 0..8),
    ) {
        let dir = tempfile::tempdir().expect("invariant: a temp dir");
        let path = dir.path().join("train.toml");
        let table: toml::Table = table.into_iter().collect();
        let text = toml::to_string(&table).expect("invariant: a table serialises");
        std::fs::write(&path, &text).expect("invariant: the temp dir is writable");
        let source = path.display().to_string();
        match read_toml(&path) {
            Ok(values) => resolve_all(&values, &source)?,
            Err(e) => prop_assert!(e.to_string().starts_with(&format!("{source}: ")), "{e}\n{text}"),
        }
    }
}

proptest! {
    #![proptest_config(config(4000))]

    /// Arbitrary bytes and TOML-looking text as a config file: no panic, errors name it.
    #[test]
    fn arbitrary_config_files_fail_naming_the_file(data in bytes()) {
        let dir = tempfile::tempdir().expect("invariant: a temp dir");
        let path = dir.path().join("c.toml");
        std::fs::write(&path, &data).expect("invariant: the temp dir is writable");
        let source = path.display().to_string();
        match read_toml(&path) {
            Ok(values) => resolve_all(&values, &source)?,
            Err(e) => prop_assert!(e.to_string().starts_with(&format!("{source}: ")), "{e}"),
        }
    }
}

// ---------------------------------------------------------------------------------------
// Bugs found by the properties above, kept as inputs (docs/reliability.md).

/// Fixed bug (crates/rlhf-train/src/config.rs, `parse_flags` → `literal`): a flag value was read as
/// a TOML literal whatever the key's type, so a text key given text that looks like a number
/// or `nan`/`inf`/`true` is refused (`--output-dir 2024`: "invalid type: integer `2024`,
/// expected a string"; `--output-dir nan`: "= null: invalid type: null").
#[test]
fn a_text_flag_keeps_values_that_look_like_numbers() {
    for v in ["2024", "nan", "true", "1e-3"] {
        let values = parse_flags(&[
            "--model-name-or-path".into(),
            "m".into(),
            "--output-dir".into(),
            v.into(),
        ])
        .unwrap();
        let cfg = resolve::<RewardConfig>(&values, "flags");
        assert_eq!(
            cfg.map(|c| c.args.output_dir).map_err(|e| e.to_string()),
            Ok(v.to_string())
        );
    }
}

/// Fixed bug (crates/rlhf-train/src/ppo_config.rs, `backward_batch_size`):
/// `mini_batch_size * gradient_accumulation_steps` overflows: a debug build panics
/// ("attempt to multiply with overflow"), a release build reports the wrapped product
/// (`4294967296 × 4294967296 = 0`).
#[test]
fn huge_mini_batch_times_accumulation_is_a_clear_error() {
    let cfg = PpoConfig {
        batch_size: 1 << 33,
        mini_batch_size: 1 << 32,
        gradient_accumulation_steps: 1 << 32,
        ..PpoConfig::default()
    };
    let err = std::panic::catch_unwind(|| cfg.validate().map_err(|e| e.to_string()));
    let msg = format!("{err:?}");
    assert!(
        matches!(err, Ok(Err(ref m)) if !m.contains("= 0)")),
        "panicked or wrapped: {msg}"
    );
}

/// Fixed bug (crates/rlhf-train/src/reward.rs, `prepare_pairs`): a finite f64 margin beyond f32's
/// range (`"margin": 1e39`) passes `opt_number` and becomes `inf` by `as f32`; training then
/// stops with "non-finite loss" at the step that meets the row, instead of an error naming
/// the row before any work.
#[test]
fn a_margin_beyond_f32_is_an_error_naming_the_row() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.jsonl");
    std::fs::write(&path, "{\"chosen\": \"a\", \"rejected\": \"b\", \"margin\": 1e39}\n").unwrap();
    let rows = read_data(&path).unwrap();
    match prepare_pairs(model(), &rows, None) {
        Ok((pairs, _)) => panic!("accepted margin {:?}", pairs[0].margin),
        Err(e) => assert!(e.to_string().contains("row 1"), "{e}"),
    }
}

/// Fixed bug (crates/rlhf-train/src/data/parquet_file.rs, `read_parquet`): a Parquet file
/// whose column-chunk metadata holds a negative page offset or size panicked inside the
/// parquet crate (`ColumnChunkMetaData::byte_range`: "column start and length should not be
/// negative") instead of an error naming the file. One flipped byte of a valid file does it;
/// the footer's column chunks are now checked against the file before reading.
#[test]
fn a_parquet_file_with_a_negative_column_offset_is_an_error() {
    let mut data = parquet_bytes(Compression::UNCOMPRESSED);
    apply(&mut data, &Mutation::Set(0.449836836902488, 155));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d.parquet");
    std::fs::write(&path, &data).unwrap();
    let result = std::panic::catch_unwind(|| read_parquet(&path).map(|r| r.len()).map_err(|e| e.to_string()));
    match result {
        Ok(Err(msg)) => assert!(
            msg.contains("d.parquet: cannot read Parquet: the file is corrupt") && msg.contains("hint:"),
            "{msg}"
        ),
        Ok(Ok(n)) => panic!("read {n} rows from a corrupt file"),
        Err(_) => panic!("read_parquet panicked"),
    }
}
