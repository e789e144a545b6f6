//! `rlhf sft`, `rlhf reward` and `rlhf ppo`: a TOML config and/or `--key value` flags with
//! TRL's names; Ctrl-C stops a run after its current step with a checkpoint ([`crate::stop`]).

use std::path::PathBuf;

use anyhow::Context;
use rlhf_train::config::{parse_flags, read_toml, resolve, KeySources};

/// Arguments of the training commands: `--config FILE` and any config key as a flag.
#[derive(clap::Args)]
pub struct Args {
    /// Config keys as flags, e.g. `--config reward.toml --learning-rate 1e-4 --max-steps 100`.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, value_name = "--KEY VALUE")]
    rest: Vec<String>,
}

/// Merges `--config FILE` (if given) with the other flags, flags winning; also returns the
/// source for parse errors (the file if given, else `flags`) and where each key was set.
fn values(a: &Args) -> anyhow::Result<(serde_json::Map<String, serde_json::Value>, String, KeySources)> {
    let mut flags = parse_flags(&a.rest)?;
    let mut source = "flags".to_string();
    let mut merged = serde_json::Map::new();
    let mut file = None;
    if let Some(path) = flags.remove("config") {
        let path = PathBuf::from(path.as_str().context("--config needs a file path")?);
        merged = read_toml(&path)?;
        source = path.display().to_string();
        file = Some(path);
    }
    let sources = KeySources::new(file.as_deref().map(|p| (p, &merged)), &flags);
    merged.extend(flags);
    Ok((merged, source, sources))
}

pub fn reward(a: Args) -> anyhow::Result<()> {
    let (v, source, sources) = values(&a)?;
    let cfg: rlhf_train::reward::RewardConfig = resolve(&v, &source)?;
    let stop = crate::stop::install()?;
    let out = rlhf_train::reward::train_until(&cfg, &stop).map_err(|e| sources.name(e))?;
    println!("reward model saved to {}", out.final_dir.display());
    if let Some(m) = out.eval {
        println!("eval accuracy {:.4}  eval loss {:.4}", m["accuracy"], m["loss"]);
    }
    Ok(())
}

pub fn sft(a: Args) -> anyhow::Result<()> {
    let (v, source, sources) = values(&a)?;
    let cfg: rlhf_train::sft::SftConfig = resolve(&v, &source)?;
    let stop = crate::stop::install()?;
    let out = rlhf_train::sft::train_until(&cfg, &stop).map_err(|e| sources.name(e))?;
    println!("model saved to {}", out.final_dir.display());
    if let Some(m) = out.eval {
        println!("eval loss {:.4}", m["loss"]);
    }
    Ok(())
}

pub fn ppo(a: Args) -> anyhow::Result<()> {
    let (v, source, sources) = values(&a)?;
    let cfg: rlhf_train::ppo_run::PpoRunConfig = resolve(&v, &source)?;
    let stop = crate::stop::install()?;
    let out = rlhf_train::ppo_run::train_until(&cfg, &stop).map_err(|e| sources.name(e))?;
    println!("policy saved to {}", out.final_dir.display());
    if let (Some(first), Some(last)) = (out.reward_means.first(), out.reward_means.last()) {
        println!("mean reward: first step {first:.4}, last step {last:.4}");
    }
    Ok(())
}
