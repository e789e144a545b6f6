//! LLM.int8() vector-wise quantization (bitsandbytes `int8_vectorwise_quant`, `Linear8bitLt`).
//!
//! A frozen `nn.Linear` weight `W (out, in)`, `y = x W^T + b`, is stored as bitsandbytes'
//! `Int8Params` does: one int8 row `CB[o]` and one f32 row scale `SCB[o]` per output feature
//! (Dettmers et al., arXiv 2208.07339). The f32 weight is never kept: every product
//! dequantizes a panel of at most [`PANEL_ELEMS`] weights at a time and multiplies it with
//! candle's GEMM, so the extra memory of a forward or backward is one panel.
//!
//! Two forward paths, chosen explicitly by the caller (bnb chooses by `module.training`):
//! * [`Int8Linear::forward`], for training: bnb's CPU train-mode path `MatMul8bitFp`,
//!   `y = x (CB * (SCB / 127))^T + b`, no activation quantization, threshold ignored. It is a
//!   candle custom op whose backward gives the input gradient `dX = dY deq(W)` (candle's
//!   `QMatMul` has none), so a LoRA adapter above a frozen int8 base can be trained.
//! * [`Int8Linear::forward_eval`], for inference: bnb's `MatMul8bitLt`, int8 x int8 with i32
//!   accumulation, outlier columns (`|x| >= threshold`) in f32. Not differentiable. The i32
//!   product is computed exactly with f32 GEMMs on integer-valued panels (see `int8_matmul`).
//!
//! Deliberate deviations from bitsandbytes:
//! * CUDA bnb uses the int8 path in training too; we follow its CPU behaviour (`MatMul8bitFp`).
//! * Only f32 activations; bnb also takes f16/bf16.
//! * No weight gradient: the base is frozen (`has_fp16_weights=False`), as in LoRA/QLoRA.
//!
//! The custom op, [`QuantizedWeight`] and the error type are shared with [`crate::nf4`].

use std::ops::Range;
use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Shape, Tensor};
use half::f16;
use rayon::prelude::*;

use crate::nf4::Nf4Weight;

