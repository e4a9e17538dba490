#!/bin/bash
# LM / AdamW: ternary + 1-bit Adam with a 60-step warm-up, 3 seeds
OMP_NUM_THREADS=1 nice -n 10 python -m ddp_qhooks.tools.study --task lm --seeds 0 1 2 --world 2 \
  --steps 300 --eval-every 100 --configs ternary,onebit_adam=60,onebit_warmup=fp32 \
  --output results/onebit_lm_w60t > results/onebit_lm_w60t.log 2>&1
