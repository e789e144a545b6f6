//! Parquet files, read through Arrow: one row per Arrow row, one JSON value per column.
//!
//! | Arrow type                          | JSON value                         |
//! |-------------------------------------|------------------------------------|
//! | Utf8, LargeUtf8, Utf8View           | string                             |
//! | Int8..Int64, UInt8..UInt64          | number                             |
//! | Float32, Float64                    | number (NaN and infinities: null)  |
//! | Boolean                             | boolean                            |
//! | List, LargeList, FixedSizeList      | array                              |
//! | Struct                              | object                             |
//! | Dictionary of any of these          | the dictionary's value             |
//! | Null, and a null in any column      | null                               |
//! | anything else (binary, dates, ...)  | null, with one warning per column  |
//!
//! This build reads uncompressed and Snappy-compressed files (the default of pandas/pyarrow
//! and of the Hugging Face Hub's conversions); other codecs fail with a hint to re-export.

use std::collections::BTreeSet;
use std::path::Path;

use arrow_array::cast::AsArray;
use arrow_array::types::{
    ArrowPrimitiveType, Float32Type, Float64Type, Int16Type, Int32Type, Int64Type, Int8Type, UInt16Type, UInt32Type,
    UInt64Type, UInt8Type,
};
use arrow_array::{Array, OffsetSizeTrait};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::file::metadata::ParquetMetaData;
use serde_json::{Map, Number, Value};

use super::{io_err, no_rows, Row, Rows};
use crate::error::{Result, TrainError};

/// Reads a Parquet file into rows (see the module docs for how each type is converted).
///
/// A file that is not Parquet, or is truncated, is a [`TrainError::Data`] naming the file with
/// a hint; a file of zero bytes or zero rows is the "no rows" error of every format.
pub fn read_parquet(path: &Path) -> Result<Rows> {
    // The parquet crate asserts on some corrupt pages (a definition-level run past its
    // buffer panics in arrow-buffer) instead of returning an error: such a file is reported
    // like any other unreadable one, never as a panic of the trainer.
    match std::panic::catch_unwind(|| read_parquet_unguarded(path)) {
        Ok(result) => result,
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "the reader stopped on a malformed page".into());
            Err(unreadable(path, &format!("the file is corrupt ({what})")))
        }
    }
}

fn read_parquet_unguarded(path: &Path) -> Result<Rows> {
    let file = std::fs::File::open(path).map_err(io_err(path))?;
    let file_len = file.metadata().map_err(io_err(path))?.len();
    if file_len == 0 {
        return Err(no_rows(path, ""));
    }
    let builder = ParquetRecordBatchReaderBuilder::try_new(file).map_err(|e| unreadable(path, &e.to_string()))?;
    check_column_chunks(path, builder.metadata(), file_len)?;
    let reader = builder.build().map_err(|e| unreadable(path, &e.to_string()))?;
    let mut rows: Vec<Row> = Vec::new();
    let mut unsupported = BTreeSet::new();
    for batch in reader {
        let batch = batch.map_err(|e| unreadable(path, &e.to_string()))?;
        let start = rows.len();
        rows.resize_with(start + batch.num_rows(), Row::new);
        for (field, column) in batch.schema().fields().iter().zip(batch.columns()) {
            let values = to_json(column.as_ref()).unwrap_or_else(|ty| {
                if unsupported.insert(field.name().clone()) {
                    tracing::warn!(
                        "{}: column `{}` has type {ty}, which is not read; its values are null",
                        path.display(),
                        field.name()
                    );
                }
                vec![Value::Null; column.len()]
            });
            for (row, value) in rows[start..].iter_mut().zip(values) {
                row.insert(field.name().clone(), value);
            }
        }
    }
    if rows.is_empty() {
        return Err(no_rows(path, " (a schema but no rows)"));
    }
    Ok(Rows {
        path: path.to_path_buf(),
        rows,
    })
}

/// Checks that every column chunk of the footer lies inside the file. The parquet crate
/// asserts this while reading (`ColumnChunkMetaData::byte_range` panics on a negative offset
/// or size), so a corrupt footer, e.g. one flipped byte, must be refused before.
fn check_column_chunks(path: &Path, meta: &ParquetMetaData, file_len: u64) -> Result<()> {
    for (g, group) in meta.row_groups().iter().enumerate() {
        for column in group.columns() {
            let (start, len) = (
                column.dictionary_page_offset().unwrap_or(column.data_page_offset()),
                column.compressed_size(),
            );
            let end = u64::try_from(start)
                .ok()
                .zip(u64::try_from(len).ok())
                .and_then(|(s, l)| s.checked_add(l));
            if end.is_none_or(|end| end > file_len) {
                return Err(TrainError::Data {
                    path: path.to_path_buf(),
                    msg: format!(
                        "cannot read Parquet: the file is corrupt: column `{}` of row group {g} starts at byte {start} and is {len} bytes long, outside the file ({file_len} bytes); hint: the file was damaged or cut short; export or download it again",
                        column.column_path().string()
                    ),
                });
            }
        }
    }
    Ok(())
}

