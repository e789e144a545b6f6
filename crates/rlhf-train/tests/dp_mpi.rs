//! Data-parallel invariants over MPI: two ranks at per-rank batch `b` train the same model
//! as one process at batch `2b` (weights within 1e-5 relative, ranks identical), for the
//! reward, SFT, DPO, GRPO, RLOO and PPO trainers (sampling included for GRPO and RLOO); a rank killed with SIGKILL leaves the last checkpoint
//! loadable, and resuming gives the uninterrupted run's result.
//!
//! The ranks are `examples/dp_check.rs`, built here with `--features mpi` (the default
//! build needs no MPI) and launched by `mpirun -np 2` over TCP on loopback, one rayon thread
//! per rank. Without `mpirun` on PATH the tests say so and pass, except under CI (`CI` set),
//! whose `.ci/run` installs Open MPI.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

/// One MPI job at a time: two ranks already fill two cores.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn fixture(p: &str) -> String {
    workspace().join(p).display().to_string()
}

fn on_path(name: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// The check binary, built once per test run; `None` (after saying why) when MPI is absent.
fn dp_check() -> Option<PathBuf> {
    static BIN: OnceLock<Option<PathBuf>> = OnceLock::new();
    BIN.get_or_init(|| {
        if on_path("mpirun").is_none() {
            assert!(
                std::env::var_os("CI").is_none(),
                "mpirun not found under CI: .ci/run installs openmpi-bin libopenmpi-dev libclang-dev"
            );
            eprintln!(
                "SKIPPED: mpirun not found; the MPI tests need Open MPI or MPICH and libclang \
                 (Debian: apt-get install openmpi-bin libopenmpi-dev libclang-dev)"
            );
            return None;
        }
        // target/<profile>/deps/<this test> → target
        let exe = std::env::current_exe().expect("test executable path");
        let target = exe.ancestors().nth(3).expect("target directory").to_path_buf();
        let out = Command::new(env!("CARGO"))
            .current_dir(workspace())
            .args([
                "build",
                "--release",
                "-p",
                "rlhf-train",
                "--features",
                "mpi",
                "--example",
                "dp_check",
            ])
            .arg("--target-dir")
            .arg(&target)
            .output()
            .expect("running cargo");
        assert!(
            out.status.success(),
            "building dp_check with --features mpi failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        Some(target.join("release/examples/dp_check"))
    })
    .clone()
}

/// The environment of every rank: run as root, one thread, TCP over loopback (what a
/// multi-node job uses), no ssh needed on one machine.
fn mpi_env(cmd: &mut Command) -> &mut Command {
    cmd.env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .env("OMPI_MCA_rmaps_base_oversubscribe", "1")
        .env("OMPI_MCA_mpi_yield_when_idle", "1")
        .env("OMPI_MCA_btl", "self,tcp")
        .env("OMPI_MCA_btl_tcp_if_include", "lo")
        .env("OMPI_MCA_plm_rsh_agent", "false")
        .env("RAYON_NUM_THREADS", "1")
        .env("CANDLE_NUM_THREADS", "1")
        .env_remove("RLHF_DIST")
}

/// Runs `dp_check MODE OUT flags` on `ranks` ranks (1: alone, no mpirun).
fn launch(bin: &Path, ranks: usize, mode: &str, out: &Path, flags: &[String]) -> Command {
    let mut cmd = if ranks == 1 {
        Command::new(bin)
    } else {
        let mut c = Command::new("mpirun");
        c.args(["-np", &ranks.to_string()]).arg(bin);
        c
    };
    mpi_env(&mut cmd).arg(mode).arg(out).args(flags);
    cmd
}

fn run(bin: &Path, ranks: usize, mode: &str, out: &Path, flags: &[String]) -> Output {
    let o = launch(bin, ranks, mode, out, flags)
        .output()
        .expect("launching dp_check");
    assert!(
        o.status.success(),
        "{mode} on {ranks} rank(s) failed:\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

fn flags(pairs: &[(&str, String)]) -> Vec<String> {
    pairs.iter().flat_map(|(k, v)| [format!("--{k}"), v.clone()]).collect()
}

fn weights(path: &Path) -> BTreeMap<String, Vec<f32>> {
    tensors(path, false)
}

/// The f32 tensors of a safetensors file, flattened (`only_1d`: vectors only, the tensors
/// whose layout a checkpoint keeps as it is).
fn tensors(path: &Path, only_1d: bool) -> BTreeMap<String, Vec<f32>> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .filter(|(_, v)| !only_1d || v.shape().len() == 1)
        .map(|(n, v)| {
            let x = v
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]));
            (n, x.collect())
        })
        .collect()
}

