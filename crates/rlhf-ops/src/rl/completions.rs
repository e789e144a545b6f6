//! Completion masks and length metrics of GRPO / RLOO (TRL 1.16
//! `GRPOTrainer._generate_single_turn`, `_generate`, `_generate_and_score_completions`; the
//! same code in `RLOOTrainer`).
//!
//! A generated row of `T` ids is kept up to and **including** its first EOS (so an EOS-only
//! completion has one scored token) and masked after it. A completion is *truncated* when
//! its last kept id is neither an EOS nor the pad id, i.e. it ran into
//! `max_completion_length`. With `mask_truncated_completions` those rows get an all-zero
//! completion mask, which TRL uses both as the loss mask and as the completion half of
//! the attention mask (so their log-probs are 0); they still count in the reward groups,
//! in the row count `B` of the grpo/sapo/luspo means and of dr_grpo's `B·max_len`, and in
//! the length metrics.

use candle_core::{Device, Tensor};

use super::{Metrics, Result, RlError};

/// The kept length and truncation flag of every completion in a generation batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Completions {
    /// Tokens kept per row: the first EOS's index + 1, or `T` without an EOS.
    pub lengths: Vec<usize>,
    /// Whether the last kept id is neither an EOS nor the pad id.
    pub is_truncated: Vec<bool>,
    /// The padded width `T` of the completion ids.
    pub width: usize,
}

impl Completions {
    /// Reads the masks from right-padded completion ids `(B, T)` (TRL: `is_eos =
    /// isin(ids, eos_token_ids)`, `mask = arange(T) <= first_eos`, `is_truncated =
    /// ids[-1] not in eos_and_pad` over the kept ids).
    ///
    /// # Errors
    /// [`RlError::Shape`] when the rows differ in length or are empty.
    pub fn from_ids(ids: &[Vec<u32>], eos_token_ids: &[u32], pad_token_id: u32) -> Result<Self> {
        let width = ids.first().map_or(0, Vec::len);
        if width == 0 {
            return Err(RlError::Shape {
                function: "Completions::from_ids",
                msg: "the completion ids are empty; expected (B, T) with B, T >= 1".into(),
            });
        }
        let mut lengths = Vec::with_capacity(ids.len());
        let mut is_truncated = Vec::with_capacity(ids.len());
        for (row, r) in ids.iter().enumerate() {
            if r.len() != width {
                return Err(RlError::Shape {
                    function: "Completions::from_ids",
                    msg: format!(
                        "row {row} has {} ids but row 0 has {width}\nhint: right-pad every \
                         completion to the same width",
                        r.len()
                    ),
                });
            }
            let len = r
                .iter()
                .position(|id| eos_token_ids.contains(id))
                .map_or(width, |i| i + 1);
            let last = r[len - 1];
            lengths.push(len);
            is_truncated.push(!(eos_token_ids.contains(&last) || last == pad_token_id));
        }
        Ok(Self {
            lengths,
            is_truncated,
            width,
        })
    }

    /// Number of completions `B`.
    pub fn len(&self) -> usize {
        self.lengths.len()
    }

    /// Whether the batch is empty.
    pub fn is_empty(&self) -> bool {
        self.lengths.is_empty()
    }

    /// Number of unmasked tokens of row `i`: its length, or 0 when it is truncated and
    /// `mask_truncated_completions` is on.
    fn kept(&self, i: usize, mask_truncated_completions: bool) -> usize {
        if mask_truncated_completions && self.is_truncated[i] {
            0
        } else {
            self.lengths[i]
        }
    }

    /// The completion (= loss) mask as rows of 0/1, zeroing truncated rows when
    /// `mask_truncated_completions` is set.
    pub fn mask_rows(&self, mask_truncated_completions: bool) -> Vec<Vec<f32>> {
        (0..self.len())
            .map(|i| {
                let kept = self.kept(i, mask_truncated_completions);
                (0..self.width).map(|t| if t < kept { 1.0 } else { 0.0 }).collect()
            })
            .collect()
    }

    /// [`Completions::mask_rows`] as an f32 tensor `(B, T)`.
    pub fn mask(&self, mask_truncated_completions: bool, device: &Device) -> Result<Tensor> {
        let flat: Vec<f32> = self.mask_rows(mask_truncated_completions).concat();
        Ok(Tensor::from_vec(flat, (self.len(), self.width), device)?)
    }

