#!/bin/sh
# is it the inner momentum? plain SGD (momentum 0, lr 0.05) for fp32 DDP, averaging and SCAFFOLD, seed 0
nice python -m ddp_qhooks.tools.study --noniid 0.9 --steps 400 --eval-every 80 \
  --seeds 0 --momentum 0 --output results/federated/nomomentum_seed0 --configs fp32 "stochastic:4,local_steps=16" \
  "stochastic:4,local_steps=16,drift=scaffold" > results/federated/nomomentum_seed0.log 2>&1
# the same with fp32 exchanges (codec none): the algorithm without quantization
nice python -m ddp_qhooks.tools.study --noniid 0.9 --steps 400 --eval-every 80 \
  --seeds 0 --momentum 0 --output results/federated/nomomentum_none_seed0 --configs "none,local_steps=16" \
  "none,local_steps=16,drift=scaffold" > results/federated/nomomentum_none_seed0.log 2>&1
