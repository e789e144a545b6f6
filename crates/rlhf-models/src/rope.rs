//! Rotary position embedding (Su et al. 2021, arXiv 2104.09864) as transformers computes it:
//! inverse frequencies per scaling type (`modeling_rope_utils.py`), cos/sin tables for any
//! per-token positions in f32 (`emb = cat(freqs, freqs)`, times the attention factor), and
//! the rotate-half application `x·cos + rotate_half(x)·sin`. Positions are per token, never
//! one offset for a whole batch, so left-padded rows rotate exactly as they would alone.

use std::f64::consts::PI;

use candle_core::{DType, Device, Tensor, D};

use crate::config::{RopeConfig, RopeScaling};
use crate::error::Result;

/// RoPE frequencies of a model.
#[derive(Clone, Debug)]
pub struct Rope {
    cfg: RopeConfig,
    /// `inv_freq` for sequences within the trained context, `dim / 2` values.
    inv_freq: Vec<f32>,
    /// cos and sin are multiplied by this (yarn; 1 otherwise).
    attention_factor: f32,
}

impl Rope {
    /// The frequencies of `cfg`.
    pub fn new(cfg: &RopeConfig) -> Result<Self> {
        let (inv_freq, attention_factor) = inv_freq(cfg, None);
        Ok(Self {
            cfg: cfg.clone(),
            inv_freq,
            attention_factor,
        })
    }

    /// The inverse frequencies used for positions below `seq_len` (dynamic NTK grows the
    /// base once `seq_len` exceeds the trained context; the others are static).
    pub fn inv_freq_for(&self, seq_len: usize) -> (Vec<f32>, f32) {
        match self.cfg.scaling {
            RopeScaling::Dynamic {
                original_max_position_embeddings: orig,
                ..
            } if seq_len > orig => inv_freq(&self.cfg, Some(seq_len)),
            _ => (self.inv_freq.clone(), self.attention_factor),
        }
    }

    /// cos and sin for each position, `(N, dim)` each, computed in f32 and cast to `dtype`.
    pub fn cos_sin(&self, positions: &[u32], dtype: DType, device: &Device) -> Result<(Tensor, Tensor)> {
        let seq_len = positions.iter().max().map_or(0, |&m| m as usize + 1);
        let (inv, factor) = self.inv_freq_for(seq_len);
        let half = inv.len();
        let n = positions.len();
        let (mut cos, mut sin) = (Vec::with_capacity(n * 2 * half), Vec::with_capacity(n * 2 * half));
        for &p in positions {
            for rep in 0..2 {
                let _ = rep;
                for &f in &inv {
                    // f32 product as transformers (`inv_freq @ position_ids.float()`).
                    let a = f * p as f32;
                    cos.push(a.cos() * factor);
                    sin.push(a.sin() * factor);
                }
            }
        }
        let cos = Tensor::from_vec(cos, (n, 2 * half), device)?.to_dtype(dtype)?;
        let sin = Tensor::from_vec(sin, (n, 2 * half), device)?.to_dtype(dtype)?;
        Ok((cos, sin))
    }
}

/// `x·cos + rotate_half(x)·sin` over each of the `heads` heads of every row, with
/// `rotate_half(x) = cat(-x[d/2:], x[:d/2])` (composed candle ops; differentiable).
///
/// # Shapes
/// `x`: `(.., heads·hd)` with `N` rows in the leading dimensions; `cos`, `sin`: `(N, hd)` →
/// the shape of `x`.
pub fn apply(x: &Tensor, cos: &Tensor, sin: &Tensor, heads: usize, hd: usize) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let n = x.elem_count() / (heads * hd).max(1);
    let x = x.reshape((n, heads, hd))?;
    let half = hd / 2;
    let x1 = x.narrow(D::Minus1, 0, half)?;
    let x2 = x.narrow(D::Minus1, half, half)?;
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    let cos = cos.to_dtype(x.dtype())?.unsqueeze(1)?;
    let sin = sin.to_dtype(x.dtype())?.unsqueeze(1)?;
    let y = (x.broadcast_mul(&cos)? + rotated.broadcast_mul(&sin)?)?;
    Ok(y.reshape(dims)?)
}

