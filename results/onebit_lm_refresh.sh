#!/bin/bash
# LM / AdamW: 1-bit Adam with sparse full-precision variance refreshes (0/1 Adam's schedule), 4 fp32 exchanges in
# all (>= 20x fewer bytes with sign), seed 0
OMP_NUM_THREADS=1 nice -n 10 python -m ddp_qhooks.tools.study --task lm --seeds 0 --world 2 \
  --steps 300 --eval-every 100 --configs sign,onebit_adam=1,onebit_refresh=10/20/30,onebit_warmup=fp32 sign,onebit_adam=2,onebit_refresh=15/30,onebit_warmup=fp32 \
  --output results/onebit_lm_refresh_s0 > results/onebit_lm_refresh_s0.log 2>&1
