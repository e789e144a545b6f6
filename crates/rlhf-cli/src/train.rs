//! `rlhf sft`, `rlhf reward`, `rlhf ppo`, `rlhf dpo`, `rlhf grpo` and `rlhf rloo`: a TOML config and/or `--key value` flags with
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

/// The keys of `rlhf dpo` (`--help`): TRL 1.16 `DPOConfig` names, defaults in brackets.
pub const DPO_KEYS: &str = "\
Keys (TOML or --flags; TRL 1.16 DPOConfig names, defaults in brackets):
  --model-name-or-path DIR        the policy to train (a causal LM directory)
  --ref-model-name-or-path DIR    the frozen reference [a copy of the policy; adapters disabled with --use-peft]
  --train-file F / --eval-file F  preference rows prompt, chosen, rejected (JSONL, CSV, TSV, Parquet)
  --dataset-name DIR              a directory with train.* and validation.*
  --output-dir DIR                [runs/dpo]
  --learning-rate X               [1e-6]
  --beta X                        [0.1]
  --loss-type NAME[,NAME..]       sigmoid, hinge, ipo, exo_pair, nca_pair, robust, bco_pair, sppo_hard, aot,
                                  aot_unpaired, apo_zero, apo_down, discopop, sft, sigmoid_norm [sigmoid]
  --loss-weights X[,X..]          one per loss type [1.0 each]
  --label-smoothing X             [0.0]        --discopop-tau X [0.05]
  --max-length N                  [1024]       --truncation-mode keep_start|keep_end [keep_start]
  --pad-to-multiple-of N          [none]
  --precompute-ref-log-probs      [false]      --precompute-ref-batch-size N [per_device_eval_batch_size]
  --per-device-train-batch-size N pairs per micro-batch [8]
  --gradient-accumulation-steps N [1]          --max-steps N / --num-train-epochs X [3]
  --lr-scheduler-type linear|constant [linear] --warmup-steps N / --warmup-ratio X
  --max-grad-norm X [1.0]  --weight-decay X [0]  --seed N [42]  --bf16  --disable-dropout [true]
  --logging-steps N [10]  --eval-strategy no|steps|epoch  --eval-steps N
  --save-strategy no|steps|epoch  --save-steps N  --save-total-limit N  --resume-from-checkpoint DIR|latest
  --use-peft --lora-r N [16] --lora-alpha X [32] --lora-dropout X [0.05] --lora-target-modules A,B
  --load-in-8bit | --load-in-4bit  (with --use-peft)
  --report-to tensorboard
See docs/dpo.md.";

pub fn dpo(a: Args) -> anyhow::Result<()> {
    let (v, source, sources) = values(&a)?;
    let cfg: rlhf_train::dpo::DpoConfig = resolve(&v, &source)?;
    let stop = crate::stop::install()?;
    let out = as_rank(|| rlhf_train::dpo::train_until(&cfg, &stop)).map_err(|e| sources.name(e))?;
    if !prints() {
        return Ok(());
    }
    println!("policy saved to {}", out.final_dir.display());
    if let Some(m) = out.eval {
        let get = |k: &str| m.get(k).copied().unwrap_or(f64::NAN);
        println!(
            "eval loss {:.4}  eval rewards/accuracies {:.4}  eval rewards/margins {:.4}",
            get("loss"),
            get("rewards/accuracies"),
            get("rewards/margins")
        );
    }
    Ok(())
}

