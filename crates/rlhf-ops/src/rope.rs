//! Rotary position embedding (Su et al. 2021, RoFormer) as transformers 5 computes it for
//! the Llama family: the inverse frequencies of every `rope_type` these checkpoints use
//! (`modeling_rope_utils.py`, `_compute_*_parameters`), the per-token cos/sin tables
//! (`LlamaRotaryEmbedding.forward`) and their application in the rotate-half convention
//! (`apply_rotary_pos_emb`).
//!
//! Precision follows transformers: inverse frequencies and tables are f32 (the constants of
//! each formula are evaluated in f64 where transformers evaluates them in Python, and the
//! per-frequency arithmetic in f32 where it uses f32 tensors); `freqs = pos · inv_freq` is one
//! f32 product; `cos`, `sin` are taken of that f32 value (correctly rounded here, within an
//! ulp of torch's) and multiplied by `attention_scaling` in f32. Tables carry
//! `cat(freqs, freqs)`: `d = head_dim` entries per token, each half repeating.
//!
//! Positions are per token (`N` of them, every row its own): left-padded batches and packed
//! sequences never share one offset.
//!
//! Not covered: `longrope` (Phi-3), `proportional` and partial rotary factors below 1 (no
//! Llama, Qwen2/2.5/3, Mistral or SmolLM2 checkpoint uses them).

use candle_core::{Device, Tensor, D};

/// The scaling of a `rope_type` (transformers 5 `rope_parameters`, or the legacy
/// `rope_scaling` with `type`/`rope_type`). Field names are the config keys.
#[derive(Clone, Debug, PartialEq)]
pub enum RopeScaling {
    /// `default` (or no `rope_scaling`): `inv_freq_i = θ^(−2i/d)`.
    Default,
    /// `linear` (kaiokendev's position interpolation): `inv_freq / factor`.
    Linear {
        /// Divides every frequency.
        factor: f64,
    },
    /// `dynamic` (NTK-aware, bloc97/emozilla): `θ' = θ · (factor·L/max_pos − (factor − 1))^(d/(d−2))`
    /// for a current length `L = max(seq_len, max_position_embeddings)`; equals
    /// [`RopeScaling::Default`] up to `max_position_embeddings`. transformers 5 reads
    /// `max_position_embeddings` here, never `original_max_position_embeddings`.
    Dynamic {
        /// The NTK factor.
        factor: f64,
    },
    /// `yarn` (Peng et al. 2023): per-frequency blend of interpolated (`/factor`) and original
    /// frequencies over a linear ramp between the correction dimensions of `beta_fast` and
    /// `beta_slow` rotations, and `attention_factor` on cos and sin.
    Yarn {
        /// Interpolation factor; `None`: `max_position_embeddings / original_max_position_embeddings`.
        factor: Option<f64>,
        /// The pre-training length (transformers defaults it to `max_position_embeddings`).
        original_max_position_embeddings: usize,
        /// Rotations that bound extrapolation (default 32).
        beta_fast: Option<f64>,
        /// Rotations that bound interpolation (default 1).
        beta_slow: Option<f64>,
        /// With `mscale_all_dim`: `attention_factor = mscale(factor, mscale) / mscale(factor, mscale_all_dim)`.
        mscale: Option<f64>,
        /// See `mscale`.
        mscale_all_dim: Option<f64>,
        /// Overrides the factor of cos and sin (default `0.1·ln(factor) + 1`).
        attention_factor: Option<f64>,
        /// Floor/ceil the correction range (default true).
        truncate: Option<bool>,
    },
    /// `llama3` (Llama 3.1/3.2/3.3): high frequencies kept, low ones divided by `factor`,
    /// the band between interpolated smoothly.
    Llama3 {
        /// Divides the low frequencies (8 for Llama 3.1, 32 for 3.2 1B/3B).
        factor: f64,
        /// `original_max_position_embeddings / low_freq_factor` is the long-wavelength bound.
        low_freq_factor: f64,
        /// `original_max_position_embeddings / high_freq_factor` is the short-wavelength bound.
        high_freq_factor: f64,
        /// The pre-training length (8192 for Llama 3.1).
        original_max_position_embeddings: usize,
    },
}

