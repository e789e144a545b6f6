//! `rlhf`: reinforcement learning from human feedback, one binary.

mod bench;
mod bench_dpo;
mod generate;
mod merge;
mod plot;
mod quickstart;
mod score;
mod stop;
mod train;

use clap::{Parser, Subcommand};

/// Reinforcement learning from human feedback: reward models, PPO, LoRA — no Python.
#[derive(Parser)]
#[command(name = "rlhf", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// The whole pipeline (SFT → reward model → PPO with LoRA) on built-in data, no download.
    Quickstart(quickstart::Args),
    /// Generate continuations of prompts with a causal LM directory.
    Generate(generate::Args),
    /// Score texts or preference pairs with a reward model directory.
    Score(score::Args),
    /// Supervised fine-tuning of a causal LM (TRL SFTTrainer).
    Sft(train::Args),
    /// Train a reward model on preference pairs (TRL RewardTrainer).
    Reward(train::Args),
    /// PPO with a value head and a KL-penalised reference (TRL 0.11 PPOTrainer).
    Ppo(train::Args),
    /// Direct preference optimisation on preference pairs (TRL 1.16 DPOTrainer).
    #[command(after_help = train::DPO_KEYS)]
    Dpo(train::Args),
    /// GRPO: groups of sampled completions, group-relative advantages (TRL GRPOTrainer).
    #[command(after_help = train::GRPO_HELP)]
    Grpo(train::Args),
    /// RLOO: leave-one-out REINFORCE with a clipped sequence ratio (TRL RLOOTrainer).
    #[command(after_help = train::RLOO_HELP)]
    Rloo(train::Args),
    /// Draw PNG charts of a run directory's metrics.jsonl into RUN_DIR/plots.
    Plot(plot::Args),
    /// Run a benchmark workload and print its timings as JSON.
    Bench(bench::Args),
    /// Merge a LoRA adapter into its base model (PEFT merge_and_unload).
    Merge(merge::Args),
}

/// Runs all parallel work on one pool. candle's CPU backend splits large element-wise ops
/// over a spinning pool of its own beside rayon's (which runs the matrix products and the
/// fused kernels); on a machine with few cores the two pools' spinning threads take each
/// other's cores, and a step gets several times slower. Unless the user chose a size,
/// candle's pool is given no extra workers (`CANDLE_NUM_THREADS=1`); rayon keeps every
/// core (`RAYON_NUM_THREADS` still applies).
///
/// `RAYON_NUM_THREADS` is also set (to rayon's own default, the available parallelism)
/// unless the user chose it: candle sizes every matrix product's split from it and, when it
/// is unset, re-derives the physical core count from `/proc/cpuinfo` on each product
/// (several percent of a small model's step).
fn single_thread_pool() {
    // Nothing else runs yet: the first statements of `main`, before any thread starts.
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let n = std::thread::available_parallelism().map_or(1, usize::from);
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
}

/// Keeps freed memory for reuse. A training step allocates and frees tensors of tens of
/// MB (logits, gradients of the embedding); glibc returns such blocks to the kernel on
/// free (mmap above a threshold, heap trimming), so every step pays a page fault and a
/// zeroed page for each 4 KB of them again — a fifth of a small model's backward pass.
/// Blocks up to 32 MiB (glibc's largest threshold) now come from the heap, and the heap
/// is never trimmed: a step's peak is reached again by the next step, so the process keeps
/// its peak resident (as PyTorch's caching allocator does); the peak itself is unchanged.
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: `mallopt` only sets allocator parameters; called before any other thread.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        // -1: never trim (mallopt(3)).
        libc::mallopt(libc::M_TRIM_THRESHOLD, -1);
        libc::mallopt(libc::M_TOP_PAD, 64 << 20);
        // One arena: the command runs on a rayon worker, and glibc gives other threads
        // arenas of 64 MiB heaps that cannot hold a step's larger blocks, which would then be
        // mapped and unmapped (page faults, TLB shootdowns) on every step.
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

/// Runs the command on a worker of rayon's global pool (one thread per core), not on the
/// main thread. A training or decoding step runs hundreds of short parallel loops; forked
/// from a worker, each is shared with the other workers by work stealing, while from the
/// main thread each would be handed over to the pool and waited for (two thread switches
/// per loop: `reward-tiny` 0.031–0.034 → 0.026–0.031 s, `ppo-tiny` 1.57–1.60 → 1.26–1.39 s).
/// The workers get the main thread's stack size or more (candle walks the autograd graph
/// recursively).
fn on_the_pool<R: Send>(run: impl FnOnce() -> R + Send) -> R {
    // Fails only if the pool was built already (nothing has used rayon yet); the default pool
    // then serves.
    let _ = rayon::ThreadPoolBuilder::new().stack_size(64 << 20).build_global();
    rayon::scope(|_| run())
}

fn main() -> std::process::ExitCode {
    keep_freed_memory();
    single_thread_pool();
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .without_time()
        .init();
    let run = move || match cli.command {
        Command::Generate(a) => generate::run(a),
        Command::Score(a) => score::run(a),
        Command::Bench(a) => bench::run(a),
        Command::Sft(a) => train::sft(a),
        Command::Reward(a) => train::reward(a),
        Command::Merge(a) => merge::run(a),
        Command::Ppo(a) => train::ppo(a),
        Command::Dpo(a) => train::dpo(a),
        Command::Grpo(a) => train::grpo(a),
        Command::Rloo(a) => train::rloo(a),
        Command::Plot(a) => plot::run(a),
        Command::Quickstart(a) => quickstart::run(a),
    };
    let result = on_the_pool(run);
    // With several ranks, rank 0 reports what every rank met (a rank's own error was
    // printed by that rank before it ended the job: `train::as_rank`).
    let reports = rlhf_train::dist::world().is_main();
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // A run stopped by Ctrl-C / SIGTERM saved its checkpoint: not an error, but the
            // shell's status for the signal.
            if let Some(rlhf_train::TrainError::Interrupted { reason, .. }) = e.downcast_ref() {
                if reports {
                    eprintln!("{}", error_text(&e));
                }
                return std::process::ExitCode::from(stop::exit_code(reason));
            }
            if reports {
                eprintln!("error: {}", error_text(&e));
            }
            std::process::ExitCode::FAILURE
        }
    }
}

/// The error and its causes, each cause once: library errors already include their
/// source's text in their message, so a cause is appended only if it is not there yet.
fn error_text(e: &anyhow::Error) -> String {
    let mut msg = e.to_string();
    for cause in e.chain().skip(1) {
        let c = cause.to_string();
        if !msg.contains(&c) {
            msg.push_str(": ");
            msg.push_str(&c);
        }
    }
    msg
}

/// Parses a dtype name for model weights.
fn parse_dtype(s: &str) -> anyhow::Result<candle_core::DType> {
    match s {
        "f32" | "float32" => Ok(candle_core::DType::F32),
        "bf16" | "bfloat16" => Ok(candle_core::DType::BF16),
        other => anyhow::bail!("unknown dtype `{other}`; expected f32 or bf16"),
    }
}
