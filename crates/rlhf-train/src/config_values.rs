//! Value forms TRL's configs accept beyond one TOML type, as serde `deserialize_with`
//! helpers for the trainer configs.
//!
//! A flag carries one text value (`--loss-type sigmoid,sft`), a TOML file a typed one
//! (`loss_type = ["sigmoid", "sft"]`); TRL itself takes several forms for some keys
//! (`DPOConfig.loss_type` is a list or one string; `GRPOConfig.scale_rewards` is a name or a
//! boolean). These helpers accept all of them and store one canonical form, which is what
//! the run's `config.toml` records. Also the errors of names a key does not know.

use serde::de::Error as _;
use serde::{Deserialize, Deserializer};
use serde_json::Value;

use crate::error::TrainError;

/// The pieces of a comma-separated list, trimmed, empty pieces dropped.
fn split_list(s: &str) -> impl Iterator<Item = &str> {
    s.split(',').map(str::trim).filter(|p| !p.is_empty())
}

/// A JSON value in a message: strings without quotes only when short enough to read.
fn show(v: &Value) -> String {
    let s = v.to_string();
    match s.char_indices().nth(60) {
        Some((end, _)) => format!("{}...", &s[..end]),
        None => s,
    }
}

/// A list of names: a list of strings, or one string holding one name or several separated
/// by commas (`"sigmoid"`, `"sigmoid,sft"`, the flag form).
pub fn names<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    match Value::deserialize(d)? {
        Value::String(s) => Ok(split_list(&s).map(String::from).collect()),
        Value::Array(items) => items
            .into_iter()
            .map(|v| match v {
                Value::String(s) => Ok(s.trim().to_string()),
                other => Err(D::Error::custom(format!(
                    "expected a list of names, found the element {}",
                    show(&other)
                ))),
            })
            .collect(),
        other => Err(D::Error::custom(format!(
            "expected a name or a list of names (e.g. [\"a\", \"b\"] or \"a,b\"), found {}",
            show(&other)
        ))),
    }
}

