//! Log-probabilities of the chosen tokens and the entropy, fused: one kernel reads each
//! row of logits twice (max, then `exp` sums) and writes two numbers; its backward writes the
//! `(.., V)` gradient in one pass. The composed [`super::logprobs_from_logits`] and
//! [`super::entropy_from_logits`] build five `(.., V)` temporaries forward and as many
//! backward; they stay as this kernel's test oracle.
//!
//! For a row `x` with label `y`, `lse = m + ln Σ e^(x−m)`:
//! - `logprob = x_y − lse`, `∂/∂x_j = δ_jy − p_j`;
//! - `entropy = lse − Σ p_j x_j`, `∂/∂x_j = p_j (Σ_i p_i x_i − x_j)`;
//!
//! with `p_j = e^(x_j − lse)`. The backward recovers `lse` and `Σ p x` from the forward's
//! two outputs, so nothing else is kept.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, CustomOp3, DType, Layout, Shape, Tensor, D};
use rayon::prelude::*;

use super::{PpoError, Result};
use crate::simd;
use crate::sink::{GradSink, SinkEntry};

/// `(logprob, entropy)` of every position: `log_softmax(logits)[.., labels]` and the
/// entropy of `softmax(logits)`, without materialising either `(.., V)` tensor. Equal to
/// [`super::logprobs_from_logits`] and [`super::entropy_from_logits`] (f32: to ~1e-6
/// relative; f64: to rounding). Differentiable in `logits` through both outputs.
///
/// # Shapes
/// `logits`: `(.., V)` f32 or f64 on the CPU; `labels`: `(..)` integer → two `(..)` tensors.
pub fn logprobs_and_entropy(logits: &Tensor, labels: &Tensor) -> Result<(Tensor, Tensor)> {
    let dims = logits.dims();
    let shape_err = |msg: String| PpoError::Shape {
        function: "logprobs_and_entropy",
        msg,
    };
    let Some((&v, lead)) = dims.split_last() else {
        return Err(shape_err("`logits` is a scalar, expected (.., V)".into()));
    };
    let labels_host = checked_labels(labels, lead, v, "logits", dims, shape_err)?;
    if !crate::kernels::applies_f32_f64(&[logits]) {
        // Other devices and dtypes (and the fast kernels switched off): composed ops.
        return Ok((
            super::logprobs_from_logits(logits, labels)?,
            super::entropy_from_logits(logits)?,
        ));
    }
    let labels = labels_host;
    let op = LogprobEntropy {
        labels: Arc::new(labels),
        vocab: v,
    };
    let out = logits.contiguous()?.apply_op1(op)?;
    let lp = out.narrow(D::Minus1, 0, 1)?.squeeze(D::Minus1)?;
    let h = out.narrow(D::Minus1, 1, 1)?.squeeze(D::Minus1)?;
    Ok((lp, h))
}

/// The labels as `u32`, checked to have shape `lead` (the leading dimensions of `what`,
/// `dims`) and to lie below the vocabulary size `v`.
fn checked_labels(
    labels: &Tensor,
    lead: &[usize],
    v: usize,
    what: &str,
    dims: &[usize],
    shape_err: impl Fn(String) -> PpoError,
) -> Result<Vec<u32>> {
    if labels.dims() != lead {
        return Err(shape_err(format!(
            "`labels` has shape {:?}, expected {lead:?} to match `{what}` {dims:?}",
            labels.dims()
        )));
    }
    let ys: Vec<u32> = labels.flatten_all()?.to_dtype(DType::U32)?.to_vec1()?;
    if let Some((i, &y)) = ys.iter().enumerate().find(|(_, &y)| y as usize >= v) {
        return Err(shape_err(format!(
            "label {y} at flat position {i} is not below the vocabulary size {v}"
        )));
    }
    Ok(ys)
}

