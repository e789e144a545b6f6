//! `rlhf sft`, `rlhf reward` and `rlhf ppo`: a TOML config and/or `--key value` flags with
//! TRL's names; Ctrl-C stops a run after its current step with a checkpoint ([`crate::stop`]).
//! Under `mpirun` / `srun` (a build with the `mpi` feature) the run is one rank of a
//! data-parallel job ([`rlhf_train::dist`], `docs/scaling.md`).

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

/// Runs `train` as this process's rank of the job it was launched in (alone when it was
/// not). An error that may be this rank's alone ends the whole job, after printing it, so
/// that no rank waits forever for this one.
pub fn as_rank<T>(train: impl FnOnce() -> rlhf_train::Result<T>) -> rlhf_train::Result<T> {
    let session = rlhf_train::dist::start()?;
    let out = train();
    if let Err(e) = &out {
        if session.must_abort(e) {
            eprintln!("error on rank {}: {e}", rlhf_train::dist::world().rank());
            session.abort(1);
        }
    }
    out
}

/// Whether this process prints results (rank 0, or the only process).
fn prints() -> bool {
    rlhf_train::dist::world().is_main()
}

pub fn reward(a: Args) -> anyhow::Result<()> {
    let (v, source, sources) = values(&a)?;
    let cfg: rlhf_train::reward::RewardConfig = resolve(&v, &source)?;
    let stop = crate::stop::install()?;
    let out = as_rank(|| rlhf_train::reward::train_until(&cfg, &stop)).map_err(|e| sources.name(e))?;
    if !prints() {
        return Ok(());
    }
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
    let out = as_rank(|| rlhf_train::sft::train_until(&cfg, &stop)).map_err(|e| sources.name(e))?;
    if !prints() {
        return Ok(());
    }
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
    let out = as_rank(|| rlhf_train::ppo_run::train_until(&cfg, &stop)).map_err(|e| sources.name(e))?;
    if !prints() {
        return Ok(());
    }
    println!("policy saved to {}", out.final_dir.display());
    if let (Some(first), Some(last)) = (out.reward_means.first(), out.reward_means.last()) {
        println!("mean reward: first step {first:.4}, last step {last:.4}");
    }
    Ok(())
}