fn number(v: &Value) -> Option<f64> {
    match v {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

fn numbers_of<E: serde::de::Error>(v: Value) -> Result<Vec<f64>, E> {
    let bad = |what: &Value| {
        E::custom(format!(
            "expected numbers (e.g. [1.0, 0.5] or \"1.0,0.5\"), found {}",
            show(what)
        ))
    };
    match &v {
        Value::Number(_) => Ok(vec![number(&v).ok_or_else(|| bad(&v))?]),
        Value::String(s) => split_list(s)
            .map(|p| p.parse::<f64>().map_err(|_| bad(&Value::String(p.into()))))
            .collect(),
        Value::Array(items) => items.iter().map(|x| number(x).ok_or_else(|| bad(x))).collect(),
        _ => Err(bad(&v)),
    }
}

/// [`names`], optional (`null` or absent: `None`).
pub fn opt_names<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<String>>, D::Error> {
    match Value::deserialize(d)? {
        Value::Null => Ok(None),
        v => names(v).map(Some).map_err(serde::de::Error::custom),
    }
}

/// An optional list of numbers: absent, a list, one number, or a comma-separated string
/// (`--reward-weights 1.0,0.5`).
pub fn opt_numbers<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<f64>>, D::Error> {
    match Value::deserialize(d)? {
        Value::Null => Ok(None),
        v => numbers_of::<D::Error>(v).map(Some),
    }
}

/// An optional `(min, max)` pair: absent, a list of two numbers, or `"min,max"`.
pub fn opt_range<'de, D: Deserializer<'de>>(d: D) -> Result<Option<(f64, f64)>, D::Error> {
    match Value::deserialize(d)? {
        Value::Null => Ok(None),
        v => match numbers_of::<D::Error>(v)?.as_slice() {
            [lo, hi] => Ok(Some((*lo, *hi))),
            other => Err(D::Error::custom(format!(
                "expected two numbers [min, max], found {} number(s)",
                other.len()
            ))),
        },
    }
}

/// `GRPOConfig.scale_rewards`: a name, or a boolean as TRL's `__post_init__` maps it
/// (`true` → `"group"`, `false` → `"none"`; the strings `"true"` / `"false"` too, as a
/// flag carries them). Other names are kept as written for the config's validation.
pub fn scale_rewards<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    match Value::deserialize(d)? {
        Value::Bool(true) => Ok("group".into()),
        Value::Bool(false) => Ok("none".into()),
        Value::String(s) => Ok(match s.trim() {
            "true" | "True" => "group".into(),
            "false" | "False" => "none".into(),
            other => other.to_string(),
        }),
        other => Err(D::Error::custom(format!(
            "expected \"group\", \"batch\", \"none\" or a boolean, found {}",
            show(&other)
        ))),
    }
}

/// `pad_to_multiple_of`: a positive number, or absent; TRL's `"auto"` (which is `None`
/// off Neuron devices) and `"none"` read as absent.
pub fn opt_multiple<'de, D: Deserializer<'de>>(d: D) -> Result<Option<usize>, D::Error> {
    let v = Value::deserialize(d)?;
    match &v {
        Value::Null => Ok(None),
        Value::String(s) if ["auto", "none", "null"].contains(&s.trim().to_ascii_lowercase().as_str()) => Ok(None),
        Value::Number(n) => n.as_u64().map(|n| Some(n as usize)).ok_or_else(|| {
            D::Error::custom(format!(
                "expected a positive whole number or \"auto\", found {}",
                show(&v)
            ))
        }),
        Value::String(s) => s.trim().parse::<usize>().map(Some).map_err(|_| {
            D::Error::custom(format!(
                "expected a positive whole number or \"auto\", found {}",
                show(&v)
            ))
        }),
        _ => Err(D::Error::custom(format!(
            "expected a positive whole number or \"auto\", found {}",
            show(&v)
        ))),
    }
}

/// A [`RlError::Config`] of the math as the config error of its key.
pub(crate) fn setting_of(e: rlhf_ops::rl::RlError) -> TrainError {
    match e {
        rlhf_ops::rl::RlError::Config { field, msg } => TrainError::setting(field, msg),
        other => TrainError::Config(other.to_string()),
    }
}

/// The error of an unknown name for `key`, listing the known ones.
pub(crate) fn unknown_name(key: &str, got: &str, known: &[&str]) -> TrainError {
    let near =
        crate::config::closest(got, known.iter().copied()).map_or(String::new(), |k| format!("; did you mean `{k}`?"));
    TrainError::setting(key, format!("`{got}` is not one of {}{near}", known.join(", ")))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[derive(serde::Deserialize, Debug)]
    struct Forms {
        #[serde(deserialize_with = "names")]
        names: Vec<String>,
        #[serde(deserialize_with = "opt_numbers")]
        numbers: Option<Vec<f64>>,
        #[serde(deserialize_with = "opt_range")]
        range: Option<(f64, f64)>,
        #[serde(deserialize_with = "scale_rewards")]
        scale: String,
        #[serde(deserialize_with = "opt_multiple")]
        multiple: Option<usize>,
    }

    fn forms(v: Value) -> Result<Forms, serde_json::Error> {
        serde_json::from_value(v)
    }

    #[test]
    fn every_accepted_form_reads_to_the_canonical_value() {
        let f = forms(json!({"names": "sigmoid, sft", "numbers": "1,0.5", "range": "-0.3,1",
                             "scale": false, "multiple": "auto"}))
        .unwrap();
        assert_eq!(f.names, ["sigmoid", "sft"]);
        assert_eq!(f.numbers, Some(vec![1.0, 0.5]));
        assert_eq!(f.range, Some((-0.3, 1.0)));
        assert_eq!((f.scale.as_str(), f.multiple), ("none", None));
        let f = forms(json!({"names": ["ipo"], "numbers": 2, "range": [0, 1],
                             "scale": "True", "multiple": 64}))
        .unwrap();
        assert_eq!(f.names, ["ipo"]);
        assert_eq!(f.numbers, Some(vec![2.0]));
        assert_eq!(f.range, Some((0.0, 1.0)));
        assert_eq!((f.scale.as_str(), f.multiple), ("group", Some(64)));
        let f =
            forms(json!({"names": "", "numbers": null, "range": null, "scale": "batch", "multiple": null})).unwrap();
        assert!(f.names.is_empty() && f.numbers.is_none() && f.range.is_none());
        assert_eq!(f.scale, "batch");
    }

    #[test]
    fn a_wrong_form_says_what_is_expected() {
        let base = json!({"names": "a", "numbers": null, "range": null, "scale": "group", "multiple": null});
        let with = |k: &str, v: Value| {
            let mut b = base.clone();
            b[k] = v;
            forms(b).unwrap_err().to_string()
        };
        assert!(with("names", json!([1])).contains("list of names"));
        assert!(with("numbers", json!("1,x")).contains("expected numbers"));
        assert!(with("range", json!([1, 2, 3])).contains("two numbers"));
        assert!(with("scale", json!(3)).contains("\"group\", \"batch\", \"none\""));
        assert!(with("multiple", json!(-8)).contains("whole number"));
    }
}
