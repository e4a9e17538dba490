#!/bin/bash
# FMNIST / momentum SGD: sign and ternary variants without changing the optimizer, seed 0 screen
OMP_NUM_THREADS=1 nice -n 10 python -m ddp_qhooks.tools.study --model mlp --steps 900 --eval-every 300 \
  --seeds 0 --world 2 --configs fp32 sign sign,block_size=64 sign,block_size=32 ternary ternary,block_size=64 \
  ternary,threshold=0.5 ternary,threshold=1.0 ternary,block_size=64,threshold=0.5 \
  --output results/onebit_fmnist_screen_s0 > results/onebit_fmnist_screen_s0.log 2>&1
