#!/bin/sh
# SCAFFOLD rows with the inner correction c - (c_i - e_i), seeds 0 1 2 (same split and recipe as run_noniid.sh)
nice python -m ddp_qhooks.tools.study --noniid 0.9 --steps 400 --eval-every 80 \
  --seeds 0 1 2 --output results/federated/scaffold_used --configs "stochastic:4,local_steps=16,drift=scaffold" \
  "stochastic:4,local_steps=16,drift=scaffold,scaffold_option=I" > results/federated/scaffold_used.log 2>&1
