//! `rlhf bench WORKLOAD`: the workloads of the benchmark suite, timed with warm-up steps
//! excluded; prints one JSON line last (median, min, max seconds per step, throughput,
//! peak RSS, threads, dtype).

mod grpo;

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use rlhf_models::{GenerationConfig, Model, ModelConfig};
use rlhf_ops::rng::RngStream;
use serde_json::json;

/// The workloads.
#[derive(Clone, Copy, clap::ValueEnum)]
pub enum Workload {
    /// Matrix products (1024³ and 4096×768×768) on f32 inputs: candle's f32 matmul, and
    /// the mixed-precision `rlhf_ops::bf16::matmul` (bf16-rounded operands, f32 sums).
    Gemm,
    /// One reward-model step on 8 pairs (max_length 128), tiny GPT-2.
    RewardTiny,
    /// One reward-model step on 8 pairs (max_length 128), GPT-2-small shape.
    RewardSmall,
    /// One PPO step (generate 32 tokens for 16 prompts, score, step) on tiny GPT-2.
    PpoTiny,
    /// One PPO step on the GPT-2-small shape, tiny reward model.
    PpoSmall,
    /// As `ppo-tiny` with LoRA (r 32, alpha 32, dropout 0.1, bias lora_only, c_attn);
    /// reference = adapters disabled.
    PpoTinyLora,
    /// As `ppo-tiny-lora` on the GPT-2-small shape with the frozen base in int8.
    PpoSmallLoraInt8,
    /// 16 prompts × 64 sampled tokens with the KV cache, GPT-2-small shape.
    GenerateSmall,
    /// 16 prompts × 64 sampled tokens, SmolLM2-135M shape (Llama, GQA, tied).
    GenerateSmollm,
    /// 8 prompts × 64 sampled tokens, Qwen2.5-0.5B shape (q/k/v biases, GQA, tied).
    #[value(name = "generate-qwen-0.5b")]
    GenerateQwen05b,
    /// One reward-model step on 8 pairs (max_length 128), SmolLM2-135M shape + score head.
    RewardSmollm,
    /// As `reward-smollm` on the Qwen2.5-0.5B shape with LoRA (r 16, alpha 32, q_proj and
    /// v_proj, the score head trained in full): the memory of LoRA reward training at 0.5B.
    #[value(name = "reward-qwen-0.5b-lora")]
    RewardQwen05bLora,
    /// As `ppo-tiny-lora` on the Qwen2.5-0.5B shape (LoRA on q_proj and v_proj): the memory
    /// of LoRA PPO at 0.5B.
    #[value(name = "ppo-qwen-0.5b-lora")]
    PpoQwen05bLora,
    /// One DPO step on 8 pairs (max_length 128, sigmoid, beta 0.1, frozen reference copy,
    /// AdamW lr 1e-6), SmolLM2-135M shape.
    DpoSmall,
    /// One GRPO step: 2 prompts × 8 completions of 64 tokens, distinct-words rule, dapo,
    /// beta 0, SmolLM2-135M shape.
    GrpoSmall,
    /// As `grpo-small` with LoRA r 16, alpha 32, dropout 0 on q_proj,v_proj, beta 0.04.
    GrpoSmallLora,
}

/// The SmolLM2-135M shape (`WORKLOADS.md`): Llama, hidden 576, 30 layers, 9 heads, 3 kv
/// heads, intermediate 1536, RMSNorm eps 1e-5, rope_theta 1e5, tied, GPT-2 vocabulary.
pub fn smollm_shape() -> anyhow::Result<ModelConfig> {
    let mut c = ModelConfig::llama_family(rlhf_models::Family::Llama, 576, 1536, 30, 9, 3, 50257, 1e5)?;
    c.tie_word_embeddings = true;
    c.norm_eps = 1e-5;
    c.eos_token_id = vec![50256];
    Ok(c)
}

/// The Qwen2.5-0.5B shape (`WORKLOADS.md`): Qwen2, hidden 896, 24 layers, 14 heads, 2 kv
/// heads, intermediate 4864, q/k/v biases, RMSNorm eps 1e-6, rope_theta 1e6, tied, vocab
/// 151,936.
pub fn qwen05b_shape() -> anyhow::Result<ModelConfig> {
    let mut c = ModelConfig::llama_family(rlhf_models::Family::Qwen2, 896, 4864, 24, 14, 2, 151_936, 1e6)?;
    c.tie_word_embeddings = true;
    c.norm_eps = 1e-6;
    c.eos_token_id = vec![50256];
    Ok(c)
}

