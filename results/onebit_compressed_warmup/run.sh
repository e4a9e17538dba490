# LM / AdamW: 1-bit Adam with its default warm-up (stochastic 2 bits) and a 1-bit one, at W=2 (seeds 0 1 2;
# fp32 per seed in docs/results_defaults.md section 7) and at W=4 (seeds 0 1, with fp32). From the repository's root.
S="python -m ddp_qhooks.tools.study --task lm --steps 300 --eval-every 100"
OMP_NUM_THREADS=1 $S --world 2 --seeds 0 1 2 --configs sign,onebit_adam=60 sign,onebit_adam=60,onebit_warmup=stochastic:1 \
  --output results/onebit_compressed_warmup/w2
OMP_NUM_THREADS=1 $S --world 4 --seeds 0 1 --configs fp32 sign,onebit_adam=60 ternary,onebit_adam=60 \
  --output results/onebit_compressed_warmup/w4
OMP_NUM_THREADS=1 $S --world 3 --seeds 0 --configs fp32 sign,onebit_adam=60 --output results/onebit_compressed_warmup/w3
