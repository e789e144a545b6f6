//! Fused causal self-attention over packed sequences, a candle custom op with its backward.
//!
//! The input is the `(N, 3H)` output of GPT-2's `c_attn` for sequences laid end to end
//! (no padding); each sequence attends to itself only. Per sequence and head it computes
//! `O = dropout(softmax(Q Kᵀ · scale + causal)) V` in one task — no head split or merge
//! copies, no `(B, heads, T, T)` score tensors, no padded rows — and writes `(N, H)` in the
//! layout of GPT-2's merged heads. The backward recomputes the probabilities from `Q` and
//! `K` (so nothing of size `T²` outlives the forward) and returns the gradient of the whole
//! `(N, 3H)` input in one buffer.
//!
//! The composed candle version (heads split, `matmul`, additive mask, softmax, dropout as a
//! multiply, `matmul`, heads merged) is the test oracle, values and gradients.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::kernels::slice;
use crate::simd::{dispatched, exp_f32, LANES};

/// The shape of a packed attention call.
#[derive(Clone, Debug)]
pub struct PackedAttention {
    /// Length of every sequence, in packing order (they sum to `N`).
    pub lens: Vec<usize>,
    /// Attention heads; `H` is a multiple of it.
    pub n_head: usize,
    /// Factor of the scores (`1/sqrt(head_dim)`, and GPT-2's layer-index scaling).
    pub scale: f32,
    /// Dropout on the probabilities: per sequence, per head, a row-major `T × T` square of
    /// keep factors (`0` or `1/(1−p)`), concatenated in sequence order then head order.
    /// `None`: no dropout.
    pub keep: Option<Arc<Vec<f32>>>,
}

impl PackedAttention {
    /// Keep factors for dropout with probability `p`, from `uniform(n)` samples in `[0, 1)`
    /// (a sample below `p` drops), in the layout of [`PackedAttention::keep`].
    pub fn dropout_keep(lens: &[usize], n_head: usize, p: f64, uniform: &mut dyn FnMut(usize) -> Vec<f32>) -> Vec<f32> {
        let n: usize = lens.iter().map(|t| n_head * t * t).sum();
        let scale = (1.0 / (1.0 - p)) as f32;
        let p = p as f32;
        uniform(n)
            .into_iter()
            .map(|u| if u < p { 0.0 } else { scale })
            .collect()
    }

    /// Every `(sequence, head)` task: `(first row, length, head, offset into keep)`.
    fn tasks(&self) -> Vec<(usize, usize, usize, usize)> {
        let mut out = Vec::with_capacity(self.lens.len() * self.n_head);
        let (mut row, mut keep) = (0, 0);
        for &t in &self.lens {
            for h in 0..self.n_head {
                out.push((row, t, h, keep));
                keep += t * t;
            }
            row += t;
        }
        out
    }

    /// The [`Task`] of one `(first row, length, head, keep offset)` of [`Self::tasks`].
    fn task<'a>(&'a self, qkv: &'a [f32], h: usize, (r0, t, head, k0): (usize, usize, usize, usize)) -> Task<'a> {
        let d = h / self.n_head;
        Task {
            qkv,
            h,
            r0,
            t,
            c: head * d,
            d,
            scale: self.scale,
            keep: self.keep.as_deref().map(|k| &k[k0..k0 + t * t]),
        }
    }

    fn check(&self, l: &Layout) -> candle_core::Result<(usize, usize)> {
        let (n, c) = l.shape().dims2()?;
        let total: usize = self.lens.iter().sum();
        if total != n || c % 3 != 0 || self.n_head == 0 || (c / 3) % self.n_head != 0 {
            candle_core::bail!(
                "packed attention: input ({n}, {c}) does not fit {} sequences of {total} tokens with {} heads",
                self.lens.len(),
                self.n_head
            )
        }
        if let Some(k) = &self.keep {
            let want: usize = self.lens.iter().map(|t| self.n_head * t * t).sum();
            if k.len() != want {
                candle_core::bail!("packed attention: {} dropout factors, expected {want}", k.len())
            }
        }
        Ok((n, c / 3))
    }
}

/// Attention of packed sequences; see the module docs.
///
/// # Shapes
/// `qkv`: `(N, 3H)` f32 → `(N, H)`.
pub fn packed_causal_attention(qkv: &Tensor, cfg: PackedAttention) -> candle_core::Result<Tensor> {
    qkv.contiguous()?.apply_op1(cfg)
}

