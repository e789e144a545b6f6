//! Causal attention over packed sequences with grouped-query heads and an optional sliding
//! window: the general op (separate q, k, v) and the drivers the GPT-2 op shares.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::kernel::{bwd_task, fwd_task, Rows, Task};
use crate::kernels::slice;
use crate::nn::{causal_window_padding_bias, repeat_kv, softmax_last_dim_composed};

/// The shape of an attention call over packed sequences (laid end to end, no padding; each
/// attends to itself only).
///
/// Query head `h` reads kv head `h / (n_head / n_kv_head)` (transformers' `repeat_kv`
/// order); with `window = Some(W)` query `i` sees keys `j` with `i − W < j ≤ i`, the `W` most
/// recent including itself (transformers' `sliding_window_overlay`; candle's Mistral/Qwen2
/// masks allow `W + 1`).
#[derive(Clone, Debug)]
pub struct AttentionConfig {
    /// Length of every sequence, in packing order (they sum to `N`).
    pub lens: Vec<usize>,
    /// Query heads (`num_attention_heads`).
    pub n_head: usize,
    /// Key/value heads (`num_key_value_heads`), a divisor of `n_head`.
    pub n_kv_head: usize,
    /// Components per head (`head_dim`; not necessarily hidden / heads).
    pub head_dim: usize,
    /// Factor of the scores (`head_dim^-0.5`; GPT-2 adds its layer-index scaling).
    pub scale: f32,
    /// Sliding window in keys (`sliding_window` where the layer uses it), `None` for full
    /// causal attention.
    pub window: Option<usize>,
    /// Dropout on the probabilities: per sequence, per query head, a row-major `T × T`
    /// square of keep factors (`0` or `1/(1−p)`), concatenated in sequence order then head
    /// order (see [`AttentionConfig::dropout_keep`]). `None`: no dropout.
    pub keep: Option<Arc<Vec<f32>>>,
    /// Shared prefixes: empty (none), or one entry per sequence. `Some((j, l))` makes
    /// sequence `i` the continuation of the first `l` tokens of an earlier sequence `j < i`
    /// (which may continue another in turn): its keys are those tokens' rows (positions
    /// `0..l`) then its own rows (positions `l..l + lens[i]`), so a prefix that sequences
    /// have in common is computed once. The window counts those positions. Not with
    /// dropout.
    pub prefixes: Vec<Option<(usize, usize)>>,
}

impl AttentionConfig {
    /// Keep factors for dropout with probability `p`, from `uniform(n)` samples in `[0, 1)`
    /// (a sample below `p` drops), in the layout of [`AttentionConfig::keep`].
    pub fn dropout_keep(lens: &[usize], n_head: usize, p: f64, uniform: &mut dyn FnMut(usize) -> Vec<f32>) -> Vec<f32> {
        let n: usize = lens.iter().map(|t| n_head * t * t).sum();
        let scale = (1.0 / (1.0 - p)) as f32;
        let p = p as f32;
        uniform(n)
            .into_iter()
            .map(|u| if u < p { 0.0 } else { scale })
            .collect()
    }

    /// Query heads per kv head.
    fn n_rep(&self) -> usize {
        self.n_head / self.n_kv_head.max(1)
    }

    /// Widths of q and of k (= v): `n_head·d`, `n_kv_head·d`.
    pub(super) fn widths(&self) -> (usize, usize) {
        (self.n_head * self.head_dim, self.n_kv_head * self.head_dim)
    }

    /// Validates the heads, the window and the dropout factors; returns `N`.
    pub(super) fn check(&self) -> candle_core::Result<usize> {
        let (h, kv) = (self.n_head, self.n_kv_head);
        if h == 0 || kv == 0 || h % kv != 0 || self.head_dim == 0 {
            candle_core::bail!(
                "attention: {h} query heads, {kv} kv heads, head_dim {}: need heads > 0, head_dim > 0 \
                 and n_head a multiple of n_kv_head",
                self.head_dim
            )
        }
        if self.window == Some(0) {
            candle_core::bail!("attention: sliding window of 0 keys (hint: None for no window)")
        }
        if let Some(k) = &self.keep {
            let want: usize = self.lens.iter().map(|t| h * t * t).sum();
            if k.len() != want {
                candle_core::bail!("attention: {} dropout factors, expected {want}", k.len())
            }
        }
        self.check_prefixes()?;
        Ok(self.lens.iter().sum())
    }