/// The keys `rlhf grpo` and `rlhf rloo` share (TRL 1.16 names; `docs/grpo.md`).
macro_rules! online_keys {
    () => {
        "\
  --config FILE                    a TOML file with any of these keys (flags win)
  --model-name-or-path DIR         the policy (a causal LM directory or hub id)
  --train-file FILE                prompts: JSONL / CSV / TSV / Parquet with `prompt` (or `query`)
  --eval-file FILE                 evaluation prompts (with --eval-strategy steps)
  --output-dir DIR                 run directory (checkpoints, metrics.jsonl, final/)
  --num-generations G              completions per prompt
  --max-completion-length N        new tokens per completion at most
  --per-device-train-batch-size B  completions per micro-batch (a multiple of G)
  --gradient-accumulation-steps N  micro-batches per optimizer step
  --steps-per-generation N         micro-batches served by one generation batch
  --num-iterations N               passes over each generation batch
  --temperature T  --top-k K  --top-p P
  --epsilon E  --epsilon-high E    clip range of the ratio
  --mask-truncated-completions     no loss on completions without EOS
  --reward-funcs a,b               built-in rules: regex_match, length_target, exact_answer,
                                   distinct_words, think_format_reward, get_soft_overlong_punishment
  --reward-regex RE  --reward-target-length N  --reward-answer-column COL  --soft-punish-cache N
  --reward-model-name-or-path DIR  a reward model (sequence classifier)
  --reward-command CMD             an external scorer (one JSON line per batch each way)
  --reward-weights 1.0,0.5         one weight per reward function
  --learning-rate LR  --max-steps N  --num-train-epochs E  --lr-scheduler-type linear|constant
  --logging-steps N  --save-steps N  --save-total-limit N  --resume-from-checkpoint latest|DIR
  --seed S  --bf16  --quiet  --disable-dropout  --report-to tensorboard
  --use-peft --lora-r R --lora-alpha A --lora-target-modules q_proj,v_proj
  --load-in-8bit | --load-in-4bit   LoRA on a quantized base (reference = adapters disabled)
"
    };
}

/// `rlhf grpo --help`: the keys.
pub const GRPO_HELP: &str = const_format_keys::GRPO;
/// `rlhf rloo --help`: the keys.
pub const RLOO_HELP: &str = const_format_keys::RLOO;

mod const_format_keys {
    pub const GRPO: &str = concat!(
        "Config keys (TRL GRPOConfig names, as --kebab-case flags or TOML keys):\n",
        "  --beta B                         k3 KL weight (0: no reference model)\n",
        "  --loss-type dapo|grpo|dr_grpo|bnpo|luspo|cispo|sapo|vespo\n",
        "  --importance-sampling-level token|sequence\n",
        "  --scale-rewards group|batch|none  --multi-objective-aggregation sum_then_normalize|normalize_then_sum\n",
        "  --delta D  --use-bias-correction-kl true|false\n",
        online_keys!()
    );
    pub const RLOO: &str = concat!(
        "Config keys (TRL RLOOConfig names, as --kebab-case flags or TOML keys):\n",
        "  --beta B                         k1 KL folded into the reward (0.05; 0: no reference)\n",
        "  --normalize-advantages           whiten the advantages over the batch\n",
        "  --reward-clip-range MIN,MAX      clamp of the aggregated reward\n",
        online_keys!()
    );
}

pub fn grpo(a: Args) -> anyhow::Result<()> {
    let (v, source, sources) = values(&a)?;
    let cfg: rlhf_train::grpo_config::GrpoConfig = resolve(&v, &source)?;
    let stop = crate::stop::install()?;
    let out = as_rank(|| rlhf_train::grpo::train_until(&cfg, &stop)).map_err(|e| sources.name(e))?;
    online_summary(&out);
    Ok(())
}

pub fn rloo(a: Args) -> anyhow::Result<()> {
    let (v, source, sources) = values(&a)?;
    let cfg: rlhf_train::rloo_config::RlooConfig = resolve(&v, &source)?;
    let stop = crate::stop::install()?;
    let out = as_rank(|| rlhf_train::rloo::train_until(&cfg, &stop)).map_err(|e| sources.name(e))?;
    online_summary(&out);
    Ok(())
}

fn online_summary(out: &rlhf_train::online::run::OnlineOutcome) {
    if !prints() {
        return;
    }
    println!("policy saved to {}", out.final_dir.display());
    if let (Some(first), Some(last)) = (out.rewards.first(), out.rewards.last()) {
        println!("reward: first generation batch {first:.4}, last {last:.4}");
    }
    if let Some(m) = &out.eval {
        if let Some(r) = m.get("reward") {
            println!("eval reward {r:.4}");
        }
    }
}
