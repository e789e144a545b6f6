//! `rlhf generate`: plain prompts, or conversations rendered with the model's chat template.

use std::path::{Path, PathBuf};

use anyhow::Context;
use rlhf_models::chat::Clock;
use rlhf_models::{ChatTemplate, GenerationConfig, LoadOptions, Message, Model, RenderOptions};
use rlhf_ops::rng::RngStream;
use serde_json::Value;

use crate::merge::ModelArgs;

/// Arguments of `rlhf generate`.
#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    model: ModelArgs,
    /// A prompt; repeat for a batch.
    #[arg(long = "prompt", required_unless_present = "messages")]
    prompts: Vec<String>,
    /// Treat each `--prompt` as a user message and render it with the chat template and the
    /// generation prompt (transformers' `apply_chat_template(..., add_generation_prompt=True)`).
    #[arg(long)]
    chat: bool,
    /// JSONL conversations, one per line: `{"messages": [{"role": ..., "content": ...}, ...]}`
    /// (or a bare list of messages), each rendered with the generation prompt.
    #[arg(long, conflicts_with = "prompts")]
    messages: Option<PathBuf>,
    /// A Jinja chat template file to use instead of the model's own.
    #[arg(long)]
    chat_template: Option<PathBuf>,
    /// Extra template variables as a JSON object, e.g. `{"enable_thinking": false}`.
    #[arg(long)]
    chat_template_kwargs: Option<String>,
    /// The date templates read through `strftime_now` (YYYY-MM-DD), for reproducible prompts.
    #[arg(long)]
    date: Option<String>,
    /// Tokens to generate per prompt at most.
    #[arg(long, default_value_t = 32)]
    max_new_tokens: usize,
    /// Tokens to generate before EOS is allowed.
    #[arg(long, default_value_t = 0)]
    min_new_tokens: usize,
    /// Greedy decoding (argmax) instead of sampling.
    #[arg(long, conflicts_with_all = ["temperature", "top_k", "top_p"])]
    greedy: bool,
    /// Sampling temperature.
    #[arg(long, default_value_t = 1.0)]
    temperature: f64,
    /// Sample among the k most likely tokens (0: all).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Nucleus sampling mass (1.0: off).
    #[arg(long, default_value_t = 1.0)]
    top_p: f64,
    /// Random seed of the sampler.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Weight dtype: f32 or bf16.
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// One JSON object per prompt instead of text (`prompt_ids` are the ids fed to the model).
    #[arg(long)]
    json: bool,
}

/// One prompt to continue: what to print for it and its token ids.
struct Prompt {
    text: String,
    messages: Option<Vec<Message>>,
    ids: Vec<u32>,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let opts = LoadOptions {
        dtype: crate::parse_dtype(&a.dtype)?,
        ..Default::default()
    };
    let model = a.model.load(&opts)?;
    let prompts = prompts(&a, &model)?;
    let tok = model.tokenizer()?;
    let cfg = GenerationConfig {
        max_new_tokens: a.max_new_tokens,
        min_new_tokens: a.min_new_tokens,
        do_sample: !a.greedy,
        temperature: a.temperature,
        top_k: a.top_k,
        top_p: a.top_p,
        eos_token_id: model.eos_token_ids(),
        pad_token_id: tok.pad_token_id,
    };
    let ids: Vec<Vec<u32>> = prompts.iter().map(|p| p.ids.clone()).collect();
    let out = model.generate(&ids, &cfg, &mut RngStream::new(a.seed))?;
    for (i, p) in prompts.iter().enumerate() {
        let completion = tok.decode(&out.response_ids[i], true)?;
        if a.json {
            let mut obj = serde_json::json!({
                "prompt": p.text,
                "prompt_ids": out.prompt_ids[i],
                "completion_ids": out.response_ids[i],
                "completion": completion,
            });
            if let Some(m) = &p.messages {
                obj["messages"] = serde_json::to_value(m)?;
            }
            println!("{obj}");
        } else {
            println!("{}{completion}", p.text);
            if i + 1 < prompts.len() {
                println!("---");
            }
        }
    }
    Ok(())
}

/// The prompts as text (plain `--prompt`) or rendered conversations (`--chat`, `--messages`).
fn prompts(a: &Args, model: &Model) -> anyhow::Result<Vec<Prompt>> {
    let tok = model.tokenizer()?;
    let conversations: Vec<Vec<Message>> = match (&a.messages, a.chat) {
        (Some(path), _) => read_conversations(path)?,
        (None, true) => a.prompts.iter().map(|p| vec![Message::new("user", p)]).collect(),
        (None, false) => {
            return a
                .prompts
                .iter()
                .map(|p| {
                    Ok(Prompt {
                        text: p.clone(),
                        messages: None,
                        ids: tok.encode(p)?,
                    })
                })
                .collect();
        }
    };
    let template = template(a, model)?;
    let mut render = RenderOptions::generation_prompt(true);
    if let Some(kw) = &a.chat_template_kwargs {
        match serde_json::from_str::<Value>(kw) {
            Ok(Value::Object(m)) => render.kwargs = m,
            _ => anyhow::bail!(
                "--chat-template-kwargs {kw:?} is not a JSON object\nhint: pass e.g. '{{\"enable_thinking\": false}}'"
            ),
        }
    }
    conversations
        .into_iter()
        .map(|msgs| {
            let enc = template.encode(tok, &msgs, &render)?;
            Ok(Prompt {
                text: enc.text,
                messages: Some(msgs),
                ids: enc.ids,
            })
        })
        .collect()
}

/// The model's chat template, or `--chat-template`, with `--date` applied.
fn template(a: &Args, model: &Model) -> anyhow::Result<ChatTemplate> {
    let t = match &a.chat_template {
        Some(p) => ChatTemplate::from_file(p, model.tokenizer()?.config.special.clone())?,
        None => model.chat_template()?.clone(),
    };
    Ok(match &a.date {
        None => t,
        Some(d) => t.with_clock(Clock::fixed(d).with_context(|| {
            format!("--date {d:?} is not a date\nhint: write it as YYYY-MM-DD (or YYYY-MM-DDTHH:MM:SS)")
        })?),
    })
}

/// Conversations from a JSONL file: per line `{"messages": [...]}` or a list of messages.
fn read_conversations(path: &Path) -> anyhow::Result<Vec<Vec<Message>>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = || format!("{}:{}", path.display(), n + 1);
        let v: Value = serde_json::from_str(line).with_context(|| format!("{}: not JSON", at()))?;
        let list = match &v {
            Value::Object(o) => o.get("messages").with_context(|| {
                format!(
                    "{}: no `messages` key\nhint: write one conversation per line as {{\"messages\": [{{\"role\": \"user\", \"content\": \"...\"}}]}}",
                    at()
                )
            })?,
            _ => &v,
        };
        let msgs = rlhf_models::chat::messages_from_json(list).map_err(|e| anyhow::anyhow!("{}: {e}", at()))?;
        out.push(msgs);
    }
    if out.is_empty() {
        anyhow::bail!(
            "{}: no conversations\nhint: one JSON conversation per line",
            path.display()
        );
    }
    Ok(out)
}