/// Arguments of `rlhf bench`.
#[derive(clap::Args)]
pub struct Args {
    /// Which workload to run.
    workload: Workload,
    /// Timed steps (default: the workload's own).
    #[arg(long)]
    steps: Option<usize>,
    /// Matrix products with bf16 operands and f32 sums (`rlhf_ops::precision`); weights,
    /// activations, gradients and optimizer state stay f32. Reported as dtype
    /// `f32+bf16-matmul`.
    #[arg(long)]
    bf16: bool,
}

/// The dtype a workload reports.
pub(crate) fn dtype_name() -> &'static str {
    match rlhf_ops::precision::matmul_precision() {
        rlhf_ops::precision::MatmulPrecision::Bf16 => "f32+bf16-matmul",
        rlhf_ops::precision::MatmulPrecision::Highest => "f32",
    }
}

pub fn run(a: Args) -> anyhow::Result<()> {
    if a.bf16 {
        rlhf_ops::precision::set_matmul_precision(rlhf_ops::precision::MatmulPrecision::Bf16);
    }
    match a.workload {
        Workload::Gemm => gemm(a.steps.unwrap_or(10)),
        Workload::GenerateSmall => generate("generate-small", ModelConfig::gpt2_small(), 16, 1, a.steps.unwrap_or(5)),
        Workload::GenerateSmollm => generate("generate-smollm", smollm_shape()?, 16, 1, a.steps.unwrap_or(3)),
        Workload::GenerateQwen05b => generate("generate-qwen-0.5b", qwen05b_shape()?, 8, 1, a.steps.unwrap_or(2)),
        Workload::RewardSmollm => reward("reward-smollm", smollm_shape()?, false, 1, a.steps.unwrap_or(3)),
        Workload::RewardQwen05bLora => reward("reward-qwen-0.5b-lora", qwen05b_shape()?, true, 1, a.steps.unwrap_or(2)),
        Workload::PpoQwen05bLora => ppo(
            "ppo-qwen-0.5b-lora",
            qwen05b_shape()?,
            Adapt::Lora,
            a.steps.unwrap_or(1),
        ),
        Workload::DpoSmall => crate::bench_dpo::dpo("dpo-small", smollm_shape()?, 1, a.steps.unwrap_or(3)),
        Workload::GrpoSmall => grpo::grpo("grpo-small", false, a.steps.unwrap_or(2)),
        Workload::GrpoSmallLora => grpo::grpo("grpo-small-lora", true, a.steps.unwrap_or(2)),
        Workload::PpoTiny => ppo("ppo-tiny", ModelConfig::gpt2_tiny(), Adapt::Full, a.steps.unwrap_or(5)),
        Workload::PpoSmall => ppo(
            "ppo-small",
            ModelConfig::gpt2_small(),
            Adapt::Full,
            a.steps.unwrap_or(3),
        ),
        Workload::PpoTinyLora => ppo(
            "ppo-tiny-lora",
            ModelConfig::gpt2_tiny(),
            Adapt::Lora,
            a.steps.unwrap_or(5),
        ),
        Workload::PpoSmallLoraInt8 => ppo(
            "ppo-small-lora-int8",
            ModelConfig::gpt2_small(),
            Adapt::LoraInt8,
            a.steps.unwrap_or(3),
        ),
        Workload::RewardTiny => {
            ranked(|| reward("reward-tiny", ModelConfig::gpt2_tiny(), false, 3, a.steps.unwrap_or(20)))
        }
        Workload::RewardSmall => ranked(|| {
            reward(
                "reward-small",
                ModelConfig::gpt2_small(),
                false,
                2,
                a.steps.unwrap_or(5),
            )
        }),
    }
}

/// Runs a workload as this process's rank of the MPI job it was launched in (alone when it
/// was not): the reward workloads then split their 8 pairs across ranks and sum gradients
/// (`docs/scaling.md`, benchmark). An error on one rank ends the job.
fn ranked(run: impl FnOnce() -> anyhow::Result<()>) -> anyhow::Result<()> {
    let session = rlhf_train::dist::start()?;
    let out = run();
    if let Err(e) = &out {
        if rlhf_train::dist::world().size() > 1 {
            eprintln!("error on rank {}: {e:#}", rlhf_train::dist::world().rank());
            session.abort(1);
        }
    }
    out
}

/// Median, min and max of step times.
pub(crate) fn stats(mut times: Vec<f64>) -> (f64, f64, f64) {
    times.sort_by(f64::total_cmp);
    let n = times.len();
    let median = if n % 2 == 1 {
        times[n / 2]
    } else {
        0.5 * (times[n / 2 - 1] + times[n / 2])
    };
    (median, times[0], times[n - 1])
}

