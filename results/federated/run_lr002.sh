#!/bin/sh
# the lr 0.02 recipe (SGD momentum 0.9), seeds 1 2 for fp32 / averaging / SCAFFOLD, seed 0 for SCAFFOLD
nice python -m ddp_qhooks.tools.study --noniid 0.9 --steps 400 --eval-every 80 \
  --seeds 0 --output results/federated/lr002_scaffold_seed0 --configs "stochastic:4,local_steps=16,drift=scaffold,lr=0.02" \
  > results/federated/lr002_scaffold_seed0.log 2>&1
nice python -m ddp_qhooks.tools.study --noniid 0.9 --steps 400 --eval-every 80 \
  --seeds 1 2 --output results/federated/lr002_seeds12 --configs "fp32,lr=0.02" "stochastic:4,local_steps=16,lr=0.02" \
  "stochastic:4,local_steps=16,drift=scaffold,lr=0.02" > results/federated/lr002_seeds12.log 2>&1