/// What the frequencies are computed from: the resolved config values.
#[derive(Clone, Debug, PartialEq)]
pub struct RopeConfig {
    /// Rotated components per head (`head_dim`; `partial_rotary_factor` is 1 here).
    pub head_dim: usize,
    /// The base `θ` (`rope_theta`).
    pub rope_theta: f64,
    /// `max_position_embeddings` (the dynamic threshold; yarn's default factor).
    pub max_position_embeddings: usize,
    /// The `rope_type` and its parameters.
    pub scaling: RopeScaling,
}

/// A RoPE configuration that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum RopeError {
    /// A parameter outside its domain.
    #[error("rope {rope_type}: {msg} (hint: check rope_parameters / rope_scaling in config.json)")]
    Invalid {
        /// The `rope_type`.
        rope_type: &'static str,
        /// What is wrong.
        msg: String,
    },
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

impl RopeScaling {
    /// The `rope_type` string of the config.
    pub fn rope_type(&self) -> &'static str {
        match self {
            Self::Default => "default",
            Self::Linear { .. } => "linear",
            Self::Dynamic { .. } => "dynamic",
            Self::Yarn { .. } => "yarn",
            Self::Llama3 { .. } => "llama3",
        }
    }
}

/// `θ^(−2i/d)` for `i < d/2` in f32, as `1.0 / (base ** (arange(0, d, 2).float() / d))`.
fn default_inv_freq(base: f64, d: usize) -> Vec<f32> {
    (0..d / 2)
        .map(|i| {
            let e = (2 * i) as f32 / d as f32;
            1.0 / ((base as f32 as f64).powf(e as f64) as f32)
        })
        .collect()
}

/// YaRN's `mscale` (paper Eq. 21): `0.1 · m · ln(s) + 1`, 1 for `s ≤ 1`.
fn yarn_mscale(scale: f64, m: f64) -> f64 {
    if scale <= 1.0 {
        1.0
    } else {
        0.1 * m * scale.ln() + 1.0
    }
}

impl RopeConfig {
    fn invalid(&self, msg: String) -> RopeError {
        RopeError::Invalid {
            rope_type: self.scaling.rope_type(),
            msg,
        }
    }

