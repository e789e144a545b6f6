//! Data embedded in the binary, so that benchmarks and the quickstart need no download.

use std::path::Path;

use rlhf_models::Tokenizer;

use crate::error::Result;

/// The GPT-2 tokenizer (`tokenizer.json`, 50,257 tokens).
pub const GPT2_TOKENIZER_JSON: &str = include_str!("../../../fixtures/tiny-gpt2/tokenizer.json");

/// 512 short prompts (`query` column), 8–16 GPT-2 tokens each.
pub const PPO_PROMPTS_JSONL: &str = include_str!("../../../fixtures/data/ppo_prompts.jsonl");

/// 2,000 preference pairs (`prompt`, `chosen`, `rejected`, `kind`).
pub const PREFS_TRAIN_JSONL: &str = include_str!("../../../fixtures/data/prefs_train.jsonl");

/// The embedded preference pairs as (prompt, chosen, rejected), in file order.
pub fn prefs_train() -> Vec<(String, String, String)> {
    PREFS_TRAIN_JSONL
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| {
            let s = |k: &str| v.get(k).and_then(|x| x.as_str()).map(str::to_string);
            Some((s("prompt")?, s("chosen")?, s("rejected")?))
        })
        .collect()
}

/// The embedded GPT-2 tokenizer.
pub fn gpt2_tokenizer() -> Result<Tokenizer> {
    Ok(Tokenizer::from_json(
        GPT2_TOKENIZER_JSON.to_string(),
        Path::new("<embedded gpt2 tokenizer.json>"),
        None,
        None,
    )?)
}

/// The `query` texts of the embedded prompt set, in file order.
pub fn ppo_prompts() -> Vec<String> {
    PPO_PROMPTS_JSONL
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v.get("query").and_then(|q| q.as_str()).map(str::to_string))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_assets_parse() {
        assert_eq!(ppo_prompts().len(), 512);
        assert_eq!(prefs_train().len(), 2000);
        assert_eq!(gpt2_tokenizer().unwrap().vocab_size(), 50257);
    }
}
