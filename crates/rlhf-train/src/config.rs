//! Configuration files and flags: TRL's key names, typed, validated once.
//!
//! A config is a flat TOML table (`learning_rate = 1e-4`); every key is also a flag
//! (`--learning-rate 1e-4`), flags overriding the file. Unknown keys are errors naming the
//! closest known key; values of the wrong type name the key.

use std::path::Path;

use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{Map, Value};

use crate::error::{Result, TrainError};

/// Parses `--kebab-key value` pairs (a key with no value, or followed by another flag, is
/// `true`) into a flat table with snake_case keys. Values are read as TOML literals
/// by [`resolve`] for the keys that are not text.
pub fn parse_flags(args: &[String]) -> Result<Map<String, Value>> {
    let mut out = Map::new();
    let mut i = 0;
    while i < args.len() {
        let Some(key) = args[i].strip_prefix("--") else {
            return Err(TrainError::Config(format!(
                "unexpected argument `{}`; config flags look like --learning-rate 1e-4",
                args[i]
            )));
        };
        let (key, inline) = match key.split_once('=') {
            Some((k, v)) => (k, Some(v.to_string())),
            None => (key, None),
        };
        let key = key.replace('-', "_");
        let value = match inline {
            Some(v) => Some(v),
            None if i + 1 < args.len() && !args[i + 1].starts_with("--") => {
                i += 1;
                Some(args[i].clone())
            }
            None => None,
        };
        // Kept as text: `resolve` types it by the key it lands on (`--output-dir 2024` stays
        // a path, `--max-steps 10` becomes a number).
        out.insert(key, value.map_or(Value::Bool(true), Value::String));
        i += 1;
    }
    Ok(out)
}

fn literal(text: &str) -> Value {
    match toml::from_str::<toml::Table>(&format!("v = {text}")) {
        Ok(t) => t
            .get("v")
            .and_then(|v| serde_json::to_value(v).ok())
            .unwrap_or_else(|| Value::String(text.into())),
        Err(_) => Value::String(text.into()),
    }
}

/// Reads a TOML config file into a flat table.
pub fn read_toml(path: &Path) -> Result<Map<String, Value>> {
    let text = std::fs::read_to_string(path).map_err(|source| TrainError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let table: toml::Table =
        toml::from_str(&text).map_err(|e| TrainError::Config(format!("{}: invalid TOML: {e}", path.display())))?;
    match serde_json::to_value(table) {
        Ok(Value::Object(m)) => Ok(m),
        _ => Err(TrainError::Config(format!(
            "{}: expected a table of keys",
            path.display()
        ))),
    }
}

/// Builds a config from its defaults overlaid with `values`: an unknown key is an error
/// that names the closest known key, and a value of the wrong type names its key.
pub fn resolve<T: Serialize + DeserializeOwned + Default>(values: &Map<String, Value>, source: &str) -> Result<T> {
    let Value::Object(defaults) = serde_json::to_value(T::default()).map_err(|e| TrainError::Config(e.to_string()))?
    else {
        return Err(TrainError::Config("config defaults are not a table".into()));
    };
    for key in values.keys() {
        if !defaults.contains_key(key) {
            let hint = closest(key, defaults.keys().map(String::as_str))
                .map_or(String::new(), |k| format!("; did you mean `{k}`?"));
            return Err(TrainError::Config(format!(
                "{source}: unknown config key `{key}`{hint}"
            )));
        }
    }
    // Flag values arrive as text: read them as TOML literals unless their key is text.
    let mut values = values.clone();
    for (k, v) in values.iter_mut() {
        let Value::String(text) = v else { continue };
        if matches!(defaults.get(k), Some(Value::String(_))) {
            continue;
        }
        let lit = literal(text);
        let mut one = defaults.clone();
        one.insert(k.clone(), lit.clone());
        if lit.is_string() || serde_json::from_value::<T>(Value::Object(one)).is_ok() {
            *v = lit;
        }
    }
    let values = &values;
    let mut merged = defaults.clone();
    merged.extend(values.clone());
    serde_json::from_value(Value::Object(merged)).map_err(|e| {
        // Find the key whose value is at fault by applying the keys one at a time.
        for (k, v) in values {
            let mut one = defaults.clone();
            one.insert(k.clone(), v.clone());
            if let Err(e) = serde_json::from_value::<T>(Value::Object(one)) {
                return TrainError::Config(format!("{source}: config key `{k}` = {v}: {e}"));
            }
        }
        TrainError::Config(format!("{source}: {e}"))
    })
}

/// The known key closest to `key` by edit distance, if any is reasonably close.
pub fn closest<'a>(key: &str, known: impl Iterator<Item = &'a str>) -> Option<&'a str> {
    known
        .map(|k| (levenshtein(key, k), k))
        .filter(|(d, k)| *d <= 3.max(k.len() / 3))
        .min()
        .map(|(_, k)| k)
}

fn levenshtein(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            cur[j + 1] = (prev[j] + usize::from(ca != *cb)).min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

/// Writes a resolved config as TOML (keys sorted; unset options omitted).
pub fn to_toml<T: Serialize>(cfg: &T) -> Result<String> {
    let v = serde_json::to_value(cfg).map_err(|e| TrainError::Config(e.to_string()))?;
    let Value::Object(m) = v else {
        return Err(TrainError::Config("config is not a table".into()));
    };
    let clean: Map<String, Value> = m.into_iter().filter(|(_, v)| !v.is_null()).collect();
    toml::to_string(&clean).map_err(|e| TrainError::Config(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Serialize, serde::Deserialize, Debug, PartialEq)]
    struct Demo {
        learning_rate: f64,
        max_steps: i64,
        disable_dropout: bool,
        output_dir: String,
        max_length: Option<usize>,
    }

    impl Default for Demo {
        fn default() -> Self {
            Self {
                learning_rate: 1e-4,
                max_steps: -1,
                disable_dropout: true,
                output_dir: "runs".into(),
                max_length: None,
            }
        }
    }

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn flags_override_defaults_with_typed_values() {
        let m = parse_flags(&args(
            "--learning-rate 3e-4 --max-steps 10 --disable-dropout false --output-dir out/x",
        ))
        .unwrap();
        let d: Demo = resolve(&m, "flags").unwrap();
        assert_eq!(
            d,
            Demo {
                learning_rate: 3e-4,
                max_steps: 10,
                disable_dropout: false,
                output_dir: "out/x".into(),
                max_length: None
            }
        );
        let m = parse_flags(&args("--disable-dropout --max-length 64")).unwrap();
        let d: Demo = resolve(&m, "flags").unwrap();
        assert!(d.disable_dropout && d.max_length == Some(64));
    }

    #[test]
    fn an_unknown_key_suggests_the_closest() {
        let m = parse_flags(&args("--learnin-rate 1")).unwrap();
        let err = resolve::<Demo>(&m, "reward.toml").unwrap_err().to_string();
        assert!(
            err.contains("unknown config key `learnin_rate`") && err.contains("did you mean `learning_rate`"),
            "{err}"
        );
    }

    #[test]
    fn a_value_of_the_wrong_type_names_the_key() {
        let m = parse_flags(&args("--max-steps ten")).unwrap();
        let err = resolve::<Demo>(&m, "flags").unwrap_err().to_string();
        assert!(err.contains("`max_steps`") && err.contains("\"ten\""), "{err}");
    }
}