    fn check(&self) -> Result<(), RopeError> {
        let d = self.head_dim;
        if d < 2 || !d.is_multiple_of(2) {
            return Err(self.invalid(format!("head_dim {d} must be even and at least 2")));
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 1.0) {
            return Err(self.invalid(format!(
                "rope_theta {} must be a finite number above 1",
                self.rope_theta
            )));
        }
        let positive = |name: &str, v: f64| match v.is_finite() && v > 0.0 {
            true => Ok(()),
            false => Err(self.invalid(format!("{name} {v} must be a finite positive number"))),
        };
        match &self.scaling {
            RopeScaling::Default => Ok(()),
            RopeScaling::Linear { factor } | RopeScaling::Dynamic { factor } => positive("factor", *factor),
            RopeScaling::Yarn {
                factor,
                original_max_position_embeddings,
                ..
            } => {
                if *original_max_position_embeddings == 0 {
                    return Err(self.invalid("original_max_position_embeddings is 0".into()));
                }
                factor.map_or(Ok(()), |f| positive("factor", f))
            }
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                positive("factor", *factor)?;
                positive("low_freq_factor", *low_freq_factor)?;
                positive("high_freq_factor", *high_freq_factor)?;
                if high_freq_factor <= low_freq_factor || *original_max_position_embeddings == 0 {
                    return Err(self.invalid(format!(
                        "need high_freq_factor ({high_freq_factor}) > low_freq_factor ({low_freq_factor}) \
                         and original_max_position_embeddings > 0 ({original_max_position_embeddings})"
                    )));
                }
                Ok(())
            }
        }
    }

    /// `(inv_freq, attention_scaling)` at model construction (transformers' `rope_init_fn(config)`,
    /// `seq_len = None`): `d/2` f32 frequencies and the factor of cos and sin.
    pub fn frequencies(&self) -> Result<RopeFrequencies, RopeError> {
        self.frequencies_at(None)
    }

    /// [`RopeConfig::frequencies`] for a current length `seq_len` (`max(position_ids) + 1`);
    /// only [`RopeScaling::Dynamic`] depends on it (see [`Rope::update`] for when transformers
    /// recomputes).
    pub fn frequencies_at(&self, seq_len: Option<usize>) -> Result<RopeFrequencies, RopeError> {
        self.check()?;
        let (d, base) = (self.head_dim, self.rope_theta);
        let half = d / 2;
        let (inv_freq, attention_scaling) = match &self.scaling {
            RopeScaling::Default => (default_inv_freq(base, d), 1.0),
            RopeScaling::Linear { factor } => {
                let f = *factor as f32;
                (default_inv_freq(base, d).into_iter().map(|x| x / f).collect(), 1.0)
            }
            RopeScaling::Dynamic { factor } => {
                let max = self.max_position_embeddings as f64;
                let len = seq_len.map_or(max, |s| (s as f64).max(max));
                let b = base * ((factor * len / max) - (factor - 1.0)).powf(d as f64 / (d as f64 - 2.0));
                (default_inv_freq(b, d), 1.0)
            }
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                let old = *original_max_position_embeddings as f64;
                let (low_wl, high_wl) = ((old / low_freq_factor) as f32, (old / high_freq_factor) as f32);
                let (f, lo, span) = (
                    *factor as f32,
                    *low_freq_factor as f32,
                    (high_freq_factor - low_freq_factor) as f32,
                );
                let two_pi = (2.0 * std::f64::consts::PI) as f32;
                let inv = default_inv_freq(base, d)
                    .into_iter()
                    .map(|x| {
                        let wavelen = two_pi / x;
                        let scaled = if wavelen > low_wl { x / f } else { x };
                        if wavelen < high_wl || wavelen > low_wl {
                            return scaled;
                        }
                        let smooth = (old as f32 / wavelen - lo) / span;
                        (1.0 - smooth) * scaled / f + smooth * scaled
                    })
                    .collect();
                (inv, 1.0)
            }
            RopeScaling::Yarn {
                factor,
                original_max_position_embeddings,
                beta_fast,
                beta_slow,
                mscale,
                mscale_all_dim,
                attention_factor,
                truncate,
            } => {
                let orig = *original_max_position_embeddings as f64;
                let factor = factor.unwrap_or(self.max_position_embeddings as f64 / orig);
                let attention = match (attention_factor, mscale, mscale_all_dim) {
                    (Some(a), _, _) => *a,
                    (None, Some(m), Some(ma)) if *m != 0.0 && *ma != 0.0 => {
                        yarn_mscale(factor, *m) / yarn_mscale(factor, *ma)
                    }
                    _ => yarn_mscale(factor, 1.0),
                };
                // `or` in Python: 0 and None both take the default.
                let beta_fast = beta_fast.filter(|b| *b != 0.0).unwrap_or(32.0);
                let beta_slow = beta_slow.filter(|b| *b != 0.0).unwrap_or(1.0);
                let dim = d as f64;
                let correction = |rot: f64| dim * (orig / (rot * 2.0 * std::f64::consts::PI)).ln() / (2.0 * base.ln());
                let (mut low, mut high) = (correction(beta_fast), correction(beta_slow));
                if truncate.unwrap_or(true) {
                    (low, high) = (low.floor(), high.ceil());
                }
                let (low, mut high) = (low.max(0.0), high.min(dim - 1.0));
                if low == high {
                    high += 0.001;
                }
                let (f32_low, f32_span, f32_factor) = (low as f32, (high - low) as f32, factor as f32);
                let inv = (0..half)
                    .map(|i| {
                        let e = (2 * i) as f32 / d as f32;
                        let pos_freq = (base as f32 as f64).powf(e as f64) as f32;
                        let extrapolation = 1.0 / pos_freq;
                        let interpolation = 1.0 / (f32_factor * pos_freq);
                        let ramp = ((i as f32 - f32_low) / f32_span).clamp(0.0, 1.0);
                        let extra_factor = 1.0 - ramp;
                        interpolation * (1.0 - extra_factor) + extrapolation * extra_factor
                    })
                    .collect();
                (inv, attention)
            }
        };
        Ok(RopeFrequencies {
            inv_freq,
            attention_scaling: attention_scaling as f32,
        })
    }
}