/// Peak resident set size of this process in MiB (`VmHWM`).
pub fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|kb| kb.parse::<f64>().ok()))
        })
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

pub(crate) fn threads() -> usize {
    candle_core::utils::get_num_threads()
}

pub(crate) fn time_steps(
    warmup: usize,
    steps: usize,
    mut f: impl FnMut() -> anyhow::Result<()>,
) -> anyhow::Result<Vec<f64>> {
    for _ in 0..warmup {
        f()?;
    }
    let mut times = Vec::with_capacity(steps);
    for _ in 0..steps.max(1) {
        let t0 = Instant::now();
        f()?;
        times.push(t0.elapsed().as_secs_f64());
    }
    Ok(times)
}

/// The kernel behind the bf16 rows: the one training uses for mixed precision.
fn bf16_kernel() -> &'static str {
    match rlhf_ops::bf16::has_bf16_dot() {
        true => "rlhf_ops::bf16::matmul: f32 in, operands rounded to bf16, AVX512-BF16 vdpbf16ps, f32 sums",
        false => "rlhf_ops::bf16::matmul fallback: f32 in, operands rounded to bf16, candle f32 matmul",
    }
}

fn gemm(steps: usize) -> anyhow::Result<()> {
    let mut results = Vec::new();
    let mut rng = RngStream::new(0);
    for (m, k, n) in [(1024usize, 1024usize, 1024usize), (4096, 768, 768)] {
        let a = Tensor::from_vec(rng.uniform_vec(m * k), (m, k), &Device::Cpu)?;
        let b = Tensor::from_vec(rng.uniform_vec(k * n), (k, n), &Device::Cpu)?;
        for dtype in [DType::F32, DType::BF16] {
            let kernel = match dtype {
                DType::BF16 => bf16_kernel(),
                _ => "candle matmul, f32",
            };
            let times = time_steps(3, steps, || {
                match dtype {
                    DType::BF16 => rlhf_ops::bf16::matmul(&a, &b)?,
                    _ => a.matmul(&b)?,
                };
                Ok(())
            })?;
            let (median, min, max) = stats(times);
            let gflops = 2.0 * (m * k * n) as f64 / median / 1e9;
            let line = json!({"shape": format!("{m}x{k}x{n}"), "dtype": format!("{dtype:?}").to_lowercase(),
                "kernel": kernel, "seconds": median, "min": min, "max": max, "gflops": gflops});
            println!("{line}");
            results.push(line);
        }
    }
    let best = |dtype: &str| {
        results
            .iter()
            .filter(|r| r["dtype"] == dtype)
            .map(|r| r["gflops"].as_f64().unwrap_or(0.0))
            .fold(0.0, f64::max)
    };
    let (best_f32, best_bf16) = (best("f32"), best("bf16"));
    let first = &results[0];
    println!(
        "{}",
        json!({"workload": "gemm", "seconds_per_step": first["seconds"], "min": first["min"], "max": first["max"],
            "throughput": best_f32, "unit": "GFLOP/s (best f32)", "bf16_throughput": best_bf16,
            "peak_rss_mib": peak_rss_mib(), "threads": threads(), "dtype": "f32+bf16", "results": results})
    );
    Ok(())
}

/// `batch` prompts of `ppo_prompts.jsonl` (left-padded on the composed path), exactly 64
/// sampled tokens each (temperature 1, top_k 0, top_p 1, EOS never stops), KV cache.
fn generate(name: &str, cfg: ModelConfig, batch: usize, warmup: usize, steps: usize) -> anyhow::Result<()> {
    let tok = rlhf_train::assets::gpt2_tokenizer()?;
    let prompts: Vec<Vec<u32>> = rlhf_train::assets::ppo_prompts()
        .iter()
        .take(batch)
        .map(|p| tok.encode(p))
        .collect::<Result<_, _>>()?;
    let model = Model::random(cfg, 0, DType::F32, &Device::Cpu)?;
    let cfg = GenerationConfig {
        max_new_tokens: 64,
        eos_token_id: vec![],
        ..Default::default()
    };
    let mut rng = RngStream::new(0);
    let mut tokens = 0;
    let times = time_steps(warmup, steps, || {
        let out = model.generate(&prompts, &cfg, &mut rng)?;
        tokens = out.response_ids.iter().map(Vec::len).sum::<usize>();
        Ok(())
    })?;
    let (median, min, max) = stats(times);
    println!(
        "{}",
        json!({"workload": name, "seconds_per_step": median, "min": min, "max": max,
            "throughput": tokens as f64 / median, "unit": "tokens/s", "peak_rss_mib": peak_rss_mib(),
            "threads": threads(), "dtype": dtype_name(), "batch": prompts.len(), "new_tokens": 64})
    );
    Ok(())
}

