#!/bin/bash
# LM / AdamW at the defaults, 3 seeds, one invocation per seed (partial results survive)
for s in 0 1 2; do
  OMP_NUM_THREADS=1 nice -n 10 python -m ddp_qhooks.tools.study --task lm --seeds $s --world 2 \
    --steps 300 --eval-every 100 --configs fp32 sign ternary stochastic:8 stochastic:4 stochastic:2 topk \
    --output results/onebit_lm_base_s$s > results/onebit_lm_base_s$s.log 2>&1
done