fn digest(out: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(out.join("digest.json")).unwrap()).unwrap()
}

/// The largest element-wise difference of two parameter sets relative to the weight,
/// `max |a − b| / (1 + |b|)` over the tensors they share (all of them for two runs of one
/// model). The `1 +` keeps weights near zero (which Adam moves by `lr` whatever the size of
/// their gradient, rounding noise included) from dominating.
fn compare(a: &BTreeMap<String, Vec<f32>>, b: &BTreeMap<String, Vec<f32>>) -> f64 {
    let mut worst: f64 = 0.0;
    for (name, x) in a {
        let Some(y) = b.get(name) else { continue };
        assert_eq!(x.len(), y.len(), "{name}");
        for (p, q) in x.iter().zip(y) {
            worst = worst.max((*p as f64 - *q as f64).abs() / (1.0 + (*q as f64).abs()));
        }
    }
    worst
}

/// Two ranks at per-rank batch sizes `batches` (flag, size) against one at twice each, same
/// everything else: weights within 1e-5 relative, ranks identical, and a real update.
fn two_ranks_equal_one(mode: &str, batches: &[(&str, usize)], common: &[(&str, String)]) {
    let model = common.iter().find(|(k, _)| *k == "model_name_or_path").map(|(_, v)| v);
    let init = &Path::new(model.expect("model_name_or_path")).join("model.safetensors");
    let Some(bin) = dp_check() else { return };
    let _one_at_a_time = serial();
    let dir = tempfile::tempdir().unwrap();
    let mut digests = Vec::new();
    for ranks in [1, 2] {
        let out = dir.path().join(format!("ranks-{ranks}"));
        let mut f: Vec<(&str, String)> = common.to_vec();
        f.extend(batches.iter().map(|&(k, b)| (k, (b * 2 / ranks).to_string())));
        f.push(("output_dir", out.join("run").display().to_string()));
        run(&bin, ranks, mode, &out, &flags(&f));
        digests.push((weights(&out.join("weights.safetensors")), digest(&out)));
    }
    let (one, two) = (&digests[0], &digests[1]);
    assert_eq!(two.1["ranks"], 2);
    assert_eq!(
        two.1["spread"].as_f64().unwrap(),
        0.0,
        "{mode}: the two ranks hold different weights"
    );
    assert_eq!(one.0.keys().collect::<Vec<_>>(), two.0.keys().collect::<Vec<_>>());
    let rel = compare(&two.0, &one.0);
    assert!(
        rel <= 1e-5,
        "{mode}: 2 ranks vs 1 at twice the batch ({batches:?}): relative difference {rel:e}"
    );
    // Not vacuous: training moved the weights far more than the tolerance and than the
    // ranks differ (measured on the vectors, which the fixture stores as they are trained).
    let moved = compare(&tensors(init, true), &one.0);
    assert!(
        moved >= 100.0 * 1e-5 && moved >= 100.0 * rel,
        "{mode}: the update ({moved:e}) is too small against the tolerance and the difference ({rel:e})"
    );
    eprintln!("{mode}: 2 ranks vs 1: largest difference {rel:e}; largest update {moved:e}");
    // PPO: every statistic of the last step is global too.
    for (key, x) in one.1["stats"].as_object().into_iter().flatten() {
        if let (Some(x), Some(y)) = (x.as_f64(), two.1["stats"][key].as_f64()) {
            assert!(
                (x - y).abs() <= 1e-5 * (1.0 + x.abs()),
                "{mode}: {key} {x} (1 rank) vs {y} (2 ranks)"
            );
        }
    }
}

