#!/bin/bash
# LM / AdamW: sign + 1-bit Adam with the warm-up that the 20x byte target allows (4 of 300 steps), seeds 1 and 2
OMP_NUM_THREADS=1 nice -n 10 python -m ddp_qhooks.tools.study --task lm --seeds 1 2 --world 2 \
  --steps 300 --eval-every 100 --configs sign,onebit_adam=4,onebit_warmup=fp32 \
  --output results/onebit_lm_w4_s12 > results/onebit_lm_w4_s12.log 2>&1
