//! Scoring texts and preference pairs with a reward model (`rlhf score`).

use candle_core::D;
use rlhf_models::{Fwd, Model};

use crate::chat_data::ChatData;
use crate::collate::{pad, PadSide};
use crate::data::Rows;
use crate::error::{Result, TrainError};

/// The reward(s) of one data row.
#[derive(Clone, Debug, PartialEq)]
pub enum Scored {
    /// A row with `text` (or `prompt` + `response`).
    Single {
        /// The reward.
        reward: f32,
    },
    /// A row with `chosen` / `rejected` (and optional `prompt`).
    Pair {
        /// Reward of prompt + chosen.
        chosen: f32,
        /// Reward of prompt + rejected.
        rejected: f32,
    },
}

/// Fraction of pairs whose chosen reward is strictly higher (ties count wrong, as TRL 1.x)
/// and the number of pairs; `None` without pairs.
pub fn pair_accuracy(scored: &[Scored]) -> Option<(f64, usize)> {
    let pairs: Vec<bool> = scored
        .iter()
        .filter_map(|s| match s {
            Scored::Pair { chosen, rejected } => Some(chosen > rejected),
            Scored::Single { .. } => None,
        })
        .collect();
    (!pairs.is_empty()).then(|| {
        (
            pairs.iter().filter(|&&c| c).count() as f64 / pairs.len() as f64,
            pairs.len(),
        )
    })
}

/// The text a reward model scores: `prompt + response` with EOS appended when missing,
/// tokenised with the tokenizer's special tokens (a Llama BOS), as TRL's `RewardTrainer`
/// tokenises its training pairs.
pub fn reward_tokens(model: &Model, prompt: &str, response: &str) -> Result<Vec<u32>> {
    let tok = model.tokenizer()?;
    let mut ids = tok.encode_special(&format!("{prompt}{response}"), true)?;
    if ids.last() != Some(&tok.eos_token_id) {
        ids.push(tok.eos_token_id);
    }
    Ok(ids)
}

/// The ids a reward model reads for a response to a conversation: `prompt + [{"role":
/// "assistant", "content": response}]` rendered with the reward model's chat template (no
/// generation prompt) and tokenised without adding special tokens, as TRL 1.16's
/// `GRPOTrainer._calculate_rewards` renders conversational data. The rendering ends the way
/// the reward model's conversational training pairs end (the template's end of turn).
pub fn conversation_reward_ids(model: &Model, prompt: &[rlhf_models::Message], response: &str) -> Result<Vec<u32>> {
    let mut messages = prompt.to_vec();
    messages.push(rlhf_models::Message::new("assistant", response));
    let template = model.chat_template()?;
    let enc = template.encode(model.tokenizer()?, &messages, &rlhf_models::RenderOptions::default())?;
    Ok(enc.ids)
}

/// Scores every row in file order, `batch_size` sequences per forward pass.
///
/// Rows with `chosen` and `rejected` are pairs; rows with `text`, or `prompt` and
/// `response`, are single texts. Sequences longer than the model's `n_positions` are an
/// error naming the row.
pub fn score_rows(model: &Model, rows: &Rows, batch_size: usize) -> Result<Vec<Scored>> {
    let n_pos = model.cfg().max_position_embeddings;
    let mut seqs: Vec<Vec<u32>> = Vec::new();
    let mut is_pair = Vec::with_capacity(rows.len());
    let data = ChatData::with_template(model.tokenizer()?, model.chat_template.as_ref());
    for i in 0..rows.len() {
        let texts: Vec<Vec<u32>> = if rows.has(i, "chosen") || rows.has(i, "rejected") {
            is_pair.push(true);
            let (c, r) = data.reward_pair(rows, i)?;
            vec![c, r]
        } else {
            let prompt = rows.opt_text(i, "prompt")?.unwrap_or("");
            is_pair.push(false);
            let text = if rows.has(i, "text") {
                rows.text(i, "text")?
            } else {
                rows.text(i, "response").map_err(|_| TrainError::Row {
                    path: rows.path.clone(),
                    row: i + 1,
                    msg: "expected `text`, `prompt` + `response`, or `chosen` + `rejected` columns".into(),
                })?
            };
            vec![reward_tokens(model, prompt, text)?]
        };
        for ids in texts {
            if ids.len() > n_pos {
                return Err(TrainError::Row {
                    path: rows.path.clone(),
                    row: i + 1,
                    msg: format!(
                        "{} tokens exceed the model's n_positions ({n_pos}); shorten the text",
                        ids.len()
                    ),
                });
            }
            seqs.push(ids);
        }
    }
    let pad_id = model.pad_token_id().unwrap_or(model.tokenizer()?.pad_token_id);
    let device = model.device();
    let mut rewards = Vec::with_capacity(seqs.len());
    for chunk in seqs.chunks(batch_size.max(1)) {
        let (ids, mask) = pad(chunk, pad_id, PadSide::Right, device)?;
        let s = model.scores(&ids, &mask, &mut Fwd::eval())?;
        rewards.extend(s.narrow(D::Minus1, 0, 1)?.flatten_all()?.to_vec1::<f32>()?);
    }
    let mut it = rewards.into_iter();
    let mut out = Vec::with_capacity(is_pair.len());
    for pair in is_pair {
        let mut next = || {
            it.next().ok_or_else(|| TrainError::Data {
                path: rows.path.clone(),
                msg: "internal: reward count".into(),
            })
        };
        out.push(if pair {
            Scored::Pair {
                chosen: next()?,
                rejected: next()?,
            }
        } else {
            Scored::Single { reward: next()? }
        });
    }
    Ok(out)
}
