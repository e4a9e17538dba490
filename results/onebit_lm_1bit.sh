#!/bin/bash
# LM / AdamW: 1-bit Adam with a 30-step warm-up (the lr warm-up's length), seed 0 (seeds 1, 2: onebit_lm_1bit_s12.sh);
# then the warm-up length on seed 0: 8 and 15 steps with sign, 15 with the lossless codec (freezing alone)
S="python -m ddp_qhooks.tools.study --task lm --seeds 0 --world 2 --steps 300 --eval-every 100"
OMP_NUM_THREADS=1 nice -n 10 $S --configs sign,onebit_adam=30,onebit_warmup=fp32 ternary,onebit_adam=30,onebit_warmup=fp32 \
    --output results/onebit_lm_1bit_s0 > results/onebit_lm_1bit_s0.log 2>&1
OMP_NUM_THREADS=1 nice -n 10 $S --configs sign,onebit_adam=15,onebit_warmup=fp32 none,onebit_adam=15,onebit_warmup=fp32 sign,onebit_adam=8,onebit_warmup=fp32 \
    --output results/onebit_lm_warmup_s0 > results/onebit_lm_warmup_s0.log 2>&1
