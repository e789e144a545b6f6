//! Stage 2 of DPO: preference rows → tokenized examples, as TRL 1.16's
//! `DPOTrainer._prepare_dataset` builds them ([`rlhf_ops::rl::dpo_data`] has the rules).
//!
//! Text rows get the EOS text appended to `chosen` / `rejected` when missing; `prompt`,
//! `prompt + chosen` and `prompt + rejected` are tokenized and split at their shortest
//! common prefix. Conversational rows are rendered with the model's chat template
//! ([`ChatData::dpo_triple`]). With `truncation_mode = "keep_start"` and a `max_length`, rows
//! whose prompt alone fills `max_length` are dropped and counted.

use std::path::Path;

use rlhf_models::{ChatTemplate, Model};
use rlhf_ops::rl::dpo_data::{keeps_completion_tokens, PreferenceIds, TruncationMode};

use crate::chat_data::{is_conversational, ChatData};
use crate::data::Rows;
use crate::dpo_config::DpoPlan;
use crate::error::{Result, TrainError};

/// One tokenized preference pair and, with `precompute_ref_log_probs`, its reference sums.
#[derive(Clone, Debug, PartialEq)]
pub struct DpoExample {
    /// Prompt, chosen and rejected completion ids (completions end in EOS for text rows).
    pub ids: PreferenceIds,
    /// Summed reference log-probs `(chosen, rejected)` of the truncated rows (TRL's
    /// `ref_chosen_logps` / `ref_rejected_logps` columns), once precomputed.
    pub ref_logps: Option<(f32, f32)>,
}

impl DpoExample {
    /// Tokens of the two rows after truncation to `max_length` (the attention-mask sum TRL
    /// counts in `num_tokens`).
    pub fn tokens(&self, max_length: Option<usize>) -> usize {
        let (c, r) = self.row_lengths(max_length);
        c + r
    }

    /// Lengths of the `prompt + chosen` and `prompt + rejected` rows after truncation.
    pub fn row_lengths(&self, max_length: Option<usize>) -> (usize, usize) {
        let p = self.ids.prompt_ids.len();
        let cap = |n: usize| max_length.map_or(n, |m| n.min(m));
        (cap(p + self.ids.chosen_ids.len()), cap(p + self.ids.rejected_ids.len()))
    }
}

/// The model's chat template when some row is conversational (`None` otherwise, so a broken
/// template does not stop text-only data); read from the model's directory, else `dir`.
pub fn chat_template_for(model: &Model, dir: &Path, rows: &[&Rows]) -> Result<Option<ChatTemplate>> {
    let conversational = rows.iter().any(|r| (0..r.len()).any(|i| is_conversational(r, i)));
    if !conversational {
        return Ok(None);
    }
    let from = |d: &Path| ChatTemplate::load(d);
    let found = match model.source_dir() {
        Some(d) => from(d)?,
        None => None,
    };
    Ok(match found {
        Some(t) => Some(t),
        None => from(dir)?,
    })
}

/// Tokenizes preference rows as TRL's `DPOTrainer`; returns the examples and how many rows
/// were dropped because their prompt alone fills `max_length` (keep_start).
///
/// # Errors
/// A row without `chosen` / `rejected`, a conversational row without a chat template, a
/// row longer (after truncation) than the model's `max_position_embeddings`, or no row
/// left, each naming the file and row.
pub fn prepare_examples(
    model: &Model,
    template: Option<&ChatTemplate>,
    rows: &Rows,
    plan: &DpoPlan,
) -> Result<(Vec<DpoExample>, usize)> {
    let chat = ChatData::with_template(model.tokenizer()?, template);
    let limit = model.cfg().max_position_embeddings;
    let (mut out, mut dropped) = (Vec::with_capacity(rows.len()), 0);
    for i in 0..rows.len() {
        let t = chat.dpo_triple(rows, i)?;
        let ids = PreferenceIds {
            prompt_ids: t.prompt_ids,
            chosen_ids: t.chosen_ids,
            rejected_ids: t.rejected_ids,
        };
        if !keeps_completion_tokens(&ids, plan.max_length, plan.truncation_mode) {
            dropped += 1;
            continue;
        }
        let ex = DpoExample { ids, ref_logps: None };
        let longest = ex.row_lengths(plan.max_length).0.max(ex.row_lengths(plan.max_length).1);
        if longest > limit {
            return Err(TrainError::Row {
                path: rows.path.clone(),
                row: i + 1,
                msg: format!(
                    "{longest} tokens after truncation, more than the model's max_position_embeddings ({limit})\n\
                     hint: set max_length to at most {limit}"
                ),
            });
        }
        out.push(ex);
    }
    if out.is_empty() {
        let why = match (plan.max_length, plan.truncation_mode) {
            (Some(m), TruncationMode::KeepStart) => format!(
                "every one of the {} rows has a prompt of {m} tokens or more (max_length) and was dropped\n\
                 hint: raise max_length, or shorten the prompts",
                rows.len()
            ),
            _ => "the file has no rows\nhint: DPO reads `prompt`, `chosen`, `rejected` rows".into(),
        };
        return Err(TrainError::Data {
            path: rows.path.clone(),
            msg: why,
        });
    }
    Ok((out, dropped))
}
