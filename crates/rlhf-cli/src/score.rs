//! `rlhf score`.

use std::path::PathBuf;

use anyhow::Context;
use rlhf_models::LoadOptions;
use rlhf_train::data::read_data;
use rlhf_train::score::{pair_accuracy, score_rows, Scored};

/// Arguments of `rlhf score`.
#[derive(clap::Args)]
pub struct Args {
    /// The reward model (`*ForSequenceClassification`, e.g. `rlhf reward` output) and an
    /// optional adapter (it may supply the score head via `modules_to_save`).
    #[command(flatten)]
    model: crate::merge::ModelArgs,
    /// JSONL, CSV or Parquet rows: `text`, or `prompt` + `response`, or `prompt`/`chosen`/`rejected`.
    #[arg(long)]
    data: PathBuf,
    /// Sequences per forward pass.
    #[arg(long, default_value_t = 16)]
    batch_size: usize,
    /// One JSON object per row, then the accuracy for pairs.
    #[arg(long)]
    json: bool,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let model = a
        .model
        .load(&LoadOptions::default())
        .context("loading the reward model")?;
    if model.score_head.is_none() {
        anyhow::bail!(
            "{}: no score head (`score.weight`) in model.safetensors\n\
             hint: `rlhf score` needs a reward model (GPT2ForSequenceClassification), such as the output of `rlhf reward`",
            a.model.model
        );
    }
    let rows = read_data(&a.data)?;
    let scored = score_rows(&model, &rows, a.batch_size)?;
    for (row, s) in scored.iter().enumerate() {
        match (s, a.json) {
            (Scored::Single { reward }, true) => println!("{}", serde_json::json!({"row": row, "reward": reward})),
            (Scored::Pair { chosen, rejected }, true) => println!(
                "{}",
                serde_json::json!({"row": row, "reward_chosen": chosen, "reward_rejected": rejected})
            ),
            (Scored::Single { reward }, false) => println!("row {row}: reward {reward:.4}"),
            (Scored::Pair { chosen, rejected }, false) => println!(
                "row {row}: chosen {chosen:.4}  rejected {rejected:.4}  {}",
                if chosen > rejected { "ok" } else { "WRONG" }
            ),
        }
    }
    if let Some((acc, n)) = pair_accuracy(&scored) {
        if a.json {
            println!("{}", serde_json::json!({"accuracy": acc, "rows": n}));
        } else {
            println!("accuracy: {acc:.4} over {n} pairs");
        }
    }
    Ok(())
}
