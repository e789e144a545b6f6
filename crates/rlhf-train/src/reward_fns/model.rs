//! A reward model as a reward function (TRL: a `reward_funcs` entry that is a model id or
//! an `AutoModelForSequenceClassification`).
//!
//! TRL 1.16 (`GRPOTrainer._calculate_rewards`) scores the text `prompt + completion` —
//! the completion decoded with special tokens skipped, no EOS appended — tokenized by the
//! reward model's tokenizer without special tokens, right-padded, and takes
//! `logits[:, 0]`. A conversational prompt is first rendered with the reward model's chat
//! template as `prompt + [{"role": "assistant", "content": completion}]`, with no generation
//! prompt ([`crate::score::conversation_reward_ids`]). The score is read where
//! [`Model::scores_packed`] reads it (the pooling of the reward model's own training and of
//! `rlhf score`).

use std::path::Path;

use rlhf_models::{Fwd, LoadOptions, Model};

use super::RewardBatch;
use crate::error::{Result, TrainError};

/// A loaded reward model (a sequence classifier with a `score` head).
#[derive(Debug)]
pub struct RewardModel {
    /// The name its metrics are logged under (TRL: the model id's last path part).
    pub name: String,
    /// The model, scored in eval mode without gradients.
    pub model: Model,
}

/// TRL's name of a reward model: the last part of its path or Hub id.
pub fn model_name(path: &str) -> String {
    let trimmed = path.trim_end_matches(['/', '\\']);
    trimmed.rsplit(['/', '\\']).next().unwrap_or(trimmed).to_string()
}

impl RewardModel {
    /// Loads the reward model directory at `path`.
    pub fn load(path: &str, opts: &LoadOptions) -> Result<Self> {
        let model = Model::load(Path::new(path), opts)?;
        if model.score_head.is_none() {
            return Err(TrainError::Reward {
                name: model_name(path),
                msg: format!(
                    "{path} has no score head (`score.weight`)\nhint: reward_model_name_or_path must be a \
                     reward model (GPT2ForSequenceClassification, e.g. the output of `rlhf reward`)"
                ),
            });
        }
        Ok(Self {
            name: model_name(path),
            model,
        })
    }

    /// The score of `prompt + completion` for every completion of the batch.
    pub fn score(&self, batch: &RewardBatch) -> Result<Vec<Option<f64>>> {
        let tok = self.model.tokenizer()?;
        let n_pos = self.model.cfg().max_position_embeddings;
        let mut seqs = Vec::with_capacity(batch.len());
        for (i, (p, c)) in batch.prompts.iter().zip(&batch.completions).enumerate() {
            let ids = match batch.conversations.get(i).and_then(Option::as_ref) {
                Some(msgs) => {
                    crate::score::conversation_reward_ids(&self.model, msgs, c).map_err(|e| TrainError::Reward {
                        name: self.name.clone(),
                        msg: format!("completion {i}: {e}"),
                    })?
                }
                None => tok.encode(&format!("{p}{c}"))?,
            };
            if ids.is_empty() || ids.len() > n_pos {
                return Err(TrainError::Reward {
                    name: self.name.clone(),
                    msg: format!(
                        "completion {i}: prompt + completion is {} tokens; the reward model reads 1 to {n_pos}\n\
                         hint: shorten the prompts or lower max_completion_length",
                        ids.len()
                    ),
                });
            }
            seqs.push(ids);
        }
        let refs: Vec<&[u32]> = seqs.iter().map(Vec::as_slice).collect();
        let scores = self.model.scores_packed(&refs, &mut Fwd::eval())?;
        let first = scores
            .narrow(1, 0, 1)?
            .flatten_all()?
            .to_dtype(candle_core::DType::F64)?;
        Ok(first.to_vec1::<f64>()?.into_iter().map(Some).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reward_model_is_named_after_its_last_path_part() {
        assert_eq!(model_name("runs/rm/final/"), "final");
        assert_eq!(model_name("OpenAssistant/reward-model-deberta"), "reward-model-deberta");
        assert_eq!(model_name("rm"), "rm");
    }
}
