//! Linear projections of a transformer: the closed set of layer kinds a model matches on.
//!
//! [`Proj`] is `Dense | Lora | Int8 | Nf4`, matched in [`Proj::forward`] (and the few
//! bookkeeping methods beside it). Every kind computes `y = x W^T + b` for a weight `W` in
//! `nn.Linear`'s layout `(out, in)` — the one layout inside, whatever a checkpoint stores
//! (models transpose GPT-2's `Conv1D` weights once at load); they differ in how `W` is stored
//! and whether a low-rank update is added:
//!
//! | kind | weight | forward |
//! |---|---|---|
//! | `Dense` | `(out, in)` [`Param`] | `x W^T + b` |
//! | `Int8` | bnb `Int8Params` `(out, in)` | `x deq(W)^T + b` (bnb CPU `MatMul8bitFp`) |
//! | `Nf4` | bnb `Params4bit` `(out, in)` | `x deq(W)^T + b` (bnb `MatMul4Bit`, f32) |
//! | `Lora` | a frozen base of the three above | `base(x) + (dropout(x) A^T B^T) * scaling` |

use candle_core::{DType, Result, Tensor};
use rlhf_ops::dropout::DropoutKeys;

use crate::int8::{Int8Linear, QuantizedWeight};
use crate::lora::LoraLinear;
use crate::nf4::Nf4Linear;
use crate::Param;

/// How a projection runs: gradients, adapters, and (in train mode) the dropout stream.
///
/// Built by the model from its own forward settings; `adapters: false` is PEFT's
/// `disable_adapter()` (LoRA updates skipped, kept original biases used).
#[derive(Debug)]
pub struct ProjCtx<'a> {
    /// Record the autograd graph.
    pub grad: bool,
    /// Apply LoRA adapters (and trained biases / saved modules instead of their originals).
    pub adapters: bool,
    /// Train mode: `lora_dropout` draws its masks from these per-example streams. `None` is
    /// eval mode.
    pub dropout: Option<&'a mut DropoutKeys>,
}

impl ProjCtx<'static> {
    /// Eval mode, no gradients, adapters on.
    pub fn eval() -> Self {
        ProjCtx {
            grad: false,
            adapters: true,
            dropout: None,
        }
    }
}

/// A dense projection in `nn.Linear`'s layout: weight `(out, in)`, `y = x W^T + b`.
#[derive(Clone, Debug)]
pub struct Dense {
    /// Weight `(out, in)`.
    pub weight: Param,
    /// Bias `(out)`.
    pub bias: Option<Param>,
}

impl Dense {
    /// Input features.
    pub fn in_features(&self) -> usize {
        self.weight.value().dims()[1]
    }

    /// Output features.
    pub fn out_features(&self) -> usize {
        self.weight.value().dims()[0]
    }

    /// `y = x W^T + b`.
    ///
    /// # Shapes
    /// `x`: `(.., in)` → `(.., out)`.
    pub fn forward(&self, x: &Tensor, ctx: &ProjCtx) -> Result<Tensor> {
        let y = linear_2d(x, self.weight.get_in(ctx.grad, ctx.adapters))?;
        add_bias(y, self.bias.as_ref(), ctx)
    }
}

/// A frozen quantized weight (an [`Int8Linear`] or [`Nf4Linear`] built without bias) plus
/// the bias as a [`Param`], so that it can train (`bias = "all" | "lora_only"`).
#[derive(Clone, Debug)]
pub struct Quantized<L> {
    /// The quantized layer, `nn.Linear` layout `(out, in)`; its own `bias` is `None`.
    pub linear: L,
    /// Bias `(out)`.
    pub bias: Option<Param>,
}

impl Quantized<Int8Linear> {
    /// LLM.int8 rows of a dense projection: the `(out, in)` weight quantized per output row,
    /// as bitsandbytes stores an `nn.Linear` (and, for GPT-2, `Conv1D.weight.T`, which is
    /// what the model holds).
    pub fn from_dense(d: &Dense, threshold: f32) -> crate::int8::Result<Self> {
        let w = d.weight.value().contiguous()?.to_dtype(DType::F32)?;
        Ok(Self {
            linear: Int8Linear::from_dense(&w, None, threshold)?,
            bias: d.bias.clone(),
        })
    }
}