    /// Validates [`AttentionConfig::prefixes`].
    fn check_prefixes(&self) -> candle_core::Result<()> {
        if self.prefixes.is_empty() {
            return Ok(());
        }
        let n = self.lens.len();
        if self.prefixes.len() != n {
            candle_core::bail!("attention: {} prefix entries for {n} sequences", self.prefixes.len())
        }
        if self.keep.is_some() && self.prefixes.iter().any(Option::is_some) {
            candle_core::bail!("attention: shared prefixes with dropout (hint: share prefixes in eval mode only)")
        }
        // Tokens of each sequence in full: its prefix and its own.
        let mut full = Vec::with_capacity(n);
        for (i, p) in self.prefixes.iter().enumerate() {
            let l = match *p {
                Some((j, l)) if j >= i || l > full[j] => candle_core::bail!(
                    "attention: sequence {i} continues {l} tokens of sequence {j}, which must be \
                     an earlier sequence of at least {l} tokens"
                ),
                Some((_, l)) => l,
                None => 0,
            };
            full.push(l + self.lens[i]);
        }
        Ok(())
    }

    /// The task of query head `head` of sequence `s`.
    fn task<'a>(&'a self, q: Rows<'a>, k: Rows<'a>, v: Rows<'a>, s: &'a Seq, head: usize) -> Task<'a> {
        let d = self.head_dim;
        let (r0, t, keep0) = (s.r0, s.t, s.keep0);
        Task {
            q,
            k,
            v,
            r0,
            t,
            prefix: &s.prefix,
            qc: head * d,
            kc: (head / self.n_rep()) * d,
            d,
            scale: self.scale,
            window: self.window.unwrap_or(usize::MAX),
            keep: self
                .keep
                .as_deref()
                .map(|kp| &kp[keep0 + head * t * t..keep0 + (head + 1) * t * t]),
        }
    }

    /// Every sequence's rows, prefix and keep factors (prefixes valid: [`Self::check`]).
    fn seqs(&self) -> Vec<Seq> {
        let (mut row, mut keep) = (0, 0);
        let mut out: Vec<Seq> = Vec::with_capacity(self.lens.len());
        for (i, &t) in self.lens.iter().enumerate() {
            // The rows of sequence j's first l tokens: its prefix's, then its own.
            let prefix = match self.prefixes.get(i).copied().flatten() {
                Some((j, l)) => {
                    let s = &out[j];
                    s.prefix.iter().copied().chain(s.r0..s.r0 + s.t).take(l).collect()
                }
                None => Vec::new(),
            };
            out.push(Seq {
                r0: row,
                t,
                prefix,
                keep0: keep,
            });
            row += t;
            keep += self.n_head * t * t;
        }
        out
    }

    /// The forward: `(N, n_head·d)` row-major.
    pub(super) fn forward(&self, q: Rows, k: Rows, v: Rows, n: usize) -> Vec<f32> {
        let d = self.head_dim;
        let (wq, _) = self.widths();
        let seqs = self.seqs();
        let specs: Vec<(&Seq, usize)> = seqs
            .iter()
            .flat_map(|s| (0..self.n_head).map(move |h| (s, h)))
            .collect();
        let parts: Vec<Vec<f32>> = specs
            .par_iter()
            .map(|&(s, h)| {
                let mut o = vec![0f32; s.t * d];
                fwd_task(&self.task(q, k, v, s, h), &mut o);
                o
            })
            .collect();
        let mut out = vec![0f32; n * wq];
        for (&(s, h), o) in specs.iter().zip(&parts) {
            for i in 0..s.t {
                let dst = (s.r0 + i) * wq + h * d;
                out[dst..dst + d].copy_from_slice(&o[i * d..(i + 1) * d]);
            }
        }
        out
    }

    /// The backward from the output gradient `g` (`(N, n_head·d)` rows): `(N, n_head·d +
    /// 2·n_kv_head·d)` row-major, each row `[dq | dk | dv]` (for GPT-2, exactly the layout of
    /// its fused `(N, 3H)` input).
    pub(super) fn backward(&self, q: Rows, k: Rows, v: Rows, g: Rows, n: usize) -> Vec<f32> {
        let d = self.head_dim;
        let (wq, wkv) = self.widths();
        let rep = self.n_rep();
        // One task per (sequence, kv head): its query heads share dk and dv.
        let seqs = self.seqs();
        let specs: Vec<(&Seq, usize)> = seqs
            .iter()
            .flat_map(|s| (0..self.n_kv_head).map(move |kvh| (s, kvh)))
            .collect();
        let parts: Vec<Vec<f32>> = specs
            .par_iter()
            .map(|&(s, kvh)| {
                // [dq of each of the `rep` query heads (`t × d`) | dk | dv (`(l + t) × d`)].
                let (t, keys) = (s.t, s.prefix.len() + s.t);
                let mut buf = vec![0f32; (rep * t + 2 * keys) * d];
                let (dqs, dkv) = buf.split_at_mut(rep * t * d);
                let (dk, dv) = dkv.split_at_mut(keys * d);
                for (r, dq) in dqs.chunks_exact_mut(t * d).enumerate() {
                    bwd_task(&self.task(q, k, v, s, kvh * rep + r), g, dq, dk, dv);
                }
                buf
            })
            .collect();
        let w = wq + 2 * wkv;
        let mut out = vec![0f32; n * w];
        for (&(s, kvh), buf) in specs.iter().zip(&parts) {
            let (t, keys) = (s.t, s.prefix.len() + s.t);
            let task = self.task(q, k, v, s, kvh * rep);
            for r in 0..rep {
                let col = (kvh * rep + r) * d;
                for i in 0..t {
                    let dst = (s.r0 + i) * w + col;
                    let src = (r * t + i) * d;
                    out[dst..dst + d].copy_from_slice(&buf[src..src + d]);
                }
            }
            // dk and dv are sums: a prefix's rows also gather its continuations' terms.
            let (dk, dv) = buf[rep * t * d..].split_at(keys * d);
            for (col, part) in [(wq + kvh * d, dk), (wq + wkv + kvh * d, dv)] {
                for j in 0..keys {
                    let dst = task.key_row(j) * w + col;
                    out[dst..dst + d]
                        .iter_mut()
                        .zip(&part[j * d..(j + 1) * d])
                        .for_each(|(o, x)| *o += x);
                }
            }
        }
        out
    }
}

