//! Linear projections of a transformer: the closed set of layer kinds a model matches on.

use candle_core::{Result, Tensor};

use crate::Param;

/// A dense projection stored in GPT-2's `Conv1D` layout: weight `(in, out)`, `y = x W + b`.
#[derive(Clone, Debug)]
pub struct Dense {
    /// Weight `(in, out)`.
    pub weight: Param,
    /// Bias `(out)`.
    pub bias: Option<Param>,
}

impl Dense {
    /// Input features.
    pub fn in_features(&self) -> usize {
        self.weight.value().dims()[0]
    }

    /// Output features.
    pub fn out_features(&self) -> usize {
        self.weight.value().dims()[1]
    }

    /// `y = x W + b`.
    ///
    /// # Shapes
    /// `x`: `(.., in)` → `(.., out)`.
    pub fn forward(&self, x: &Tensor, grad: bool) -> Result<Tensor> {
        let w = self.weight.get(grad);
        let y = matmul_2d(x, w)?;
        match &self.bias {
            Some(b) => y.broadcast_add(b.get(grad)),
            None => Ok(y),
        }
    }
}

/// A projection of the model: the closed set of layer kinds, matched in [`Proj::forward`].
#[derive(Clone, Debug)]
pub enum Proj {
    /// Full-precision dense weight.
    Dense(Dense),
}

impl Proj {
    /// A dense projection from a `(in, out)` weight and optional bias.
    pub fn dense(weight: Param, bias: Option<Param>) -> Self {
        Self::Dense(Dense { weight, bias })
    }

    /// Applies the projection.
    ///
    /// # Shapes
    /// `x`: `(.., in)` → `(.., out)`.
    pub fn forward(&self, x: &Tensor, grad: bool) -> Result<Tensor> {
        match self {
            Self::Dense(d) => d.forward(x, grad),
        }
    }

    /// The named weights of this projection, relative to the module (`weight`, `bias`).
    pub fn params(&self) -> Vec<(&'static str, &Param)> {
        match self {
            Self::Dense(d) => {
                let mut v = vec![("weight", &d.weight)];
                if let Some(b) = &d.bias {
                    v.push(("bias", b));
                }
                v
            }
        }
    }

    /// Mutable access to the named weights (to change which are trainable).
    pub fn params_mut(&mut self) -> Vec<(&'static str, &mut Param)> {
        match self {
            Self::Dense(d) => {
                let mut v = vec![("weight", &mut d.weight)];
                if let Some(b) = &mut d.bias {
                    v.push(("bias", b));
                }
                v
            }
        }
    }
}

/// `x W` for `x: (.., in)` and `W: (in, out)`, flattening the leading dimensions into one
/// matrix product (one large GEMM instead of a batched one).
pub fn matmul_2d(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let dims = x.dims();
    let k = dims[dims.len() - 1];
    let n = w.dim(1)?;
    let rows = x.elem_count() / k.max(1);
    let mut out_dims = dims.to_vec();
    *out_dims.last_mut().expect("invariant: x has at least one dimension") = n;
    x.reshape((rows, k))?.matmul(w)?.reshape(out_dims)
}
