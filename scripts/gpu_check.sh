#!/usr/bin/env bash
# One-shot CUDA/NCCL check for a GPU machine: correctness of every codec on CUDA tensors, a DDP
# training run over NCCL with the hook, the CPU unit tests under that machine's torch, and the
# codec micro-benchmark on the GPU.  Usage: bash scripts/gpu_check.sh [OUTDIR]
set -uo pipefail
out=${1:-${OUT:-/tmp/gpu_check}}
mkdir -p "$out"
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'gpus', torch.cuda.device_count())"
  echo "== CUDA / NCCL tests"
  timeout 300 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tail -25
  echo "== CPU unit and multi-process DDP tests under this machine's torch"
  timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_codecs.py tests/test_ddp.py -k "not compile" 2>&1 | tail -4  # the fused kernels are CPU-only: CI runs them
  echo "== micro-benchmark, GPU, 25 MiB bucket, every codec (clone = device memory bandwidth)"
  timeout 200 python3 -m ddp_qhooks.microbench --device cuda --repeat 10 --markdown
  echo "== micro-benchmark, GPU, 256 MiB bucket"
  timeout 120 python3 -m ddp_qhooks.microbench --device cuda --numel 67108864 --repeat 10 --codecs uniform stochastic fp16 none --no-naive --markdown
  echo "== every codec on CUDA tensors (family properties) and through the hook on CPU"
  timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_codec_family.py tests/test_ddp_codecs.py 2>&1 | tail -4
  echo "== bench on one GPU with NCCL (world 1: code path and compute time only)"
  timeout 300 torchrun --nproc-per-node=1 -m ddp_qhooks.bench --params 25e6 --steps 5 --output "$out/bench_gpu" \
    --configs fp32 fp16_hook powersgd quant_pertensor stochastic:4 sign --timeline 2>&1 | tail -25
} 2>&1 | tee "$out/gpu_check.log"