/// A preference file of `n` rows from the fixture (an odd size leaves a short last batch).
fn prefs(dir: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(fixture("fixtures/data/prefs_train.jsonl")).unwrap();
    let p = dir.join(format!("prefs-{n}.jsonl"));
    std::fs::write(&p, text.lines().take(n).collect::<Vec<_>>().join("\n")).unwrap();
    p.display().to_string()
}

fn train_common(data: String, extra: &[(&'static str, &str)]) -> Vec<(&'static str, String)> {
    let mut f = vec![
        ("model_name_or_path", fixture("fixtures/tiny-gpt2")),
        ("train_file", data),
        ("max_steps", "3".into()),
        ("learning_rate", "1e-3".into()),
        ("max_length", "64".into()),
        ("disable_dropout", "true".into()),
        ("save_strategy", "no".into()),
        ("logging_steps", "1".into()),
        ("quiet", "true".into()),
    ];
    f.retain(|(k, _)| !extra.iter().any(|(e, _)| e == k));
    f.extend(extra.iter().map(|(k, v)| (*k, v.to_string())));
    f
}

#[test]
fn reward_on_two_ranks_equals_one_rank_at_twice_the_batch() {
    let dir = tempfile::tempdir().unwrap();
    // 13 pairs, global micro-batches of 4: the last step of each epoch has a micro-batch of
    // 1 (one rank empty); gradient accumulation 2; clipping at a norm the gradients exceed;
    // tiny GPT-2's dropout (0.1 on embeddings, attention and residuals) on: masks are keyed
    // by pair, so the ranks drop what one process drops.
    let common = train_common(
        prefs(dir.path(), 13),
        &[
            ("gradient_accumulation_steps", "2"),
            ("max_grad_norm", "0.05"),
            ("disable_dropout", "false"),
        ],
    );
    two_ranks_equal_one("reward", &[("per_device_train_batch_size", 2)], &common);
}

#[test]
fn dpo_on_two_ranks_equals_one_rank_at_twice_the_batch() {
    let dir = tempfile::tempdir().unwrap();
    // 13 pairs, global micro-batches of 4 (a last micro-batch of 1: one rank empty),
    // gradient accumulation 2, the frozen reference copy on every rank. Adam's epsilon at
    // 1e-4: entries whose gradient is rounding noise (the summed log-probs are ~300 nats, so
    // packing 4 rows instead of 8 changes them in the 7th digit) move in proportion to it
    // instead of by ±lr.
    let common = train_common(
        prefs(dir.path(), 13),
        &[
            ("gradient_accumulation_steps", "2"),
            ("adam_epsilon", "1e-4"),
            ("disable_dropout", "false"),
        ],
    );
    two_ranks_equal_one("dpo", &[("per_device_train_batch_size", 2)], &common);
}

#[test]
fn sft_on_two_ranks_equals_one_rank_at_twice_the_batch() {
    let dir = tempfile::tempdir().unwrap();
    // prompt + completion rows from the preference fixture.
    let text = std::fs::read_to_string(fixture("fixtures/data/prefs_train.jsonl")).unwrap();
    let rows: Vec<String> = text
        .lines()
        .take(11)
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            serde_json::json!({"prompt": v["prompt"], "completion": v["chosen"]}).to_string()
        })
        .collect();
    let p = dir.path().join("sft.jsonl");
    std::fs::write(&p, rows.join("\n")).unwrap();
    let common = train_common(
        p.display().to_string(),
        &[
            ("gradient_accumulation_steps", "2"),
            ("max_grad_norm", "0.5"),
            ("disable_dropout", "false"),
        ],
    );
    two_ranks_equal_one("sft", &[("per_device_train_batch_size", 2)], &common);
}

/// Distinct prompts of the PPO prompt fixture, `n` of them, as a `prompt` file.
fn prompts(dir: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(fixture("fixtures/data/ppo_prompts.jsonl")).unwrap();
    let mut seen = std::collections::BTreeSet::new();
    let rows: Vec<&str> = text.lines().filter(|l| seen.insert(*l)).take(n).collect();
    assert_eq!(rows.len(), n);
    let p = dir.join(format!("prompts-{n}.jsonl"));
    std::fs::write(&p, rows.join("\n")).unwrap();
    p.display().to_string()
}

