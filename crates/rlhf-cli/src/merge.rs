//! `rlhf merge`: PEFT's `merge_and_unload` on the command line, and the `--adapter` loading
//! shared by `generate` and `score`.

use std::path::{Path, PathBuf};

use anyhow::Context;
use rlhf_models::lora::{count_parameters, load_adapter, merge_and_unload, AdapterLoadOptions};
use rlhf_models::{LoadOptions, Model};

/// Arguments of `rlhf merge`.
#[derive(clap::Args)]
pub struct Args {
    /// Base model directory (Hugging Face GPT-2 layout) the adapter was trained on.
    #[arg(long)]
    model: PathBuf,
    /// PEFT LoRA adapter directory (`adapter_config.json` + `adapter_model.safetensors`).
    #[arg(long)]
    adapter: PathBuf,
    /// Where to write the merged model (a plain Hugging Face directory).
    #[arg(long)]
    output: PathBuf,
}

/// Loads `model` and, when given, applies the PEFT adapter in `adapter` (frozen, adapters
/// on), printing the loader's warnings to stderr.
pub fn load_model(model: &Path, adapter: Option<&Path>, opts: &LoadOptions) -> anyhow::Result<Model> {
    let mut m = Model::load(model, opts).with_context(|| format!("loading model {}", model.display()))?;
    if let Some(dir) = adapter {
        let warnings = load_adapter(&mut m, dir, &AdapterLoadOptions::default())
            .with_context(|| format!("loading adapter {}", dir.display()))?;
        for w in warnings {
            eprintln!("warning: {w}");
        }
    }
    Ok(m)
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let same = |p: &Path, q: &Path| match (std::fs::canonicalize(p), std::fs::canonicalize(q)) {
        (Ok(x), Ok(y)) => x == y,
        _ => false,
    };
    if same(&a.output, &a.model) || same(&a.output, &a.adapter) {
        anyhow::bail!(
            "--output {} is the model or adapter directory\nhint: write the merged model to a new directory",
            a.output.display()
        );
    }
    let model = load_model(&a.model, Some(&a.adapter), &LoadOptions::default())?;
    let counts = count_parameters(&model);
    let layers = model
        .backbone()
        .projections()
        .iter()
        .filter(|(_, p)| p.lora().is_some())
        .count();
    let merged = merge_and_unload(&model)?;
    merged
        .save(&a.output)
        .with_context(|| format!("writing merged model {}", a.output.display()))?;
    eprintln!(
        "merged {layers} LoRA layers ({} adapter parameters) into {}",
        counts.all - count_parameters(&merged).all,
        a.output.display()
    );
    Ok(())
}
