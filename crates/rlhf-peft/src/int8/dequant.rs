//! The dequantize-and-multiply custom op, shared by [`super::Int8Linear`] and
//! [`crate::nf4::Nf4Linear`]: a frozen quantized weight dequantized panel by panel into
//! candle's GEMM, with the input gradient as its backward.

use std::ops::Range;
use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::{out_dims, Int8Weight, QuantError, Result, PANEL_ELEMS};
use crate::nf4::Nf4Weight;

/// A frozen quantized weight `(out, in)` that the custom op can dequantize panel by panel.
#[derive(Clone, Debug)]
pub enum QuantizedWeight {
    /// LLM.int8 rows, dequantized as `MatMul8bitFp` does.
    Int8(Arc<Int8Weight>),
    /// NF4 blocks, dequantized as `dequantize_4bit`.
    Nf4(Arc<Nf4Weight>),
}

impl QuantizedWeight {
    /// `(out, in)`.
    pub fn shape(&self) -> (usize, usize) {
        match self {
            Self::Int8(w) => (w.out_features, w.in_features),
            Self::Nf4(w) => w.shape,
        }
    }

    /// The whole dequantized weight `(out, in)`, exactly as [`dequant_matmul`] multiplies by
    /// it (for an int8 weight the `MatMul8bitFp` rounding, which can differ from
    /// [`Int8Weight::dequantize`] by one ulp). Used to merge a LoRA update into the base.
    pub fn dequantized(&self) -> candle_core::Result<Tensor> {
        self.panel(0..self.shape().0)
    }

    /// Writes rows `rows` of the dequantized weight into `out` (`rows.len() * in` values).
    fn dequantize_rows(&self, rows: Range<usize>, out: &mut [f32]) {
        match self {
            Self::Int8(w) => w.dequantize_rows_fp(rows, out),
            Self::Nf4(w) => w.dequantize_rows(rows, out),
        }
    }

    /// Rows per panel so that a panel holds at most [`PANEL_ELEMS`] weights.
    fn panel_rows(&self) -> usize {
        (PANEL_ELEMS / self.shape().1.max(1)).max(1)
    }

    /// A dequantized panel of rows as a `(rows, in)` tensor.
    fn panel(&self, rows: Range<usize>) -> candle_core::Result<Tensor> {
        let (p, k) = (rows.len(), self.shape().1);
        let mut buf = vec![0f32; p * k];
        self.dequantize_rows(rows, &mut buf);
        Tensor::from_vec(buf, (p, k), &Device::Cpu)
    }
}

/// `y = x deq(W)^T` for `x: (.., in)` (f32, CPU) and a quantized `W: (out, in)`, through the
/// custom op, so that the graph carries the input gradient `dX = dY deq(W)`.
///
/// # Shapes
/// `x`: `(.., in)` → `(.., out)`.
pub fn dequant_matmul(x: &Tensor, w: &QuantizedWeight) -> Result<Tensor> {
    let (out, k) = w.shape();
    let out_dims = out_dims(x, k, out)?;
    if x.dtype() != DType::F32 {
        return Err(QuantError::DType {
            what: "input",
            got: x.dtype(),
        });
    }
    let rows = x.elem_count() / k.max(1);
    let op = DequantMatMul {
        weight: w.clone(),
        transposed: false,
    };
    let y = x.reshape((rows, k))?.contiguous()?.apply_op1(op)?;
    Ok(y.reshape(out_dims)?)
}

/// The custom op: `y = x deq(W)^T` (`transposed = false`, `x: (N, in)`) or `y = x deq(W)`
/// (`transposed = true`, `x: (N, out)`). Each is the other's backward.
pub(super) struct DequantMatMul {
    pub(super) weight: QuantizedWeight,
    pub(super) transposed: bool,
}

impl DequantMatMul {
    /// `x (n, in) deq(W)^T`: for each panel of output rows, one GEMM into those columns.
    fn forward_nt(&self, x: &[f32], n: usize) -> candle_core::Result<Vec<f32>> {
        let (out, k) = self.weight.shape();
        let mut y = vec![0f32; n * out];
        if n == 0 || out == 0 || k == 0 {
            return Ok(y);
        }
        let xt = Tensor::from_slice(x, (n, k), &Device::Cpu)?;
        let step = self.weight.panel_rows();
        for o0 in (0..out).step_by(step) {
            let o1 = (o0 + step).min(out);
            let wp = self.weight.panel(o0..o1)?;
            let yp = xt.matmul(&wp.t()?)?.flatten_all()?.to_vec1::<f32>()?;
            for (yr, pr) in y.chunks_mut(out).zip(yp.chunks(o1 - o0)) {
                yr[o0..o1].copy_from_slice(pr);
            }
        }
        Ok(y)
    }

    /// `g (n, out) deq(W)`: the sum over panels of `g[:, panel] deq(W)[panel, :]`.
    fn forward_nn(&self, g: &[f32], n: usize) -> candle_core::Result<Vec<f32>> {
        let (out, k) = self.weight.shape();
        let mut acc = vec![0f32; n * k];
        if n == 0 || out == 0 || k == 0 {
            return Ok(acc);
        }
        let step = self.weight.panel_rows();
        for o0 in (0..out).step_by(step) {
            let o1 = (o0 + step).min(out);
            let gp: Vec<f32> = g.chunks(out).flat_map(|r| &r[o0..o1]).copied().collect();
            let gp = Tensor::from_vec(gp, (n, o1 - o0), &Device::Cpu)?;
            let part = gp.matmul(&self.weight.panel(o0..o1)?)?;
            let part = part.flatten_all()?.to_vec1::<f32>()?;
            acc.par_iter_mut().zip(part).for_each(|(a, p)| *a += p);
        }
        Ok(acc)
    }
}

impl CustomOp1 for DequantMatMul {
    fn name(&self) -> &'static str {
        "dequant-matmul"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n, kin) = l.shape().dims2()?;
        let (out, k) = self.weight.shape();
        let (inner, outer) = if self.transposed { (out, k) } else { (k, out) };
        if kin != inner {
            candle_core::bail!("dequant-matmul: input has {kin} features, weight expects {inner}")
        }
        let CpuStorage::F32(data) = s else {
            candle_core::bail!("dequant-matmul: expected an f32 input")
        };
        let Some((a, b)) = l.contiguous_offsets() else {
            candle_core::bail!("dequant-matmul: input must be contiguous")
        };
        let x = &data[a..b];
        let y = if self.transposed {
            self.forward_nn(x, n)?
        } else {
            self.forward_nt(x, n)?
        };
        Ok((CpuStorage::F32(y), Shape::from((n, outer))))
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, dy: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let op = DequantMatMul {
            weight: self.weight.clone(),
            transposed: !self.transposed,
        };
        Ok(Some(dy.contiguous()?.apply_op1(op)?))
    }
}
