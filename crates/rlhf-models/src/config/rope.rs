//! Rotary position embedding settings from `config.json`, in the three shapes checkpoints
//! use: `rope_theta` + `rope_scaling` (`type` or `rope_type`), and transformers 5's
//! `rope_parameters` (which holds `rope_theta` too). The frequencies themselves are computed
//! in `rlhf_ops::rope`.

use serde_json::{Map, Value};

use super::Fields;
use crate::error::Result;

/// RoPE scaling (`rope_type`), with transformers' parameter names.
#[derive(Clone, Debug, PartialEq)]
pub enum RopeScaling {
    /// `default`: `inv_freq[i] = theta^(-2i/d)`.
    Default,
    /// `linear`: frequencies divided by `factor`.
    Linear {
        /// Position interpolation factor.
        factor: f64,
    },
    /// `dynamic` (NTK): the base grows once a sequence exceeds `original_max_position_embeddings`.
    Dynamic {
        /// Scaling factor.
        factor: f64,
        /// The context the model was trained with.
        original_max_position_embeddings: usize,
    },
    /// `yarn`: NTK-by-parts interpolation with an attention factor.
    Yarn {
        /// Scaling factor.
        factor: f64,
        /// The context the model was trained with.
        original_max_position_embeddings: usize,
        /// `beta_fast` (default 32).
        beta_fast: f64,
        /// `beta_slow` (default 1).
        beta_slow: f64,
        /// `attention_factor` when given; else derived from `factor` (and `mscale`).
        attention_factor: Option<f64>,
        /// `mscale` (DeepSeek-style), when given.
        mscale: Option<f64>,
        /// `mscale_all_dim`, when given.
        mscale_all_dim: Option<f64>,
        /// Round the correction range to whole dimensions (`truncate`, default true).
        truncate: bool,
    },
    /// `llama3`: low frequencies divided by `factor`, high ones kept, a smooth ramp between.
    Llama3 {
        /// Scaling factor.
        factor: f64,
        /// `low_freq_factor`.
        low_freq_factor: f64,
        /// `high_freq_factor`.
        high_freq_factor: f64,
        /// The context the model was trained with.
        original_max_position_embeddings: usize,
    },
}

/// RoPE of a model: base, scaling and the dimensions it rotates.
#[derive(Clone, Debug, PartialEq)]
pub struct RopeConfig {
    /// `rope_theta`.
    pub theta: f64,
    /// The scaling type and its parameters.
    pub scaling: RopeScaling,
    /// Rotated dimensions per head (`head_dim`; `partial_rotary_factor` is 1 for every
    /// supported family).
    pub dim: usize,
}

impl RopeConfig {
    /// Reads `rope_parameters` (transformers 5), else `rope_theta` and `rope_scaling`.
    /// `original_max_position_embeddings` defaults to `max_position_embeddings`.
    pub(crate) fn parse(f: &Fields, head_dim: usize, max_pos: usize) -> Result<Self> {
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
            "dynamic" => RopeScaling::Dynamic {
                factor: factor()?,
                original_max_position_embeddings: orig()?,
            },
            "yarn" => RopeScaling::Yarn {
                factor: factor()?,
                original_max_position_embeddings: orig()?,
                beta_fast: num("beta_fast")?.unwrap_or(32.0),
                beta_slow: num("beta_slow")?.unwrap_or(1.0),
                attention_factor: num("attention_factor")?,
                mscale: num("mscale")?,
                mscale_all_dim: num("mscale_all_dim")?,
                truncate: params
                    .and_then(|p| p.get("truncate"))
                    .and_then(Value::as_bool)
                    .unwrap_or(true),
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
        Ok(Self {
            theta,
            scaling,
            dim: head_dim,
        })
    }
}