/// transformers' `_compute_*_rope_parameters`: `(inv_freq, attention_factor)`; `seq_len` is
/// the current length for dynamic NTK (`None`: the trained context).
fn inv_freq(cfg: &RopeConfig, seq_len: Option<usize>) -> (Vec<f32>, f32) {
    let dim = cfg.dim;
    let base = cfg.theta;
    // transformers builds the exponents from an int64 arange cast to float, in f32.
    let default_with = |base: f64| -> Vec<f64> {
        (0..dim / 2)
            .map(|i| 1.0 / (base as f32).powf((2 * i) as f32 / dim as f32) as f64)
            .collect()
    };
    let to32 = |v: Vec<f64>| v.into_iter().map(|x| x as f32).collect::<Vec<f32>>();
    match &cfg.scaling {
        RopeScaling::Default => (to32(default_with(base)), 1.0),
        RopeScaling::Linear { factor } => (to32(default_with(base).into_iter().map(|f| f / factor).collect()), 1.0),
        RopeScaling::Dynamic {
            factor,
            original_max_position_embeddings: orig,
        } => {
            let seq = seq_len.unwrap_or(*orig).max(*orig) as f64;
            let orig = *orig as f64;
            let base = base * ((factor * seq / orig) - (factor - 1.0)).powf(dim as f64 / (dim as f64 - 2.0));
            (to32(default_with(base)), 1.0)
        }
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings: orig,
        } => {
            let orig = *orig as f64;
            let low_wl = orig / low_freq_factor;
            let high_wl = orig / high_freq_factor;
            let inv: Vec<f64> = default_with(base)
                .into_iter()
                .map(|f| {
                    let wavelen = 2.0 * PI / f;
                    if wavelen < high_wl {
                        f
                    } else if wavelen > low_wl {
                        f / factor
                    } else {
                        let smooth = (orig / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                        (1.0 - smooth) * f / factor + smooth * f
                    }
                })
                .collect();
            (to32(inv), 1.0)
        }
        RopeScaling::Yarn {
            factor,
            original_max_position_embeddings: orig,
            beta_fast,
            beta_slow,
            attention_factor,
            mscale,
            mscale_all_dim,
            truncate,
        } => {
            let get_mscale = |scale: f64, m: f64| if scale <= 1.0 { 1.0 } else { 0.1 * m * scale.ln() + 1.0 };
            let att = match (attention_factor, mscale, mscale_all_dim) {
                (Some(a), _, _) => *a,
                (None, Some(m), Some(ma)) => get_mscale(*factor, *m) / get_mscale(*factor, *ma),
                _ => get_mscale(*factor, 1.0),
            };
            let orig = *orig as f64;
            let d = dim as f64;
            let correction_dim = |rot: f64| d * (orig / (rot * 2.0 * PI)).ln() / (2.0 * base.ln());
            let (mut low, mut high) = (correction_dim(*beta_fast), correction_dim(*beta_slow));
            if *truncate {
                low = low.floor();
                high = high.ceil();
            }
            let (low, mut high) = (low.max(0.0), high.min(d - 1.0));
            if low == high {
                high += 0.001;
            }
            let inv: Vec<f64> = (0..dim / 2)
                .map(|i| {
                    let pos_freq = base.powf((2 * i) as f64 / d);
                    let extra = 1.0 / pos_freq;
                    let inter = 1.0 / (factor * pos_freq);
                    let ramp = ((i as f64 - low) / (high - low)).clamp(0.0, 1.0);
                    let extra_factor = 1.0 - ramp;
                    inter * (1.0 - extra_factor) + extra * extra_factor
                })
                .collect();
            (to32(inv), att as f32)
        }
    }
}
