//! Sequences packed end to end without padding, and the shared prefixes among them.
//!
//! Under causal attention a token's hidden state depends only on the tokens before it, so
//! two sequences that begin with the same `l` tokens have the same hidden states there: the
//! prompt of a preference pair's chosen and rejected rows, or of a group of completions.
//! [`Packing::shared`] runs such a prefix once: the later sequence keeps only its own rows
//! (positions `l..`) and attends to the rows of the earlier one's first `l` tokens (which may
//! be shared in turn)
//! ([`rlhf_ops::attention::AttentionConfig::prefixes`]); [`Packing::gather`] then lays the
//! hidden states out as if every sequence had run in full, and its backward sums the
//! gradients of the copies. The results equal the unshared pass up to f32 rounding.

use std::collections::HashMap;

use candle_core::{Device, Tensor};

use crate::error::{ModelError, Result};

thread_local! {
    /// Whether this thread's packed passes share prefixes (see [`set_prefix_sharing`]).
    static SHARE: std::cell::Cell<bool> = std::cell::Cell::new(
        std::env::var("RLHF_SHARE_PREFIXES").map_or(true, |v| v != "0"),
    );
}

/// Whether this thread's packed forward passes run shared prefixes once (default: yes;
/// `RLHF_SHARE_PREFIXES=0` turns it off for every thread). Passes that draw dropout never
/// share.
pub fn prefix_sharing() -> bool {
    SHARE.with(|f| f.get())
}

/// Restores the previous [`prefix_sharing`] setting when dropped.
#[must_use = "the setting is restored when the guard is dropped"]
pub struct PrefixSharingGuard {
    previous: bool,
}

impl Drop for PrefixSharingGuard {
    fn drop(&mut self) {
        SHARE.with(|f| f.set(self.previous));
    }
}

/// Switches this thread's prefix sharing on or off until the guard is dropped (the
/// unshared pass is the shared one's test oracle).
pub fn set_prefix_sharing(on: bool) -> PrefixSharingGuard {
    let previous = SHARE.with(|f| f.replace(on));
    PrefixSharingGuard { previous }
}

/// Sequences packed end to end: their ids, positions and lengths.
pub(crate) struct Packing {
    /// `(N)` token ids, sequences end to end (without their shared prefixes).
    pub ids: Tensor,
    /// `N` positions: from 0 in every sequence, from `l` in one that shares `l` tokens.
    pub positions_host: Vec<u32>,
    /// Rows of each sequence (`B` of them).
    pub lens: Vec<usize>,
    /// Shared prefixes, `(sequence, length)` per sequence (empty: none).
    pub prefixes: Vec<Option<(usize, usize)>>,
    /// For shared prefixes: the row of every token of every sequence, in order, as if each
    /// ran in full.
    gather: Option<Vec<u32>>,
}

impl Packing {
    /// Every sequence in full, sequence `i`'s first token at position `offsets[i]`.
    pub(crate) fn new(seqs: &[&[u32]], offsets: &[usize], cfg: &crate::ModelConfig, device: &Device) -> Result<Self> {
        Self::build(seqs, offsets, vec![None; seqs.len()], cfg, device)
    }

    /// As [`Packing::new`], but a sequence that begins with tokens of an earlier one at the
    /// same positions continues it (see the module docs); every sequence keeps at least one
    /// row of its own.
    pub(crate) fn shared(
        seqs: &[&[u32]],
        offsets: &[usize],
        cfg: &crate::ModelConfig,
        device: &Device,
    ) -> Result<Self> {
        let prefixes = shared_prefixes(seqs, offsets);
        Self::build(seqs, offsets, prefixes, cfg, device)
    }

    fn build(
        seqs: &[&[u32]],
        offsets: &[usize],
        prefixes: Vec<Option<(usize, usize)>>,
        cfg: &crate::ModelConfig,
        device: &Device,
    ) -> Result<Self> {
        let max_positions = cfg.max_position_embeddings;
        if seqs.is_empty() {
            return Err(ModelError::Input("an empty batch: no sequences to run".into()));
        }
        if offsets.len() != seqs.len() {
            return Err(ModelError::Input(format!(
                "{} position offsets for {} sequences",
                offsets.len(),
                seqs.len()
            )));
        }
        let n: usize = seqs.iter().map(|s| s.len()).sum();
        let (mut ids, mut positions, mut lens) = (Vec::with_capacity(n), Vec::with_capacity(n), Vec::new());
        let mut starts = Vec::with_capacity(seqs.len());
        for (i, s) in seqs.iter().enumerate() {
            if s.is_empty() {
                return Err(ModelError::Input(format!("sequence {i} of the batch has no tokens")));
            }
            let o = offsets[i];
            if o + s.len() > max_positions {
                let at = if o > 0 {
                    format!(" from position {o}")
                } else {
                    String::new()
                };
                return Err(ModelError::Input(format!(
                    "sequence {i} has {} tokens{at}, more than the model's {} ({max_positions})\n\
                     hint: lower max_length",
                    s.len(),
                    cfg.max_positions_key()
                )));
            }
            let l = prefixes[i].map_or(0, |(_, l)| l);
            starts.push(ids.len());
            ids.extend_from_slice(&s[l..]);
            positions.extend((o + l) as u32..(o + s.len()) as u32);
            lens.push(s.len() - l);
        }
        let gather = prefixes.iter().any(Option::is_some).then(|| {
            // Each sequence in full as packed rows: its prefix's (a start of an earlier
            // sequence's), then its own.
            let mut full: Vec<Vec<u32>> = Vec::with_capacity(seqs.len());
            for (i, s) in seqs.iter().enumerate() {
                let mut rows = match prefixes[i] {
                    Some((j, l)) => full[j][..l].to_vec(),
                    None => Vec::new(),
                };
                rows.extend((starts[i]..starts[i] + s.len() - rows.len()).map(|r| r as u32));
                full.push(rows);
            }
            full.concat()
        });
        let rows = ids.len();
        Ok(Self {
            ids: Tensor::from_vec(ids, rows, device)?,
            positions_host: positions,
            lens,
            prefixes: if gather.is_some() { prefixes } else { Vec::new() },
            gather,
        })
    }

