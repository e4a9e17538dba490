#!/usr/bin/env bash
# One-shot CUDA/NCCL check for a GPU machine: codecs on CUDA tensors; DDP over NCCL with several
# buckets, bitwise equal to CUDA_LAUNCH_BLOCKING=1 (stream ordering between the encode and the
# completion thread's decode); torch's sync debug mode around steady-state steps (within the
# per-codec budget that tests/test_engine.py proves on the CPU); a bf16 model; the codec
# micro-benchmark on the GPU (clone = device memory bandwidth); the bench under torchrun with
# NCCL.  Usage: bash scripts/gpu_check.sh [OUTDIR]
#
# Sized for one device call (at most 600 s): the steps run in order of importance under a total
# budget (BUDGET_S, default 540 s); a step that would start with less than its own limit left is
# skipped and says so.  The CPU tests (the fused compile=True kernels included) run in CI, not here.
set -uo pipefail
out=${1:-${OUT:-/tmp/gpu_check}}
budget=${BUDGET_S:-540}
mkdir -p "$out"
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1

step() {  # step TITLE LIMIT_S COMMAND...: run COMMAND under LIMIT_S if the budget allows it
  local title=$1 limit=$2
  shift 2
  local left=$((budget - SECONDS))
  if ((left < limit)); then
    echo "== $title: SKIPPED (${left} s of the budget left, the step needs up to ${limit} s)"
    return
  fi
  echo "== $title (limit ${limit} s, ${left} s left)"
  local t0=$SECONDS
  timeout "$limit" "$@"
  echo "-- rc=$? in $((SECONDS - t0)) s"
}

{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'gpus', torch.cuda.device_count())"
  step "CUDA / NCCL tests (codecs on CUDA, DDP buckets vs launch blocking, sync budget, bf16)" 200 \
    python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py
  step "micro-benchmark, GPU, 25 MiB bucket, every codec" 130 \
    python3 -m ddp_qhooks.tools.microbench --device cuda --repeat 10 --markdown
  step "bench on one GPU with NCCL (world 1: the code path and compute time)" 120 \
    torchrun --nproc-per-node=1 -m ddp_qhooks.bench --params 25e6 --steps 5 --output "$out/bench_gpu" \
    --configs fp32 fp16_hook stochastic:4 sign --timeline
  step "micro-benchmark, GPU, 256 MiB bucket" 60 \
    python3 -m ddp_qhooks.tools.microbench --device cuda --numel 67108864 --repeat 10 \
    --codecs uniform stochastic fp16 none --no-naive --markdown
} 2>&1 | tee "$out/gpu_check.log"
