//! Rotary position embedding settings from `config.json`, in the three shapes checkpoints
//! use: `rope_theta` + `rope_scaling` (`type` or `rope_type`), and transformers 5's
//! `rope_parameters` (which holds `rope_theta` too), into [`rlhf_ops::rope::RopeConfig`],
//! which computes the frequencies.

use serde_json::{Map, Value};

use rlhf_ops::rope::{RopeConfig, RopeScaling};

use super::Fields;
use crate::error::Result;

/// Reads `rope_parameters` (transformers 5), else `rope_theta` and `rope_scaling`.
/// `original_max_position_embeddings` defaults to `max_position_embeddings`.
pub(crate) fn parse(f: &Fields, head_dim: usize, max_pos: usize) -> Result<RopeConfig> {
    let (params, field): (Option<&Map<String, Value>>, &str) = match f.get("rope_parameters") {
        Some(Value::Object(p)) => (Some(p), "rope_parameters"),
        Some(other) => {
            return Err(f.err("rope_parameters", format!("expected an object, found {other}")));
        }
        None => match f.get("rope_scaling") {
            Some(Value::Object(p)) => (Some(p), "rope_scaling"),
            Some(other) => return Err(f.err("rope_scaling", format!("expected an object or null, found {other}"))),
            None => (None, "rope_scaling"),
        },
    };
    let num = |key: &str| -> Result<Option<f64>> {
        match params.and_then(|p| p.get(key)).filter(|v| !v.is_null()) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| f.err(&format!("{field}.{key}"), format!("expected a number, found {v}"))),
        }
    };
    let theta = match num("rope_theta")? {
        Some(t) => t,
        None => f.f64("rope_theta", 10_000.0)?,
    };
    if !(theta > 0.0 && theta.is_finite()) {
        return Err(f.err("rope_theta", format!("must be a positive number, found {theta}")));
    }
    let kind = params
        .and_then(|p| p.get("rope_type").or_else(|| p.get("type")))
        .and_then(Value::as_str)
        .unwrap_or("default");
    let factor = || -> Result<f64> {
        let v = num("factor")?.ok_or_else(|| {
            f.err(
                &format!("{field}.factor"),
                format!("is required for rope_type \"{kind}\""),
            )
        })?;
        if v > 0.0 && v.is_finite() {
            Ok(v)
        } else {
            Err(f.err(&format!("{field}.factor"), format!("must be positive, found {v}")))
        }
    };
    let orig = || -> Result<usize> { Ok(num("original_max_position_embeddings")?.map_or(max_pos, |v| v as usize)) };
    let scaling = match kind {
        "default" => RopeScaling::Default,
        "linear" => RopeScaling::Linear { factor: factor()? },
        // transformers reads `max_position_embeddings` for dynamic NTK, never
        // `original_max_position_embeddings`.
        "dynamic" => RopeScaling::Dynamic { factor: factor()? },
        "yarn" => RopeScaling::Yarn {
            factor: num("factor")?,
            original_max_position_embeddings: orig()?,
            beta_fast: num("beta_fast")?,
            beta_slow: num("beta_slow")?,
            attention_factor: num("attention_factor")?,
            mscale: num("mscale")?,
            mscale_all_dim: num("mscale_all_dim")?,
            truncate: params.and_then(|p| p.get("truncate")).and_then(Value::as_bool),
        },
        "llama3" => RopeScaling::Llama3 {
            factor: factor()?,
            low_freq_factor: num("low_freq_factor")?.unwrap_or(1.0),
            high_freq_factor: num("high_freq_factor")?.unwrap_or(4.0),
            original_max_position_embeddings: orig()?,
        },
        other => {
            return Err(f.err(
                &format!("{field}.rope_type"),
                format!("\"{other}\" is not supported; expected default, linear, dynamic, yarn or llama3"),
            ))
        }
    };
    let cfg = RopeConfig {
        head_dim,
        rope_theta: theta,
        max_position_embeddings: max_pos,
        scaling,
    };
    // Invalid parameters (a yarn factor below 1, ...) are reported at load, naming the key.
    cfg.frequencies().map_err(|e| f.err(field, e.to_string()))?;
    Ok(cfg)
}
