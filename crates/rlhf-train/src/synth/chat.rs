//! The synthetic world as conversations, for a chat model: TRL 1.x's conversational rows and a
//! ChatML tokenizer and template in the style of Qwen2.
//!
//! Each text row `"User: <question>\nAssistant:"` + `" <answer>"` becomes a user message
//! `<question>` and an assistant message `<answer>`; the questions, answers and splits are
//! those of the text rows of the same seed. The template is Qwen2's ChatML without a default
//! system message (it would cost a tiny model's short context a dozen tokens per row):
//!
//! ```text
//! <|im_start|>user
//! How do I get started with tea?<|im_end|>
//! <|im_start|>assistant
//! Sure! Use water just below boiling for green tea.<|im_end|>
//! ```
//!
//! The assistant's content and end of turn sit in a `{% generation %}` block, so
//! `assistant_only_loss` works with `messages` rows too.

use std::path::Path;

use serde_json::{json, Value};

use super::{bpe, preference_pairs, prompts, sft_rows, write_rows, RowFormat, Split, SynthConfig, SynthFiles};
use crate::error::Result;

/// Start of a turn (id 1).
pub const IM_START: &str = "<|im_start|>";
/// End of a turn (id 2): the chat model's end-of-sequence token.
pub const IM_END: &str = "<|im_end|>";

/// The chat template: ChatML as Qwen2 renders it, without a default system message.
pub const CHAT_TEMPLATE: &str = concat!(
    "{% for message in messages %}",
    "{{ '<|im_start|>' + message['role'] + '\\n' }}",
    "{% if message['role'] == 'assistant' %}",
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}",
    "{% else %}{{ message['content'] + '<|im_end|>' + '\\n' }}{% endif %}",
    "{% endfor %}",
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}",
);

/// The user's question of a text prompt (`"User: <question>\nAssistant:"`).
pub fn question(prompt: &str) -> &str {
    let q = prompt.strip_prefix("User: ").unwrap_or(prompt);
    q.strip_suffix("\nAssistant:").unwrap_or(q)
}

/// The one-message conversation of a text prompt.
pub fn user_turn(prompt: &str) -> Value {
    json!([{"role": "user", "content": question(prompt)}])
}

fn assistant_turn(response: &str) -> Value {
    json!([{"role": "assistant", "content": response.trim_start()}])
}

/// ChatML text of a question and (when given) its answer, as [`CHAT_TEMPLATE`] renders it.
fn render(prompt: &str, response: Option<&str>) -> String {
    let mut text = format!("{IM_START}user\n{}{IM_END}\n{IM_START}assistant\n", question(prompt));
    if let Some(r) = response {
        text.push_str(&format!("{}{IM_END}\n", r.trim_start()));
    }
    text
}

/// Every conversation the quickstart will tokenize, rendered: the chat tokenizer's corpus.
pub fn corpus(cfg: &SynthConfig) -> Vec<String> {
    let mut texts: Vec<String> = sft_rows(cfg).iter().map(|(p, c)| render(p, Some(c))).collect();
    for split in [Split::Train, Split::Eval] {
        for pair in preference_pairs(cfg, split) {
            texts.push(render(&pair.prompt, Some(&pair.chosen)));
            texts.push(render(&pair.prompt, Some(&pair.rejected)));
        }
        texts.extend(prompts(cfg, split).iter().map(|p| render(p, None)));
    }
    texts
}

/// A byte-level BPE `tokenizer.json` of `vocab_size` tokens trained on [`corpus`], with the
/// special tokens `<|endoftext|>` (0, padding), `<|im_start|>` (1) and `<|im_end|>` (2).
pub fn tokenizer_json(cfg: &SynthConfig, vocab_size: usize) -> Result<String> {
    bpe::train_tokenizer_with(&corpus(cfg), vocab_size, &[bpe::EOS_TOKEN, IM_START, IM_END])
}

/// `tokenizer_config.json` of the chat tokenizer, as Qwen2.5's instruct checkpoints set it:
/// EOS `<|im_end|>`, padding `<|endoftext|>`, no BOS. The template itself goes to
/// `chat_template.jinja` ([`write_tokenizer_files`]).
pub fn tokenizer_config(model_max_length: usize) -> Value {
    let special = |id: u32, content: &str| {
        (
            id.to_string(),
            json!({"content": content, "lstrip": false, "normalized": false, "rstrip": false,
                   "single_word": false, "special": true}),
        )
    };
    let decoder: serde_json::Map<String, Value> =
        [special(0, bpe::EOS_TOKEN), special(1, IM_START), special(2, IM_END)]
            .into_iter()
            .collect();
    json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": decoder,
        "additional_special_tokens": [IM_START, IM_END],
        "bos_token": null,
        "eos_token": IM_END,
        "pad_token": bpe::EOS_TOKEN,
        "unk_token": null,
        "model_max_length": model_max_length,
        "add_prefix_space": false,
        "clean_up_tokenization_spaces": false,
        "split_special_tokens": false,
    })
}

/// Writes `tokenizer_config.json` and `chat_template.jinja` into the model directory `dir`.
pub fn write_tokenizer_files(dir: &Path, model_max_length: usize) -> Result<()> {
    let config = serde_json::to_string_pretty(&tokenizer_config(model_max_length))
        .map_err(|e| crate::error::TrainError::Config(format!("tokenizer_config.json: {e}")))?;
    crate::checkpoint::write_atomic(&dir.join("tokenizer_config.json"), format!("{config}\n").as_bytes())?;
    crate::checkpoint::write_atomic(&dir.join("chat_template.jinja"), CHAT_TEMPLATE.as_bytes())
}

/// Writes the rows of [`super::write_all`] in TRL 1.x's conversational format:
/// - `sft/train.jsonl`: `prompt` (the user turn), `completion` (the assistant turn);
/// - `prefs/{train,validation}.jsonl`: `prompt`, `chosen`, `rejected` (assistant turns), `kind`;
/// - `prompts/{train,validation}.jsonl`: `prompt` (the user turn).
pub fn write_all(cfg: &SynthConfig, dir: &Path) -> Result<SynthFiles> {
    let format = RowFormat {
        sft: |p, c| json!({"prompt": user_turn(p), "completion": assistant_turn(c)}),
        pair: |p| {
            json!({"prompt": user_turn(&p.prompt), "chosen": assistant_turn(&p.chosen),
                   "rejected": assistant_turn(&p.rejected), "kind": p.kind.as_str()})
        },
        prompt: |q| json!({"prompt": user_turn(q)}),
    };
    write_rows(cfg, dir, &format)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_text_prompt_gives_its_question() {
        assert_eq!(question("User: Any tips for tea?\nAssistant:"), "Any tips for tea?");
        assert_eq!(question("Any tips for tea?"), "Any tips for tea?");
    }
}
