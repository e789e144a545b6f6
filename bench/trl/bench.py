#!/usr/bin/env python
"""Python reference for rlhf's Llama-family and TRL 1.16 benchmark workloads
(`rlhf bench generate-smollm|generate-qwen-0.5b|reward-smollm|grpo-small|grpo-small-lora|dpo-small`,
described in docs/performance.md): transformers `generate` and the real TRL 1.16 trainers
(RewardTrainer, GRPOTrainer, DPOTrainer), CPU, float32, 2 threads.

Each subcommand prints one JSON line last:
  {"workload", "seconds_per_step" (median of the timed steps), "min", "max", "throughput",
   "unit", "peak_rss_mib", "threads", "dtype", ...}

Usage:  python bench.py WORKLOAD [--steps N] [--warmup N] [--layers N] [--threads N]
WORKLOAD: generate-smollm generate-qwen-0.5b reward-smollm grpo-small grpo-small-lora dpo-small

Models are random-initialised from the workloads' shapes with torch.manual_seed(0).
--layers shrinks the model (validation only; timings must use the full shape).
"""

import argparse
import os
import sys

# Thread counts must be fixed before torch (and its OpenMP runtime) is loaded.
_pre = argparse.ArgumentParser(add_help=False)
_pre.add_argument("--threads", type=int, default=2)
_THREADS = _pre.parse_known_args()[0].threads
for _v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[_v] = str(_THREADS)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("WANDB_DISABLED", "true")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")  # CPU only, even on a machine with a GPU

import copy
import json
import resource
import statistics
import tempfile
import time
import warnings

import torch

torch.set_num_threads(_THREADS)
try:
    torch.set_num_interop_threads(1)
except RuntimeError:
    pass

import datasets
import transformers
from transformers import (
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    TrainerCallback,
)

import trl

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURES = os.environ.get("RLHF_FIXTURES", os.path.join(HERE, "..", "..", "fixtures"))
DATA = os.path.join(FIXTURES, "data")
TOKENIZER_JSON = os.path.join(FIXTURES, "tiny-gpt2", "tokenizer.json")
EOS = 50256  # GPT-2 <|endoftext|>: EOS = pad = bos
NEW_TOKENS = 64

# name -> (default warm-up steps, default timed steps), as `rlhf bench` runs them
DEFAULT_STEPS = {
    "generate-smollm": (1, 3),
    "generate-qwen-0.5b": (1, 2),
    "reward-smollm": (1, 3),
    "grpo-small": (1, 2),
    "grpo-small-lora": (1, 2),
    "dpo-small": (1, 3),
}


# --------------------------------------------------------------------------- shapes / assets


def smollm_config(layers=None, **extra):
    """SmolLM2-135M shape (135.2M parameters at 30 layers)."""
    return LlamaConfig(
        vocab_size=50257,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=layers or 30,
        num_attention_heads=9,
        num_key_value_heads=3,
        head_dim=64,
        hidden_act="silu",
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 1e5},
        tie_word_embeddings=True,
        attention_bias=False,
        mlp_bias=False,
        attention_dropout=0.0,
        bos_token_id=EOS,
        eos_token_id=EOS,
        pad_token_id=EOS,
        **extra,
    )


def qwen05b_config(layers=None, **extra):
    """Qwen2.5-0.5B shape (q/k/v biases are part of Qwen2)."""
    return Qwen2Config(
        vocab_size=151936,
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=layers or 24,
        num_attention_heads=14,
        num_key_value_heads=2,
        hidden_act="silu",
        max_position_embeddings=32768,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6},
        tie_word_embeddings=True,
        use_sliding_window=False,
        attention_dropout=0.0,
        bos_token_id=EOS,
        eos_token_id=EOS,
        pad_token_id=EOS,
        **extra,
    )


