#!/usr/bin/env bash
# The one prepared GPU check (under 5 minutes on one GPU):
#   1. env          nvidia-smi, Python, torch (CUDA, cuDNN), torchvision, numpy, pytest versions
#   2. cuda tests   pytest -m cuda tests/engine/test_cuda.py: every CUDA path against the CPU result
#                   (tensor loader, memory-bank scores, folded teacher, bf16/fp16 autocast and the
#                   loss scaler, train_student.py on cuda, NCCL all-gather under torchrun)
#   3. torchrun crd a teacher trained a few steps, then train_student.py --distill crd under
#                   torchrun --standalone --nproc_per_node 1 for 50 steps on the synthetic set
#   4. bench fp32   scripts/benchmark.py --device cuda (crd and kd, crd's plain baseline)
#   5. bench bf16   the same for crd with --flags "--amp bf16"
# Each part has a time limit (300 s in all); a failing part does not stop the others. The last lines are a
# summary of the parts; the exit status is the number of parts that failed (0 without a GPU:
# the CUDA parts are then skipped and said so).
#
# usage: scripts/gpu_check.sh OUTDIR     (PYTHON=python3 by default; OUTDIR gets 8 files:
#        env.txt pytest_cuda.log pytest_cuda.xml torchrun_crd.log bench.log bench_fp32.json
#        bench_bf16.json summary.txt)
# Needs torch (2.11 or later), torchvision, numpy, tqdm, tensorboard, and pytest for part 2. Without
# pytest on the machine: `python3 -m pip install --target .gpu_check_deps pytest` elsewhere and bring
# that folder along; it is put on PYTHONPATH when present.
if [ -z "${BASH_VERSION:-}" ]; then  # started as `sh scripts/...` (dash on Debian): rerun with bash
  command -v bash > /dev/null 2>&1 || { echo "error: $0 needs bash, which is not installed" >&2; exit 2; }
  exec bash "$0" "$@"
fi
set +o posix  # bash started as sh runs in POSIX mode: the rest is written for bash
set -u

if [ $# -ne 1 ]; then
  echo "usage: $0 OUTDIR" >&2
  exit 2
fi
OUT=$1
mkdir -p "$OUT" || exit 2
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.." || exit 2
PY=${PYTHON:-python3}
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
if [ -d .gpu_check_deps ]; then
  PYTHONPATH="$PYTHONPATH:$PWD/.gpu_check_deps"
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX") || exit 2
trap 'rm -rf "$WORK"' EXIT

SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
failed=0
t0=$(date +%s)

note() {  # a line of the summary, also on stdout
  echo "$*" | tee -a "$SUMMARY"
}

part() {  # NAME LIMIT LOG COMMAND...: run COMMAND under `timeout LIMIT`, output appended to LOG
  local name=$1 limit=$2 log=$3 start status
  shift 3
  start=$(date +%s)
  echo "== $name: $*" >> "$log"
  timeout -k 10 "$limit" "$@" >> "$log" 2>&1
  status=$?
  if [ "$status" -eq 0 ]; then
    note "PASS  $name ($(( $(date +%s) - start )) s)"
  else
    failed=$((failed + 1))
    if [ "$status" -eq 124 ] || [ "$status" -eq 137 ]; then
      note "FAIL  $name: over its ${limit} s limit (see $(basename "$log"))"
    else
      note "FAIL  $name: exit $status after $(( $(date +%s) - start )) s (see $(basename "$log"))"
    fi
  fi
  return "$status"
}

skip() {  # NAME REASON
  note "SKIP  $1: $2"
}

# --- 1. environment ---------------------------------------------------------------------------
ENV_TXT="$OUT/env.txt"
{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)  host: $(hostname)  cpus: $(nproc 2>/dev/null || echo ?)"
  echo "git: $(git rev-parse HEAD 2>/dev/null || echo 'not a git checkout')"
  if command -v nvidia-smi > /dev/null 2>&1; then
    timeout 30 nvidia-smi
  else
    echo "nvidia-smi: not found"
  fi
} > "$ENV_TXT" 2>&1
part "env" 15 "$ENV_TXT" "$PY" - <<'EOF'
import importlib, platform, sys
print("python", sys.version.replace("\n", " "), platform.platform())
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn",
      torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None)
