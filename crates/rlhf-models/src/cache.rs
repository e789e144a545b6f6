//! Key/value cache for incremental decoding, kept outside the model.

use candle_core::{DType, Device, Tensor};

use crate::error::{ModelError, Result};

/// Keys and values of every layer for the tokens seen so far, in buffers allocated once
/// for the whole generation (no per-token allocation of the cache).
///
/// # Shapes
/// Each buffer is `(B, n_head, capacity, head_dim)`; [`KvCache::len`] positions are filled.
pub struct KvCache {
    k: Vec<Tensor>,
    v: Vec<Tensor>,
    len: usize,
    capacity: usize,
}

impl KvCache {
    /// An empty cache for `n_layer` layers holding up to `capacity` positions.
    pub fn new(
        n_layer: usize,
        batch: usize,
        n_head: usize,
        head_dim: usize,
        capacity: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let shape = (batch, n_head, capacity, head_dim);
        let alloc = || Tensor::zeros(shape, dtype, device);
        let k = (0..n_layer).map(|_| alloc()).collect::<candle_core::Result<Vec<_>>>()?;
        let v = (0..n_layer).map(|_| alloc()).collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self { k, v, len: 0, capacity })
    }

    /// Positions filled.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no position is filled.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Writes layer `layer`'s new keys and values after the filled positions and returns
    /// views of all keys and values so far. [`KvCache::advance`] commits the positions once
    /// every layer has appended.
    ///
    /// # Shapes
    /// `k`, `v`: `(B, n_head, T, head_dim)` → `(B, n_head, len + T, head_dim)` each.
    pub fn append(&mut self, layer: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let t = k.dim(2)?;
        if self.len + t > self.capacity {
            return Err(ModelError::Input(format!(
                "KV cache full: {} + {t} positions exceed its capacity of {}",
                self.len, self.capacity
            )));
        }
        let (kb, vb) = (&self.k[layer], &self.v[layer]);
        kb.slice_set(&k.to_dtype(kb.dtype())?.contiguous()?, 2, self.len)?;
        vb.slice_set(&v.to_dtype(vb.dtype())?.contiguous()?, 2, self.len)?;
        Ok((kb.narrow(2, 0, self.len + t)?, vb.narrow(2, 0, self.len + t)?))
    }

    /// Marks `t` more positions as filled (after every layer appended them).
    pub fn advance(&mut self, t: usize) -> Result<()> {
        if self.len + t > self.capacity {
            return Err(ModelError::Input("KV cache advanced past its capacity".into()));
        }
        self.len += t;
        Ok(())
    }
}
