//! `y = x Wᵀ`, the product of every linear layer, for a weight in `nn.Linear`'s `(out, in)`
//! layout.
//!
//! Composed as `x.matmul(&w.t())`, candle's backward records the transpose as a node of its
//! own: the weight's gradient is summed once into the transposed view and once more, strided,
//! into the weight, and a frozen weight's gradient (a LoRA base, a frozen reference) is
//! computed in full and thrown away. [`linear`] runs the same product as one op on the CPU
//! whose backward computes only the gradients an input needs — `∂x = g W` when `x` is
//! tracked, `∂W = gᵀ x`, already `(out, in)`, when `W` is — at the thread's
//! [`crate::precision`]. The composed product stays the path off the CPU and the op's test
//! oracle.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};

use crate::bf16::Bf16Matmul;
use crate::precision::{matmul_precision, MatmulPrecision};

/// `x Wᵀ` at this thread's precision.
///
/// # Shapes
/// `x`: `(m, k)`, `w`: `(n, k)` → `(m, n)`.
pub fn linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let (_, k) = x.dims2()?;
    let (_, k2) = w.dims2()?;
    if k != k2 {
        candle_core::bail!(
            "linear: x is {:?} and w is {:?}; the inner sizes differ",
            x.dims(),
            w.dims()
        )
    }
    let tracked = x.track_op() || w.track_op();
    match tracked && crate::kernels::applies(&[x, w]) {
        true => x.apply_op2(
            w,
            Linear {
                bf16: matmul_precision() == MatmulPrecision::Bf16,
            },
        ),
        false => crate::precision::matmul(x, &w.t()?),
    }
}

/// The product as a candle op: `bf16` picks bf16 operands with f32 sums.
struct Linear {
    bf16: bool,
}

impl Linear {
    /// `a b` on untracked views, at this op's precision.
    fn product(&self, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        match self.bf16 {
            true => a.apply_op2_no_bwd(b, &Bf16Matmul),
            false => a.matmul(b),
        }
    }
}

impl CustomOp2 for Linear {
    fn name(&self) -> &'static str {
        "linear"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        if s1.dtype() != DType::F32 || s2.dtype() != DType::F32 {
            candle_core::bail!(
                "linear: expected f32 operands, got {:?} and {:?}",
                s1.dtype(),
                s2.dtype()
            )
        }
        let ((m, k), (n, _)) = (l1.shape().dims2()?, l2.shape().dims2()?);
        let wt = l2.transpose(0, 1)?;
        match self.bf16 {
            true => Bf16Matmul.cpu_fwd(s1, l1, s2, &wt),
            false => Ok((s1.matmul(s2, (1, m, n, k), l1, &wt)?, Shape::from((m, n)))),
        }
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dx = match x.track_op() {
            true => Some(self.product(grad, &w.detach())?),
            false => None,
        };
        let dw = match w.track_op() {
            true => Some(self.product(&grad.t()?, &x.detach())?),
            false => None,
        };
        Ok((dx, dw))
    }
}

#[cfg(test)]
mod tests;