    /// Rows `(N', ..)` of the packed pass laid out as every sequence in full `(N, ..)`
    /// (a copy whose backward sums the shared rows' gradients); unchanged without sharing.
    pub(crate) fn gather(&self, x: &Tensor) -> Result<Tensor> {
        match &self.gather {
            Some(rows) => {
                let idx = Tensor::from_slice(rows, rows.len(), x.device())?;
                Ok(x.index_select(&idx, 0)?)
            }
            None => Ok(x.clone()),
        }
    }
}

/// For each sequence, an earlier one at the same position offset with which it shares the
/// most leading tokens, and how many (at most its length − 1, so that it keeps a row of its
/// own); `None` where no such sequence begins with its first token. A trie per offset of the
/// sequences seen so far, each node naming the first sequence through it, finds them in one
/// pass over the tokens.
fn shared_prefixes(seqs: &[&[u32]], offsets: &[usize]) -> Vec<Option<(usize, usize)>> {
    struct Node {
        children: HashMap<u32, usize>,
        seq: usize,
    }
    let mut nodes: Vec<Node> = Vec::new();
    let mut roots: HashMap<usize, usize> = HashMap::new();
    let mut out = Vec::with_capacity(seqs.len());
    for (i, s) in seqs.iter().enumerate() {
        let mut node = *roots.entry(offsets[i]).or_insert_with(|| {
            nodes.push(Node {
                children: HashMap::new(),
                seq: i,
            });
            nodes.len() - 1
        });
        let mut depth = 0;
        while let Some(&c) = s.get(depth).and_then(|t| nodes[node].children.get(t)) {
            node = c;
            depth += 1;
        }
        let l = depth.min(s.len().saturating_sub(1));
        out.push((l > 0).then(|| (nodes[node].seq, l)));
        for &t in &s[depth..] {
            nodes.push(Node {
                children: HashMap::new(),
                seq: i,
            });
            let new = nodes.len() - 1;
            nodes[node].children.insert(t, new);
            node = new;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_point_at_an_earlier_sequence_with_the_longest_common_start() {
        let seqs: Vec<&[u32]> = vec![
            &[1, 2, 3, 4],
            &[1, 2, 9],
            &[1, 2, 3, 4, 5],
            &[7, 8],
            &[1, 2, 3, 4],
            &[7],
            &[1, 2, 9, 9, 6],
            &[1, 5, 5],
        ];
        let p = shared_prefixes(&seqs, &[0; 8]);
        // [1, 2, 3, 4] again keeps its last token as its own row; [7] alone cannot share
        // (no row would be left); [1, 2, 9, 9, 6] continues [1, 2, 9], itself a continuation.
        assert_eq!(
            p,
            vec![
                None,
                Some((0, 2)),
                Some((0, 4)),
                None,
                Some((0, 3)),
                None,
                Some((1, 3)),
                Some((0, 1))
            ]
        );
    }

    #[test]
    fn shared_rows_gather_back_to_every_sequence_in_full() {
        let cfg = crate::ModelConfig::gpt2_tiny();
        let seqs: Vec<&[u32]> = vec![&[1, 2, 3, 4], &[1, 2, 9], &[5, 6], &[1, 2, 9, 7]];
        let p = Packing::shared(&seqs, &[0; 4], &cfg, &Device::Cpu).unwrap();
        assert_eq!(p.ids.to_vec1::<u32>().unwrap(), vec![1, 2, 3, 4, 9, 5, 6, 7]);
        assert_eq!(p.positions_host, vec![0, 1, 2, 3, 2, 0, 1, 3]);
        assert_eq!(p.lens, vec![4, 1, 2, 1]);
        assert_eq!(p.prefixes, vec![None, Some((0, 2)), None, Some((1, 3))]);
        let rows = Tensor::arange(0u32, 8, &Device::Cpu).unwrap();
        let full = p.gather(&rows).unwrap().to_vec1::<u32>().unwrap();
        assert_eq!(full, vec![0, 1, 2, 3, 0, 1, 4, 5, 6, 0, 1, 4, 7]);
        // Nothing in common: the plain packing.
        let q = Packing::shared(&[&[1, 2], &[3]], &[0, 0], &cfg, &Device::Cpu).unwrap();
        assert!(q.prefixes.is_empty() && q.gather.is_none());
        // The same tokens at other positions: nothing in common either.
        let r = Packing::shared(&[&[1, 2, 3], &[1, 2, 4]], &[0, 1], &cfg, &Device::Cpu).unwrap();
        assert!(r.prefixes.is_empty());
        assert_eq!(r.positions_host, vec![0, 1, 2, 1, 2, 3]);
    }
}