/// One sequence of a call: rows `r0..r0 + t`, the rows of its shared prefix's keys (empty
/// for none) and the offset of its dropout factors.
struct Seq {
    r0: usize,
    t: usize,
    prefix: Vec<usize>,
    keep0: usize,
}

/// The rows of a rank-2 f32 CPU tensor whose rows may be strided (a `narrow` of a wider
/// matrix) but whose components are contiguous.
fn rows<'a>(s: &'a CpuStorage, l: &Layout, width: usize, what: &str) -> candle_core::Result<Rows<'a>> {
    let CpuStorage::F32(data) = s else {
        candle_core::bail!("attention: {what} is not f32")
    };
    match (l.dims(), l.stride()) {
        ([_, w], [s0, s1]) if *w == width && (*s1 == 1 || width == 1) => Ok(Rows {
            data,
            stride: *s0,
            off: l.start_offset(),
        }),
        _ => candle_core::bail!(
            "attention: {what} {:?} (strides {:?}), expected (N, {width}) with contiguous rows",
            l.dims(),
            l.stride()
        ),
    }
}

/// Whether a tensor's rows can be read in place (rank 2, unit column stride).
fn rows_in_place(t: &Tensor) -> bool {
    let l = t.layout();
    l.dims().len() == 2 && (l.stride()[1] == 1 || l.dims()[1] == 1)
}

