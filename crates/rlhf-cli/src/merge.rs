//! `rlhf merge`: PEFT's `merge_and_unload` on the command line, and the `--adapter` loading
//! shared by `generate` and `score`.

use std::path::{Path, PathBuf};

use anyhow::Context;
use rlhf_models::lora::{count_parameters, load_adapter, merge_and_unload, AdapterLoadOptions};
use rlhf_models::{LoadOptions, Model};

/// The model flags shared by `generate`, `score` and `merge`: a directory or a Hugging
/// Face Hub id for each, and the Hub revision.
#[derive(clap::Args)]
pub struct ModelArgs {
    /// Model directory (Hugging Face layout) or Hub id such as `Qwen/Qwen2.5-0.5B`, looked up
    /// in the Hub cache (`HF_HUB_CACHE`, `HF_HOME`, `~/.cache/huggingface/hub`).
    #[arg(long)]
    pub model: String,
    /// PEFT LoRA adapter directory or Hub id to apply to the model.
    #[arg(long)]
    pub adapter: Option<String>,
    /// Hub revision (branch, tag or commit) of ids given to `--model` and `--adapter`.
    #[arg(long)]
    pub revision: Option<String>,
}

impl ModelArgs {
    /// Loads the model and its adapter (see [`load_model`]).
    pub fn load(&self, opts: &LoadOptions) -> anyhow::Result<Model> {
        let opts = LoadOptions {
            revision: self.revision.clone(),
            ..opts.clone()
        };
        load_model(&self.model, self.adapter.as_deref(), &opts)
    }
}

/// Arguments of `rlhf merge`.
#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    model: ModelArgs,
    /// Where to write the merged model (a plain Hugging Face directory).
    #[arg(long)]
    output: PathBuf,
}

/// Loads `model` (a directory or Hub id at `opts.revision`) and, when given, applies the
/// PEFT adapter `adapter` (a directory or Hub id; frozen, adapters on), printing the
/// loader's warnings to stderr.
pub fn load_model(model: &str, adapter: Option<&str>, opts: &LoadOptions) -> anyhow::Result<Model> {
    let mut m = Model::load(Path::new(model), opts).with_context(|| format!("loading model {model}"))?;
    if let Some(a) = adapter {
        let dir = rlhf_models::hub::resolve_adapter(a, opts.revision.as_deref())
            .with_context(|| format!("loading adapter {a}"))?;
        let warnings = load_adapter(&mut m, &dir, &AdapterLoadOptions::default())
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
    let Some(adapter) = a.model.adapter.as_deref() else {
        anyhow::bail!("--adapter is required: the LoRA adapter to merge into --model");
    };
    if same(&a.output, Path::new(&a.model.model)) || same(&a.output, Path::new(adapter)) {
        anyhow::bail!(
            "--output {} is the model or adapter directory\nhint: write the merged model to a new directory",
            a.output.display()
        );
    }
    let model = a.model.load(&LoadOptions::default())?;
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
