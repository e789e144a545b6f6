//! DPO data preparation on token ids (TRL 1.16 `DPOTrainer._prepare_dataset`,
//! `trl.data_utils.common_prefix_length`, `DataCollatorForPreference`).
//!
//! 1. Standard (non-conversational) rows get the EOS appended **as text** to `chosen` and
//!    `rejected` when missing ([`append_eos`]).
//! 2. `prompt`, `prompt + chosen` and `prompt + rejected` are tokenized as `tokenizer(text)`
//!    (special tokens added: Llama 3's BOS, none for GPT-2); the prompt is the shortest common prefix of the tokenized prompt with both
//!    ([`split_preference`]), so a token merging across the boundary moves into the
//!    completion.
//! 3. With `truncation_mode = "keep_start"` and a `max_length`, rows whose prompt alone
//!    has `>= max_length` tokens are dropped ([`keeps_completion_tokens`]).
//! 4. The collator builds `2N` rows — `prompt + chosen` for every example, then
//!    `prompt + rejected` — truncates each row to `max_length` (keep_start: the first
//!    tokens; keep_end: the last, which may remove the whole prompt), and right-pads
//!    ([`collate_preference`]).

use candle_core::{Device, Tensor};

use super::{Result, RlError};

/// One tokenized preference example.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PreferenceIds {
    /// The shared prompt tokens.
    pub prompt_ids: Vec<u32>,
    /// The chosen completion's tokens (ending in EOS for standard data).
    pub chosen_ids: Vec<u32>,
    /// The rejected completion's tokens.
    pub rejected_ids: Vec<u32>,
}

/// `DPOConfig.truncation_mode`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TruncationMode {
    /// `"keep_start"` (default): keep the first `max_length` tokens of each row.
    #[default]
    KeepStart,
    /// `"keep_end"`: keep the last `max_length` tokens.
    KeepEnd,
}

impl TruncationMode {
    /// Parses TRL's name.
    pub fn from_trl_name(name: &str) -> Option<Self> {
        match name {
            "keep_start" => Some(Self::KeepStart),
            "keep_end" => Some(Self::KeepEnd),
            _ => None,
        }
    }
}

/// `text` with `eos_token` appended unless it already ends with it (TRL's `add_eos`).
pub fn append_eos(text: &str, eos_token: &str) -> String {
    if text.ends_with(eos_token) {
        text.to_string()
    } else {
        format!("{text}{eos_token}")
    }
}

/// Number of leading tokens `a` and `b` share.
pub fn common_prefix_length(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// Splits tokenized `prompt`, `prompt + chosen` and `prompt + rejected` at
/// `min(common_prefix(prompt, prompt+chosen), common_prefix(prompt, prompt+rejected))`.
/// When that is shorter than the prompt, the prompt's tail is left out of the training
/// sequence (TRL warns once).
pub fn split_preference(prompt_ids: &[u32], prompt_chosen_ids: &[u32], prompt_rejected_ids: &[u32]) -> PreferenceIds {
    let len =
        common_prefix_length(prompt_ids, prompt_chosen_ids).min(common_prefix_length(prompt_ids, prompt_rejected_ids));
    PreferenceIds {
        prompt_ids: prompt_ids[..len].to_vec(),
        chosen_ids: prompt_chosen_ids[len..].to_vec(),
        rejected_ids: prompt_rejected_ids[len..].to_vec(),
    }
}

/// Whether TRL keeps the example: with keep_start truncation, a prompt of `max_length`
/// tokens or more would leave no completion token, so the row is dropped.
pub fn keeps_completion_tokens(example: &PreferenceIds, max_length: Option<usize>, mode: TruncationMode) -> bool {
    match (max_length, mode) {
        (Some(max), TruncationMode::KeepStart) => example.prompt_ids.len() < max,
        _ => true,
    }
}

/// A collated preference batch: `2N` right-padded rows, chosen then rejected.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PreferenceBatch {
    /// Token ids, padded with the pad id.
    pub input_ids: Vec<Vec<u32>>,
    /// 1 on real tokens, 0 on padding.
    pub attention_mask: Vec<Vec<u32>>,
    /// 1 on completion tokens, 0 on prompt and padding.
    pub completion_mask: Vec<Vec<u32>>,
}

impl PreferenceBatch {
    /// The batch as tensors: `input_ids` `u32`, `attention_mask` and `completion_mask`
    /// `f32`, each `(2N, L)`.
    pub fn to_tensors(&self, device: &Device) -> Result<(Tensor, Tensor, Tensor)> {
        let rows = self.input_ids.len();
        let width = self.input_ids.first().map_or(0, Vec::len);
        let ids = Tensor::from_vec(self.input_ids.concat(), (rows, width), device)?;
        let float = |m: &[Vec<u32>]| -> Vec<f32> { m.iter().flatten().map(|&x| x as f32).collect() };
        let attn = Tensor::from_vec(float(&self.attention_mask), (rows, width), device)?;
        let comp = Tensor::from_vec(float(&self.completion_mask), (rows, width), device)?;
        Ok((ids, attn, comp))
    }
}