/// The same two outputs straight from the LM head's input: `logits = hidden · wᵀ` is
/// computed without a graph, and the backward goes from the `(N, V)` logits gradient to
/// `∂hidden = g · w` and `∂w = gᵀ · hidden` with two matrix products, so the weight's
/// gradient comes out `(V, H)` contiguous (a differentiable `hidden.matmul(w.t())` yields it
/// transposed, and a tied embedding then adds the two layouts element by element).
/// Equal to `logprobs_and_entropy(hidden.matmul(w.t()), labels)` in value and gradients.
/// With a `sink`, `w`'s gradient goes there (see [`crate::sink`]) instead of to the graph;
/// a `w` that is not tracked gets no gradient product at all (a frozen base under LoRA).
///
/// # Shapes
/// `hidden`: `(.., H)`, `w`: `(V, H)` (f32 or f64, same dtype), `labels`: `(..)` → two
/// `(..)` tensors.
pub fn lm_head_logprobs_and_entropy(
    hidden: &Tensor,
    w: &Tensor,
    labels: &Tensor,
    sink: Option<&GradSink>,
) -> Result<(Tensor, Tensor)> {
    let hdims = hidden.dims().to_vec();
    let shape_err = |msg: String| PpoError::Shape {
        function: "lm_head_logprobs_and_entropy",
        msg,
    };
    let (v, h) = w.dims2()?;
    let Some((&hh, lead)) = hdims.split_last() else {
        return Err(shape_err("`hidden` is a scalar, expected (.., H)".into()));
    };
    if hh != h {
        return Err(shape_err(format!(
            "`hidden` {hdims:?} does not end in H = {h} of `w` {:?}",
            w.dims()
        )));
    }
    let ys = checked_labels(labels, lead, v, "hidden", &hdims, shape_err)?;
    if !crate::kernels::applies_f32_f64(&[hidden, w]) || hidden.dtype() != w.dtype() {
        // Other devices and dtypes (and the fast kernels switched off): the logits, then
        // composed ops; `w`'s gradient goes through the graph.
        let logits = hidden.broadcast_matmul(&w.t()?)?;
        return Ok((
            super::logprobs_from_logits(&logits, labels)?,
            super::entropy_from_logits(&logits)?,
        ));
    }
    let n: usize = lead.iter().product();
    let h2 = hidden.reshape((n, h))?;
    // The thread's matrix-product precision, fixed for the backward's products too.
    let bf16 = crate::precision::uses_bf16(&h2, w);
    let logits = product(bf16, &h2.detach(), &w.detach().t()?)?;
    let op = LmHeadLogprobEntropy {
        labels: Arc::new(ys),
        vocab: v,
        sink: sink.cloned(),
        bf16,
    };
    let out = h2.apply_op3(w, &logits, op)?;
    let lp = out.narrow(1, 0, 1)?.reshape(lead)?;
    let ent = out.narrow(1, 1, 1)?.reshape(lead)?;
    Ok((lp, ent))
}

/// `a · b` in f32, or with bf16 operands (see [`crate::precision`]).
fn product(bf16: bool, a: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    if bf16 {
        crate::bf16::matmul(a, b)
    } else {
        a.matmul(b)
    }
}

/// `(hidden (N, H), w (V, H), logits (N, V) detached)` → `(N, 2)`.
struct LmHeadLogprobEntropy {
    labels: Arc<Vec<u32>>,
    vocab: usize,
    sink: Option<GradSink>,
    /// Products with bf16 operands.
    bf16: bool,
}

impl CustomOp3 for LmHeadLogprobEntropy {
    fn name(&self) -> &'static str {
        "lm-head-logprobs-and-entropy"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        logits: &CpuStorage,
        l: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        LogprobEntropy {
            labels: self.labels.clone(),
            vocab: self.vocab,
        }
        .cpu_fwd(logits, l)
    }

    fn bwd(
        &self,
        hidden: &Tensor,
        w: &Tensor,
        logits: &Tensor,
        res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let op = LogprobEntropyBwd {
            labels: self.labels.clone(),
            vocab: self.vocab,
        };
        let g = logits.apply_op3_no_bwd(res, &grad_res.contiguous()?, &op)?;
        let dh = match hidden.track_op() {
            true => Some(product(self.bf16, &g, &w.detach())?),
            false => None,
        };
        let dw = match (w.track_op(), &self.sink) {
            (false, _) => None,
            (true, None) => Some(product(self.bf16, &g.t()?, &hidden.detach())?),
            (true, Some(sink)) => {
                sink.push(SinkEntry::Dense {
                    id: w.id(),
                    grad: product(self.bf16, &g.t()?, &hidden.detach())?,
                });
                None
            }
        };
        Ok((dh, dw, None))
    }
}