/// The error of a file the Parquet reader rejects, with the likely fix.
fn unreadable(path: &Path, e: &str) -> TrainError {
    let e = e.strip_prefix("Parquet error: ").unwrap_or(e);
    let hint = if e.contains("Disabled feature") || e.contains("codec") {
        "this build reads uncompressed or Snappy-compressed Parquet; re-export with \
         compression=\"snappy\" (pandas: `df.to_parquet(path, compression=\"snappy\")`)"
    } else {
        "the file may be truncated or not Parquet at all; download or export it again"
    };
    TrainError::Data {
        path: path.to_path_buf(),
        msg: format!("cannot read Parquet: {e}; hint: {hint}"),
    }
}

/// One JSON value per element of `array`, or the Arrow type that has no conversion.
fn to_json(array: &dyn Array) -> std::result::Result<Vec<Value>, String> {
    let text = |s: Option<&str>| s.map_or(Value::Null, |s| Value::String(s.to_owned()));
    let mut values: Vec<Value> = if let Some(a) = array.as_string_opt::<i32>() {
        a.iter().map(text).collect()
    } else if let Some(a) = array.as_string_opt::<i64>() {
        a.iter().map(text).collect()
    } else if let Some(a) = array.as_string_view_opt() {
        a.iter().map(text).collect()
    } else if let Some(a) = array.as_boolean_opt() {
        a.iter().map(|b| b.map_or(Value::Null, Value::Bool)).collect()
    } else if let Some(values) = numbers(array) {
        values
    } else if let Some(a) = array.as_list_opt::<i32>() {
        lists(a)?
    } else if let Some(a) = array.as_list_opt::<i64>() {
        lists(a)?
    } else if let Some(a) = array.as_fixed_size_list_opt() {
        let items = to_json(a.values().as_ref())?;
        let width = a.value_length() as usize;
        (0..a.len())
            .map(|i| {
                let start = a.value_offset_at(i);
                Value::Array(items[start..start + width].to_vec())
            })
            .collect()
    } else if let Some(a) = array.as_struct_opt() {
        let mut objects = vec![Map::new(); a.len()];
        for (field, column) in a.fields().iter().zip(a.columns()) {
            for (object, value) in objects.iter_mut().zip(to_json(column.as_ref())?) {
                object.insert(field.name().clone(), value);
            }
        }
        objects.into_iter().map(Value::Object).collect()
    } else if let Some(a) = array.as_any_dictionary_opt() {
        let dictionary = to_json(a.values().as_ref())?;
        // A key of a null slot may be out of range; nulls are applied below.
        a.normalized_keys()
            .into_iter()
            .map(|k| dictionary.get(k).cloned().unwrap_or(Value::Null))
            .collect()
    } else if array.logical_null_count() == array.len() {
        // The Null type, or a column of another type without a single value.
        vec![Value::Null; array.len()]
    } else {
        return Err(array.data_type().to_string());
    };
    if let Some(nulls) = array.logical_nulls() {
        for (value, valid) in values.iter_mut().zip(nulls.iter()) {
            if !valid {
                *value = Value::Null;
            }
        }
    }
    Ok(values)
}

fn lists<O: OffsetSizeTrait>(a: &arrow_array::GenericListArray<O>) -> std::result::Result<Vec<Value>, String> {
    let items = to_json(a.values().as_ref())?;
    Ok(a.value_offsets()
        .windows(2)
        .map(|w| Value::Array(items[w[0].as_usize()..w[1].as_usize()].to_vec()))
        .collect())
}

/// The values of an integer or float column, or `None` for any other type.
fn numbers(array: &dyn Array) -> Option<Vec<Value>> {
    primitive::<Int8Type>(array, Value::from)
        .or_else(|| primitive::<Int16Type>(array, Value::from))
        .or_else(|| primitive::<Int32Type>(array, Value::from))
        .or_else(|| primitive::<Int64Type>(array, Value::from))
        .or_else(|| primitive::<UInt8Type>(array, Value::from))
        .or_else(|| primitive::<UInt16Type>(array, Value::from))
        .or_else(|| primitive::<UInt32Type>(array, Value::from))
        .or_else(|| primitive::<UInt64Type>(array, Value::from))
        // Through the shortest decimal text, so that an f32 0.1 reads as 0.1, not 0.100000001.
        .or_else(|| primitive::<Float32Type>(array, |x| float(x.to_string().parse().unwrap_or(f64::NAN))))
        .or_else(|| primitive::<Float64Type>(array, float))
}