/// A reward-model training step as `RewardTrainer` runs it: 8 pairs in file order,
/// tokenised with EOS, dropped if longer than 128; forward over [chosen; rejected],
/// Bradley–Terry loss, backward, AdamW (lr 5e-4), dropout 0.1 as the config says.
fn reward(name: &str, cfg: ModelConfig, lora: bool, warmup: usize, steps: usize) -> anyhow::Result<()> {
    use rlhf_models::Fwd;
    use rlhf_train::optim::{AdamConfig, AdamW, Grads};
    use rlhf_train::reward::{pair_loss, Pair};
    let mut model = Model::random(cfg, 0, DType::F32, &Device::Cpu)?;
    model.set_tokenizer(rlhf_train::assets::gpt2_tokenizer()?);
    model.ensure_score_head(0)?;
    if lora {
        let peft = rlhf_train::peft_args::PeftArgs {
            use_peft: true,
            ..Default::default()
        };
        if let Some(counts) = peft.apply(&mut model, "SEQ_CLS", 0)? {
            eprintln!("{counts}");
        }
    } else {
        model.set_trainable(true)?;
    }
    let tok = model.tokenizer()?.clone();
    let enc = |p: &str, r: &str| -> anyhow::Result<Vec<u32>> {
        let mut ids = tok.encode(&format!("{p}{r}"))?;
        ids.push(tok.eos_token_id);
        Ok(ids)
    };
    let mut pairs = Vec::new();
    for (p, c, r) in rlhf_train::assets::prefs_train() {
        let (chosen, rejected) = (enc(&p, &c)?, enc(&p, &r)?);
        if chosen.len() <= 128 && rejected.len() <= 128 {
            pairs.push(Pair {
                chosen,
                rejected,
                margin: None,
            });
        }
    }
    let params = rlhf_train::trainer::trainable_params(&model);
    let mut opt = AdamW::new(params, AdamConfig::default());
    let vars: Vec<_> = opt.vars().into_iter().cloned().collect();
    let dist = rlhf_train::dist::world();
    let sizes: Vec<usize> = vars.iter().map(|v| v.elem_count()).collect();
    let mine = rlhf_train::dist::split(8, dist.rank(), dist.size());
    let mut step = 0usize;
    let mut tokens = 0usize;
    let before = rlhf_train::dist::grad_traffic();
    let times = time_steps(warmup, steps, || {
        // With several ranks each takes its part of the 8 pairs (loss weighted by its share).
        let batch: Vec<&Pair> = mine.clone().map(|k| &pairs[(step * 8 + k) % pairs.len()]).collect();
        let pairs_now: Vec<usize> = mine.clone().map(|k| step * 8 + k).collect();
        let ids = rlhf_train::trainer::pair_sequence_ids(&pairs_now);
        let mut keys = rlhf_ops::dropout::DropoutKeys::new(step as u64, ids);
        step += 1;
        tokens = batch.iter().map(|p| p.chosen.len() + p.rejected.len()).sum();
        let sink = rlhf_ops::sink::GradSink::new();
        let out = pair_loss(&model, &batch, None, &mut Fwd::train(&mut keys).with_sink(&sink))?;
        let mut grads = Grads::new(vars.len());
        let var_refs: Vec<_> = vars.iter().collect();
        grads.add(&var_refs, &(&out.loss / (8.0 / batch.len() as f64))?.backward()?)?;
        grads.add_sink(&var_refs, sink.take())?;
        dist.all_reduce_grads(&mut grads, &sizes)?;
        grads.clip(1.0);
        opt.step(&grads, 5e-4)?;
        Ok(())
    })?;
    let traffic = rlhf_train::dist::grad_traffic();
    let calls = (traffic.calls - before.calls).max(1) as f64;
    let (median, min, max) = stats(times);
    if !dist.is_main() {
        return Ok(());
    }
    println!(
        "{}",
        json!({"workload": name, "seconds_per_step": median, "min": min, "max": max,
            "throughput": 8.0 / median, "unit": "pairs/s", "peak_rss_mib": peak_rss_mib(),
            "threads": threads(), "dtype": dtype_name(), "tokens_last_step": tokens, "ranks": dist.size(),
            "allreduce_seconds_per_step": (traffic.seconds - before.seconds) / calls,
            "allreduce_bytes_per_step": (traffic.bytes - before.bytes) as f64 / calls})
    );
    Ok(())
}

