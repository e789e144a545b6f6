#!/usr/bin/env bash
# Runs the six Llama-family / TRL 1.16 reference workloads (bench.py) at full size, one after
# another, on CPU, f32, 2 threads, and prints each workload's JSON line.
# Run it on a quiet machine (nothing else busy): about 15 minutes on 2 cores.
#
#   ./run_all.sh                     # all six, each workload's own warm-up and timed steps
#   ./run_all.sh dpo-small grpo-small  # a subset
#   PYTHON=/path/to/python ./run_all.sh
#   EXTRA_ARGS="--steps 5" ./run_all.sh
#
# The JSON lines go to stdout and to $LOG_DIR/results.jsonl; each workload's full output
# (per-step seconds, TRL's own summary) to $LOG_DIR/<workload>.log.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PYTHON="${PYTHON:-python3}"
THREADS="${THREADS:-2}"
LOG_DIR="${LOG_DIR:-$HERE/logs/$(date +%Y%m%d-%H%M%S)}"
WORKLOADS=("$@")
if [ ${#WORKLOADS[@]} -eq 0 ]; then
  WORKLOADS=(generate-smollm generate-qwen-0.5b reward-smollm grpo-small grpo-small-lora dpo-small)
fi
export OMP_NUM_THREADS="$THREADS" MKL_NUM_THREADS="$THREADS" OPENBLAS_NUM_THREADS="$THREADS"
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 CUDA_VISIBLE_DEVICES=
mkdir -p "$LOG_DIR"
"$PYTHON" -c 'import torch, transformers, trl, peft, datasets; print("torch", torch.__version__, "transformers", transformers.__version__, "trl", trl.__version__, "peft", peft.__version__, "datasets", datasets.__version__)' | tee "$LOG_DIR/versions.txt" >&2
echo "nproc $(nproc); $(grep -m1 'model name' /proc/cpuinfo)" | tee -a "$LOG_DIR/versions.txt" >&2
status=0
for w in "${WORKLOADS[@]}"; do
  echo "== $w" >&2
  if "$PYTHON" "$HERE/bench.py" "$w" --threads "$THREADS" ${EXTRA_ARGS:-} >"$LOG_DIR/$w.log" 2>&1; then
    tail -n 1 "$LOG_DIR/$w.log" | tee -a "$LOG_DIR/results.jsonl"
  else
    echo "!! $w failed; see $LOG_DIR/$w.log" >&2
    tail -n 20 "$LOG_DIR/$w.log" >&2
    status=1
  fi
done
echo "results: $LOG_DIR/results.jsonl" >&2
exit $status