/// The forward op: `(.., V)` → `(.., 2)` = `[logprob, entropy]`.
struct LogprobEntropy {
    labels: Arc<Vec<u32>>,
    vocab: usize,
}

/// A row's log-sum-exp and entropy: `(lse, entropy)`.
trait RowFloat: Copy + Send + Sync + candle_core::WithDType {
    fn row_stats(x: &[Self]) -> (f64, f64);
    fn row_grad(x: &[Self], out: &mut [Self], y: usize, lse: f64, mean_x: f64, g_lp: f64, g_h: f64);
}

impl RowFloat for f32 {
    #[inline(always)]
    fn row_stats(x: &[f32]) -> (f64, f64) {
        let m = simd::max_f32(x);
        if m == f32::INFINITY || m.is_nan() || m == f32::NEG_INFINITY {
            return f64::row_stats_slow(x.iter().map(|&v| v as f64));
        }
        let (s, sx) = simd::exp_sums_f32(x, m);
        let ln_s = s.ln();
        (m as f64 + ln_s, ln_s - sx / s)
    }

    #[inline(always)]
    fn row_grad(x: &[f32], out: &mut [f32], y: usize, lse: f64, mean_x: f64, g_lp: f64, g_h: f64) {
        let (lse, mean_x, g_lp, g_h) = (lse as f32, mean_x as f32, g_lp as f32, g_h as f32);
        simd::logprob_entropy_grad_f32(x, out, lse, mean_x, g_lp, g_h);
        out[y] += g_lp;
    }
}

impl RowFloat for f64 {
    fn row_stats(x: &[f64]) -> (f64, f64) {
        f64::row_stats_slow(x.iter().copied())
    }

    fn row_grad(x: &[f64], out: &mut [f64], y: usize, lse: f64, mean_x: f64, g_lp: f64, g_h: f64) {
        for (o, &xj) in out.iter_mut().zip(x) {
            let p = (xj - lse).exp();
            *o = p * (g_h * (mean_x - xj) - g_lp);
        }
        out[y] += g_lp;
    }
}

/// Plain two-pass statistics in f64 (also the fallback for rows with infinities or NaN).
trait SlowStats {
    fn row_stats_slow(x: impl Iterator<Item = f64> + Clone) -> (f64, f64);
}

impl SlowStats for f64 {
    fn row_stats_slow(x: impl Iterator<Item = f64> + Clone) -> (f64, f64) {
        let m = x.clone().fold(f64::NEG_INFINITY, f64::max);
        if !m.is_finite() {
            // An all -inf row, a +inf or a NaN logit: the composed formula gives NaN too.
            return (f64::NAN, f64::NAN);
        }
        let (mut s, mut sx) = (0.0, 0.0);
        for v in x {
            let e = (v - m).exp();
            s += e;
            sx += e * (v - m);
        }
        let ln_s = s.ln();
        (m + ln_s, ln_s - sx / s)
    }
}

fn forward<T: RowFloat>(x: &[T], labels: &[u32], v: usize) -> Vec<T> {
    let mut out = vec![T::from_f64(0.0); 2 * labels.len()];
    // One row per task (a row of the GPT-2 vocabulary is 200 KB of f32); the row kernels
    // pick their instruction set themselves, inside the task.
    out.par_chunks_mut(2)
        .zip(x.par_chunks(v))
        .zip(labels.par_iter())
        .for_each(|((o, x), &y)| {
            let (lse, h) = T::row_stats(x);
            o[0] = T::from_f64(x[y as usize].to_f64() - lse);
            o[1] = T::from_f64(h);
        });
    out
}