/// `DataCollatorForPreference`: rows `prompt + chosen` (all examples), then `prompt +
/// rejected`; each truncated to `max_length` per `mode`; right-padded with
/// `pad_token_id` to the longest row (rounded up to `pad_to_multiple_of`).
///
/// # Errors
/// [`RlError::Config`] for `max_length = 0` or `pad_to_multiple_of = 0`, and for an empty
/// batch.
pub fn collate_preference(
    examples: &[PreferenceIds],
    pad_token_id: u32,
    max_length: Option<usize>,
    mode: TruncationMode,
    pad_to_multiple_of: Option<usize>,
) -> Result<PreferenceBatch> {
    if examples.is_empty() {
        return Err(RlError::Config {
            field: "per_device_train_batch_size",
            msg: "the preference batch is empty".into(),
        });
    }
    if max_length == Some(0) || pad_to_multiple_of == Some(0) {
        return Err(RlError::Config {
            field: "max_length",
            msg: "`max_length` and `pad_to_multiple_of` must be at least 1 (or None)".into(),
        });
    }
    let mut rows: Vec<(Vec<u32>, Vec<u32>)> = Vec::with_capacity(2 * examples.len());
    for pick_chosen in [true, false] {
        for ex in examples {
            let completion = if pick_chosen { &ex.chosen_ids } else { &ex.rejected_ids };
            let ids = [ex.prompt_ids.as_slice(), completion].concat();
            let mask: Vec<u32> = (0..ids.len()).map(|i| u32::from(i >= ex.prompt_ids.len())).collect();
            rows.push(truncate(ids, mask, max_length, mode));
        }
    }
    let longest = rows.iter().map(|(ids, _)| ids.len()).max().unwrap_or(0);
    let width = match pad_to_multiple_of {
        Some(m) => longest.div_ceil(m) * m,
        None => longest,
    };
    let pad = |mut v: Vec<u32>, value: u32| {
        v.resize(width, value);
        v
    };
    let mut batch = PreferenceBatch {
        input_ids: Vec::with_capacity(rows.len()),
        attention_mask: Vec::with_capacity(rows.len()),
        completion_mask: Vec::with_capacity(rows.len()),
    };
    for (ids, mask) in rows {
        batch.attention_mask.push(pad(vec![1; ids.len()], 0));
        batch.input_ids.push(pad(ids, pad_token_id));
        batch.completion_mask.push(pad(mask, 0));
    }
    Ok(batch)
}

/// One row and its completion mask cut to `max_length` tokens.
fn truncate(ids: Vec<u32>, mask: Vec<u32>, max_length: Option<usize>, mode: TruncationMode) -> (Vec<u32>, Vec<u32>) {
    match max_length {
        Some(max) if ids.len() > max => match mode {
            TruncationMode::KeepStart => (ids[..max].to_vec(), mask[..max].to_vec()),
            TruncationMode::KeepEnd => {
                let start = ids.len() - max;
                (ids[start..].to_vec(), mask[start..].to_vec())
            }
        },
        _ => (ids, mask),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ex(p: &[u32], c: &[u32], r: &[u32]) -> PreferenceIds {
        PreferenceIds {
            prompt_ids: p.to_vec(),
            chosen_ids: c.to_vec(),
            rejected_ids: r.to_vec(),
        }
    }

    #[test]
    fn collation_matches_trls_docstring_example() {
        let batch = collate_preference(
            &[ex(&[1, 2, 3], &[4, 5], &[6]), ex(&[7, 8], &[9], &[10, 11])],
            0,
            None,
            TruncationMode::KeepStart,
            None,
        )
        .unwrap();
        assert_eq!(
            batch.input_ids,
            vec![
                vec![1, 2, 3, 4, 5],
                vec![7, 8, 9, 0, 0],
                vec![1, 2, 3, 6, 0],
                vec![7, 8, 10, 11, 0]
            ]
        );
        assert_eq!(batch.attention_mask[1], vec![1, 1, 1, 0, 0]);
        assert_eq!(
            batch.completion_mask,
            vec![
                vec![0, 0, 0, 1, 1],
                vec![0, 0, 1, 0, 0],
                vec![0, 0, 0, 1, 0],
                vec![0, 0, 1, 1, 0]
            ]
        );
    }

    #[test]
    fn truncation_keeps_the_start_or_the_end_and_padding_rounds_up() {
        let e = [ex(&[1, 2, 3], &[4, 5, 6], &[7])];
        let start = collate_preference(&e, 0, Some(4), TruncationMode::KeepStart, Some(3)).unwrap();
        assert_eq!(start.input_ids, vec![vec![1, 2, 3, 4, 0, 0], vec![1, 2, 3, 7, 0, 0]]);
        let end = collate_preference(&e, 0, Some(2), TruncationMode::KeepEnd, None).unwrap();
        assert_eq!(end.input_ids, vec![vec![5, 6], vec![3, 7]]);
        assert_eq!(end.completion_mask, vec![vec![1, 1], vec![0, 1]]);
    }

    #[test]
    fn the_prompt_is_the_shortest_common_prefix() {
        // The prompt's last token merges with the completion in `prompt + rejected`.
        let s = split_preference(&[1, 2, 3], &[1, 2, 3, 4, 9], &[1, 2, 8, 9]);
        assert_eq!(s, ex(&[1, 2], &[3, 4, 9], &[8, 9]));
        assert_eq!(append_eos(" hi", "<e>"), " hi<e>");
        assert_eq!(append_eos(" hi<e>", "<e>"), " hi<e>");
    }

    #[test]
    fn keep_start_drops_rows_whose_prompt_fills_max_length() {
        let e = ex(&[1, 2, 3], &[4], &[5]);
        assert!(!keeps_completion_tokens(&e, Some(3), TruncationMode::KeepStart));
        assert!(keeps_completion_tokens(&e, Some(4), TruncationMode::KeepStart));
        assert!(keeps_completion_tokens(&e, Some(3), TruncationMode::KeepEnd));
        assert!(keeps_completion_tokens(&e, None, TruncationMode::KeepStart));
    }
}
