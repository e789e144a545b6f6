//! The data-parallel check binary of `tests/dp_mpi.rs` (feature `mpi`): runs one trainer as
//! a rank of the MPI job it was launched in (or alone), then writes what the test compares.
//!
//! `dp_check MODE OUT_DIR [--key value ...]`
//! - MODE `reward` | `sft` | `dpo` | `grpo` | `rloo` | `ppo-run`: the library trainer, configured by
//!   the flags exactly as `rlhf reward|sft|dpo|grpo|rloo|ppo` is;
//! - MODE `ppo-fixed`: `PpoTrainer::step` on fixed synthetic rollouts (generation is out of
//!   scope): `--batch-size` rollouts per rank, `--steps` steps, a policy from
//!   `--model-name-or-path` with dropout off, a frozen copy as reference, whitening, score
//!   scaling and the adaptive KL controller on.
//!
//! Every rank writes `OUT_DIR/pid-<rank>` at start (so a test can kill one). At the end,
//! rank 0 writes `OUT_DIR/weights.safetensors` (the trained parameters) and
//! `OUT_DIR/digest.json`: `spread`, the largest difference of any parameter between ranks,
//! `ranks`, and for `ppo-fixed` the last step's scalar statistics.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::Tensor;
use rlhf_train::dist::{self, ReduceOp};
use rlhf_train::models::{LoadOptions, Model};
use rlhf_train::ppo::PpoTrainer;
use rlhf_train::ppo_config::PpoConfig;
use rlhf_train::{config, Result, TrainError};
use serde_json::json;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let session = match dist::start() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("dp_check: {e}");
            std::process::exit(2)
        }
    };
    if let Err(e) = run(&args) {
        eprintln!("dp_check rank {}: {e}", dist::world().rank());
        if session.must_abort(&e) {
            session.abort(1);
        }
        drop(session);
        std::process::exit(1);
    }
}

fn run(args: &[String]) -> Result<()> {
    let (mode, out) = match args {
        [m, o, ..] => (m.as_str(), PathBuf::from(o)),
        _ => {
            return Err(TrainError::Config(
                "usage: dp_check MODE OUT_DIR [--key value ...]".into(),
            ))
        }
    };
    let flags = config::parse_flags(&args[2..])?;
    let w = dist::world();
    std::fs::create_dir_all(&out).map_err(|source| TrainError::Io {
        path: out.clone(),
        source,
    })?;
    let pid = out.join(format!("pid-{}", w.rank()));
    std::fs::write(&pid, std::process::id().to_string()).map_err(|source| TrainError::Io { path: pid, source })?;
    let mut extra = BTreeMap::new();
    let model = match mode {
        "reward" => rlhf_train::reward::train(&config::resolve(&flags, "flags")?)?.model,
        "sft" => rlhf_train::sft::train(&config::resolve(&flags, "flags")?)?.model,
        "dpo" => rlhf_train::dpo::train(&config::resolve(&flags, "flags")?)?.model,
        "grpo" => rlhf_train::grpo::train(&config::resolve(&flags, "flags")?)?.model,
        "rloo" => rlhf_train::rloo::train(&config::resolve(&flags, "flags")?)?.model,
        "ppo-run" => rlhf_train::ppo_run::train(&config::resolve(&flags, "flags")?)?.model,
        "ppo-fixed" => ppo_fixed(&flags, &mut extra)?,
        other => return Err(TrainError::Config(format!("unknown mode `{other}`"))),
    };
    digest(&model, &out, extra)
}

/// A deterministic synthetic rollout: row `i` of step `s` of the global batch.
fn rollout(i: usize, s: usize) -> (Vec<u32>, Vec<u32>, f32) {
    let k = i + 31 * s;
    let q = (0..3 + k % 4).map(|t| ((k * 7 + t * 3) % 500 + 10) as u32).collect();
    let r = (0..2 + k % 5).map(|t| ((k * 13 + t * 5) % 500 + 10) as u32).collect();
    (q, r, ((k * 37) % 11) as f32 / 5.0 - 1.0)
}

fn ppo_fixed(flags: &serde_json::Map<String, serde_json::Value>, extra: &mut BTreeMap<String, f64>) -> Result<Model> {
    let get = |k: &str, d: f64| {
        flags
            .get(k)
            .and_then(|v| v.as_str())
            .and_then(|s| s.parse().ok())
            .unwrap_or(d)
    };
    let dir = flags
        .get("model_name_or_path")
        .and_then(|v| v.as_str())
        .ok_or_else(|| TrainError::setting("model_name_or_path", "required"))?;
    let mut policy = Model::load(Path::new(dir), &LoadOptions::default())?;
    policy.disable_dropout();
    let reference = policy.clone();
    policy.set_trainable(true)?;
    let bs = get("batch_size", 4.0) as usize;
    let cfg = PpoConfig {
        batch_size: bs,
        mini_batch_size: get("mini_batch_size", 2.0) as usize,
        gradient_accumulation_steps: get("gradient_accumulation_steps", 1.0) as usize,
        ppo_epochs: 2,
        learning_rate: get("learning_rate", 1e-3),
        whiten_rewards: true,
        use_score_scaling: true,
        use_score_norm: true,
        adap_kl_ctrl: true,
        max_grad_norm: Some(get("max_grad_norm", 0.5)),
        seed: 3,
        ..PpoConfig::default()
    };
    let (mut trainer, _) = PpoTrainer::new(cfg, policy, Some(reference))?;
    let w = dist::world();
    let global = bs * w.size();
    let mine = dist::split(global, w.rank(), w.size());
    for s in 0..get("steps", 2.0) as usize {
        let rows: Vec<_> = mine.clone().map(|i| rollout(i, s)).collect();
        let q: Vec<Vec<u32>> = rows.iter().map(|r| r.0.clone()).collect();
        let r: Vec<Vec<u32>> = rows.iter().map(|r| r.1.clone()).collect();
        let sc: Vec<f32> = rows.iter().map(|r| r.2).collect();
        let stats = trainer.step(&q, &r, &sc)?;
        *extra = stats
            .scalars
            .into_iter()
            .filter(|(k, _)| !k.starts_with("time/"))
            .collect();
    }
    Ok(trainer.model)
}

fn digest(model: &Model, out: &Path, extra: BTreeMap<String, f64>) -> Result<()> {
    let w = dist::world();
    let params = rlhf_train::trainer::trainable_params(model);
    let mut flat = Vec::new();
    let mut tensors = BTreeMap::new();
    for (name, var) in &params {
        let t = var.as_tensor().flatten_all()?.to_vec1::<f32>()?;
        flat.extend(t.iter().map(|&x| x as f64));
        tensors.insert(name.clone(), Tensor::new(t.as_slice(), &candle_core::Device::Cpu)?);
    }
    let (mut hi, mut lo) = (flat.clone(), flat);
    w.all_reduce_f64(&mut hi, ReduceOp::Max)?;
    w.all_reduce_f64(&mut lo, ReduceOp::Min)?;
    let spread = hi.iter().zip(&lo).map(|(a, b)| a - b).fold(0.0, f64::max);
    if w.is_main() {
        rlhf_train::checkpoint::save_tensors(&tensors, &out.join("weights.safetensors"))?;
        let d = json!({"spread": spread, "ranks": w.size(), "stats": extra});
        let p = out.join("digest.json");
        std::fs::write(&p, d.to_string()).map_err(|source| TrainError::Io { path: p, source })?;
    }
    Ok(())
}