/// A PPO step as `WORKLOADS.md` defines it: 16 queries, exactly 32 sampled tokens each
/// (top_k 0, top_p 1, no EOS stop), scored by a tiny reward model, then `step()` with 4
/// epochs × 4 minibatches of 4, Adam lr 1.41e-5, a frozen copy as reference.
/// How the PPO policy is trained.
#[derive(Clone, Copy, PartialEq)]
enum Adapt {
    /// Every weight, and a frozen copy as reference.
    Full,
    /// LoRA adapters; reference = adapters disabled.
    Lora,
    /// LoRA adapters over an int8 base.
    LoraInt8,
}

fn ppo(name: &str, cfg: ModelConfig, adapt: Adapt, steps: usize) -> anyhow::Result<()> {
    use rlhf_train::peft_args::PeftArgs;
    use rlhf_train::ppo::PpoTrainer;
    use rlhf_train::ppo_config::PpoConfig;
    let tok = rlhf_train::assets::gpt2_tokenizer()?;
    let mut policy = Model::random(cfg, 0, DType::F32, &Device::Cpu)?;
    policy.set_tokenizer(tok.clone());
    let reference = if adapt == Adapt::Full {
        let r = policy.clone();
        policy.set_trainable(true)?;
        Some(r)
    } else {
        let mut peft = PeftArgs {
            use_peft: true,
            lora_r: 32,
            lora_alpha: 32.0,
            lora_dropout: 0.1,
            lora_bias: "lora_only".into(),
            ..PeftArgs::default()
        };
        peft.quant.load_in_8bit = adapt == Adapt::LoraInt8;
        if let Some(counts) = peft.apply(&mut policy, "CAUSAL_LM", 0)? {
            eprintln!("{counts}");
        }
        None
    };
    let mut rm = Model::random(ModelConfig::gpt2_tiny(), 1, DType::F32, &Device::Cpu)?;
    rm.set_tokenizer(tok.clone());
    rm.ensure_score_head(1)?;
    let ppo_cfg = PpoConfig {
        batch_size: 16,
        mini_batch_size: 4,
        ppo_epochs: 4,
        ..Default::default()
    };
    let (mut trainer, _) = PpoTrainer::new(ppo_cfg, policy, reference)?;
    let prompts: Vec<rlhf_train::ppo_run::Query> = rlhf_train::assets::ppo_prompts()
        .into_iter()
        .map(|p| tok.encode(&p).map(|ids| rlhf_train::ppo_run::Query::text(p, ids)))
        .collect::<Result<_, _>>()?;
    let gen = GenerationConfig {
        max_new_tokens: 32,
        eos_token_id: vec![],
        ..Default::default()
    };
    let mut rng = RngStream::new(0);
    let mut k = 0usize;
    let mut phases: Vec<[f64; 3]> = Vec::new();
    let mut ppo_times: Vec<serde_json::Map<String, serde_json::Value>> = Vec::new();
    let times = time_steps(1, steps, || {
        let batch: Vec<&rlhf_train::ppo_run::Query> = (0..16).map(|i| &prompts[(k * 16 + i) % prompts.len()]).collect();
        k += 1;
        let queries: Vec<Vec<u32>> = batch.iter().map(|q| q.ids.clone()).collect();
        let t0 = Instant::now();
        let responses = trainer.generate(&queries, &gen, None, 16, &mut rng)?;
        let t1 = Instant::now();
        let texts: Vec<String> = responses
            .iter()
            .map(|r| tok.decode(r, true))
            .collect::<Result<_, _>>()?;
        let scores = rlhf_train::ppo_run::score_texts(&rm, &batch, &texts, 16)?;
        let t2 = Instant::now();
        let stats = trainer.step(&queries, &responses, &scores)?;
        phases.push([
            (t1 - t0).as_secs_f64(),
            (t2 - t1).as_secs_f64(),
            t2.elapsed().as_secs_f64(),
        ]);
        ppo_times.push(
            stats
                .scalars
                .iter()
                .filter(|(k, _)| k.starts_with("time/"))
                .map(|(k, v)| (k.clone(), json!(v)))
                .collect(),
        );
        Ok(())
    })?;
    let (median, min, max) = stats(times);
    let timed = &phases[1..];
    let med = |i: usize| stats(timed.iter().map(|p| p[i]).collect()).0;
    println!(
        "{}",
        json!({"workload": name, "seconds_per_step": median, "min": min, "max": max,
            "throughput": 16.0 / median, "unit": "samples/s", "peak_rss_mib": peak_rss_mib(),
            "threads": threads(), "dtype": dtype_name(),
            "generate_s": med(0), "score_s": med(1), "step_s": med(2),
            "last_step_times": ppo_times.last()})
    );
    Ok(())
}