/// A sampled online run: 3 prompts × 4 completions per generation batch over the ranks,
/// so the groups split unevenly (one rank samples 1 prompt, the other 2) and every
/// statistic of the group and of the batch needs the other rank's completions. Adam's
/// epsilon at 1e-4 as for DPO: the two runs agree on the loss to ~1e-7 relative, and entries
/// whose gradient is that rounding noise would otherwise move by ±lr.
fn online_common(data: String, extra: &[(&'static str, &str)]) -> Vec<(&'static str, String)> {
    let mut f = train_common(data, &[("num_generations", "4"), ("max_completion_length", "8")]);
    f.retain(|(k, _)| *k != "max_length");
    f.extend([
        ("temperature", "1.0".to_string()),
        ("reward_funcs", "regex_match".to_string()),
        ("reward_regex", "[0-9]".to_string()),
        ("learning_rate", "2e-3".to_string()),
        ("steps_per_generation", "2".to_string()),
        ("adam_epsilon", "1e-4".to_string()),
    ]);
    f.retain(|(k, _)| !extra.iter().any(|(e, _)| e == k));
    f.extend(extra.iter().map(|(k, v)| (*k, v.to_string())));
    f
}

#[test]
fn grpo_on_two_ranks_equals_one_rank_at_twice_the_batch() {
    let dir = tempfile::tempdir().unwrap();
    // Generation batches of 12 completions (6 per micro-batch × steps_per_generation 2) served
    // twice (num_iterations 2: old log-probs and clipping), a reference (beta > 0, split
    // no-grad passes), bnpo (a token mean re-weighted across ranks), gradient clipping, and
    // dropout on (TRL's GRPO default), keyed by completion.
    let common = online_common(
        prompts(dir.path(), 9),
        &[
            ("num_iterations", "2"),
            ("beta", "0.04"),
            ("loss_type", "bnpo"),
            ("max_grad_norm", "0.5"),
            ("gradient_accumulation_steps", "2"),
            ("disable_dropout", "false"),
        ],
    );
    two_ranks_equal_one("grpo", &[("per_device_train_batch_size", 3)], &common);
}

#[test]
fn rloo_on_two_ranks_equals_one_rank_at_twice_the_batch() {
    let dir = tempfile::tempdir().unwrap();
    let common = online_common(prompts(dir.path(), 9), &[("beta", "0.05")]);
    two_ranks_equal_one("rloo", &[("per_device_train_batch_size", 3)], &common);
}

#[test]
fn ppo_on_two_ranks_equals_one_rank_at_twice_the_batch() {
    // Fixed rollouts: whitening, score scaling, the adaptive KL controller and the ratio
    // threshold all see the global batch; minibatches of 2 per rank, accumulation 2.
    let common = vec![
        ("model_name_or_path", fixture("fixtures/tiny-gpt2")),
        ("gradient_accumulation_steps", "2".to_string()),
        ("steps", "2".to_string()),
    ];
    two_ranks_equal_one("ppo-fixed", &[("batch_size", 4), ("mini_batch_size", 2)], &common);
}

#[test]
fn sampled_ppo_on_two_ranks_equals_one_rank_at_twice_the_batch() {
    // The whole `rlhf ppo` loop with sampling: each response comes from the stream of its
    // index in the step's global batch, so the ranks sample what one process samples. A
    // Llama-family policy: GPT-2's key biases have an exactly zero gradient (softmax is
    // shift-invariant), which Adam turns into moves of the size of their rounding noise.
    // The value head's dropout on (TRL's `summary_dropout_prob`, 0.1), keyed by response.
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy");
    std::fs::create_dir_all(&policy).unwrap();
    for e in std::fs::read_dir(workspace().join("fixtures/families/tiny-llama")).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), policy.join(e.file_name())).unwrap();
    }
    let cfg_path = policy.join("config.json");
    let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["summary_dropout_prob"] = serde_json::json!(0.1);
    cfg["attention_dropout"] = serde_json::json!(0.1);
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let common = vec![
        ("model_name_or_path", policy.display().to_string()),
        ("reward_model_path", fixture("fixtures/families/tiny-llama-seqcls")),
        ("train_file", fixture("fixtures/data/ppo_prompts.jsonl")),
        ("max_new_tokens", "6".to_string()),
        ("learning_rate", "1e-3".to_string()),
        ("gradient_accumulation_steps", "2".to_string()),
        ("save_steps", "0".to_string()),
        ("log_samples", "0".to_string()),
        ("quiet", "true".to_string()),
    ];
    two_ranks_equal_one(
        "ppo-run",
        &[("batch_size", 4), ("mini_batch_size", 2), ("steps", 8)],
        &common,
    );
}