/// Causal attention of packed sequences with grouped-query heads and an optional sliding
/// window, `O = dropout(softmax(Q Kᵀ · scale + mask)) V` per sequence and query head, heads
/// merged in transformers' layout (`attn_output.transpose(1, 2).reshape(N, n_head·d)`).
///
/// f32 on the CPU runs the fused op (one task per sequence and head, nothing of size `T²`
/// kept for the backward, which recomputes the probabilities; dk and dv summed over the
/// query heads of their kv head); q, k, v may be `narrow`s of one wider matrix (rows read
/// in place). Every other case runs [`attention_composed`].
///
/// # Shapes
/// `q`: `(N, n_head·d)`, `k`, `v`: `(N, n_kv_head·d)` (after RoPE) → `(N, n_head·d)`.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, cfg: &AttentionConfig) -> candle_core::Result<Tensor> {
    if !crate::kernels::applies(&[q, k, v]) {
        return attention_composed(q, k, v, cfg);
    }
    let fix = |t: &Tensor| {
        if rows_in_place(t) {
            Ok(t.clone())
        } else {
            t.contiguous()
        }
    };
    fix(q)?.apply_op3(&fix(k)?, &fix(v)?, Split(cfg.clone()))
}

/// [`attention`] from candle ops (every dtype; the fused op's test oracle): per sequence,
/// heads split, `repeat_kv`, scores, the additive causal (and window) mask of
/// [`causal_window_padding_bias`], softmax in f32 for half-precision inputs (transformers'
/// `softmax(.., dtype=float32)`) cast back, the dropout factors as a multiply, the product with V, heads merged.
pub fn attention_composed(q: &Tensor, k: &Tensor, v: &Tensor, cfg: &AttentionConfig) -> candle_core::Result<Tensor> {
    let n = cfg.check()?;
    let (wq, wkv) = cfg.widths();
    let (nh, nkv, d) = (cfg.n_head, cfg.n_kv_head, cfg.head_dim);
    if q.dims() != [n, wq] || k.dims() != [n, wkv] || v.dims() != [n, wkv] {
        candle_core::bail!(
            "attention: q {:?}, k {:?}, v {:?} do not fit {n} tokens, {nh} heads, {nkv} kv heads of {d}",
            q.dims(),
            k.dims(),
            v.dims()
        )
    }
    let seqs = cfg.seqs();
    let (mut outs, mut k0) = (Vec::new(), 0);
    for s in &seqs {
        let (row, t, l) = (s.r0, s.t, s.prefix.len());
        if t == 0 {
            continue;
        }
        // Rows of the sequence's keys: the shared prefix's, then its own.
        let keys = |x: &Tensor| match l {
            0 => x.narrow(0, row, t),
            _ => {
                let rows: Vec<u32> = s.prefix.iter().copied().chain(row..row + t).map(|r| r as u32).collect();
                x.contiguous()?
                    .index_select(&Tensor::from_vec(rows, l + t, x.device())?, 0)
            }
        };
        let heads = |x: Tensor, h: usize| -> candle_core::Result<Tensor> {
            let n = x.dim(0)?;
            x.reshape((n, h, d))?.transpose(0, 1)?.contiguous()
        };
        let qh = heads(q.narrow(0, row, t)?, nh)?;
        let kh = repeat_kv(&heads(keys(k)?, nkv)?.unsqueeze(0)?, cfg.n_rep())?.squeeze(0)?;
        let vh = repeat_kv(&heads(keys(v)?, nkv)?.unsqueeze(0)?, cfg.n_rep())?.squeeze(0)?;
        let s = (qh.matmul(&kh.t()?)? * cfg.scale as f64)?;
        // Softmax in f32 as transformers (f64 stays f64 for the finite-difference tests).
        // Queries at positions `l..l + t` over keys `0..l + t`.
        let sdt = crate::nn::compute_dtype(q.dtype());
        let bias = causal_window_padding_bias(&[vec![1; l + t]], t, cfg.window, q.device())?
            .squeeze(0)?
            .to_dtype(sdt)?;
        let p = softmax_last_dim_composed(&s.to_dtype(sdt)?.broadcast_add(&bias)?)?;
        let mut p = p.to_dtype(q.dtype())?;
        if let Some(keep) = &cfg.keep {
            let m = Tensor::from_vec(keep[k0..k0 + nh * t * t].to_vec(), (nh, t, t), q.device())?;
            p = (p * m.to_dtype(q.dtype())?)?;
        }
        k0 += nh * t * t;
        outs.push(p.matmul(&vh)?.transpose(0, 1)?.reshape((t, wq))?);
    }
    if outs.is_empty() {
        return Tensor::zeros((0, wq), q.dtype(), q.device());
    }
    Tensor::cat(&outs, 0)
}

