//! Configuration files and flags: TRL's key names, typed, validated once.
//!
//! A config is a flat TOML table (`learning_rate = 1e-4`); every key is also a flag
//! (`--learning-rate 1e-4`), flags overriding the file. Unknown keys are errors naming the
//! closest known key; values of the wrong type name the key.

use std::collections::BTreeMap;
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

/// Where each key of a config was set, for messages: a `--config` file or `flags` (a flag
/// overrides the file). Keys left at their default have no source.
#[derive(Clone, Debug, Default)]
pub struct KeySources(BTreeMap<String, String>);

impl KeySources {
    /// The keys of `file` (a `--config` path and its table), then those of `flags`.
    pub fn new(file: Option<(&Path, &Map<String, Value>)>, flags: &Map<String, Value>) -> Self {
        let mut by_key = BTreeMap::new();
        if let Some((path, table)) = file {
            for key in table.keys() {
                by_key.insert(key.clone(), path.display().to_string());
            }
        }
        for key in flags.keys() {
            by_key.insert(key.clone(), "flags".to_string());
        }
        Self(by_key)
    }

    /// Where `key` was set: the file's path or `flags`; `None` for a default.
    pub fn of(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }

    /// `e`, naming where its key was set when it is a [`TrainError::Setting`] (a range error
    /// found by a config's `validate`), e.g. `reward.toml: config key `learning_rate`: ...`.
    pub fn name(&self, e: TrainError) -> TrainError {
        match e {
            TrainError::Setting { key, msg, origin: None } => TrainError::Setting {
                origin: self.of(&key).map(String::from),
                key,
                msg,
            },
            e => e,
        }
    }
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

/// Keys that leave the trained weights alone: where the run writes, how often it logs,
/// evaluates and saves, what it evaluates on, and how it resumes. Every other key must keep
/// its value when a run is resumed ([`check_resume`]).
pub const RESUME_FREE_KEYS: &[&str] = &[
    "output_dir",
    "overwrite_output_dir",
    "resume_from_checkpoint",
    "quiet",
    "report_to",
    "logging_dir",
    "logging_steps",
    "log_samples",
    "eval_strategy",
    "eval_steps",
    "eval_file",
    "per_device_eval_batch_size",
    "save_strategy",
    "save_steps",
    "save_total_limit",
];

/// Refuses to resume a run under settings that change its training: compares `cfg` key by
/// key with the config the run was started with (`saved`, its `config.toml`), skipping
/// [`RESUME_FREE_KEYS`]. The error lists every differing key with the saved and the new
/// value. Paths that name the same file count as equal, and so does an empty
/// `model_name_or_path` (resuming takes the model from the checkpoint).
pub fn check_resume<T: Serialize>(cfg: &T, saved: &Path) -> Result<()> {
    let old = read_toml(saved)?;
    let Value::Object(new) = serde_json::to_value(cfg).map_err(|e| TrainError::Config(e.to_string()))? else {
        return Err(TrainError::Config("config is not a table".into()));
    };
    let show = |v: &Value| match v {
        Value::Null => "unset".to_string(),
        v => v.to_string(),
    };
    let diffs: Vec<String> = new
        .iter()
        .filter(|(key, _)| !RESUME_FREE_KEYS.contains(&key.as_str()))
        .filter_map(|(key, now)| {
            let was = old.get(key).unwrap_or(&Value::Null);
            (!same_setting(key, was, now)).then(|| format!("  {key}: {} (saved) → {} (now)", show(was), show(now)))
        })
        .collect();
    if diffs.is_empty() {
        return Ok(());
    }
    Err(TrainError::Config(format!(
        "{}: cannot resume: {} setting(s) differ from the run's, so it would continue as a different run:\n{}\n\
         hint: resume with the run's values (listed in this file), or start over: drop \
         --resume-from-checkpoint and pass --overwrite-output-dir (or choose another --output-dir)",
        saved.display(),
        diffs.len(),
        diffs.join("\n")
    )))
}

/// Whether a saved and a new value of `key` configure the same training.
fn same_setting(key: &str, was: &Value, now: &Value) -> bool {
    match (was, now) {
        (Value::Number(a), Value::Number(b)) => a == b || a.as_f64() == b.as_f64(),
        (Value::String(a), Value::String(b)) if a != b => {
            let same_file = match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
                (Ok(a), Ok(b)) => a == b,
                _ => false,
            };
            same_file || (key == "model_name_or_path" && (a.is_empty() || b.is_empty()))
        }
        _ => was == now,
    }
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
    use serde_json::json;

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
    fn a_range_error_names_the_file_or_the_flags_that_set_its_key() {
        let file = parse_flags(&args("--learning-rate -1 --max-steps 0")).unwrap();
        let flags = parse_flags(&args("--max-steps -2")).unwrap();
        let sources = KeySources::new(Some((Path::new("reward.toml"), &file)), &flags);
        let named = |key: &str| sources.name(TrainError::setting(key, "must be at least 1")).to_string();
        assert_eq!(
            named("learning_rate"),
            "reward.toml: config key `learning_rate`: must be at least 1"
        );
        assert_eq!(named("max_steps"), "flags: config key `max_steps`: must be at least 1");
        assert_eq!(named("seed"), "config key `seed`: must be at least 1");
        let other = sources.name(TrainError::Config("x".into()));
        assert!(matches!(other, TrainError::Config(m) if m == "x"));
    }

    #[test]
    fn resuming_with_other_training_settings_lists_each_key() {
        let tmp = tempfile::tempdir().unwrap();
        let saved = tmp.path().join("config.toml");
        let started = Demo {
            max_length: Some(64),
            ..Demo::default()
        };
        std::fs::write(&saved, to_toml(&started).unwrap()).unwrap();
        // Output paths may change; a path spelled another way names the same file.
        std::fs::write(tmp.path().join("x.jsonl"), "").unwrap();
        let (a, b) = (tmp.path().join("x.jsonl"), tmp.path().join(".").join("x.jsonl"));
        assert!(same_setting(
            "train_file",
            &json!(a.display().to_string()),
            &json!(b.display().to_string())
        ));
        assert!(!same_setting("train_file", &json!("a.jsonl"), &json!("b.jsonl")));
        let elsewhere = Demo {
            output_dir: "other".into(),
            ..Demo::default()
        };
        assert!(check_resume(
            &Demo {
                max_length: Some(64),
                ..elsewhere
            },
            &saved
        )
        .is_ok());
        let changed = Demo {
            learning_rate: 3e-4,
            disable_dropout: false,
            max_length: None,
            ..Demo::default()
        };
        let err = check_resume(&changed, &saved).unwrap_err().to_string();
        assert!(
            err.starts_with(&format!("{}: cannot resume: 3 setting(s) differ", saved.display())),
            "{err}"
        );
        for line in [
            "learning_rate: 0.0001 (saved) → 0.0003 (now)",
            "disable_dropout: true (saved) → false (now)",
            "max_length: 64 (saved) → unset (now)",
            "hint:",
            "--overwrite-output-dir",
        ] {
            assert!(err.contains(line), "{line}: {err}");
        }
        assert!(!err.contains("output_dir:"), "{err}");
    }

    #[test]
    fn a_value_of_the_wrong_type_names_the_key() {
        let m = parse_flags(&args("--max-steps ten")).unwrap();
        let err = resolve::<Demo>(&m, "flags").unwrap_err().to_string();
        assert!(err.contains("`max_steps`") && err.contains("\"ten\""), "{err}");
    }
}
