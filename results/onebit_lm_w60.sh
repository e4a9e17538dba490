#!/bin/bash
# LM / AdamW: 1-bit Adam with a 60-step warm-up, 3 seeds
OMP_NUM_THREADS=1 nice -n 10 python -m ddp_qhooks.tools.study --task lm --seeds 2 0 1 --world 2 \
  --steps 300 --eval-every 100 --configs sign,onebit_adam=60,onebit_warmup=fp32 \
  --output results/onebit_lm_w60 > results/onebit_lm_w60.log 2>&1