#[inline(always)]
fn dot_imp(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (a, b) in ca.zip(cb) {
        for i in 0..LANES {
            acc[i] = a[i].mul_add(b[i], acc[i]);
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (a, b) in ra.iter().zip(rb) {
        s = a.mul_add(*b, s);
    }
    s
}

/// `y += c · x`.
#[inline(always)]
fn axpy_imp(y: &mut [f32], c: f32, x: &[f32]) {
    for (y, x) in y.iter_mut().zip(x) {
        *y = c.mul_add(*x, *y);
    }
}

/// Softmax probabilities of one query row over keys `0..=i`, into `p[..=i]`.
#[inline(always)]
fn probs_row<'a>(q: &[f32], k_rows: impl Fn(usize) -> &'a [f32], i: usize, scale: f32, p: &mut [f32]) {
    let mut m = f32::NEG_INFINITY;
    for (j, pj) in p[..=i].iter_mut().enumerate() {
        let s = dot_imp(q, k_rows(j)) * scale;
        *pj = s;
        m = if s > m { s } else { m };
    }
    let mut sum = 0f32;
    for pj in p[..=i].iter_mut() {
        let e = exp_f32(*pj - m);
        *pj = e;
        sum += e;
    }
    let inv = 1.0 / sum;
    p[..=i].iter_mut().for_each(|x| *x *= inv);
}

/// Keys scored per block (one register of f32 lanes) and value components per block (four
/// registers), in [`cached_attention_row`].
const KEY_BLOCK: usize = 16;
/// Keys per block of the key cache that [`cached_attention_row`] reads.
pub const CACHED_KEY_BLOCK: usize = KEY_BLOCK;
const VALUE_BLOCK: usize = 64;

/// Attention of one query over `len` cached positions; see [`cached_attention_row`].
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn cached_row_imp(q: &[f32], kt: &[f32], v: &[f32], len: usize, scale: f32, p: &mut [f32], out: &mut [f32]) {
    let d = q.len();
    out.iter_mut().for_each(|x| *x = 0.0);
    if len == 0 {
        return;
    }
    // Scores, a block of keys at a time with the block's sums in registers; the block's
    // keys are stored component-major, so it is one contiguous read.
    let blocks = len.div_ceil(KEY_BLOCK);
    let s = &mut p[..blocks * KEY_BLOCK];
    for (sb, kb) in s.chunks_exact_mut(KEY_BLOCK).zip(kt.chunks_exact(d * KEY_BLOCK)) {
        let mut acc = [0f32; KEY_BLOCK];
        for (&qc, kc) in q.iter().zip(kb.chunks_exact(KEY_BLOCK)) {
            for i in 0..KEY_BLOCK {
                acc[i] = qc.mul_add(kc[i], acc[i]);
            }
        }
        for (x, a) in sb.iter_mut().zip(acc) {
            *x = a * scale;
        }
    }
    let s = &mut s[..len];
    let m = crate::simd::max_f32_imp(s);
    let z = crate::simd::exp_shift_in_place_f32_imp(s, m);
    let inv = (1.0 / z) as f32;
    // Weighted values, a block of components at a time with the block in registers.
    for (b, ob) in out.chunks_mut(VALUE_BLOCK).enumerate() {
        let c0 = b * VALUE_BLOCK;
        let mut acc = [0f32; VALUE_BLOCK];
        if ob.len() == VALUE_BLOCK {
            for (j, &e) in s.iter().enumerate() {
                let (pj, vj) = (e * inv, &v[j * d + c0..j * d + c0 + VALUE_BLOCK]);
                for i in 0..VALUE_BLOCK {
                    acc[i] = pj.mul_add(vj[i], acc[i]);
                }
            }
        } else {
            for (j, &e) in s.iter().enumerate() {
                let (pj, vj) = (e * inv, &v[j * d + c0..j * d + c0 + ob.len()]);
                for (a, &x) in acc.iter_mut().zip(vj) {
                    *a = pj.mul_add(x, *a);
                }
            }
        }
        ob.copy_from_slice(&acc[..ob.len()]);
    }
}

dispatched! {
    /// One query of incremental decoding against a KV cache:
    /// `out = softmax(q·Kᵀ · scale) V` over the first `len` cached positions (the query's own
    /// key and value already appended).
    ///
    /// The keys are stored in blocks of [`CACHED_KEY_BLOCK`] keys, each block
    /// component-major: component `c` of key `j` at
    /// `kt[(j / 16)·16·d + c·16 + j % 16]`, `d = q.len()`, so one block's scores are one
    /// contiguous read with the sums in registers. `kt` holds whole blocks
    /// (`ceil(len / 16)·16·d` elements; keys past `len` are scored and ignored). Value `j`
    /// is row `j` of `v` (rows of `d`). `p` is scratch of at least `ceil(len / 16)·16`
    /// elements; `out` has `d`.
    pub fn cached_attention_row(q: &[f32], kt: &[f32], v: &[f32], len: usize, scale: f32, p: &mut [f32], out: &mut [f32]) = cached_row_imp;
}

/// One `(sequence, head)` of the input: rows `r0..r0+t` of `qkv` (row stride `3h`), the
/// head's columns from `c` (width `d`) in each of the q, k, v parts.
struct Task<'a> {
    qkv: &'a [f32],
    h: usize,
    r0: usize,
    t: usize,
    c: usize,
    d: usize,
    scale: f32,
    /// The task's `t × t` dropout keep factors.
    keep: Option<&'a [f32]>,
}