def build(model_cls, config):
    """Random init from the shape, seed 0, float32, CPU."""
    torch.manual_seed(0)
    model = model_cls(config).to(torch.float32)
    # generate() falls back to model.generation_config: keep it consistent with the tokenizer.
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.bos_token_id = EOS
        model.generation_config.eos_token_id = EOS
        model.generation_config.pad_token_id = EOS
    return model


def n_params(model):
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def tokenizer(padding_side="right"):
    tok = PreTrainedTokenizerFast(
        tokenizer_file=TOKENIZER_JSON,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        model_max_length=1024,
    )
    tok.padding_side = padding_side
    assert tok.eos_token_id == EOS and tok.pad_token_id == EOS, (tok.eos_token_id, tok.pad_token_id)
    return tok


def read_jsonl(name):
    with open(os.path.join(DATA, name), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def prompts(n=None):
    rows = [r["query"] for r in read_jsonl("ppo_prompts.jsonl")]
    return rows if n is None else rows[:n]


def pairs():
    return [{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]} for r in read_jsonl("prefs_train.jsonl")]


# --------------------------------------------------------------------------- timing / report


def peak_rss_mib():
    # Linux: ru_maxrss in KiB (the same figure as VmHWM in /proc/self/status).
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def report(name, times, warmup, per_step_items, unit, **extra):
    timed = times[warmup:]
    if not timed:
        raise SystemExit(f"{name}: no timed steps ({len(times)} steps ran, {warmup} warm-up)")
    med = statistics.median(timed)
    out = {
        "workload": name,
        "seconds_per_step": med,
        "min": min(timed),
        "max": max(timed),
        "throughput": per_step_items / med,
        "unit": unit,
        "peak_rss_mib": peak_rss_mib(),
        "threads": torch.get_num_threads(),
        "dtype": "f32",
    }
    out.update(extra)
    out["warmup_steps"] = warmup
    out["timed_steps"] = len(timed)
    out["all_step_seconds"] = times
    out["versions"] = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "trl": trl.__version__,
        "datasets": datasets.__version__,
    }
    try:
        import peft

        out["versions"]["peft"] = peft.__version__
    except ImportError:
        pass
    sys.stdout.flush()
    sys.stderr.flush()
    print(json.dumps(out), flush=True)


class StepTimer(TrainerCallback):
    """Wall time of each optimizer step: Trainer's on_step_begin .. on_step_end. This covers
    the step's forward/backward (GRPO: also generation, rewards and the reference forward,
    which TRL runs inside training_step), gradient clipping, optimizer.step, the scheduler
    and zero_grad. The batch fetch/collation happens just before on_step_begin."""

    def __init__(self):
        self.times = []
        self._t0 = None

    def on_step_begin(self, args, state, control, **kw):
        self._t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        self.times.append(time.perf_counter() - self._t0)
        print(f"[bench] step {len(self.times)}: {self.times[-1]:.3f} s", file=sys.stderr, flush=True)


def common_args(out_dir, max_steps, batch_size, lr, **extra):
    """TrainingArguments shared by the three trainers: f32 on CPU, no gradient checkpointing,
    no logging/reporting/saving, no dataloader workers."""
    return dict(
        output_dir=out_dir,
        max_steps=max_steps,
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=1,
        learning_rate=lr,
        lr_scheduler_type="constant",
        bf16=False,
        fp16=False,
        use_cpu=True,
        gradient_checkpointing=False,
        report_to="none",
        logging_strategy="no",
        save_strategy="no",
        eval_strategy="no",
        dataloader_num_workers=0,
        dataloader_pin_memory=False,
        disable_tqdm=True,
        **extra,
    )


# --------------------------------------------------------------------------- workloads


