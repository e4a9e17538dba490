#!/bin/bash
# LM / AdamW: the frozen variance alone (lossless codec, warm-up 30) on seeds 1 and 2, to separate freezing from compression
OMP_NUM_THREADS=1 nice -n 10 python -m ddp_qhooks.tools.study --task lm --seeds 2 1 --world 2 \
  --steps 300 --eval-every 100 --configs none,onebit_adam=30,onebit_warmup=fp32 \
  --output results/onebit_lm_freeze_s12 > results/onebit_lm_freeze_s12.log 2>&1