/// Inverse frequencies (`d/2`, f32) and the factor transformers multiplies cos and sin by
/// (`attention_scaling`: 1 except for yarn).
#[derive(Clone, Debug, PartialEq)]
pub struct RopeFrequencies {
    /// `inv_freq_i`, `i < d/2`.
    pub inv_freq: Vec<f32>,
    /// The factor of cos and sin.
    pub attention_scaling: f32,
}

impl RopeFrequencies {
    /// The cos and sin rows of one position into `cos`, `sin` (`d` each, the decoder's
    /// per-step tables): `[cos(p·f), cos(p·f)] · attention_scaling`, the same for sin.
    ///
    /// # Panics
    /// If `cos` or `sin` is shorter than `d = 2·inv_freq.len()`.
    pub fn row(&self, position: u32, cos: &mut [f32], sin: &mut [f32]) {
        let half = self.inv_freq.len();
        let p = position as f32;
        for (i, &f) in self.inv_freq.iter().enumerate() {
            let a = (p * f) as f64;
            let (c, s) = (
                (a.cos() as f32) * self.attention_scaling,
                (a.sin() as f32) * self.attention_scaling,
            );
            cos[i] = c;
            cos[half + i] = c;
            sin[i] = s;
            sin[half + i] = s;
        }
    }

    /// The tables of `N` positions: `(cos, sin)`, each row-major `N × d`.
    pub fn tables(&self, positions: &[u32]) -> (Vec<f32>, Vec<f32>) {
        let d = 2 * self.inv_freq.len();
        let (mut cos, mut sin) = (vec![0f32; positions.len() * d], vec![0f32; positions.len() * d]);
        for ((&p, c), s) in positions
            .iter()
            .zip(cos.chunks_exact_mut(d))
            .zip(sin.chunks_exact_mut(d))
        {
            self.row(p, c, s);
        }
        (cos, sin)
    }

    /// [`RopeFrequencies::tables`] as f32 tensors `(N, d)` on `device`.
    pub fn cos_sin(&self, positions: &[u32], device: &Device) -> candle_core::Result<(Tensor, Tensor)> {
        let d = 2 * self.inv_freq.len();
        let (cos, sin) = self.tables(positions);
        let n = positions.len();
        Ok((
            Tensor::from_vec(cos, (n, d), device)?,
            Tensor::from_vec(sin, (n, d), device)?,
        ))
    }
}

/// A model's rotary embedding with transformers' `dynamic_rope_update` state: the current
/// frequencies, recomputed for `dynamic` scaling as lengths change.
#[derive(Clone, Debug)]
pub struct Rope {
    config: RopeConfig,
    original: RopeFrequencies,
    current: RopeFrequencies,
    /// `max_seq_len_cached`: the length the current frequencies were computed for.
    cached_len: usize,
}