def run_generate(name, model_cls, config, batch, warmup, steps):
    tok = tokenizer(padding_side="left")
    model = build(model_cls, config)
    model.eval()
    enc = tok(prompts(batch), return_tensors="pt", padding=True, add_special_tokens=False)
    gen = GenerationConfig(
        do_sample=True,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        max_new_tokens=NEW_TOKENS,
        # "EOS never stops": EOS is masked out until 64 new tokens exist, so every row has
        # exactly 64 new tokens and the whole batch runs all 64 decode steps.
        min_new_tokens=NEW_TOKENS,
        eos_token_id=EOS,
        pad_token_id=EOS,
        bos_token_id=EOS,
        use_cache=True,
    )
    print(f"[bench] {name}: {n_params(model) / 1e6:.1f}M parameters, batch {batch}, prompt width {enc['input_ids'].shape[1]}", file=sys.stderr)
    torch.manual_seed(0)
    times, new_tokens = [], 0
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model.generate(**enc, generation_config=gen)
        times.append(time.perf_counter() - t0)
        new = out[:, enc["input_ids"].shape[1]:]
        assert new.shape[1] == NEW_TOKENS, new.shape
        new_tokens = new.numel()
        print(f"[bench] call {i + 1}: {times[-1]:.3f} s", file=sys.stderr, flush=True)
    report(name, times, warmup, new_tokens, "tokens/s", batch=batch, new_tokens=NEW_TOKENS,
           layers=config.num_hidden_layers, params=n_params(model))


def run_reward(name, layers, warmup, steps):
    from trl import RewardConfig, RewardTrainer

    tok = tokenizer()
    config = smollm_config(layers, num_labels=1)
    model = build(LlamaForSequenceClassification, config)
    model.config.pad_token_id = EOS
    ds = datasets.Dataset.from_list(pairs())
    timer = StepTimer()
    with tempfile.TemporaryDirectory() as out_dir:
        args = RewardConfig(
            **common_args(out_dir, warmup + steps, 8, 5e-4, train_sampling_strategy="sequential"),
            max_length=128,
        )
        trainer = RewardTrainer(model=model, args=args, train_dataset=ds, processing_class=tok, callbacks=[timer])
        print(f"[bench] {name}: {n_params(model) / 1e6:.1f}M parameters, {len(trainer.train_dataset)} pairs", file=sys.stderr)
        trainer.train()
    report(name, timer.times, warmup, 8, "pairs/s", layers=config.num_hidden_layers, params=n_params(model))


COMPLETION_LENGTHS = []  # every completion's token count, as TRL hands it to the reward function


PROMPTS_SEEN = []  # the prompts of each generation batch


def distinct_words(completions, completion_ids=None, prompts=None, **kwargs):
    """Rule reward: distinct whitespace-separated words / 10."""
    if completion_ids is not None:
        COMPLETION_LENGTHS.extend(len(c) for c in completion_ids)
    if prompts is not None:
        PROMPTS_SEEN.append(list(prompts))
    return [len(set(c.split())) / 10.0 for c in completions]


