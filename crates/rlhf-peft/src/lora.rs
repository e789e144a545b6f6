//! LoRA (Hu et al. 2021, arXiv 2106.09685) with PEFT's contract:
//!
//! ```text
//! y = base(x) + lora_B(lora_A(dropout(x))) * scaling = base(x) + (dropout(x) A^T B^T) * scaling
//! ```
//!
//! `A: (r, in)`, `B: (out, r)` (PEFT's `lora_A.weight` / `lora_B.weight`), `scaling =
//! lora_alpha / r` (or `lora_alpha / sqrt(r)` with rsLoRA). The base is a frozen
//! [`Proj::Dense`] in `nn.Linear`'s layout `(out, in)`, or a frozen [`Proj::Int8`] /
//! [`Proj::Nf4`] (QLoRA); the merged weight is `W + B A * scaling` (PEFT's
//! `transpose(B @ A, fan_in_fan_out) * scaling` added to a weight stored in its own layout:
//! a GPT-2 `Conv1D` checkpoint, `fan_in_fan_out = true`, is transposed at the model's
//! boundary, so the sum inside is the same).
//!
//! Deliberate deviations from PEFT:
//! * Adapters of bf16/f16 bases are kept in f32 (PEFT's `autocast_adapter_dtype=True`
//!   default); of f64 bases in f64 (for finite-difference tests).
//! * With adapters disabled, trained biases fall back to their kept originals by default
//!   ([`ReferenceBias::Original`]); PEFT keeps the trained ones ([`ReferenceBias::Trained`]).

mod config;

use candle_core::{DType, Device, Tensor};
use rlhf_ops::rng::RngStream;

pub use config::{InitLoraWeights, LoraBias, LoraConfig, ReferenceBias, TargetModules, TaskType};

use crate::int8::QuantError;
use crate::proj::{linear_2d, Proj, ProjCtx};
use crate::Param;

