//! `rlhf generate`.

use std::path::PathBuf;

use rlhf_models::{GenerationConfig, LoadOptions};
use rlhf_ops::rng::RngStream;

/// Arguments of `rlhf generate`.
#[derive(clap::Args)]
pub struct Args {
    /// Model directory (Hugging Face GPT-2 layout).
    #[arg(long)]
    model: PathBuf,
    /// PEFT LoRA adapter directory to apply to the model.
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// A prompt; repeat for a batch.
    #[arg(long = "prompt", required = true)]
    prompts: Vec<String>,
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
    /// One JSON object per prompt instead of text.
    #[arg(long)]
    json: bool,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let opts = LoadOptions {
        dtype: crate::parse_dtype(&a.dtype)?,
        ..Default::default()
    };
    let model = crate::merge::load_model(&a.model, a.adapter.as_deref(), &opts)?;
    let tok = model.tokenizer()?;
    let prompts = a.prompts.iter().map(|p| tok.encode(p)).collect::<Result<Vec<_>, _>>()?;
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
    let out = model.generate(&prompts, &cfg, &mut RngStream::new(a.seed))?;
    for (i, text) in a.prompts.iter().enumerate() {
        let completion = tok.decode(&out.response_ids[i], true)?;
        if a.json {
            let obj = serde_json::json!({
                "prompt": text,
                "prompt_ids": out.prompt_ids[i],
                "completion_ids": out.response_ids[i],
                "completion": completion,
            });
            println!("{obj}");
        } else {
            println!("{text}{completion}");
            if i + 1 < a.prompts.len() {
                println!("---");
            }
        }
    }
    Ok(())
}
