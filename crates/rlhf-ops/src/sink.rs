//! Gradients delivered beside the autograd graph.
//!
//! candle's backward gives every parameter one dense gradient, built as `zeros + g` and
//! summed over its uses. For a token embedding that is a `(V, H)` tensor of zeros with a
//! few rows set, and for GPT-2's tied embedding a second `(V, H)` tensor (from the LM
//! head) added to it: several passes over 25 MB (tiny) to 150 MB (GPT-2-small) per
//! backward, most of the time of a small model's step. Ops given a [`GradSink`] instead
//! put their weight gradient here — touched rows only for a lookup, the dense product
//! for the LM head — and tell the graph they have none; the trainer adds the sink's
//! entries to its gradient sums after `backward()`.
//!
//! Without a sink the same ops return their gradients to the graph as usual, so
//! `backward()` alone stays complete (the gradient tests use it).

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor, TensorId};

/// One gradient contribution for the parameter with tensor id `id`.
#[derive(Clone, Debug)]
pub enum SinkEntry {
    /// A full-shape gradient to add.
    Dense {
        /// The parameter's tensor id ([`Tensor::id`] of its tracked tensor).
        id: TensorId,
        /// The gradient, the parameter's shape.
        grad: Tensor,
    },
    /// Row `rows[i]` of the parameter receives row `i` of `grad` (rows may repeat).
    Rows {
        /// The parameter's tensor id.
        id: TensorId,
        /// Row indices into the parameter's first dimension.
        rows: Arc<Vec<u32>>,
        /// `(rows.len(), H)`.
        grad: Tensor,
    },
}

/// A shared collector of [`SinkEntry`]s; clones share the same entries.
#[derive(Clone, Debug, Default)]
pub struct GradSink(Arc<Mutex<Vec<SinkEntry>>>);

impl GradSink {
    /// An empty sink.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds an entry (called from backward passes).
    pub fn push(&self, entry: SinkEntry) {
        // A poisoned lock only means another backward panicked; its entries are still valid.
        let mut v = self.0.lock().unwrap_or_else(|e| e.into_inner());
        v.push(entry);
    }

    /// Removes and returns every entry collected so far.
    pub fn take(&self) -> Vec<SinkEntry> {
        let mut v = self.0.lock().unwrap_or_else(|e| e.into_inner());
        std::mem::take(&mut *v)
    }
}

/// `w[ids]`: rows of an embedding table. With a sink and a tracked `w`, the backward
/// pushes [`SinkEntry::Rows`] and gives the graph no gradient for `w`; without a sink it is
/// candle's `index_select` (dense gradient through the graph).
///
/// # Shapes
/// `w`: `(V, H)`; `ids`: `(N)` `u32` → `(N, H)`.
pub fn embedding(w: &Tensor, ids: &Tensor, sink: Option<&GradSink>) -> candle_core::Result<Tensor> {
    match sink {
        Some(sink) if w.track_op() && w.is_contiguous() => {
            let (v, _) = w.dims2()?;
            let rows: Vec<u32> = ids.flatten_all()?.to_dtype(candle_core::DType::U32)?.to_vec1()?;
            if let Some(&bad) = rows.iter().find(|&&r| r as usize >= v) {
                candle_core::bail!("embedding: id {bad} is not below the table size {v}")
            }
            w.apply_op1(SinkedLookup {
                rows: Arc::new(rows),
                sink: sink.clone(),
            })
        }
        _ => w.index_select(ids, 0),
    }
}

/// The lookup whose backward feeds the sink.
struct SinkedLookup {
    rows: Arc<Vec<u32>>,
    sink: GradSink,
}

impl CustomOp1 for SinkedLookup {
    fn name(&self) -> &'static str {
        "sinked-lookup"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let Some((start, end)) = l.contiguous_offsets() else {
            candle_core::bail!("embedding: the table must be contiguous")
        };
        let h = l.dims().get(1).copied().unwrap_or(1);
        fn gather<T: Copy>(x: &[T], rows: &[u32], h: usize) -> Vec<T> {
            let mut out = Vec::with_capacity(rows.len() * h);
            for &r in rows {
                let r = r as usize;
                out.extend_from_slice(&x[r * h..(r + 1) * h]);
            }
            out
        }
        let rows = self.rows.as_slice();
        let out = match s {
            CpuStorage::F32(x) => CpuStorage::F32(gather(&x[start..end], rows, h)),
            CpuStorage::F64(x) => CpuStorage::F64(gather(&x[start..end], rows, h)),
            CpuStorage::BF16(x) => CpuStorage::BF16(gather(&x[start..end], rows, h)),
            CpuStorage::F16(x) => CpuStorage::F16(gather(&x[start..end], rows, h)),
            _ => candle_core::bail!("embedding: the table must be a float tensor"),
        };
        Ok((out, Shape::from((rows.len(), h))))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> candle_core::Result<Option<Tensor>> {
        self.sink.push(SinkEntry::Rows {
            id: arg.id(),
            rows: self.rows.clone(),
            grad: grad_res.clone(),
        });
        Ok(None)
    }
}