/// The fused op on separate q, k, v.
struct Split(AttentionConfig);

impl Split {
    fn inputs<'a>(
        &self,
        (s1, l1): (&'a CpuStorage, &Layout),
        (s2, l2): (&'a CpuStorage, &Layout),
        (s3, l3): (&'a CpuStorage, &Layout),
    ) -> candle_core::Result<(usize, Rows<'a>, Rows<'a>, Rows<'a>)> {
        let n = self.0.check()?;
        let (wq, wkv) = self.0.widths();
        let (q, k, v) = (rows(s1, l1, wq, "q")?, rows(s2, l2, wkv, "k")?, rows(s3, l3, wkv, "v")?);
        for (what, l) in [("q", l1), ("k", l2), ("v", l3)] {
            if l.dims()[0] != n {
                candle_core::bail!(
                    "attention: {what} has {} rows, but the {} sequences hold {n} tokens",
                    l.dims()[0],
                    self.0.lens.len()
                )
            }
        }
        Ok((n, q, k, v))
    }
}

impl CustomOp3 for Split {
    fn name(&self) -> &'static str {
        "gqa-causal-attention"
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
        let (n, q, k, v) = self.inputs((s1, l1), (s2, l2), (s3, l3))?;
        let out = self.0.forward(q, k, v, n);
        Ok((CpuStorage::F32(out), Shape::from((n, self.0.widths().0))))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // k and v side by side (a copy of 2·N·n_kv_head·d values), so that the backward is
        // one three-input op.
        let kv = Tensor::cat(&[k, v], 1)?;
        let out = q.apply_op3_no_bwd(&kv, &grad.contiguous()?, &SplitBwd(self.0.clone()))?;
        let (wq, wkv) = self.0.widths();
        let dq = out.narrow(1, 0, wq)?;
        let dk = out.narrow(1, wq, wkv)?;
        let dv = out.narrow(1, wq + wkv, wkv)?;
        Ok((
            q.track_op().then_some(dq),
            k.track_op().then_some(dk),
            v.track_op().then_some(dv),
        ))
    }
}

struct SplitBwd(AttentionConfig);

impl CustomOp3 for SplitBwd {
    fn name(&self) -> &'static str {
        "gqa-causal-attention-bwd"
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
        let cfg = &self.0;
        let n = cfg.check()?;
        let (wq, wkv) = cfg.widths();
        let q = rows(s1, l1, wq, "q")?;
        let kv = slice(s2, l2, "attention")?;
        let g = slice(s3, l3, "attention")?;
        if l2.dims() != [n, 2 * wkv] || l3.dims() != [n, wq] {
            candle_core::bail!(
                "attention: backward inputs kv {:?}, gradient {:?}, expected ({n}, {}) and ({n}, {wq})",
                l2.dims(),
                l3.dims(),
                2 * wkv
            )
        }
        let k = Rows {
            data: kv,
            stride: 2 * wkv,
            off: 0,
        };
        let v = Rows { off: wkv, ..k };
        let g = Rows {
            data: g,
            stride: wq,
            off: 0,
        };
        let out = cfg.backward(q, k, v, g, n);
        Ok((CpuStorage::F32(out), Shape::from((n, wq + 2 * wkv))))
    }
}
