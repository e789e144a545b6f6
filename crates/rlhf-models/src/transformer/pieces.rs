//! The position-wise pieces: the norm (LayerNorm or RMSNorm) and the MLP (plain or gated).

use candle_core::Tensor;
use rlhf_ops::nn::{layer_norm, rms_norm, silu_mul, Activation};
use rlhf_peft::{Param, Proj};

use super::Fwd;
use crate::config::{ModelConfig, NormKind};
use crate::error::Result;

/// A normalisation layer: LayerNorm (weight and bias) or RMSNorm (weight only).
#[derive(Clone, Debug)]
pub struct Norm {
    /// Scale `(n)`.
    pub weight: Param,
    /// Shift `(n)` (LayerNorm only).
    pub bias: Option<Param>,
    eps: f64,
    kind: NormKind,
}

impl Norm {
    /// Loads the norm `name` of width `n` of a model with `cfg`'s kind of norm.
    pub(super) fn load(cfg: &ModelConfig, name: String, n: usize, ld: &mut super::Loader) -> Result<Self> {
        let weight = ld.param(format!("{name}.weight"), &[n], false)?;
        let bias = match cfg.norm {
            NormKind::LayerNorm => Some(ld.param(format!("{name}.bias"), &[n], false)?),
            NormKind::RmsNorm => None,
        };
        Ok(Self {
            weight,
            bias,
            eps: cfg.norm_eps,
            kind: cfg.norm,
        })
    }

    /// The epsilon.
    pub fn eps(&self) -> f64 {
        self.eps
    }

    /// LayerNorm or RMSNorm.
    pub fn kind(&self) -> NormKind {
        self.kind
    }

    /// Normalises the last dimension.
    ///
    /// RMSNorm follows transformers' order: `x · rsqrt(mean(x²) + eps)` in f32 (f64 for f64
    /// models), cast back to the input dtype, then times the weight
    /// ([`rlhf_ops::nn::rms_norm`]).
    ///
    /// # Shapes
    /// `x`: `(.., n)` → `(.., n)`.
    pub fn forward(&self, x: &Tensor, fwd: &Fwd) -> Result<Tensor> {
        let (g, a) = (fwd.grad, fwd.adapters);
        let w = self.weight.get_in(g, a);
        match (&self.kind, &self.bias) {
            (NormKind::LayerNorm, Some(b)) => Ok(layer_norm(x, w, b.get_in(g, a), self.eps)?),
            _ => Ok(rms_norm(x, w, self.eps)?),
        }
    }

    pub(super) fn push_params<'a>(&'a self, out: &mut Vec<(String, &'a Param)>, name: String) {
        out.push((format!("{name}.weight"), &self.weight));
        if let Some(b) = &self.bias {
            out.push((format!("{name}.bias"), b));
        }
    }

    pub(super) fn push_params_mut<'a>(&'a mut self, out: &mut Vec<(String, &'a mut Param)>, name: String) {
        out.push((format!("{name}.weight"), &mut self.weight));
        if let Some(b) = &mut self.bias {
            out.push((format!("{name}.bias"), b));
        }
    }
}

/// The MLP of a block.
#[derive(Clone, Debug)]
pub enum Mlp {
    /// `fc_out(act(fc_in(x)))` (GPT-2's `c_fc`, `c_proj`).
    Plain {
        /// `(I, H)`.
        fc_in: Proj,
        /// `(H, I)`.
        fc_out: Proj,
    },
    /// `down(act(gate(x)) · up(x))` (SwiGLU).
    Gated {
        /// `(I, H)`.
        gate: Proj,
        /// `(I, H)`.
        up: Proj,
        /// `(H, I)`.
        down: Proj,
    },
}

impl Mlp {
    /// # Shapes
    /// `x`: `(.., H)` → `(.., H)`.
    pub fn forward(&self, x: &Tensor, act: Activation, fwd: &mut Fwd) -> Result<Tensor> {
        match self {
            Self::Plain { fc_in, fc_out } => {
                let m = fc_in.forward(x, &mut fwd.proj())?;
                Ok(fc_out.forward(&act.apply(&m)?, &mut fwd.proj())?)
            }
            Self::Gated { gate, up, down } => {
                let g = gate.forward(x, &mut fwd.proj())?;
                let u = up.forward(x, &mut fwd.proj())?;
                let h = match act {
                    Activation::Silu => silu_mul(&g, &u)?,
                    other => (other.apply(&g)? * u)?,
                };
                Ok(down.forward(&h, &mut fwd.proj())?)
            }
        }
    }
}
