//! Rotary position embedding of a model: the frequencies of its config
//! ([`rlhf_ops::rope`], transformers' `modeling_rope_utils.py`) and the per-token cos/sin
//! tables. Positions are per token, never one offset for a whole batch, so left-padded rows
//! rotate exactly as they would alone.
//!
//! Deliberate deviation: transformers' dynamic NTK scaling keeps state between calls (the
//! frequencies of the longest sequence seen stay in use until a sequence shorter than
//! `max_position_embeddings` resets them); here every forward computes its frequencies from
//! its own longest position, so a forward is a pure function of its inputs. The two agree
//! whenever lengths only grow, as within one generation.

use candle_core::{DType, Device, Tensor};
use rlhf_ops::rope::{RopeConfig, RopeFrequencies, RopeScaling};

use crate::error::{ModelError, Result};

/// RoPE frequencies of a model.
#[derive(Clone, Debug)]
pub struct Rope {
    cfg: RopeConfig,
    /// The frequencies within `max_position_embeddings`.
    base: RopeFrequencies,
}

impl Rope {
    /// The frequencies of `cfg` (an error names the invalid parameter).
    pub fn new(cfg: &RopeConfig) -> Result<Self> {
        let base = cfg.frequencies().map_err(rope_err)?;
        Ok(Self { cfg: cfg.clone(), base })
    }

    /// The frequencies for positions below `seq_len` (dynamic NTK grows the base past
    /// `max_position_embeddings`; the other types are static).
    pub fn frequencies_for(&self, seq_len: usize) -> Result<std::borrow::Cow<'_, RopeFrequencies>> {
        match self.cfg.scaling {
            RopeScaling::Dynamic { .. } if seq_len > self.cfg.max_position_embeddings => Ok(std::borrow::Cow::Owned(
                self.cfg.frequencies_at(Some(seq_len)).map_err(rope_err)?,
            )),
            _ => Ok(std::borrow::Cow::Borrowed(&self.base)),
        }
    }

    /// cos and sin for each position, `(N, head_dim)` each, computed in f32 and cast to
    /// `dtype` (transformers casts the tables to the hidden states' dtype).
    pub fn cos_sin(&self, positions: &[u32], dtype: DType, device: &Device) -> Result<(Tensor, Tensor)> {
        let seq_len = positions.iter().max().map_or(0, |&m| m as usize + 1);
        let (cos, sin) = self.frequencies_for(seq_len)?.cos_sin(positions, device)?;
        Ok((cos.to_dtype(dtype)?, sin.to_dtype(dtype)?))
    }
}

fn rope_err(e: rlhf_ops::rope::RopeError) -> ModelError {
    ModelError::Input(format!("config.json: {e}"))
}