/// Errors of LoRA configuration and layers.
#[derive(Debug, thiserror::Error)]
pub enum LoraError {
    /// A config field is invalid or names an unsupported feature.
    #[error("LoRA config field `{field}`: {msg}")]
    Config {
        /// The field (PEFT's name).
        field: String,
        /// What is wrong, with a hint.
        msg: String,
    },
    /// An adapter tensor does not fit the layer.
    #[error(
        "{what}: expected shape {expected:?}, got {got:?}\nhint: the adapter was trained for a different model or rank"
    )]
    Shape {
        /// Which tensor.
        what: String,
        /// The shape the layer needs.
        expected: Vec<usize>,
        /// The shape found.
        got: Vec<usize>,
    },
    /// LoRA on a LoRA layer.
    #[error("the projection already has a LoRA adapter; hint: merge it first (merge_and_unload)")]
    Nested,
    /// A quantization error.
    #[error(transparent)]
    Quant(#[from] QuantError),
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// A LoRA adapter over a frozen base projection (PEFT `lora.Linear`).
#[derive(Clone, Debug)]
pub struct LoraLinear {
    /// The frozen base: `Dense`, `Int8` or `Nf4` (never `Lora`).
    pub base: Box<Proj>,
    /// `lora_A.weight`, `(r, in)`.
    pub lora_a: Param,
    /// `lora_B.weight`, `(out, r)`.
    pub lora_b: Param,
    /// `lora_alpha / r` (or `/ sqrt(r)` with rsLoRA).
    pub scaling: f64,
    /// `lora_dropout`, applied to the adapter's input in train mode.
    pub dropout: f64,
}

/// The dtype adapters of a base with weights in `base` are kept in: f64 for f64, else f32.
pub fn adapter_dtype(base: DType) -> DType {
    if base == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

impl LoraLinear {
    /// Wraps `base` with given factors, checking `A: (r, in)` and `B: (out, r)`.
    pub fn new(base: Proj, lora_a: Param, lora_b: Param, scaling: f64, dropout: f64) -> Result<Self, LoraError> {
        if matches!(base, Proj::Lora(_)) {
            return Err(LoraError::Nested);
        }
        let (i, o) = base.shape();
        let r = lora_a.value().dims().first().copied().unwrap_or(0);
        for (what, p, expected) in [("lora_A.weight", &lora_a, [r, i]), ("lora_B.weight", &lora_b, [o, r])] {
            if p.value().dims() != expected {
                return Err(LoraError::Shape {
                    what: what.into(),
                    expected: expected.to_vec(),
                    got: p.value().dims().to_vec(),
                });
            }
        }
        Ok(Self {
            base: Box::new(base),
            lora_a,
            lora_b,
            scaling,
            dropout,
        })
    }

    /// A fresh adapter of rank `r` (PEFT `reset_lora_parameters`), factors trainable:
    /// * `true`: `A ~ U(-1/sqrt(in), 1/sqrt(in))` (`kaiming_uniform_(a=sqrt(5))`), `B = 0`,
    ///   so the layer equals its base;
    /// * `false`: A as above, `B ~ U(-1/sqrt(r), 1/sqrt(r))` (`nn.Linear`'s default);
    /// * `"gaussian"`: `A ~ N(0, (1/r)^2)`, `B = 0`.
    ///
    /// Values are drawn from `rng` (ours, not torch's generator).
    pub fn init(
        base: Proj,
        r: usize,
        scaling: f64,
        dropout: f64,
        init: &InitLoraWeights,
        rng: &mut RngStream,
    ) -> Result<Self, LoraError> {
        let (i, o) = base.shape();
        let dtype = adapter_dtype(base_dtype(&base));
        let device = base_device(&base);
        let uniform = |rng: &mut RngStream, n: usize, bound: f64| -> Vec<f64> {
            (0..n).map(|_| (rng.uniform_f64() * 2.0 - 1.0) * bound).collect()
        };
        if let InitLoraWeights::Name(n) = init {
            if n != "gaussian" {
                return Err(LoraError::Config {
                    field: "init_lora_weights".into(),
                    msg: format!("`{n}` is not supported; hint: use true, false or \"gaussian\""),
                });
            }
        }
        let a = match init {
            InitLoraWeights::Name(_) => (0..r * i).map(|_| rng.normal() / r as f64).collect(),
            InitLoraWeights::Bool(_) => uniform(rng, r * i, 1.0 / (i as f64).sqrt()),
        };
        let b = match init {
            InitLoraWeights::Bool(false) => uniform(rng, o * r, 1.0 / (r as f64).sqrt()),
            _ => vec![0.0; o * r],
        };
        let t = |v: Vec<f64>, shape: (usize, usize)| -> Result<Param, LoraError> {
            let t = Tensor::from_vec(v, shape, &device)?.to_dtype(dtype)?;
            Ok(Param::trainable(&t)?)
        };
        Self::new(base, t(a, (r, i))?, t(b, (o, r))?, scaling, dropout)
    }

    /// The rank `r`.
    pub fn rank(&self) -> usize {
        self.lora_a.value().dims()[0]
    }

    /// `base(x) + (dropout(x) A^T B^T) * scaling`; with adapters disabled in `ctx`, only
    /// `base(x)` (whose biases then read their kept originals, if any).
    ///
    /// # Shapes
    /// `x`: `(.., in)` → `(.., out)`.
    pub fn forward(&self, x: &Tensor, ctx: &mut ProjCtx) -> candle_core::Result<Tensor> {
        let y = self.base.forward(x, ctx)?;
        if !ctx.adapters {
            return Ok(y);
        }
        let (a, b) = (self.lora_a.get(ctx.grad), self.lora_b.get(ctx.grad));
        let xa = x.to_dtype(a.dtype())?;
        let xa = match ctx.dropout.as_deref_mut() {
            Some(keys) => keys.tokens(&xa, self.dropout)?,
            _ => xa,
        };
        let h = linear_2d(&linear_2d(&xa, a)?, b)?;
        let delta = (h * self.scaling)?.to_dtype(y.dtype())?;
        y + delta
    }

    /// The weight update `B A * scaling`, `(out, in)`, in the adapter dtype (PEFT
    /// `get_delta_weight`).
    pub fn delta_weight(&self) -> candle_core::Result<Tensor> {
        self.lora_b.value().matmul(self.lora_a.value())? * self.scaling
    }
}

/// The dtype a base computes in (quantized bases: f32).
fn base_dtype(base: &Proj) -> DType {
    match base {
        Proj::Dense(d) => d.weight.value().dtype(),
        Proj::Lora(l) => base_dtype(&l.base),
        Proj::Int8(_) | Proj::Nf4(_) => DType::F32,
    }
}

fn base_device(base: &Proj) -> Device {
    match base.bias() {
        Some(b) => b.value().device().clone(),
        None => match base {
            Proj::Dense(d) => d.weight.value().device().clone(),
            _ => Device::Cpu,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dense(i: usize, o: usize, seed: u64) -> Proj {
        let mut rng = RngStream::new(seed);
        let w: Vec<f32> = (0..i * o).map(|_| rng.normal() as f32 * 0.1).collect();
        let b: Vec<f32> = (0..o).map(|_| rng.normal() as f32 * 0.1).collect();
        Proj::dense(
            Param::frozen(Tensor::from_vec(w, (o, i), &Device::Cpu).unwrap()),
            Some(Param::frozen(Tensor::from_vec(b, o, &Device::Cpu).unwrap())),
        )
    }

    fn x(n: usize, i: usize) -> Tensor {
        let mut rng = RngStream::new(99);
        let v: Vec<f32> = (0..n * i).map(|_| rng.normal() as f32).collect();
        Tensor::from_vec(v, (n, i), &Device::Cpu).unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    #[test]
    fn lora_at_init_equals_its_base_exactly() {
        let base = dense(6, 5, 1);
        let lora = LoraLinear::init(
            base.clone(),
            3,
            2.0,
            0.0,
            &InitLoraWeights::Bool(true),
            &mut RngStream::new(2),
        );
        let lora = Proj::Lora(lora.unwrap());
        let x = x(4, 6);
        let (y0, y1) = (
            base.forward(&x, &mut ProjCtx::eval()).unwrap(),
            lora.forward(&x, &mut ProjCtx::eval()).unwrap(),
        );
        assert_eq!(max_diff(&y0, &y1), 0.0);
    }

    #[test]
    fn the_kaiming_bound_of_a_is_one_over_the_square_root_of_in() {
        let lora = LoraLinear::init(
            dense(64, 4, 1),
            8,
            1.0,
            0.0,
            &InitLoraWeights::Bool(false),
            &mut RngStream::new(3),
        );
        let lora = lora.unwrap();
        let a = lora.lora_a.value().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let b = lora.lora_b.value().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let amax = a.iter().fold(0f32, |m, v| m.max(v.abs()));
        let bmax = b.iter().fold(0f32, |m, v| m.max(v.abs()));
        assert!(amax <= 0.125 && amax > 0.1, "A within ±1/sqrt(64): {amax}");
        assert!(bmax <= 1.0 / 8f32.sqrt() && bmax > 0.2, "B within ±1/sqrt(r): {bmax}");
    }

    #[test]
    fn forward_is_base_plus_scaled_low_rank_product_and_merging_gives_the_same_output() {
        let base = dense(6, 5, 4);
        let init = InitLoraWeights::Bool(false);
        let lora = LoraLinear::init(base.clone(), 2, 1.5, 0.0, &init, &mut RngStream::new(5)).unwrap();
        let x = x(3, 6);
        let (a, b) = (lora.lora_a.value().clone(), lora.lora_b.value().clone());
        let want = (base.forward(&x, &mut ProjCtx::eval()).unwrap()
            + (x.matmul(&a.t().unwrap()).unwrap().matmul(&b.t().unwrap()).unwrap() * 1.5).unwrap())
        .unwrap();
        let lora = Proj::Lora(lora);
        let got = lora.forward(&x, &mut ProjCtx::eval()).unwrap();
        assert!(max_diff(&got, &want) < 1e-6);
        let merged = lora.merged(DType::F32).unwrap();
        assert!(max_diff(&merged.forward(&x, &mut ProjCtx::eval()).unwrap(), &want) < 1e-5);
        let mut off = ProjCtx::eval();
        off.adapters = false;
        let base_y = base.forward(&x, &mut ProjCtx::eval()).unwrap();
        assert_eq!(max_diff(&lora.forward(&x, &mut off).unwrap(), &base_y), 0.0);
    }

    #[test]
    fn lora_dropout_acts_in_train_mode_only() {
        let init = InitLoraWeights::Bool(false);
        let lora = LoraLinear::init(dense(6, 5, 6), 2, 1.0, 0.5, &init, &mut RngStream::new(7)).unwrap();
        let lora = Proj::Lora(lora);
        let x = x(8, 6);
        let eval1 = lora.forward(&x, &mut ProjCtx::eval()).unwrap();
        let eval2 = lora.forward(&x, &mut ProjCtx::eval()).unwrap();
        assert_eq!(max_diff(&eval1, &eval2), 0.0);
        let mut keys = rlhf_ops::dropout::DropoutKeys::new(8, vec![0]);
        keys.set_packed(&[8]).unwrap();
        let mut train = ProjCtx {
            grad: false,
            adapters: true,
            dropout: Some(&mut keys),
        };
        assert!(max_diff(&lora.forward(&x, &mut train).unwrap(), &eval1) > 1e-3);
    }

    #[test]
    fn wrong_factor_shapes_and_nested_adapters_are_refused() {
        let a = Param::frozen(Tensor::zeros((2, 7), DType::F32, &Device::Cpu).unwrap());
        let b = Param::frozen(Tensor::zeros((5, 2), DType::F32, &Device::Cpu).unwrap());
        assert!(matches!(
            LoraLinear::new(dense(6, 5, 1), a, b.clone(), 1.0, 0.0),
            Err(LoraError::Shape { .. })
        ));
        let init = InitLoraWeights::Bool(true);
        let lora = LoraLinear::init(dense(6, 5, 1), 2, 1.0, 0.0, &init, &mut RngStream::new(1)).unwrap();
        let r = LoraLinear::init(Proj::Lora(lora), 2, 1.0, 0.0, &init, &mut RngStream::new(1));
        assert!(matches!(r, Err(LoraError::Nested)));
    }
}