#[test]
fn a_rank_killed_mid_run_leaves_a_loadable_checkpoint_and_resuming_finishes_the_run() {
    let Some(bin) = dp_check() else { return };
    let _one_at_a_time = serial();
    let dir = tempfile::tempdir().unwrap();
    let data = prefs(dir.path(), 40);
    let common = |out: &Path| {
        let mut f = train_common(data.clone(), &[]);
        f.retain(|(k, _)| *k != "save_strategy" && *k != "max_steps");
        f.extend([
            ("max_steps", "12".to_string()),
            ("save_strategy", "steps".to_string()),
            ("save_steps", "2".to_string()),
            ("save_total_limit", "2".to_string()),
            ("per_device_train_batch_size", "2".to_string()),
            ("output_dir", out.join("run").display().to_string()),
        ]);
        f
    };
    // The uninterrupted run.
    let full = dir.path().join("full");
    run(&bin, 2, "reward", &full, &flags(&common(&full)));

    // The same run, rank 1 killed once a few checkpoints exist.
    let cut = dir.path().join("cut");
    let mut job = launch(&bin, 2, "reward", &cut, &flags(&common(&cut))).spawn().unwrap();
    let t = Instant::now();
    while !cut.join("run/checkpoint-4").exists() {
        assert!(t.elapsed() < Duration::from_secs(120), "no checkpoint-4 after 120 s");
        if let Some(st) = job.try_wait().unwrap() {
            panic!("the run ended ({st}) before it could be killed");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let pid = std::fs::read_to_string(cut.join("pid-1")).unwrap();
    let killed = Command::new("kill").args(["-KILL", pid.trim()]).status().unwrap();
    assert!(killed.success());
    let status = job.wait().unwrap();
    assert!(!status.success(), "the job survived the loss of a rank");
    assert!(
        !cut.join("run/final").exists(),
        "the run finished before the kill; lengthen it"
    );

    // Every complete checkpoint loads; the latest is what resuming continues.
    let ckpts: Vec<PathBuf> = std::fs::read_dir(cut.join("run"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with("checkpoint-"))
        .collect();
    assert!(!ckpts.is_empty());
    for c in &ckpts {
        let state: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(c.join("trainer_state.json")).unwrap()).unwrap();
        assert_eq!(state["world_size"], 2, "{}", c.display());
        assert!(!weights(&c.join("model.safetensors")).is_empty());
        assert!(!weights(&c.join("optimizer.safetensors")).is_empty());
    }

    // A different number of ranks is refused, naming the right one.
    let mut alone = flags(&common(&cut));
    alone.extend(["--resume-from-checkpoint".to_string(), "latest".to_string()]);
    let o = launch(&bin, 1, "reward", &dir.path().join("alone"), &alone)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("2 ranks") && err.contains("mpirun -np 2"),
        "{err}"
    );

    // Resuming on two ranks ends where the uninterrupted run ended, and leaves no temporary
    // directory behind.
    run(&bin, 2, "reward", &cut, &alone);
    let rel = compare(
        &weights(&cut.join("weights.safetensors")),
        &weights(&full.join("weights.safetensors")),
    );
    assert!(rel <= 1e-6, "resumed run differs from the uninterrupted one by {rel:e}");
    let leftovers: Vec<_> = std::fs::read_dir(cut.join("run"))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}
