//! The per-`(sequence, head)` loops of the fused attention ops, over row views of q, k and v
//! wherever they live (one fused `(N, 3H)` buffer for GPT-2, separate or strided tensors for
//! the Llama family).

use crate::simd::{dispatched, exp_f32, LANES};

/// Rows of a row-major matrix inside a flat buffer: component `c` of row `r` at
/// `data[off + r·stride + c]`.
#[derive(Clone, Copy)]
pub(super) struct Rows<'a> {
    pub data: &'a [f32],
    pub stride: usize,
    pub off: usize,
}

impl<'a> Rows<'a> {
    /// Components `c..c + d` of row `r`.
    #[inline(always)]
    pub fn row(&self, r: usize, c: usize, d: usize) -> &'a [f32] {
        let s = self.off + r * self.stride + c;
        &self.data[s..s + d]
    }
}

#[inline(always)]
pub(super) fn dot_imp(a: &[f32], b: &[f32]) -> f32 {
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

/// Softmax probabilities of one query row over keys `j0..=i`, into `p[j0..=i]`.
#[inline(always)]
fn probs_row<'a>(q: &[f32], k_rows: impl Fn(usize) -> &'a [f32], j0: usize, i: usize, scale: f32, p: &mut [f32]) {
    let mut m = f32::NEG_INFINITY;
    for (j, pj) in p[j0..=i].iter_mut().enumerate() {
        let s = dot_imp(q, k_rows(j0 + j)) * scale;
        *pj = s;
        m = if s > m { s } else { m };
    }
    let mut sum = 0f32;
    for pj in p[j0..=i].iter_mut() {
        let e = exp_f32(*pj - m);
        *pj = e;
        sum += e;
    }
    let inv = 1.0 / sum;
    p[j0..=i].iter_mut().for_each(|x| *x *= inv);
}

/// One query head of one sequence: rows `r0..r0+t` of q, k, v; the query head's columns
/// from `qc`, its kv head's from `kc` (width `d` each).
///
/// With a shared prefix of `l` tokens the sequence's keys are the rows `prefix` (where
/// other sequences computed those tokens) followed by its own `t`: key index `j` counts over
/// those `l + t` keys, and query `i` (its own row `r0 + i`) sits at key index `l + i`.
pub(super) struct Task<'a> {
    pub q: Rows<'a>,
    pub k: Rows<'a>,
    pub v: Rows<'a>,
    pub r0: usize,
    pub t: usize,
    /// Rows of the shared prefix's keys (empty: none).
    pub prefix: &'a [usize],
    pub qc: usize,
    pub kc: usize,
    pub d: usize,
    pub scale: f32,
    /// Keys per query (the sliding window), `usize::MAX` for none.
    pub window: usize,
    /// The task's `t × t` dropout keep factors (only without a prefix).
    pub keep: Option<&'a [f32]>,
}

impl<'a> Task<'a> {
    #[inline(always)]
    fn q(&self, i: usize) -> &'a [f32] {
        self.q.row(self.r0 + i, self.qc, self.d)
    }

    /// The row of key index `j` (see [`Task`]).
    #[inline(always)]
    pub(super) fn key_row(&self, j: usize) -> usize {
        let l = self.prefix.len();
        if j < l {
            self.prefix[j]
        } else {
            self.r0 + (j - l)
        }
    }

    #[inline(always)]
    fn k(&self, j: usize) -> &'a [f32] {
        self.k.row(self.key_row(j), self.kc, self.d)
    }

    #[inline(always)]
    fn v(&self, j: usize) -> &'a [f32] {
        self.v.row(self.key_row(j), self.kc, self.d)
    }

    /// The first key query `i` sees: transformers' `kv_idx > q_idx − window`.
    #[inline(always)]
    fn first_key(&self, i: usize) -> usize {
        (i + 1).saturating_sub(self.window)
    }
}

/// Forward of one task into `o` (`t × d`).
#[inline(always)]
fn fwd_task_imp(task: &Task, o: &mut [f32]) {
    let (t, d, l) = (task.t, task.d, task.prefix.len());
    let mut p = vec![0f32; l + t];
    for i in 0..t {
        // Query `i` at key index `qi`; `keep` exists only without a prefix (`qi == i`).
        let qi = l + i;
        let j0 = task.first_key(qi);
        probs_row(task.q(i), |j| task.k(j), j0, qi, task.scale, &mut p);
        let out = &mut o[i * d..(i + 1) * d];
        out.iter_mut().for_each(|x| *x = 0.0);
        for j in j0..=qi {
            let pj = match task.keep {
                Some(kp) => p[j] * kp[i * t + j],
                None => p[j],
            };
            axpy_imp(out, pj, task.v(j));
        }
    }
}

dispatched! {
    /// One `(sequence, query head)` of the forward.
    pub(super) fn fwd_task(task: &Task, o: &mut [f32]) = fwd_task_imp;
}

/// Backward of one task: from `g` (the output gradient; the query head's columns from
/// `task.qc`), writes `dq` (`t × d`) and adds to `dk`, `dv` (`(l + t) × d`, by key index;
/// several query heads share one kv head, so the caller zeroes `dk`, `dv` once per kv head).
#[inline(always)]
fn bwd_task_imp(task: &Task, g: Rows, dq: &mut [f32], dk: &mut [f32], dv: &mut [f32]) {
    let (t, d, l) = (task.t, task.d, task.prefix.len());
    dq.iter_mut().for_each(|x| *x = 0.0);
    let (mut p, mut dp) = (vec![0f32; l + t], vec![0f32; l + t]);
    for i in 0..t {
        let qi = l + i;
        let j0 = task.first_key(qi);
        probs_row(task.q(i), |j| task.k(j), j0, qi, task.scale, &mut p);
        let gi = g.row(task.r0 + i, task.qc, d);
        // dP'ᵢⱼ = gᵢ·vⱼ; dVⱼ += P'ᵢⱼ gᵢ; dPᵢⱼ = dP'ᵢⱼ · keepᵢⱼ.
        let mut dot = 0f32;
        for j in j0..=qi {
            let kf = task.keep.map_or(1.0, |kp| kp[i * t + j]);
            axpy_imp(&mut dv[j * d..(j + 1) * d], p[j] * kf, gi);
            dp[j] = dot_imp(gi, task.v(j)) * kf;
            dot += p[j] * dp[j];
        }
        // dSᵢⱼ = Pᵢⱼ (dPᵢⱼ − Σⱼ Pᵢⱼ dPᵢⱼ); dQᵢ += scale dSᵢⱼ Kⱼ; dKⱼ += scale dSᵢⱼ Qᵢ.
        let q_row = task.q(i);
        for j in j0..=qi {
            let ds = p[j] * (dp[j] - dot) * task.scale;
            axpy_imp(&mut dq[i * d..(i + 1) * d], ds, task.k(j));
            axpy_imp(&mut dk[j * d..(j + 1) * d], ds, q_row);
        }
    }
}

dispatched! {
    /// One `(sequence, query head)` of the backward.
    pub(super) fn bwd_task(task: &Task, g: Rows, dq: &mut [f32], dk: &mut [f32], dv: &mut [f32]) = bwd_task_imp;
}