impl Rope {
    /// The embedding at model construction.
    pub fn new(config: RopeConfig) -> Result<Self, RopeError> {
        let original = config.frequencies()?;
        Ok(Self {
            cached_len: config.max_position_embeddings,
            current: original.clone(),
            original,
            config,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &RopeConfig {
        &self.config
    }

    /// The frequencies the next tables use.
    pub fn frequencies(&self) -> &RopeFrequencies {
        &self.current
    }

    /// transformers' `dynamic_frequency_update`, called before each forward with
    /// `seq_len = max(position_ids) + 1` over the whole batch (a no-op unless dynamic):
    /// - growth: `seq_len` above the cached length recomputes the frequencies for `seq_len`
    ///   and caches that length;
    /// - reset: `seq_len` *below* `max_position_embeddings` while the cache had grown past it
    ///   restores the original frequencies.
    ///
    /// Between the two — `max_position_embeddings ≤ seq_len ≤` the cached length — the
    /// frequencies of the longest length seen so far stay in use, so after a long sequence
    /// a shorter one (still past the original maximum) is rotated with the longer one's
    /// frequencies: dynamic RoPE depends on the history of calls, as in transformers.
    pub fn update(&mut self, seq_len: usize) -> Result<(), RopeError> {
        if !matches!(self.config.scaling, RopeScaling::Dynamic { .. }) {
            return Ok(());
        }
        let original_len = self.config.max_position_embeddings;
        let cached = self.cached_len;
        if seq_len > cached {
            self.current = self.config.frequencies_at(Some(seq_len))?;
            self.cached_len = seq_len;
        }
        if seq_len < original_len && cached > original_len {
            self.current = self.original.clone();
            self.cached_len = original_len;
        }
        Ok(())
    }
}

/// `rotate_half(x) = cat(−x[.., d/2..], x[.., ..d/2])` over the last dimension.
pub fn rotate_half(x: &Tensor) -> candle_core::Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    let x1 = x.narrow(D::Minus1, 0, d / 2)?;
    let x2 = x.narrow(D::Minus1, d / 2, d - d / 2)?;
    Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)
}

/// RoPE of the rows of `x` (tokens; heads side by side in each row, the layout right after
/// `q_proj`/`k_proj`): `x·cos + rotate_half(x)·sin` per head (transformers'
/// `apply_rotary_pos_emb`). The tables are cast to the dtype of `x` first, as transformers
/// casts them to the hidden states' dtype.
///
/// f32 on the CPU runs [`crate::kernels::apply_rope`] (the same arithmetic, one pass);
/// every other case [`apply_rope_composed`]. Both differentiate `x`, `cos` and `sin`.
///
/// # Shapes
/// `x`: `(.., heads·d)` with `N` rows, `cos`, `sin`: `(N, d)` (from
/// [`RopeFrequencies::cos_sin`]) → the shape of `x`.
pub fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
    if crate::kernels::applies(&[x, cos, sin]) {
        return crate::kernels::apply_rope(x, cos, sin);
    }
    apply_rope_composed(x, cos, sin)
}

/// [`apply_rope`] from candle ops (every dtype; the fused kernel's test oracle).
pub fn apply_rope_composed(x: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
    let w = x.dim(D::Minus1)?;
    let d = cos.dim(D::Minus1)?;
    let rows = x.elem_count() / w.max(1);
    if d == 0 || d % 2 != 0 || w % d != 0 || cos.elem_count() != rows * d || sin.dims() != cos.dims() {
        candle_core::bail!(
            "apply_rope: x {:?} with cos {:?} and sin {:?}: expected x (.., heads·d) and tables (rows of x, d), d even",
            x.dims(),
            cos.dims(),
            sin.dims()
        )
    }
    let xh = x.reshape((rows, w / d, d))?;
    let cos = cos.to_dtype(x.dtype())?.reshape((rows, 1, d))?;
    let sin = sin.to_dtype(x.dtype())?.reshape((rows, 1, d))?;
    let y = (xh.broadcast_mul(&cos)? + rotate_half(&xh)?.broadcast_mul(&sin)?)?;
    y.reshape(x.shape())
}