fn primitive<T: ArrowPrimitiveType>(array: &dyn Array, f: impl Fn(T::Native) -> Value) -> Option<Vec<Value>> {
    let a = array.as_primitive_opt::<T>()?;
    Some(a.iter().map(|v| v.map_or(Value::Null, &f)).collect())
}

/// A JSON number, or null for NaN and infinities (JSON has neither).
fn float(x: f64) -> Value {
    Number::from_f64(x).map_or(Value::Null, Value::Number)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow_array::builder::{ListBuilder, StringBuilder};
    use arrow_array::{
        ArrayRef, BinaryArray, BooleanArray, DictionaryArray, Float32Array, Int64Array, LargeStringArray, RecordBatch,
        StringArray, StructArray, UInt8Array,
    };
    use parquet::arrow::ArrowWriter;
    use serde_json::json;

    use super::*;

    fn round_trip(columns: Vec<(&str, ArrayRef)>) -> (tempfile::NamedTempFile, Result<Rows>) {
        let f = tempfile::NamedTempFile::new().unwrap();
        let batch = RecordBatch::try_from_iter(columns).unwrap();
        let mut writer = ArrowWriter::try_new(std::fs::File::create(f.path()).unwrap(), batch.schema(), None).unwrap();
        writer.write(&batch).unwrap();
        writer.close().unwrap();
        let rows = read_parquet(f.path());
        (f, rows)
    }

    #[test]
    fn each_arrow_type_becomes_its_json_value() {
        let mut messages = ListBuilder::new(StringBuilder::new());
        messages.append_value([Some("hi"), Some("hello")]);
        messages.append_null();
        let meta = StructArray::try_from(vec![("turns", Arc::new(Int64Array::from(vec![2, 0])) as ArrayRef)]).unwrap();
        let (_f, rows) = round_trip(vec![
            (
                "large",
                Arc::new(LargeStringArray::from(vec![Some("ü"), None])) as ArrayRef,
            ),
            ("f32", Arc::new(Float32Array::from(vec![0.1, f32::NAN]))),
            ("i64", Arc::new(Int64Array::from(vec![Some(-3), None]))),
            ("u8", Arc::new(UInt8Array::from(vec![7, 8]))),
            ("flag", Arc::new(BooleanArray::from(vec![true, false]))),
            ("messages", Arc::new(messages.finish())),
            ("meta", Arc::new(meta)),
            (
                "label",
                Arc::new(DictionaryArray::<arrow_array::types::Int32Type>::from_iter([
                    Some("good"),
                    None,
                ])),
            ),
        ]);
        let rows = rows.unwrap();
        assert_eq!(
            Value::Object(rows.rows[0].clone()),
            json!({"large": "ü", "f32": 0.1, "i64": -3, "u8": 7, "flag": true,
                   "messages": ["hi", "hello"], "meta": {"turns": 2}, "label": "good"})
        );
        assert_eq!(
            Value::Object(rows.rows[1].clone()),
            json!({"large": null, "f32": null, "i64": null, "u8": 8, "flag": false,
                   "messages": null, "meta": {"turns": 0}, "label": null})
        );
    }

    #[test]
    fn a_column_of_an_unsupported_type_reads_as_null() {
        let (_f, rows) = round_trip(vec![
            ("text", Arc::new(StringArray::from(vec!["a"])) as ArrayRef),
            ("bytes", Arc::new(BinaryArray::from(vec![b"\x00\x01".as_slice()]))),
        ]);
        let rows = rows.unwrap();
        assert_eq!(rows.text(0, "text").unwrap(), "a");
        assert!(!rows.has(0, "bytes"));
        let err = rows.text(0, "bytes").unwrap_err().to_string();
        assert!(
            err.contains("row 1: column `bytes` must be a string, found null"),
            "{err}"
        );
    }

    #[test]
    fn an_unknown_codec_hints_at_snappy() {
        let err = unreadable(Path::new("x.parquet"), "Disabled feature at compile time: zstd").to_string();
        assert!(
            err.contains("x.parquet: cannot read Parquet") && err.contains("compression=\"snappy\""),
            "{err}"
        );
    }
}