impl Quantized<Nf4Linear> {
    /// NF4 blocks of a dense projection: the `(out, in)` weight flattened row-major into
    /// blocks of `blocksize`, as `Linear4bit` stores it.
    pub fn from_dense(d: &Dense, blocksize: usize, double_quant: bool) -> crate::int8::Result<Self> {
        let w = d.weight.value().contiguous()?.to_dtype(DType::F32)?;
        Ok(Self {
            linear: Nf4Linear::from_dense(&w, None, blocksize, double_quant)?,
            bias: d.bias.clone(),
        })
    }
}

/// A projection of the model: the closed set of layer kinds, matched in [`Proj::forward`].
#[derive(Clone, Debug)]
pub enum Proj {
    /// Full-precision dense weight.
    Dense(Dense),
    /// A LoRA adapter over a frozen `Dense`, `Int8` or `Nf4` base.
    Lora(LoraLinear),
    /// A frozen LLM.int8 weight.
    Int8(Quantized<Int8Linear>),
    /// A frozen NF4 weight.
    Nf4(Quantized<Nf4Linear>),
}

impl Proj {
    /// A dense projection from a `(out, in)` weight and optional bias.
    pub fn dense(weight: Param, bias: Option<Param>) -> Self {
        Self::Dense(Dense { weight, bias })
    }

    /// Applies the projection.
    ///
    /// Quantized bases compute in f32 (bnb's `compute_dtype=float32`): the input is cast to
    /// f32 and the output back to the input dtype. An int8 base runs bnb's training path
    /// (`MatMul8bitFp`), or, in passes without gradients with
    /// [`crate::int8::set_llm_int8_inference`] on, its LLM.int8 inference path.
    ///
    /// # Shapes
    /// `x`: `(.., in)` → `(.., out)`.
    pub fn forward(&self, x: &Tensor, ctx: &mut ProjCtx) -> Result<Tensor> {
        match self {
            Self::Dense(d) => d.forward(x, ctx),
            Self::Lora(l) => l.forward(x, ctx),
            Self::Int8(q) => {
                let x32 = x.to_dtype(DType::F32)?;
                let y = match !ctx.grad && crate::int8::llm_int8_inference() {
                    true => q.linear.forward_eval(&x32)?,
                    false => q.linear.forward(&x32)?,
                };
                add_bias(y.to_dtype(x.dtype())?, q.bias.as_ref(), ctx)
            }
            Self::Nf4(q) => {
                let y = q.linear.forward(&x.to_dtype(DType::F32)?)?.to_dtype(x.dtype())?;
                add_bias(y, q.bias.as_ref(), ctx)
            }
        }
    }

    /// `(in, out)`.
    pub fn shape(&self) -> (usize, usize) {
        match self {
            Self::Dense(d) => (d.in_features(), d.out_features()),
            Self::Lora(l) => l.base.shape(),
            Self::Int8(q) => (q.linear.weight.in_features, q.linear.weight.out_features),
            Self::Nf4(q) => (q.linear.weight.shape.1, q.linear.weight.shape.0),
        }
    }

    /// The bias, if any.
    pub fn bias(&self) -> Option<&Param> {
        match self {
            Self::Dense(d) => d.bias.as_ref(),
            Self::Lora(l) => l.base.bias(),
            Self::Int8(q) => q.bias.as_ref(),
            Self::Nf4(q) => q.bias.as_ref(),
        }
    }

    /// Mutable access to the bias, if any.
    pub fn bias_mut(&mut self) -> Option<&mut Param> {
        match self {
            Self::Dense(d) => d.bias.as_mut(),
            Self::Lora(l) => l.base.bias_mut(),
            Self::Int8(q) => q.bias.as_mut(),
            Self::Nf4(q) => q.bias.as_mut(),
        }
    }

    /// The named weights of this projection, relative to the module: `weight` (dense only;
    /// a quantized weight is not a [`Param`]), `bias`, and for LoRA `lora_A.weight` `(r, in)`
    /// and `lora_B.weight` `(out, r)` (PEFT's names).
    pub fn params(&self) -> Vec<(&'static str, &Param)> {
        let mut v = Vec::new();
        match self {
            Self::Dense(d) => v.push(("weight", &d.weight)),
            Self::Lora(l) => {
                v = l.base.params();
                v.push(("lora_A.weight", &l.lora_a));
                v.push(("lora_B.weight", &l.lora_b));
                return v;
            }
            Self::Int8(_) | Self::Nf4(_) => {}
        }
        if let Some(b) = self.bias() {
            v.push(("bias", b));
        }
        v
    }

