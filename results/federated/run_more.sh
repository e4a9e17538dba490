#!/bin/sh
# SMALL federated study, continued: seeds 1 and 2 of the main rows, the lr 0.02 recipe, a Dirichlet(0.1) split
run() { out=$1; shift; nice python -m ddp_qhooks.tools.study --steps 400 --eval-every 80 \
          --output results/federated/$out "$@" > results/federated/$out.log 2>&1; }
for seed in 1 2; do
  run noniid_seed$seed --noniid 0.9 --seeds $seed --configs fp32 "stochastic:4,local_steps=16" \
      "stochastic:4,local_steps=16,drift=scaffold" "stochastic:4,local_steps=16,drift=fedprox,mu=0.1"
done
run lr002_seed0 --noniid 0.9 --seeds 0 --configs "fp32,lr=0.02" "stochastic:4,local_steps=16,lr=0.02"
run dirichlet_seed0 --dirichlet 0.1 --seeds 0 --configs fp32 "stochastic:4,local_steps=16" \
    "stochastic:4,local_steps=16,drift=scaffold"
