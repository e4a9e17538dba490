#!/bin/sh
# delayed application (overlap) and half participation against the synchronous row, seed 0, same split
nice python -m ddp_qhooks.tools.study --noniid 0.9 --steps 400 --eval-every 80 \
  --seeds 0 --output results/federated/overlap_seed0 --configs "stochastic:4,local_steps=16,delay=2" \
  "stochastic:4,local_steps=16,participation=0.5" > results/federated/overlap_seed0.log 2>&1
