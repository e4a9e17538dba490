#!/bin/sh
# exploratory, seed 0: which SCAFFOLD / FedProx recipe corrects the drift (4 ranks, non-IID p=0.9, H=16)
nice python -m ddp_qhooks.tools.study --noniid 0.9 --steps 400 --eval-every 80 \
  --seeds 0 --output results/federated/variants_seed0 --configs \
  "none,local_steps=16,drift=scaffold" "stochastic:4,local_steps=16,drift=scaffold,momentum=0,lr=0.2" \
  "stochastic:4,local_steps=16,momentum=0,lr=0.2" "stochastic:4,local_steps=16,drift=fedprox,mu=1" \
  "stochastic:4,local_steps=16,drift=scaffold,lr=0.02" \
  > results/federated/variants_seed0.log 2>&1
