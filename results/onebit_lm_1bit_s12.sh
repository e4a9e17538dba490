#!/bin/bash
# LM / AdamW: 1-bit Adam with a 30-step warm-up, seeds 1 and 2 (seed 0: onebit_lm_1bit.sh)
for s in 1 2; do
  OMP_NUM_THREADS=1 nice -n 10 python -m ddp_qhooks.tools.study --task lm --seeds $s --world 2 \
    --steps 300 --eval-every 100 --configs sign,onebit_adam=30,onebit_warmup=fp32 ternary,onebit_adam=30,onebit_warmup=fp32 \
    --output results/onebit_lm_1bit_s$s > results/onebit_lm_1bit_s$s.log 2>&1
done