print("cuda available:", torch.cuda.is_available(), "devices:", torch.cuda.device_count())
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"  cuda:{i} {p.name}, {p.total_memory / 2**30:.0f} GiB, capability {p.major}.{p.minor}")
print("nccl:", torch.distributed.is_available() and torch.distributed.is_nccl_available())
for name in ("torchvision", "numpy", "scipy", "tqdm", "tensorboard", "PIL", "pytest"):
    try:
        print(name, getattr(importlib.import_module(name), "__version__", "?"))
    except Exception as err:
        print(name, "MISSING:", type(err).__name__, err)
EOF
env_status=$?

GPU=0
if [ "$env_status" -eq 0 ] && "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  GPU=1
fi
if [ "$env_status" -ne 0 ]; then
  note "NO GPU: torch or another package did not import (see env.txt); the GPU runs are skipped"
elif [ "$GPU" -eq 0 ]; then
  note "NO GPU: torch.cuda.is_available() is False here; the cuda tests are collected and skipped, the GPU runs are skipped"
fi

# --- 2. the cuda tests ------------------------------------------------------------------------
TEST_LOG="$OUT/pytest_cuda.log"
: > "$TEST_LOG"
if "$PY" -c "import pytest" 2>/dev/null; then
  part "cuda tests" 120 "$TEST_LOG" "$PY" -m pytest -m cuda tests/engine/test_cuda.py -p no:cacheprovider -rfEs \
    --durations=10 --junitxml="$OUT/pytest_cuda.xml" -o junit_family=xunit1
  note "      $(grep -E '[0-9]+ (passed|failed|skipped|error)' "$TEST_LOG" | tail -n 1)"
else
  failed=$((failed + 1))
  echo "pytest is not importable by $PY" >> "$TEST_LOG"
  note "FAIL  cuda tests: NOT RUN, pytest is missing for $PY (pip install pytest, or bring .gpu_check_deps: see the top of $0)"
fi

# --- 3. a 1-GPU torchrun CRD run ----------------------------------------------------------------
RUN_LOG="$OUT/torchrun_crd.log"
: > "$RUN_LOG"
if [ "$GPU" -eq 1 ]; then
  if part "teacher for torchrun (10 steps)" 25 "$RUN_LOG" "$PY" train_teacher.py --model resnet32x4 \
      --dataset synthetic --epochs 1 --max_steps 10 --num_workers 0 --device cuda --save_folder "$WORK/teacher"; then
    teachers=("$WORK"/teacher/*/*_last.pth)
    teacher=${teachers[0]}
    part "torchrun crd (50 steps)" 50 "$RUN_LOG" "$PY" -m torch.distributed.run --standalone --nproc_per_node 1 \
      train_student.py --path_t "$teacher" --model_s resnet8x4 --distill crd --nce_k 4096 --dataset synthetic \
      --epochs 1 --max_steps 50 --num_workers 0 --device cuda --save_folder "$WORK/student"
    for results in "$WORK"/student/*/results.json; do
      [ -f "$results" ] || continue
      echo "== $results" >> "$RUN_LOG"
      cat "$results" >> "$RUN_LOG"
      note "      $("$PY" -c 'import json, sys; r = json.load(open(sys.argv[1])); print("status", r.get("status"), "steps", r.get("steps"), "last_acc", r.get("last_acc"), "world", r.get("world_size"))' "$results" 2>&1)"
    done
  else
    skip "torchrun crd (50 steps)" "no teacher"
  fi
else
  skip "teacher and torchrun crd" "no GPU"
fi

# --- 4./5. the benchmark ------------------------------------------------------------------------
BENCH_LOG="$OUT/bench.log"
: > "$BENCH_LOG"
if [ "$GPU" -eq 1 ]; then
  part "bench fp32" 60 "$BENCH_LOG" "$PY" scripts/benchmark.py --device cuda --methods crd,kd --baseline_methods crd \
    --steps 20 --warmup 5 --data_batches 20 --json "$OUT/bench_fp32.json"
  part "bench bf16" 30 "$BENCH_LOG" "$PY" scripts/benchmark.py --device cuda --methods crd --baseline_methods none \
    --steps 20 --warmup 5 --no_loader_check --flags "--amp bf16" --json "$OUT/bench_bf16.json"
  grep -E '^\| (kd|crd) ' "$BENCH_LOG" | sed 's/^/      /' | tee -a "$SUMMARY"
else
  skip "bench fp32, bench bf16" "no GPU"
fi

note "gpu_check: $failed part(s) failed, $(( $(date +%s) - t0 )) s in all; outputs in $OUT"
exit "$failed"