impl Task<'_> {
    /// Row `r` (task-relative) of part 0 (q), 1 (k) or 2 (v).
    #[inline(always)]
    fn row(&self, r: usize, part: usize) -> &[f32] {
        let s = (self.r0 + r) * 3 * self.h + part * self.h + self.c;
        &self.qkv[s..s + self.d]
    }
}

/// Forward of one task into `o` (`t × d`).
#[inline(always)]
fn fwd_task_imp(task: &Task, o: &mut [f32]) {
    let (t, d) = (task.t, task.d);
    let mut p = vec![0f32; t];
    for i in 0..t {
        probs_row(task.row(i, 0), |j| task.row(j, 1), i, task.scale, &mut p);
        let out = &mut o[i * d..(i + 1) * d];
        out.iter_mut().for_each(|x| *x = 0.0);
        for j in 0..=i {
            let pj = match task.keep {
                Some(kp) => p[j] * kp[i * t + j],
                None => p[j],
            };
            axpy_imp(out, pj, task.row(j, 2));
        }
    }
}

dispatched! {
    /// One `(sequence, head)` of the forward.
    fn fwd_task(task: &Task, o: &mut [f32]) = fwd_task_imp;
}

/// Backward of one task: from `g` (the output gradient, row stride `h`), writes
/// `dqkv = [dq; dk; dv]` (each `t × d`).
#[inline(always)]
fn bwd_task_imp(task: &Task, g: &[f32], dqkv: &mut [f32]) {
    let (t, d, h, c) = (task.t, task.d, task.h, task.c);
    let (dq, rest) = dqkv.split_at_mut(t * d);
    let (dk, dv) = rest.split_at_mut(t * d);
    dq.iter_mut()
        .chain(dk.iter_mut())
        .chain(dv.iter_mut())
        .for_each(|x| *x = 0.0);
    let (mut p, mut dp) = (vec![0f32; t], vec![0f32; t]);
    for i in 0..t {
        probs_row(task.row(i, 0), |j| task.row(j, 1), i, task.scale, &mut p);
        let gi = &g[(task.r0 + i) * h + c..(task.r0 + i) * h + c + d];
        // dP'ᵢⱼ = gᵢ·vⱼ; dVⱼ += P'ᵢⱼ gᵢ; dPᵢⱼ = dP'ᵢⱼ · keepᵢⱼ.
        let mut dot = 0f32;
        for j in 0..=i {
            let kf = task.keep.map_or(1.0, |kp| kp[i * t + j]);
            axpy_imp(&mut dv[j * d..(j + 1) * d], p[j] * kf, gi);
            dp[j] = dot_imp(gi, task.row(j, 2)) * kf;
            dot += p[j] * dp[j];
        }
        // dSᵢⱼ = Pᵢⱼ (dPᵢⱼ − Σⱼ Pᵢⱼ dPᵢⱼ); dQᵢ += scale dSᵢⱼ Kⱼ; dKⱼ += scale dSᵢⱼ Qᵢ.
        let qi = task.row(i, 0);
        for j in 0..=i {
            let ds = p[j] * (dp[j] - dot) * task.scale;
            axpy_imp(&mut dq[i * d..(i + 1) * d], ds, task.row(j, 1));
            axpy_imp(&mut dk[j * d..(j + 1) * d], ds, qi);
        }
    }
}

dispatched! {
    /// One `(sequence, head)` of the backward.
    fn bwd_task(task: &Task, g: &[f32], dqkv: &mut [f32]) = bwd_task_imp;
}

