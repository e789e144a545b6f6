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

use candle_core::{DType, Device, Tensor};
use half::f16;
use rayon::prelude::*;

mod dequant;
#[cfg(test)]
mod tests;

pub use dequant::{dequant_matmul, QuantizedWeight};

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