fn contiguous<'a, T: candle_core::WithDType>(s: &'a [T], l: &Layout, what: &str) -> candle_core::Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&s[a..b]),
        None => candle_core::bail!("logprobs_and_entropy: `{what}` must be contiguous"),
    }
}

impl CustomOp1 for LogprobEntropy {
    fn name(&self) -> &'static str {
        "logprobs-and-entropy"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let mut dims = l.dims().to_vec();
        if let Some(last) = dims.last_mut() {
            *last = 2;
        }
        let out = match s {
            CpuStorage::F32(x) => CpuStorage::F32(forward(contiguous(x, l, "logits")?, &self.labels, self.vocab)),
            CpuStorage::F64(x) => CpuStorage::F64(forward(contiguous(x, l, "logits")?, &self.labels, self.vocab)),
            _ => candle_core::bail!("logprobs_and_entropy: logits must be f32 or f64"),
        };
        Ok((out, Shape::from(dims)))
    }

    fn bwd(&self, arg: &Tensor, res: &Tensor, grad_res: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let op = LogprobEntropyBwd {
            labels: self.labels.clone(),
            vocab: self.vocab,
        };
        let g = arg.apply_op3_no_bwd(res, &grad_res.contiguous()?, &op)?;
        Ok(Some(g))
    }
}

/// The backward op: `(logits, [logprob, entropy], [g_logprob, g_entropy])` → `(.., V)`.
struct LogprobEntropyBwd {
    labels: Arc<Vec<u32>>,
    vocab: usize,
}

fn backward<T: RowFloat>(x: &[T], res: &[T], g: &[T], labels: &[u32], v: usize) -> Vec<T> {
    let mut out = vec![T::from_f64(0.0); x.len()];
    out.par_chunks_mut(v)
        .zip(x.par_chunks(v))
        .zip(res.par_chunks(2).zip(g.par_chunks(2)))
        .zip(labels.par_iter())
        .for_each(|(((o, x), (r, g)), &y)| {
            let (lp, h) = (r[0].to_f64(), r[1].to_f64());
            let y = y as usize;
            let lse = x[y].to_f64() - lp;
            T::row_grad(x, o, y, lse, lse - h, g[0].to_f64(), g[1].to_f64());
        });
    out
}