impl CustomOp1 for PackedAttention {
    fn name(&self) -> &'static str {
        "packed-causal-attention"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n, h) = self.check(l)?;
        let qkv = slice(s, l, "packed attention")?;
        let d = h / self.n_head;
        let parts: Vec<Vec<f32>> = self
            .tasks()
            .into_par_iter()
            .map(|spec| {
                let mut o = vec![0f32; spec.1 * d];
                fwd_task(&self.task(qkv, h, spec), &mut o);
                o
            })
            .collect();
        let mut out = vec![0f32; n * h];
        for ((r0, t, head, _), o) in self.tasks().into_iter().zip(&parts) {
            for i in 0..t {
                let dst = (r0 + i) * h + head * d;
                out[dst..dst + d].copy_from_slice(&o[i * d..(i + 1) * d]);
            }
        }
        Ok((CpuStorage::F32(out), Shape::from((n, h))))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(arg.apply_op2_no_bwd(
            &grad.contiguous()?,
            &PackedAttentionBwd(self.clone()),
        )?))
    }
}

struct PackedAttentionBwd(PackedAttention);

impl CustomOp2 for PackedAttentionBwd {
    fn name(&self) -> &'static str {
        "packed-causal-attention-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let cfg = &self.0;
        let (n, h) = cfg.check(l1)?;
        if l2.shape().dims() != [n, h] {
            candle_core::bail!(
                "packed attention: gradient {:?}, expected ({n}, {h})",
                l2.shape().dims()
            )
        }
        let (qkv, g) = (slice(s1, l1, "packed attention")?, slice(s2, l2, "packed attention")?);
        let d = h / cfg.n_head;
        let parts: Vec<Vec<f32>> = cfg
            .tasks()
            .into_par_iter()
            .map(|spec| {
                let mut buf = vec![0f32; 3 * spec.1 * d];
                bwd_task(&cfg.task(qkv, h, spec), g, &mut buf);
                buf
            })
            .collect();
        let mut out = vec![0f32; n * 3 * h];
        for ((r0, t, head, _), buf) in cfg.tasks().into_iter().zip(&parts) {
            for part in 0..3 {
                for i in 0..t {
                    let dst = (r0 + i) * 3 * h + part * h + head * d;
                    let src = (part * t + i) * d;
                    out[dst..dst + d].copy_from_slice(&buf[src..src + d]);
                }
            }
        }
        Ok((CpuStorage::F32(out), Shape::from((n, 3 * h))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::{causal_padding_bias, softmax_last_dim_composed};
    use crate::rng::RngStream;
    use candle_core::{Device, Var};

    /// The composed oracle: each sequence on its own, heads split, scores, mask, softmax,
    /// dropout as a multiply by the same keep factors, product, heads merged.
    fn composed(qkv: &Tensor, cfg: &PackedAttention) -> Tensor {
        let h = qkv.dim(1).unwrap() / 3;
        let (nh, d) = (cfg.n_head, h / cfg.n_head);
        let (mut outs, mut row, mut k0) = (Vec::new(), 0, 0);
        for &t in &cfg.lens {
            let x = qkv.narrow(0, row, t).unwrap();
            let heads = |i: usize| {
                x.narrow(1, i * h, h)
                    .unwrap()
                    .reshape((t, nh, d))
                    .unwrap()
                    .transpose(0, 1)
                    .unwrap()
                    .contiguous()
                    .unwrap()
            };
            let (q, k, v) = (heads(0), heads(1), heads(2));
            let s = (q.matmul(&k.t().unwrap()).unwrap() * cfg.scale as f64).unwrap();
            let bias = causal_padding_bias(&[vec![1; t]], t, &Device::Cpu)
                .unwrap()
                .squeeze(0)
                .unwrap();
            let mut p = softmax_last_dim_composed(&s.broadcast_add(&bias).unwrap()).unwrap();
            if let Some(keep) = &cfg.keep {
                let m = Tensor::from_vec(keep[k0..k0 + nh * t * t].to_vec(), (nh, t, t), &Device::Cpu).unwrap();
                p = (p * m).unwrap();
            }
            k0 += nh * t * t;
            let o = p.matmul(&v).unwrap().transpose(0, 1).unwrap().reshape((t, h)).unwrap();
            outs.push(o);
            row += t;
        }
        Tensor::cat(&outs, 0).unwrap()
    }

    fn check(lens: Vec<usize>, n_head: usize, d: usize, dropout: Option<f64>) {
        let h = n_head * d;
        let n: usize = lens.iter().sum();
        let mut rng = RngStream::new(7);
        let x: Vec<f32> = (0..n * 3 * h).map(|_| (2.0 * rng.uniform_f64() - 1.0) as f32).collect();
        let keep = dropout.map(|p| {
            Arc::new(PackedAttention::dropout_keep(&lens, n_head, p, &mut |k| {
                rng.uniform_vec(k)
            }))
        });
        let cfg = PackedAttention {
            lens,
            n_head,
            scale: 1.0 / (d as f32).sqrt(),
            keep,
        };
        let w: Vec<f32> = (0..n * h).map(|_| (2.0 * rng.uniform_f64() - 1.0) as f32).collect();
        let w = Tensor::from_vec(w, (n, h), &Device::Cpu).unwrap();
        let run = |f: &dyn Fn(&Tensor) -> Tensor| {
            let v = Var::from_tensor(&Tensor::from_vec(x.clone(), (n, 3 * h), &Device::Cpu).unwrap()).unwrap();
            let y = f(v.as_tensor());
            let g = (&y * &w).unwrap().sum_all().unwrap().backward().unwrap();
            let gx = g
                .get(v.as_tensor())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            (y.flatten_all().unwrap().to_vec1::<f32>().unwrap(), gx)
        };
        let fused = run(&|t| packed_causal_attention(t, cfg.clone()).unwrap());
        let oracle = run(&|t| composed(t, &cfg));
        for (name, a, b) in [("value", &fused.0, &oracle.0), ("gradient", &fused.1, &oracle.1)] {
            let scale = b.iter().fold(1e-6f32, |m, x| m.max(x.abs()));
            for (i, (x, y)) in a.iter().zip(b.iter()).enumerate() {
                // f32, sums of at most T·d products in another order.
                assert!((x - y).abs() <= 2e-5 * scale, "{name}[{i}]: fused {x} vs composed {y}");
            }
        }
    }

    #[test]
    fn packed_attention_matches_the_composed_ops() {
        check(vec![5, 1, 9, 3], 2, 4, None);
        check(vec![17, 40], 4, 32, None);
    }

    #[test]
    fn packed_attention_with_dropout_matches_the_composed_ops() {
        check(vec![6, 2, 11], 2, 8, Some(0.3));
        check(vec![33], 3, 20, Some(0.1));
    }

    #[test]
    fn packed_attention_refuses_a_mismatched_input() {
        let x = Tensor::zeros((5, 12), candle_core::DType::F32, &Device::Cpu).unwrap();
        let cfg = PackedAttention {
            lens: vec![2, 2],
            n_head: 2,
            scale: 1.0,
            keep: None,
        };
        let err = packed_causal_attention(&x, cfg).unwrap_err().to_string();
        assert!(err.contains("2 sequences of 4 tokens"), "{err}");
    }

    #[test]
    fn cached_attention_row_matches_the_f64_softmax() {
        let (d, cap) = (24, 48);
        let mut rng = RngStream::new(17);
        let mut u = |n: usize| -> Vec<f32> { rng.uniform_vec(n).into_iter().map(|x| 3.0 * x - 1.5).collect() };
        let (q, keys, v) = (u(d), u(cap * d), u(cap * d));
        // Keys in blocks of 16, component-major (cap is a multiple of 16).
        let mut kt = vec![f32::NAN; d * cap];
        for j in 0..cap {
            for c in 0..d {
                kt[(j / 16) * 16 * d + c * 16 + j % 16] = keys[j * d + c];
            }
        }
        let scale = 0.3f32;
        for len in [1usize, 2, 15, 16, 17, 40, 48] {
            let mut p = vec![0f32; cap];
            let mut out = vec![f32::NAN; d];
            // Keys past `len` in the last block are read and ignored: make them large.
            let mut kt = kt.clone();
            for j in len..len.div_ceil(16) * 16 {
                (0..d).for_each(|c| kt[(j / 16) * 16 * d + c * 16 + j % 16] = 1e30);
            }
            cached_attention_row(&q, &kt, &v[..len * d], len, scale, &mut p, &mut out);
            let s: Vec<f64> = (0..len)
                .map(|j| (0..d).map(|c| q[c] as f64 * keys[j * d + c] as f64).sum::<f64>() * scale as f64)
                .collect();
            let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
            let z: f64 = e.iter().sum();
            for c in 0..d {
                let want: f64 = (0..len).map(|j| e[j] / z * v[j * d + c] as f64).sum();
                assert!(
                    (out[c] as f64 - want).abs() < 1e-5,
                    "len {len} c {c}: {} vs {want}",
                    out[c]
                );
            }
        }
    }
}
