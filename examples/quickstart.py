# examples/quickstart.py -- run with: torchrun --nproc-per-node=2 examples/quickstart.py
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import ddp_qhooks

dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
device = torch.device("cuda", dist.get_rank() % torch.cuda.device_count()) if torch.cuda.is_available() else torch.device("cpu")
torch.manual_seed(dist.get_rank())  # different data per rank; DDP broadcasts rank 0's weights
model = torch.nn.Sequential(torch.nn.Linear(32, 256), torch.nn.ReLU(), torch.nn.Linear(256, 1)).to(device)
ddp = DDP(model)
state = ddp_qhooks.register(ddp, codec="stochastic", bits=4)  # the one line
opt = torch.optim.SGD(ddp.parameters(), lr=0.01)
for step in range(200):
    x = torch.randn(64, 32, device=device)
    loss = torch.nn.functional.mse_loss(ddp(x), x[:, :1] - x[:, 1:2])
    opt.zero_grad()
    loss.backward()
    opt.step()
s = state.stats()
print(f"rank {dist.get_rank()}: loss {loss.item():.4f}, {s['steps']} steps, {s['compression_ratio']:.1f}x smaller "
      f"than fp32, {s['wire_bytes_sent']} bytes sent")
dist.destroy_process_group()