    /// `num_items_in_batch`: the sum of the loss mask over the generation batch (one
    /// process; TRL sums it over processes).
    pub fn num_items(&self, mask_truncated_completions: bool) -> usize {
        (0..self.len()).map(|i| self.kept(i, mask_truncated_completions)).sum()
    }

    /// The generation-time metrics: `num_tokens` (= `num_tokens_seen` + Σ prompt lengths +
    /// Σ completion lengths, TRL's running `num_input_tokens_seen`),
    /// `completions/{mean,min,max}_length`, `completions/clipped_ratio` and
    /// `completions/{mean,min,max}_terminated_length` (over the rows that are not
    /// truncated; all 0 when every row is). Lengths are the kept lengths, unaffected by
    /// `mask_truncated_completions`.
    ///
    /// # Errors
    /// [`RlError::Shape`] when `prompt_lengths` (unpadded prompt token counts) is not one
    /// per completion.
    pub fn metrics(&self, prompt_lengths: &[usize], num_tokens_seen: f64) -> Result<Metrics> {
        super::expect_len(
            "Completions::metrics",
            "prompt_lengths",
            prompt_lengths.len(),
            self.len(),
        )?;
        let lens: Vec<f64> = self.lengths.iter().map(|&l| l as f64).collect();
        let term: Vec<f64> = lens
            .iter()
            .zip(&self.is_truncated)
            .filter(|(_, &t)| !t)
            .map(|(&l, _)| l)
            .collect();
        let term = if term.is_empty() { vec![0.0] } else { term };
        let mean = |x: &[f64]| x.iter().sum::<f64>() / x.len() as f64;
        let min = |x: &[f64]| x.iter().copied().fold(f64::INFINITY, f64::min);
        let max = |x: &[f64]| x.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let tokens = prompt_lengths.iter().sum::<usize>() + self.lengths.iter().sum::<usize>();
        let clipped = self.is_truncated.iter().filter(|&&t| t).count() as f64 / self.len() as f64;
        let mut m = Metrics::new();
        m.insert("num_tokens".into(), num_tokens_seen + tokens as f64);
        m.insert("completions/mean_length".into(), mean(&lens));
        m.insert("completions/min_length".into(), min(&lens));
        m.insert("completions/max_length".into(), max(&lens));
        m.insert("completions/clipped_ratio".into(), clipped);
        m.insert("completions/mean_terminated_length".into(), mean(&term));
        m.insert("completions/min_terminated_length".into(), min(&term));
        m.insert("completions/max_terminated_length".into(), max(&term));
        Ok(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EOS: u32 = 9;

    #[test]
    fn the_mask_keeps_the_first_eos_and_nothing_after_it() {
        let ids = vec![
            vec![1, 2, EOS, EOS],
            vec![EOS, EOS, EOS, EOS],
            vec![1, 2, 3, 4],
            vec![1, 2, 3, EOS],
        ];
        let c = Completions::from_ids(&ids, &[EOS], EOS).unwrap();
        assert_eq!(c.lengths, vec![3, 1, 4, 4]);
        assert_eq!(c.is_truncated, vec![false, false, true, false]);
        assert_eq!(c.mask_rows(false)[1], vec![1.0, 0.0, 0.0, 0.0]);
        assert_eq!(c.mask_rows(true)[2], vec![0.0; 4]);
        assert_eq!(c.num_items(false), 12);
        assert_eq!(c.num_items(true), 8);
    }

    #[test]
    fn a_row_padded_without_eos_is_not_truncated() {
        // pad != EOS: the pads stay in the kept ids (TRL cuts at EOS only) and end the row.
        let c = Completions::from_ids(&[vec![1, 0, 0]], &[EOS], 0).unwrap();
        assert_eq!((c.lengths[0], c.is_truncated[0]), (3, false));
    }

    #[test]
    fn length_metrics_fall_back_to_zero_when_every_row_is_truncated() {
        let c = Completions::from_ids(&[vec![1, 2], vec![3, 4]], &[EOS], EOS).unwrap();
        let m = c.metrics(&[3, 5], 10.0).unwrap();
        assert_eq!(m["num_tokens"], 22.0);
        assert_eq!(m["completions/clipped_ratio"], 1.0);
        assert_eq!(m["completions/mean_terminated_length"], 0.0);
        assert_eq!(m["completions/max_length"], 2.0);
    }

    #[test]
    fn ragged_ids_are_an_error() {
        assert!(Completions::from_ids(&[vec![1, 2], vec![3]], &[EOS], EOS).is_err());
        assert!(Completions::from_ids(&[], &[EOS], EOS).is_err());
    }
}