thread_local! {
    static LLM_INT8: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether passes without gradients on this thread run int8 projections through
/// [`Int8Linear::forward_eval`] (bitsandbytes' LLM.int8 inference path, what transformers
/// computes in eval mode) instead of the training path [`Int8Linear::forward`]. Off by default,
/// so that PPO's rollout and training log-probs come from the same function; scoring and
/// generation that must reproduce bitsandbytes' own outputs switch it on
/// ([`set_llm_int8_inference`]).
pub fn llm_int8_inference() -> bool {
    LLM_INT8.with(|c| c.get())
}

/// Restores the previous [`llm_int8_inference`] setting when dropped.
#[must_use = "the setting is restored when the guard is dropped"]
pub struct LlmInt8Guard {
    previous: bool,
}

impl Drop for LlmInt8Guard {
    fn drop(&mut self) {
        LLM_INT8.with(|c| c.set(self.previous));
    }
}

/// Sets [`llm_int8_inference`] on this thread until the guard is dropped.
pub fn set_llm_int8_inference(on: bool) -> LlmInt8Guard {
    LlmInt8Guard {
        previous: LLM_INT8.with(|c| c.replace(on)),
    }
}

/// bnb's `int8_vectorwise_dequant` literal, `7.874015718698502e-3` (= f32(1/127)):
/// `deq = f32(CB) * SCB * 7.874015718698502e-3`.
#[allow(clippy::excessive_precision)] // bnb's digits
pub const DEQUANT_SCALE: f32 = 7.874_015_718_698_502e-3;

/// bnb's `int8_mm_dequant` literal `6.200124e-05` (as f32). It is *not* 1/127² = 6.2000124e-05.
pub const MM_DEQUANT_SCALE: f32 = 6.200_124e-5;

/// transformers' `BitsAndBytesConfig.llm_int8_threshold` default (bnb's own default is 0.0).
pub const DEFAULT_THRESHOLD: f32 = 6.0;

/// Largest number of weights dequantized at once by the custom op (1 MiB of f32).
pub const PANEL_ELEMS: usize = 1 << 18;

/// Errors of the quantized layers.
#[derive(Debug, thiserror::Error)]
pub enum QuantError {
    /// A tensor has the wrong shape.
    #[error("{what}: expected {expected}, got shape {got:?}")]
    Shape {
        /// Which tensor.
        what: &'static str,
        /// The expected shape, in words.
        expected: String,
        /// The shape it has.
        got: Vec<usize>,
    },
    /// A tensor has a dtype the kernel does not take.
    #[error("{what}: expected dtype f32, got {got:?}; hint: convert with `.to_dtype(DType::F32)`")]
    DType {
        /// Which tensor.
        what: &'static str,
        /// The dtype it has.
        got: DType,
    },
    /// A block size of zero.
    #[error("blocksize must be positive, got {0}; hint: bitsandbytes' default is 64")]
    Blocksize(usize),
    /// An error of a candle operation.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

impl From<QuantError> for candle_core::Error {
    fn from(e: QuantError) -> Self {
        match e {
            QuantError::Candle(c) => c,
            other => candle_core::Error::wrap(other),
        }
    }
}

/// Result of the quantized layers.
pub type Result<T> = std::result::Result<T, QuantError>;

/// `(rows, cols)` of a rank-2 tensor, or a shape error naming `what`.
pub(crate) fn dims2(t: &Tensor, what: &'static str) -> Result<(usize, usize)> {
    match t.dims() {
        &[r, c] => Ok((r, c)),
        d => Err(QuantError::Shape {
            what,
            expected: "(out, in)".into(),
            got: d.to_vec(),
        }),
    }
}

/// Checks that a bias has shape `(out)`.
pub(crate) fn check_bias(bias: Option<&Tensor>, out: usize) -> Result<()> {
    match bias {
        Some(b) if b.dims() != [out] => Err(QuantError::Shape {
            what: "bias",
            expected: format!("({out})"),
            got: b.dims().to_vec(),
        }),
        _ => Ok(()),
    }
}

/// A tensor's values as an f32 row-major vector.
pub(crate) fn to_f32_vec(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
}

/// Round to f16 (nearest, ties to even) and back: torch's `.to(torch.float16)`.
fn f16_round(x: f32) -> f32 {
    f16::from_f32(x).to_f32()
}

/// Vector-wise absmax quantization of one row that is already f16-rounded (bnb
/// `int8_vectorwise_quant`): `s = max_j |v_j|`, `q_j = round_half_even(v_j * (127 / s))`, all f32.
/// A zero row gives `s = 0` and `q = 0` (torch's NaN-to-int8 cast gives 0 on x86 too).
fn quantize_row(v: &[f32], q: &mut [i8]) -> f32 {
    let s = v.iter().fold(0f32, |m, x| m.max(x.abs()));
    let scale = 127.0 / s;
    for (qi, &vi) in q.iter_mut().zip(v) {
        // `as i8` saturates and maps NaN (0 * inf) to 0.
        *qi = (vi * scale).round_ties_even() as i8;
    }
    s
}

/// An int8 weight `(out, in)` with one scale per output row: bnb's `Int8Params` (`CB`, `SCB`).
#[derive(Clone, Debug)]
pub struct Int8Weight {
    /// `CB`, row-major `(out, in)`.
    pub cb: Vec<i8>,
    /// `SCB`, the absmax of each f16-rounded row, `(out)`.
    pub scb: Vec<f32>,
    /// Output features (rows).
    pub out_features: usize,
    /// Input features (columns).
    pub in_features: usize,
}

impl Int8Weight {
    /// A weight from stored `CB` (`(out, in)` row-major) and `SCB` (`(out)`), e.g. the
    /// `weight` and `SCB` tensors of a bitsandbytes 8-bit checkpoint.
    pub fn new(cb: Vec<i8>, scb: Vec<f32>, out_features: usize, in_features: usize) -> Result<Self> {
        if cb.len() != out_features * in_features || scb.len() != out_features {
            return Err(QuantError::Shape {
                what: "int8 weight (CB, SCB)",
                expected: format!("CB ({out_features}, {in_features}) and SCB ({out_features})"),
                got: vec![cb.len(), scb.len()],
            });
        }
        Ok(Self {
            cb,
            scb,
            out_features,
            in_features,
        })
    }

    /// Quantizes a weight `(out, in)` as `bnb.functional.int8_vectorwise_quant(W.half())`:
    ///
    /// ```text
    /// W16     = f16(W)                                  (round to nearest even)
    /// SCB[o]  = max_j |W16[o, j]|                       (as f32)
    /// CB[o,j] = round_half_even(W16[o, j] * (127 / SCB[o]))   (f32)
    /// ```
    pub fn quantize(w: &Tensor) -> Result<Self> {
        let (out, inp) = dims2(w, "int8 weight")?;
        let mut data = to_f32_vec(w)?;
        data.par_iter_mut().for_each(|x| *x = f16_round(*x));
        let mut cb = vec![0i8; out * inp];
        let mut scb = vec![0f32; out];
        if inp > 0 {
            cb.par_chunks_mut(inp)
                .zip(scb.par_iter_mut())
                .zip(data.par_chunks(inp))
                .for_each(|((q, s), row)| *s = quantize_row(row, q));
        }
        Self::new(cb, scb, out, inp)
    }

    /// The dequantized weight `(out, in)`, as bnb's `int8_vectorwise_dequant`:
    /// `f32(CB[o, j]) * SCB[o] * 7.874015718698502e-3`, multiplied left to right.
    pub fn dequantize(&self) -> Result<Tensor> {
        let k = self.in_features;
        let mut w = vec![0f32; self.cb.len()];
        if k > 0 {
            w.par_chunks_mut(k).enumerate().for_each(|(o, row)| {
                for (x, &q) in row.iter_mut().zip(&self.cb[o * k..(o + 1) * k]) {
                    *x = q as f32 * self.scb[o] * DEQUANT_SCALE;
                }
            });
        }
        Ok(Tensor::from_vec(w, (self.out_features, k), &Device::Cpu)?)
    }

    /// Dequantizes rows `rows` into `out` as bnb's train-mode `MatMul8bitFp` does:
    /// `f32(CB[o, j]) * (SCB[o] * (1/127))` (the scale is rounded first, unlike
    /// [`Self::dequantize`]; the two differ by at most one ulp).
    fn dequantize_rows_fp(&self, rows: Range<usize>, out: &mut [f32]) {
        let k = self.in_features;
        out.par_chunks_mut(k).zip(rows).for_each(|(row, o)| {
            let s = self.scb[o] * DEQUANT_SCALE;
            for (x, &q) in row.iter_mut().zip(&self.cb[o * k..(o + 1) * k]) {
                *x = q as f32 * s;
            }
        });
    }
}

/// Activations quantized row-wise by bnb's `int8_vectorwise_quant(X.half(), threshold)`.
#[derive(Clone, Debug, PartialEq)]
pub struct Int8Activations {
    /// `CA`, row-major `(rows, cols)`; outlier columns are zero.
    pub ca: Vec<i8>,
    /// `SCA`, the absmax of each f16-rounded row without its outlier entries, `(rows)`.
    pub sca: Vec<f32>,
    /// Columns holding at least one `|f16(x)| >= f16(threshold)`, ascending; empty when the
    /// threshold is 0.
    pub outlier_cols: Vec<usize>,
    /// Rows (all leading dimensions flattened).
    pub rows: usize,
    /// Columns (features).
    pub cols: usize,
}

/// Quantizes activations `x: (.., in)` for the LLM.int8 product (bnb `int8_vectorwise_quant`
/// on `X.half()`):
///
/// ```text
/// X16      = f16(X)
/// outlier  = |X16| >= f16(threshold)                 (only when threshold > 0)
/// SCA[n]   = max_k |X16[n, k]| over non-outlier entries
/// CA[n,k]  = round_half_even(X16'[n, k] * (127 / SCA[n]))   (X16' = X16, outliers zeroed)
/// CA[:, c] = 0 for every column c that holds an outlier
/// ```
pub fn quantize_activations(x: &Tensor, threshold: f32) -> Result<Int8Activations> {
    let cols = x.dims().last().copied().unwrap_or(1);
    let data = to_f32_vec(x)?;
    Ok(quantize_activations_slice(&data, cols, threshold))
}

fn quantize_activations_slice(x: &[f32], cols: usize, threshold: f32) -> Int8Activations {
    let rows = x.len().checked_div(cols).unwrap_or(0);
    let mut x16: Vec<f32> = x.par_iter().map(|&v| f16_round(v)).collect();
    let mut outlier_cols = Vec::new();
    if threshold > 0.0 {
        // torch compares a half tensor with a Python scalar in half precision.
        let t = f16_round(threshold);
        let mut is_outlier = vec![false; cols];
        for row in x16.chunks_mut(cols.max(1)) {
            for (c, v) in row.iter_mut().enumerate() {
                if v.abs() >= t {
                    is_outlier[c] = true;
                    *v = 0.0;
                }
            }
        }
        outlier_cols = (0..cols).filter(|&c| is_outlier[c]).collect();
    }
    let mut ca = vec![0i8; rows * cols];
    let mut sca = vec![0f32; rows];
    if cols > 0 {
        ca.par_chunks_mut(cols)
            .zip(sca.par_iter_mut())
            .zip(x16.par_chunks(cols))
            .for_each(|((q, s), row)| {
                *s = quantize_row(row, q);
                for &c in &outlier_cols {
                    q[c] = 0;
                }
            });
    }
    Int8Activations {
        ca,
        sca,
        outlier_cols,
        rows,
        cols,
    }
}

/// Columns per exact f32 GEMM in [`int8_matmul`]: `1024 * 128 * 128 = 2^24`, and every
/// integer up to `2^24` in magnitude is exact in f32.
const EXACT_K: usize = 1024;

/// `A B^T` for int8 `A (n, k)` and `B (out, k)`, in i32 and exactly (bnb `int8_linear_matmul`).
///
/// Computed as f32 GEMMs over chunks of [`EXACT_K`] columns and panels of `B` rows: every
/// product and partial sum is an integer of magnitude at most `2^24`, so each f32 GEMM is
/// exact in any summation order; the chunks are then summed in i32. This runs at f32 GEMM
/// speed (several times faster than i32 dot products on CPU) and is tested against [`dot_i8`].
fn int8_matmul(a: &[i8], n: usize, b: &[i8], out: usize, k: usize) -> candle_core::Result<Vec<i32>> {
    let mut acc = vec![0i32; n * out];
    if n == 0 || out == 0 || k == 0 {
        return Ok(acc);
    }
    let to_f32 = |m: &[i8], rows: usize, k0: usize, k1: usize| -> candle_core::Result<Tensor> {
        let mut v = vec![0f32; rows * (k1 - k0)];
        v.par_chunks_mut(k1 - k0)
            .zip(m.par_chunks(k))
            .for_each(|(d, r)| d.iter_mut().zip(&r[k0..k1]).for_each(|(d, &q)| *d = q as f32));
        Tensor::from_vec(v, (rows, k1 - k0), &Device::Cpu)
    };
    for k0 in (0..k).step_by(EXACT_K) {
        let k1 = (k0 + EXACT_K).min(k);
        let at = to_f32(a, n, k0, k1)?;
        let step = (PANEL_ELEMS / (k1 - k0)).max(1);
        for o0 in (0..out).step_by(step) {
            let o1 = (o0 + step).min(out);
            let bt = to_f32(&b[o0 * k..o1 * k], o1 - o0, k0, k1)?;
            let part = at.matmul(&bt.t()?)?.flatten_all()?.to_vec1::<f32>()?;
            acc.par_chunks_mut(out)
                .zip(part.par_chunks(o1 - o0))
                .for_each(|(r, p)| r[o0..o1].iter_mut().zip(p).for_each(|(a, &v)| *a += v as i32));
        }
    }
    Ok(acc)
}

/// `sum_k a_k b_k` in i32: the plain reference for [`int8_matmul`].
#[cfg(test)]
fn dot_i8(a: &[i8], b: &[i8]) -> i32 {
    a.iter().zip(b).map(|(&x, &y)| x as i32 * y as i32).sum()
}

/// A frozen linear layer on an int8 weight: bnb's `Linear8bitLt(has_fp16_weights=False)`.
#[derive(Clone, Debug)]
pub struct Int8Linear {
    /// The quantized weight `(out, in)` (shared with the custom op, hence the `Arc`).
    pub weight: Arc<Int8Weight>,
    /// Bias `(out)`; a [`candle_core::Var`] here receives its gradient through [`Self::forward`].
    pub bias: Option<Tensor>,
    /// Outlier threshold of [`Self::forward_eval`] (0 disables the mixed-precision part).
    pub threshold: f32,
}

impl Int8Linear {
    /// A layer from a quantized weight; checks the bias shape.
    pub fn new(weight: Int8Weight, bias: Option<Tensor>, threshold: f32) -> Result<Self> {
        check_bias(bias.as_ref(), weight.out_features)?;
        Ok(Self {
            weight: Arc::new(weight),
            bias,
            threshold,
        })
    }

    /// Quantizes a dense `nn.Linear` weight `(out, in)` ([`Int8Weight::quantize`]).
    pub fn from_dense(weight: &Tensor, bias: Option<Tensor>, threshold: f32) -> Result<Self> {
        Self::new(Int8Weight::quantize(weight)?, bias, threshold)
    }

    /// Training forward, bnb's CPU `MatMul8bitFp`: `y = x (f32(CB) * (SCB / 127))^T + b`.
    /// Differentiable in `x` (backward `dX = dY deq(W)`) and in `b` when it is a variable.
    ///
    /// # Shapes
    /// `x`: `(.., in)` f32 → `(.., out)`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = dequant_matmul(x, &QuantizedWeight::Int8(self.weight.clone()))?;
        match &self.bias {
            Some(b) => Ok(y.broadcast_add(b)?),
            None => Ok(y),
        }
    }

    /// Inference forward, bnb's `MatMul8bitLt` (LLM.int8):
    ///
    /// ```text
    /// CA, SCA, cols = quantize_activations(x, threshold)
    /// acc = CA CB^T                                          (i32, exact)
    /// y   = f32(acc) * (SCA[n] * SCB[o]) * 6.200124e-05 + b
    /// y  += x[:, cols] deq(W)[:, cols]^T                     (f32 x, int8-dequantized W)
    /// ```
    ///
    /// Not differentiable (use [`Self::forward`] to train).
    ///
    /// # Shapes
    /// `x`: `(.., in)` → `(.., out)`.
    pub fn forward_eval(&self, x: &Tensor) -> Result<Tensor> {
        let w = &self.weight;
        let (k, out) = (w.in_features, w.out_features);
        let out_dims = out_dims(x, k, out)?;
        let xs = to_f32_vec(x)?;
        let act = quantize_activations_slice(&xs, k, self.threshold);
        let cols = &act.outlier_cols;
        // Dequantized outlier columns of W, (out, cols), as int8_vectorwise_dequant.
        let w_out: Vec<f32> = (0..out)
            .flat_map(|o| cols.iter().map(move |&c| (o, c)))
            .map(|(o, c)| w.cb[o * k + c] as f32 * w.scb[o] * DEQUANT_SCALE)
            .collect();
        let bias = self.bias.as_ref().map(to_f32_vec).transpose()?;
        let acc = int8_matmul(&act.ca, act.rows, &w.cb, out, k)?;
        let mut y = vec![0f32; act.rows * out];
        if out > 0 && k > 0 {
            y.par_chunks_mut(out).enumerate().for_each(|(n, yr)| {
                let xr = &xs[n * k..(n + 1) * k];
                for (o, yo) in yr.iter_mut().enumerate() {
                    let acc = acc[n * out + o];
                    let mut v = acc as f32 * (act.sca[n] * w.scb[o]) * MM_DEQUANT_SCALE;
                    if let Some(b) = &bias {
                        v += b[o];
                    }
                    if !cols.is_empty() {
                        let wo = &w_out[o * cols.len()..(o + 1) * cols.len()];
                        v += cols.iter().zip(wo).map(|(&c, &wc)| xr[c] * wc).sum::<f32>();
                    }
                    *yo = v;
                }
            });
        } else if let Some(b) = &bias {
            for yr in y.chunks_mut(out.max(1)) {
                yr.copy_from_slice(&b[..yr.len()]);
            }
        }
        Ok(Tensor::from_vec(y, out_dims, x.device())?)
    }
}

/// `x: (.., k)` → the dims of `(.., n)`, or a shape error.
fn out_dims(x: &Tensor, k: usize, n: usize) -> Result<Vec<usize>> {
    let mut dims = x.dims().to_vec();
    match dims.last_mut() {
        Some(last) if *last == k => {
            *last = n;
            Ok(dims)
        }
        _ => Err(QuantError::Shape {
            what: "input",
            expected: format!("(.., {k})"),
            got: x.dims().to_vec(),
        }),
    }
}

// ---------------------------------------------------------------------------------------
// The dequantize-and-multiply custom op, shared by Int8Linear and Nf4Linear.
// ---------------------------------------------------------------------------------------

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
struct DequantMatMul {
    weight: QuantizedWeight,
    transposed: bool,
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

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Var;
    use rand::{rngs::StdRng, Rng, SeedableRng};

    /// Seeded standard-normal values (Box-Muller).
    pub(crate) fn randn(rng: &mut StdRng, n: usize, scale: f32) -> Vec<f32> {
        (0..n)
            .map(|_| {
                let (u, v): (f32, f32) = (rng.random::<f32>().max(1e-7), rng.random());
                scale * (-2.0 * u.ln()).sqrt() * (std::f32::consts::TAU * v).cos()
            })
            .collect()
    }

    fn cpu(v: Vec<f32>, shape: &[usize]) -> Tensor {
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    fn vals(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    }

    #[test]
    fn dequant_constant_is_f32_of_one_over_127_and_mm_constant_is_not_its_square() {
        assert_eq!(DEQUANT_SCALE, (1.0f64 / 127.0) as f32);
        assert_ne!(MM_DEQUANT_SCALE, (1.0f64 / (127.0 * 127.0)) as f32);
    }

    #[test]
    fn quantize_rounds_half_to_even_after_the_f16_cast() {
        // absmax 127 makes the scale exactly 1; 2.5 -> 2, 3.5 -> 4, -2.5 -> -2. The f32
        // 2.5000002 would round to 3, but its f16 is the tie 2.5, which rounds to 2.
        let w = cpu(vec![127.0, 2.5, 3.5, -2.5, 0.0, 2.500_000_2], &[1, 6]);
        let q = Int8Weight::quantize(&w).unwrap();
        assert_eq!(q.cb, vec![127, 2, 4, -2, 0, 2]);
        assert_eq!(q.scb, vec![127.0]);
    }

    #[test]
    fn int8_matmul_through_f32_gemm_equals_i32_dot_products_exactly() {
        // k = 2500 spans three f32 chunks; values at the int8 extremes stress exactness.
        let (n, k, out) = (5, 2500, 9);
        let mut rng = StdRng::seed_from_u64(1);
        let mut draw = |len: usize| -> Vec<i8> {
            (0..len)
                .map(|i| match i % 7 {
                    0 => 127,
                    1 => -128,
                    _ => rng.random::<i8>(),
                })
                .collect()
        };
        let (a, b) = (draw(n * k), draw(out * k));
        let acc = int8_matmul(&a, n, &b, out, k).unwrap();
        for r in 0..n {
            for o in 0..out {
                let expect = dot_i8(&a[r * k..(r + 1) * k], &b[o * k..(o + 1) * k]);
                assert_eq!(acc[r * out + o], expect);
            }
        }
    }

    #[test]
    fn zero_rows_quantize_to_zero_and_give_the_bias() {
        let w = cpu(vec![0.0; 6], &[2, 3]);
        let b = cpu(vec![0.5, -1.0], &[2]);
        let lin = Int8Linear::from_dense(&w, Some(b), 6.0).unwrap();
        assert_eq!(lin.weight.cb, vec![0; 6]);
        let x = cpu(vec![1.0, 2.0, 3.0, 0.0, 0.0, 0.0], &[2, 3]);
        assert_eq!(vals(&lin.forward(&x).unwrap()), vec![0.5, -1.0, 0.5, -1.0]);
        assert_eq!(vals(&lin.forward_eval(&x).unwrap()), vec![0.5, -1.0, 0.5, -1.0]);
    }

    #[test]
    fn a_wrong_input_width_or_bias_is_a_shape_error() {
        let w = cpu(vec![1.0; 6], &[2, 3]);
        let lin = Int8Linear::from_dense(&w, None, 0.0).unwrap();
        let x = cpu(vec![1.0; 4], &[1, 4]);
        assert!(matches!(lin.forward(&x), Err(QuantError::Shape { .. })));
        assert!(matches!(lin.forward_eval(&x), Err(QuantError::Shape { .. })));
        let bad_bias = Some(cpu(vec![0.0; 3], &[3]));
        assert!(Int8Linear::from_dense(&w, bad_bias, 0.0).is_err());
    }

    /// Worst-case bound of `|x (W - W')^T|` from per-element bounds `ex`, `ew` on
    /// `|x - x'|` and `|W - W'|`, plus f32 accumulation slack.
    fn product_bound(x: &[f32], w: &[f32], ex: &[f32], ew: &[f32], k: usize) -> Vec<f32> {
        let (n, out) = (x.len() / k, w.len() / k);
        let mut b = Vec::with_capacity(n * out);
        for r in 0..n {
            for o in 0..out {
                let s: f32 = (0..k)
                    .map(|j| {
                        let (xi, wi) = (x[r * k + j].abs(), w[o * k + j].abs());
                        xi * ew[o * k + j] + wi * ex[r * k + j] + ex[r * k + j] * ew[o * k + j]
                    })
                    .sum();
                b.push(s * 1.001 + 1e-4);
            }
        }
        b
    }

    /// Exact f32 reference product `x W^T`, `(n, out)`.
    fn reference(x: &Tensor, w: &Tensor) -> Vec<f32> {
        vals(&x.matmul(&w.t().unwrap()).unwrap())
    }

    #[test]
    fn train_and_eval_forwards_stay_within_the_int8_rounding_bound_of_the_f32_product() {
        let (n, k, out) = (16, 96, 40);
        let mut rng = StdRng::seed_from_u64(7);
        let (xv, wv) = (randn(&mut rng, n * k, 1.0), randn(&mut rng, out * k, 0.05));
        let (x, w) = (cpu(xv.clone(), &[n, k]), cpu(wv.clone(), &[out, k]));
        let lin = Int8Linear::from_dense(&w, None, 0.0).unwrap();
        // |W - deq W| <= |W| 2^-11 (f16) + SCB / 254 (half an int8 step).
        let ew: Vec<f32> = (0..out * k)
            .map(|i| wv[i].abs() / 2048.0 + lin.weight.scb[i / k] / 254.0)
            .collect();
        let exact = reference(&x, &w);
        let bound = product_bound(&xv, &wv, &vec![0.0; n * k], &ew, k);
        let y = vals(&lin.forward(&x).unwrap());
        assert!(y.iter().zip(&exact).zip(&bound).all(|((a, e), b)| (a - e).abs() <= *b));
        // The eval path also rounds x: |x - deq x| <= |x| 2^-11 + SCA / 254.
        let act = quantize_activations(&x, 0.0).unwrap();
        let ex: Vec<f32> = (0..n * k)
            .map(|i| xv[i].abs() / 2048.0 + act.sca[i / k] / 254.0)
            .collect();
        let bound = product_bound(&xv, &wv, &ex, &ew, k);
        let y = vals(&lin.forward_eval(&x).unwrap());
        assert!(y.iter().zip(&exact).zip(&bound).all(|((a, e), b)| (a - e).abs() <= *b));
    }

    #[test]
    fn custom_op_input_gradient_equals_plain_candle_matmul_on_the_dequantized_weight() {
        // in = 4096 gives panels of 64 rows: 150 rows run as 64 + 64 + 22.
        let (b, t, k, out) = (2, 3, 4096, 150);
        let mut rng = StdRng::seed_from_u64(11);
        let w = cpu(randn(&mut rng, out * k, 0.05), &[out, k]);
        let bias = Var::from_tensor(&cpu(randn(&mut rng, out, 0.1), &[out])).unwrap();
        let lin = Int8Linear::from_dense(&w, Some(bias.as_tensor().clone()), 6.0).unwrap();
        let x = Var::from_tensor(&cpu(randn(&mut rng, b * t * k, 1.0), &[b, t, k])).unwrap();
        let r = cpu(randn(&mut rng, b * t * out, 1.0), &[b, t, out]);
        let loss = (lin.forward(x.as_tensor()).unwrap() * &r).unwrap().sum_all().unwrap();
        let grads = loss.backward().unwrap();
        // The same loss with plain candle ops on the weight MatMul8bitFp multiplies by.
        let s = Tensor::from_vec(lin.weight.scb.clone(), (out, 1), &Device::Cpu).unwrap();
        let cb: Vec<f32> = lin.weight.cb.iter().map(|&c| c as f32).collect();
        let deq = cpu(cb, &[out, k]).broadcast_mul(&(s * DEQUANT_SCALE as f64).unwrap());
        let deq = deq.unwrap();
        let x2 = Var::from_tensor(x.as_tensor()).unwrap();
        let y2 = x2.as_tensor().broadcast_matmul(&deq.t().unwrap()).unwrap();
        let y2 = y2.broadcast_add(bias.as_tensor()).unwrap();
        let loss2 = (&y2 * &r).unwrap().sum_all().unwrap();
        let grads2 = loss2.backward().unwrap();
        let y1 = vals(&lin.forward(x.as_tensor()).unwrap());
        let d = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(p, q)| (p - q).abs()).fold(0.0, f32::max);
        assert!(d(&y1, &vals(&y2)) < 1e-5, "forward");
        let (g1, g2) = (grads.get(&x).unwrap(), grads2.get(&x2).unwrap());
        assert_eq!(g1.dims(), &[b, t, k]);
        assert!(d(&vals(g1), &vals(g2)) < 1e-5, "input gradient");
        let (gb1, gb2) = (grads.get(&bias).unwrap(), grads2.get(&bias).unwrap());
        assert!(d(&vals(gb1), &vals(gb2)) < 1e-5, "bias gradient");
    }

    #[test]
    fn second_derivative_through_the_backward_op_is_the_forward_op() {
        // d/dx of sum(dX) where dX = g deq(W) (the backward op) is a constant: check that the
        // backward of the backward runs and gives g-shaped results equal to 1 deq(W)^T.
        let mut rng = StdRng::seed_from_u64(3);
        let w = cpu(randn(&mut rng, 5 * 7, 0.1), &[5, 7]);
        let q = QuantizedWeight::Int8(Arc::new(Int8Weight::quantize(&w).unwrap()));
        let g = Var::from_tensor(&cpu(randn(&mut rng, 2 * 5, 1.0), &[2, 5])).unwrap();
        let op = DequantMatMul {
            weight: q.clone(),
            transposed: true,
        };
        let dx = g.as_tensor().apply_op1(op).unwrap();
        let grads = dx.sum_all().unwrap().backward().unwrap();
        let ones = Tensor::ones((2, 7), DType::F32, &Device::Cpu).unwrap();
        let expect = dequant_matmul(&ones, &q).unwrap();
        assert_eq!(vals(grads.get(&g).unwrap()), vals(&expect));
    }
}