    /// Mutable access to the named weights of [`Proj::params`].
    pub fn params_mut(&mut self) -> Vec<(&'static str, &mut Param)> {
        match self {
            Self::Dense(d) => {
                let mut v = vec![("weight", &mut d.weight)];
                v.extend(d.bias.as_mut().map(|b| ("bias", b)));
                v
            }
            Self::Lora(l) => {
                let mut v = l.base.params_mut();
                v.push(("lora_A.weight", &mut l.lora_a));
                v.push(("lora_B.weight", &mut l.lora_b));
                v
            }
            Self::Int8(q) => q.bias.as_mut().map(|b| ("bias", b)).into_iter().collect(),
            Self::Nf4(q) => q.bias.as_mut().map(|b| ("bias", b)).into_iter().collect(),
        }
    }

    /// The LoRA layer, when this is one.
    pub fn lora(&self) -> Option<&LoraLinear> {
        match self {
            Self::Lora(l) => Some(l),
            _ => None,
        }
    }

    /// Scalars of the weight and bias as the model computes with them (a quantized weight
    /// counts `in * out`, as PEFT's `print_trainable_parameters` counts `Params4bit`),
    /// without LoRA factors.
    pub fn base_numel(&self) -> usize {
        let (i, o) = self.shape();
        i * o + self.bias().map_or(0, |b| b.value().elem_count())
    }

    /// The weight `(out, in)` that this projection multiplies by, in `dtype`: the dense
    /// weight; a quantized weight dequantized exactly as its forward does; for LoRA, the
    /// base's plus [`LoraLinear::delta_weight`] (PEFT's `merge`), summed in f32 or f64.
    pub fn effective_weight(&self, dtype: DType) -> Result<Tensor> {
        match self {
            Self::Dense(d) => d.weight.value().to_dtype(dtype),
            Self::Int8(q) => QuantizedWeight::Int8(q.linear.weight.clone())
                .dequantized()?
                .to_dtype(dtype),
            Self::Nf4(q) => QuantizedWeight::Nf4(q.linear.weight.clone())
                .dequantized()?
                .to_dtype(dtype),
            Self::Lora(l) => {
                let delta = l.delta_weight()?;
                let w = l.base.effective_weight(delta.dtype())?;
                (w + delta)?.to_dtype(dtype)
            }
        }
    }

    /// A plain [`Proj::Dense`] computing what this projection computes with adapters on
    /// (PEFT's `merge_and_unload` for one layer): weight [`Proj::effective_weight`] in
    /// `dtype` (a quantized base is dequantized and kept dense, not re-quantized), the
    /// current bias. Every weight of the result is frozen and owns its storage.
    pub fn merged(&self, dtype: DType) -> Result<Proj> {
        let weight = Param::frozen(self.effective_weight(dtype)?.copy()?);
        let bias = match self.bias() {
            Some(b) => Some(Param::frozen(b.value().copy()?)),
            None => None,
        };
        Ok(Self::dense(weight, bias))
    }
}

/// `y + b` with the bias the context asks for ([`Param::get_in`]).
fn add_bias(y: Tensor, bias: Option<&Param>, ctx: &ProjCtx) -> Result<Tensor> {
    match bias {
        Some(b) => {
            let b = b.get_in(ctx.grad, ctx.adapters);
            if rlhf_ops::kernels::applies(&[&y, b]) {
                rlhf_ops::kernels::bias_add(&y, b)
            } else {
                y.broadcast_add(b)
            }
        }
        None => Ok(y),
    }
}

/// `x Wᵀ` for `x: (.., in)` and a weight `W: (out, in)` in `nn.Linear`'s layout, flattening
/// the leading dimensions into one product ([`rlhf_ops::linear::linear`]: a backward that
/// builds only the gradients its inputs need).
pub fn linear_2d(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let dims = x.dims();
    let k = dims[dims.len() - 1];
    let rows = x.elem_count() / k.max(1);
    let mut out_dims = dims.to_vec();
    *out_dims.last_mut().expect("invariant: x has at least one dimension") = w.dim(0)?;
    rlhf_ops::linear::linear(&x.reshape((rows, k))?, w)?.reshape(out_dims)
}
