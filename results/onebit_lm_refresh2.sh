#!/bin/bash
# LM / AdamW: 1-bit Adam, variance refreshes that forget the stale estimate (beta2^gap), 4 fp32 exchanges, seed 0
OMP_NUM_THREADS=1 nice -n 10 python -m ddp_qhooks.tools.study --task lm --seeds 0 --world 2 \
  --steps 300 --eval-every 100 --configs sign,onebit_adam=1,onebit_refresh=10/20/30,onebit_warmup=fp32 sign,onebit_adam=1,onebit_refresh=20/30/40,onebit_warmup=fp32 \
  --output results/onebit_lm_refresh2_s0 > results/onebit_lm_refresh2_s0.log 2>&1
