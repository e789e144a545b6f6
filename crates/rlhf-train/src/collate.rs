//! Padding token sequences into batches, and cutting generated ones at their end.

use candle_core::{Device, Tensor};

/// Which side padding goes on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PadSide {
    /// Pad after the tokens (training, scoring).
    Right,
    /// Pad before the tokens (generation).
    Left,
}

/// Cuts a generated sequence after its first token in `eos` (kept), as TRL cuts responses
/// and completions.
pub fn cut_after_eos(seq: &mut Vec<u32>, eos: &[u32]) {
    if let Some(p) = seq.iter().position(|t| eos.contains(t)) {
        seq.truncate(p + 1);
    }
}

/// Pads `seqs` to the longest one with `pad_id`; the mask is 1 on real tokens.
///
/// # Shapes
/// → ids `(B, T)` u32, mask `(B, T)` u32.
pub fn pad(seqs: &[Vec<u32>], pad_id: u32, side: PadSide, device: &Device) -> candle_core::Result<(Tensor, Tensor)> {
    let t = seqs.iter().map(Vec::len).max().unwrap_or(0);
    let b = seqs.len();
    let mut ids = Vec::with_capacity(b * t);
    let mut mask = Vec::with_capacity(b * t);
    for s in seqs {
        let n = t - s.len();
        let (real, padding) = (s.iter().copied(), std::iter::repeat_n(pad_id, n));
        match side {
            PadSide::Right => {
                ids.extend(real.chain(padding));
                mask.extend(std::iter::repeat_n(1u32, s.len()).chain(std::iter::repeat_n(0, n)));
            }
            PadSide::Left => {
                ids.extend(padding.chain(real));
                mask.extend(std::iter::repeat_n(0u32, n).chain(std::iter::repeat_n(1, s.len())));
            }
        }
    }
    Ok((
        Tensor::from_vec(ids, (b, t), device)?,
        Tensor::from_vec(mask, (b, t), device)?,
    ))
}
