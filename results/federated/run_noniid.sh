#!/bin/sh
# SMALL federated study: 4 ranks, non-IID p=0.9, H=16, 4-bit + EF; one seed per output directory
for seed in 0 1 2; do
  nice python -m ddp_qhooks.tools.study --noniid 0.9 --steps 400 --eval-every 80 \
    --seeds $seed --output results/federated/noniid_seed$seed --configs fp32 \
    "stochastic:4,local_steps=16" "stochastic:4,local_steps=16,drift=scaffold" \
    "stochastic:4,local_steps=16,drift=scaffold,scaffold_option=I" "stochastic:4,local_steps=16,drift=fedprox,mu=0.1" \
    > results/federated/noniid_seed$seed.log 2>&1
done