def run_grpo(name, layers, warmup, steps, lora):
    from trl import GRPOConfig, GRPOTrainer

    tok = tokenizer()
    config = smollm_config(layers)
    model = build(LlamaForCausalLM, config)
    # The first 2 prompts of ppo_prompts.jsonl, every step (as the Rust bench does): a 2-row
    # dataset is one step per epoch; max_steps runs as many epochs as steps.
    ds = datasets.Dataset.from_list([{"prompt": p} for p in prompts(2)])
    peft_config = None
    if lora:
        from peft import LoraConfig

        peft_config = LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    timer = StepTimer()
    with tempfile.TemporaryDirectory() as out_dir:
        args = GRPOConfig(
            **common_args(out_dir, warmup + steps, 16, 1e-6),
            num_generations=8,
            max_completion_length=NEW_TOKENS,
            # exactly 64 new tokens: EOS cannot be sampled before 64 tokens exist
            generation_kwargs={"min_new_tokens": NEW_TOKENS},
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            loss_type="dapo",
            beta=0.04 if lora else 0.0,
            num_iterations=1,
            shuffle_dataset=False,
            log_completions=False,
        )
        trainer = GRPOTrainer(
            model=model,
            reward_funcs=distinct_words,
            args=args,
            train_dataset=ds,
            processing_class=tok,
            peft_config=peft_config,
            callbacks=[timer],
        )
        trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
        print(f"[bench] {name}: {n_params(model) / 1e6:.1f}M parameters, {trainable / 1e6:.3f}M trainable, "
              f"generation batch {args.generation_batch_size}, ref model {'adapters disabled' if lora else 'none'}",
              file=sys.stderr)
        trainer.train()
    # every completion must have exactly 64 tokens (no EOS stop, no truncation by TRL's EOS mask)
    assert len(COMPLETION_LENGTHS) == 16 * (warmup + steps), len(COMPLETION_LENGTHS)
    assert set(COMPLETION_LENGTHS) == {NEW_TOKENS}, sorted(set(COMPLETION_LENGTHS))
    # each step: prompt 0 eight times, then prompt 1 eight times (groups are consecutive rows)
    first2 = prompts(2)
    assert all(p == [first2[0]] * 8 + [first2[1]] * 8 for p in PROMPTS_SEEN), PROMPTS_SEEN
    report(name, timer.times, warmup, 16 * NEW_TOKENS, "completion tokens/s", completions=16, prompts=2,
           new_tokens=NEW_TOKENS, layers=config.num_hidden_layers, params=n_params(model),
           trainable_params=trainable, beta=args.beta, loss_type=args.loss_type,
           completion_lengths=[min(COMPLETION_LENGTHS), max(COMPLETION_LENGTHS)])


def run_dpo(name, layers, warmup, steps):
    from trl import DPOConfig, DPOTrainer

    tok = tokenizer()
    config = smollm_config(layers)
    model = build(LlamaForCausalLM, config)
    ref_model = copy.deepcopy(model)  # frozen reference copy of the starting policy
    ref_model.eval()
    for p in ref_model.parameters():
        p.requires_grad_(False)
    ds = datasets.Dataset.from_list(pairs())
    timer = StepTimer()
    with tempfile.TemporaryDirectory() as out_dir:
        args = DPOConfig(
            **common_args(out_dir, warmup + steps, 8, 1e-6, train_sampling_strategy="sequential"),
            max_length=128,
            truncation_mode="keep_start",
            beta=0.1,
            loss_type=["sigmoid"],
            precompute_ref_log_probs=False,
        )
        trainer = DPOTrainer(model=model, ref_model=ref_model, args=args, train_dataset=ds,
                             processing_class=tok, callbacks=[timer])
        print(f"[bench] {name}: {n_params(model) / 1e6:.1f}M parameters, {len(trainer.train_dataset)} pairs", file=sys.stderr)
        trainer.train()
    report(name, timer.times, warmup, 8, "pairs/s", layers=config.num_hidden_layers, params=n_params(model))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("workload", choices=list(DEFAULT_STEPS))
    p.add_argument("--steps", type=int, default=None, help="timed steps (default: the workload's own)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps (default: the workload's own)")
    p.add_argument("--layers", type=int, default=None, help="shrink the model to N layers (validation only)")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    a = p.parse_args()
    warmup, steps = DEFAULT_STEPS[a.workload]
    warmup = warmup if a.warmup is None else a.warmup
    steps = steps if a.steps is None else a.steps
    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    warnings.filterwarnings("ignore")
    w = a.workload
    if w == "generate-smollm":
        run_generate(w, LlamaForCausalLM, smollm_config(a.layers), 16, warmup, steps)
    elif w == "generate-qwen-0.5b":
        run_generate(w, Qwen2ForCausalLM, qwen05b_config(a.layers), 8, warmup, steps)
    elif w == "reward-smollm":
        run_reward(w, a.layers, warmup, steps)
    elif w == "grpo-small":
        run_grpo(w, a.layers, warmup, steps, lora=False)
    elif w == "grpo-small-lora":
        run_grpo(w, a.layers, warmup, steps, lora=True)
    elif w == "dpo-small":
        run_dpo(w, a.layers, warmup, steps)


if __name__ == "__main__":
    main()
