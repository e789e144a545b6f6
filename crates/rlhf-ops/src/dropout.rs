//! Dropout masks keyed by example.
//!
//! Every sequence of a training batch draws its masks from a stream of its own,
//! `RngStream::keyed(&[pass key, example id, site])`: the pass key names the forward pass
//! (seed, step, micro-batch: the same on every rank), the example id its global index, and
//! the site counts the dropout calls of the pass (embeddings, each block's attention and
//! residuals, LoRA inputs, the value head, in the model's order). Inside a sequence the
//! samples are read in its own token order — `(token, feature)` for activations,
//! `(head, query, key)` for attention probabilities — so a sequence's masks do not depend
//! on the rank that holds it, on the other sequences of its batch, on padding (left or
//! right) or on packing. That makes N ranks drop what one process drops, and the padded and
//! packed forwards drop the same units.
//!
//! The model tells the masks where each sequence's tokens sit ([`DropoutKeys::set_packed`],
//! [`DropoutKeys::set_padded`]) at the start of a forward pass.

use candle_core::{Result, Tensor};

use crate::rng::RngStream;

/// Where the sequences' tokens sit in the pass's activations.
#[derive(Clone, Debug)]
enum Tokens {
    /// Not set yet: the first dropout call fails with a clear message.
    Unset,
    /// Packed end to end: `(N, F)` with sequence `i` at its `lens[i]` consecutive rows.
    Packed(Vec<usize>),
    /// A padded `(B, T, F)` batch: sequence `i` is row `i`, its tokens at columns `cols[i]`.
    Padded { t: usize, cols: Vec<Vec<usize>> },
}

/// The dropout streams of one training forward pass.
#[derive(Clone, Debug)]
pub struct DropoutKeys {
    pass: u64,
    examples: Vec<u64>,
    site: u64,
    tokens: Tokens,
}

impl DropoutKeys {
    /// The streams of the pass keyed `pass` over sequences with global ids `examples`, in
    /// the order the forward pass takes them.
    pub fn new(pass: u64, examples: Vec<u64>) -> Self {
        Self {
            pass,
            examples,
            site: 0,
            tokens: Tokens::Unset,
        }
    }

    /// The sequences are packed end to end with these lengths.
    pub fn set_packed(&mut self, lens: &[usize]) -> Result<()> {
        self.check_count(lens.len())?;
        self.tokens = Tokens::Packed(lens.to_vec());
        Ok(())
    }

    /// The sequences are the rows of a padded `(B, T)` batch of new tokens whose real tokens
    /// are where the last `T` columns of `mask` (`B` rows, a cached past first) are non-zero.
    pub fn set_padded(&mut self, mask: &[Vec<u32>], t: usize) -> Result<()> {
        self.check_count(mask.len())?;
        if let Some(r) = mask.iter().position(|r| r.len() < t) {
            candle_core::bail!("dropout: mask row {r} has {} columns, fewer than {t}", mask[r].len())
        }
        let cols = mask
            .iter()
            .map(|r| {
                r[r.len() - t..]
                    .iter()
                    .enumerate()
                    .filter(|(_, &m)| m != 0)
                    .map(|(c, _)| c)
                    .collect()
            })
            .collect();
        self.tokens = Tokens::Padded { t, cols };
        Ok(())
    }

    fn check_count(&self, n: usize) -> Result<()> {
        if n != self.examples.len() {
            candle_core::bail!(
                "dropout: the pass has {} sequences but was keyed for {} examples",
                n,
                self.examples.len()
            )
        }
        Ok(())
    }

    /// The stream of sequence `i` at the current site.
    fn stream(&self, i: usize) -> RngStream {
        RngStream::keyed(&[self.pass, self.examples[i], self.site])
    }