impl CustomOp3 for LogprobEntropyBwd {
    fn name(&self) -> &'static str {
        "logprobs-and-entropy-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (v, labels) = (self.vocab, self.labels.as_slice());
        let out = match (s1, s2, s3) {
            (CpuStorage::F32(x), CpuStorage::F32(r), CpuStorage::F32(g)) => CpuStorage::F32(backward(
                contiguous(x, l1, "logits")?,
                contiguous(r, l2, "outputs")?,
                contiguous(g, l3, "gradient")?,
                labels,
                v,
            )),
            (CpuStorage::F64(x), CpuStorage::F64(r), CpuStorage::F64(g)) => CpuStorage::F64(backward(
                contiguous(x, l1, "logits")?,
                contiguous(r, l2, "outputs")?,
                contiguous(g, l3, "gradient")?,
                labels,
                v,
            )),
            _ => candle_core::bail!("logprobs_and_entropy backward: mixed or unsupported dtypes"),
        };
        Ok((out, l1.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::super::{entropy_from_logits, logprobs_from_logits};
    use super::*;
    use crate::rng::RngStream;
    use candle_core::{Device, Var};

    fn random(n: usize, scale: f64, seed: u64) -> Vec<f64> {
        let mut rng = RngStream::new(seed);
        (0..n).map(|_| scale * (2.0 * rng.uniform_f64() - 1.0)).collect()
    }

    fn labels(b: usize, t: usize, v: usize, seed: u64) -> Tensor {
        let mut rng = RngStream::new(seed);
        let y: Vec<u32> = (0..b * t).map(|_| (rng.next_u64() % v as u64) as u32).collect();
        Tensor::from_vec(y, (b, t), &Device::Cpu).unwrap()
    }

    /// Values and both gradients against the composed oracle, f32 (V large enough for the
    /// vector loops and their remainders) and f64.
    fn check(dtype: DType, v: usize, scale: f64, tol: f64) {
        let (b, t) = (3, 5);
        let x = Tensor::from_vec(random(b * t * v, scale, 1), (b, t, v), &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        let y = labels(b, t, v, 2);
        let wl = Tensor::from_vec(random(b * t, 1.0, 3), (b, t), &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        let wh = Tensor::from_vec(random(b * t, 1.0, 4), (b, t), &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        let run = |fused: bool| {
            let var = Var::from_tensor(&x).unwrap();
            let (lp, h) = if fused {
                logprobs_and_entropy(var.as_tensor(), &y).unwrap()
            } else {
                (
                    logprobs_from_logits(var.as_tensor(), &y).unwrap(),
                    entropy_from_logits(var.as_tensor()).unwrap(),
                )
            };
            let loss = ((&lp * &wl).unwrap().sum_all().unwrap() + (&h * &wh).unwrap().sum_all().unwrap()).unwrap();
            let g = loss.backward().unwrap().get(var.as_tensor()).unwrap().clone();
            let f = |t: &Tensor| {
                t.to_dtype(DType::F64)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f64>()
                    .unwrap()
            };
            (f(&lp), f(&h), f(&g))
        };
        let (a, b_) = (run(true), run(false));
        for (name, u, w) in [
            ("logprob", &a.0, &b_.0),
            ("entropy", &a.1, &b_.1),
            ("grad", &a.2, &b_.2),
        ] {
            for (i, (p, q)) in u.iter().zip(w.iter()).enumerate() {
                assert!(
                    (p - q).abs() <= tol * (1.0 + q.abs()),
                    "{name}[{i}]: fused {p} vs composed {q} ({dtype:?}, V {v})"
                );
            }
        }
    }

    #[test]
    fn fused_matches_the_composed_oracle_f32() {
        check(DType::F32, 1000, 3.0, 2e-5);
        check(DType::F32, 37, 8.0, 2e-5);
    }

    #[test]
    fn fused_matches_the_composed_oracle_f64() {
        check(DType::F64, 101, 5.0, 1e-12);
    }

    /// The LM-head form against `matmul` + the composed ops, with the weight also used by an
    /// embedding lookup (tied, as GPT-2's `wte`), so its two gradients are summed.
    fn check_lm_head(dtype: DType, tol: f64, bf16: bool) -> f64 {
        let (b, t, h, v) = (2, 3, 8, 300);
        let dev = &Device::Cpu;
        let mk = |n: usize, shape: &[usize], seed| {
            Tensor::from_vec(random(n, 1.0, seed), shape, dev)
                .unwrap()
                .to_dtype(dtype)
                .unwrap()
        };
        let hid = mk(b * t * h, &[b, t, h], 5);
        let w = mk(v * h, &[v, h], 6);
        let y = labels(b, t, v, 7);
        let (wl, wh) = (mk(b * t, &[b, t], 8), mk(b * t, &[b, t], 9));
        let ids = Tensor::new(&[3u32, 7, 7, 299], dev).unwrap();
        let run = |fused: bool| {
            let (hv, wv) = (Var::from_tensor(&hid).unwrap(), Var::from_tensor(&w).unwrap());
            let (lp, ent) = if fused {
                let p = match bf16 {
                    true => crate::precision::MatmulPrecision::Bf16,
                    false => crate::precision::MatmulPrecision::Highest,
                };
                crate::precision::with_matmul_precision(p, || {
                    lm_head_logprobs_and_entropy(hv.as_tensor(), wv.as_tensor(), &y, None).unwrap()
                })
            } else {
                let logits = hv.as_tensor().broadcast_matmul(&wv.as_tensor().t().unwrap()).unwrap();
                (
                    logprobs_from_logits(&logits, &y).unwrap(),
                    entropy_from_logits(&logits).unwrap(),
                )
            };
            let emb = wv
                .as_tensor()
                .embedding(&ids)
                .unwrap()
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap();
            let loss = ((&lp * &wl).unwrap().sum_all().unwrap() + (&ent * &wh).unwrap().sum_all().unwrap())
                .unwrap()
                .add(&emb)
                .unwrap();
            let g = loss.backward().unwrap();
            let f = |t: &Tensor| {
                t.to_dtype(DType::F64)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f64>()
                    .unwrap()
            };
            let gh = f(g.get(hv.as_tensor()).unwrap());
            let gw = f(g.get(wv.as_tensor()).unwrap());
            (f(&lp), f(&ent), gh, gw)
        };
        let (a, c) = (run(true), run(false));
        let mut largest = 0f64;
        for (name, u, w) in [
            ("logprob", &a.0, &c.0),
            ("entropy", &a.1, &c.1),
            ("grad hidden", &a.2, &c.2),
            ("grad w", &a.3, &c.3),
        ] {
            assert_eq!(u.len(), w.len());
            for (i, (p, q)) in u.iter().zip(w.iter()).enumerate() {
                largest = largest.max((p - q).abs());
                assert!(
                    (p - q).abs() <= tol * (1.0 + q.abs()),
                    "{name}[{i}]: fused {p} vs composed {q} ({dtype:?})"
                );
            }
        }
        largest
    }

    #[test]
    fn lm_head_form_matches_matmul_and_the_composed_oracle() {
        check_lm_head(DType::F32, 2e-5, false);
        check_lm_head(DType::F64, 1e-12, false);
    }

    #[test]
    fn lm_head_form_with_bf16_products_stays_within_bf16_rounding_of_f32() {
        // Operands rounded to 8 mantissa bits (relative 2⁻⁹ each), sums over H = 8 terms of
        // size ≤ 1 in the logits and over 300 vocabulary entries in the weight's gradient.
        let largest = check_lm_head(DType::F32, 3e-2, true);
        assert!(largest > 1e-6, "bf16 products should differ from f32 ({largest})");
        // f64 models never use bf16.
        check_lm_head(DType::F64, 1e-12, true);
    }

    #[test]
    fn huge_logits_stay_finite_and_infinite_ones_give_nan_like_the_composed_op() {
        let x = Tensor::new(&[[[1000.0f32, 0.0, -1000.0], [1.0, 2.0, 3.0]]], &Device::Cpu).unwrap();
        let y = Tensor::new(&[[1u32, 2]], &Device::Cpu).unwrap();
        let (lp, h) = logprobs_and_entropy(&x, &y).unwrap();
        let lp = lp.to_vec2::<f32>().unwrap();
        assert_eq!(lp[0][0], -1000.0);
        assert!(h.to_vec2::<f32>().unwrap()[0][0].abs() < 1e-6);
        let x = Tensor::new(&[[f32::INFINITY, 0.0]], &Device::Cpu).unwrap();
        let y = Tensor::new(&[0u32], &Device::Cpu).unwrap();
        let (lp, _) = logprobs_and_entropy(&x, &y).unwrap();
        assert!(lp.to_vec1::<f32>().unwrap()[0].is_nan());
    }

    #[test]
    fn bad_labels_are_errors() {
        let x = Tensor::zeros((2, 3, 4), DType::F32, &Device::Cpu).unwrap();
        let wrong_shape = Tensor::zeros((3, 2), DType::U32, &Device::Cpu).unwrap();
        assert!(matches!(
            logprobs_and_entropy(&x, &wrong_shape),
            Err(PpoError::Shape { .. })
        ));
        let out_of_range = Tensor::new(&[[0u32, 4, 1], [0, 0, 0]], &Device::Cpu).unwrap();
        let err = logprobs_and_entropy(&x, &out_of_range).unwrap_err().to_string();
        assert!(err.contains("label 4") && err.contains("vocabulary size 4"), "{err}");
    }
}