    /// Dropout with probability `p` on per-token activations: `(N, F)` packed rows or a
    /// `(B, T, F)` padded batch (any shape whose elements are the tokens' rows of `F`).
    /// Padding positions are kept. `p = 0` returns `x` and draws nothing.
    pub fn tokens(&mut self, x: &Tensor, p: f64) -> Result<Tensor> {
        if p <= 0.0 {
            return Ok(x.clone());
        }
        let f = x.dims().last().copied().unwrap_or(1).max(1);
        let rows = x.elem_count() / f;
        let mut u = vec![1f32; x.elem_count()];
        match &self.tokens {
            Tokens::Unset => candle_core::bail!("dropout: the model did not say where the sequences' tokens sit"),
            Tokens::Packed(lens) => {
                let n: usize = lens.iter().sum();
                if n != rows {
                    candle_core::bail!("dropout: {rows} rows of activations for {n} packed tokens")
                }
                let mut start = 0;
                for (i, &len) in lens.iter().enumerate() {
                    let draw = self.stream(i).uniform_vec(len * f);
                    u[start * f..(start + len) * f].copy_from_slice(&draw);
                    start += len;
                }
            }
            Tokens::Padded { t, cols } => {
                if cols.len() * t != rows {
                    candle_core::bail!("dropout: {rows} rows of activations for a ({}, {t}) batch", cols.len())
                }
                for (i, c) in cols.iter().enumerate() {
                    let draw = self.stream(i).uniform_vec(c.len() * f);
                    for (j, &col) in c.iter().enumerate() {
                        let at = (i * t + col) * f;
                        u[at..at + f].copy_from_slice(&draw[j * f..(j + 1) * f]);
                    }
                }
            }
        }
        self.site += 1;
        crate::nn::dropout(x, p, &mut |_| std::mem::take(&mut u))
    }

    /// Dropout with probability `p` on padded attention probabilities `(B, nh, T, T)`.
    /// Pairs involving padding are kept.
    pub fn attention(&mut self, probs: &Tensor, p: f64) -> Result<Tensor> {
        if p <= 0.0 {
            return Ok(probs.clone());
        }
        let (b, nh, tq, tk) = probs.dims4()?;
        let Tokens::Padded { t, cols } = &self.tokens else {
            candle_core::bail!("dropout: padded attention probabilities in a pass that is not padded")
        };
        if b != cols.len() || tq != *t || tk != *t {
            candle_core::bail!(
                "dropout: attention probabilities ({b}, {nh}, {tq}, {tk}) for a ({}, {t}) batch",
                cols.len()
            )
        }
        let mut u = vec![1f32; probs.elem_count()];
        for (i, c) in cols.iter().enumerate() {
            let n = c.len();
            let draw = self.stream(i).uniform_vec(nh * n * n);
            for h in 0..nh {
                for (qi, &qc) in c.iter().enumerate() {
                    let row = ((i * nh + h) * tq + qc) * tk;
                    let src = (h * n + qi) * n;
                    for (ki, &kc) in c.iter().enumerate() {
                        u[row + kc] = draw[src + ki];
                    }
                }
            }
        }
        self.site += 1;
        crate::nn::dropout(probs, p, &mut |_| std::mem::take(&mut u))
    }

    /// Keep factors (`0` or `1/(1−p)`) for the packed attention kernel's probabilities, in
    /// [`crate::attention::AttentionConfig::keep`]'s layout: per sequence, per head, its
    /// `len × len` square.
    pub fn attention_keep(&mut self, n_head: usize, p: f64) -> Result<Vec<f32>> {
        let Tokens::Packed(lens) = &self.tokens else {
            candle_core::bail!("dropout: packed attention in a pass that is not packed")
        };
        let mut keep = Vec::with_capacity(lens.iter().map(|l| n_head * l * l).sum());
        for (i, &len) in lens.iter().enumerate() {
            let mut s = self.stream(i);
            keep.extend(crate::attention::AttentionConfig::dropout_keep(
                &[len],
                n_head,
                p,
                &mut |n| s.uniform_vec(n),
            ));
        }
        self.site += 1;
        Ok(keep)
    }
}

#[cfg(test)]
mod tests;
