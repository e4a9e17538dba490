"""Fashion-MNIST with Hugging Face Accelerate, 2 CPU processes, gradients quantized by ddp_qhooks.

    pip install accelerate
    python examples/accelerate_train.py                  # re-launches itself with torchrun, 2 CPU processes
    torchrun --nproc-per-node=2 examples/accelerate_train.py --codec uniform --bits 4
    accelerate launch --cpu --num_processes 2 examples/accelerate_train.py --accumulate 4
    python examples/accelerate_train.py --save-state ckpt --max-steps 100
    python examples/accelerate_train.py --resume ckpt --max-steps 200        # hook state resumes too

``accelerator.prepare(model)`` returns torch's DistributedDataParallel when several processes
run, so the hook is registered on it directly (``ddp_qhooks.integrations.accelerate.register`` = that, plus
per-rank hook state in ``accelerator.save_state`` / ``load_state``).  With ``--accumulate N``,
``accelerator.accumulate`` skips DDP's gradient sync (``no_sync``) on N-1 of N micro-batches:
the hook runs once per optimizer step.

Every rank prints one ``hook-stats {...}`` JSON line at the end; rank 0 then prints the test accuracy.
"""
import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import ddp_qhooks


def _emit(tag: str, record: dict) -> None:
    # one write per line, so the lines of concurrently printing ranks do not interleave
    print(f"{tag} {json.dumps(record)}\n", end="", flush=True)


def _residual_norm(state) -> float:
    return sum(float(r.double().pow(2).sum()) for r in state.state_dict()["residuals"].values()) ** 0.5


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--codec", default="stochastic", choices=sorted(ddp_qhooks.CODECS))
    p.add_argument("--bits", type=int, default=8)
    p.add_argument("--max-steps", type=int, default=300, help="optimizer steps in total (including resumed ones)")
    p.add_argument("--batch", type=int, default=64, help="per process and micro-batch")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--accumulate", type=int, default=1, help="gradient accumulation steps")
    p.add_argument("--nproc", type=int, default=2, help="processes when started without a launcher")
    p.add_argument("--save-state", help="accelerator.save_state() folder written at the end")
    p.add_argument("--resume", help="accelerator.load_state() folder to resume from")
    p.add_argument("--data", help="Fashion-MNIST directory (default: see ddp_qhooks.tools.data)")
    args = p.parse_args()

    if "LOCAL_RANK" not in os.environ:  # not under torchrun / accelerate launch: start 2 CPU processes
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={args.nproc}", "--standalone",
               os.path.abspath(__file__), *sys.argv[1:]]
        os.execv(sys.executable, cmd)

    from accelerate import Accelerator

    from ddp_qhooks.integrations.accelerate import register
    from ddp_qhooks.tools.data import SmallCNN, load

    torch.set_num_threads(1)
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=args.accumulate)
    torch.manual_seed(0)
    x, y = load("train", args.data)
    loader = DataLoader(TensorDataset(x, y), batch_size=args.batch, shuffle=True)  # sharded by prepare()
    model = SmallCNN()
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    model, opt, loader = accelerator.prepare(model, opt, loader)
    # the DDP model: ddp_qhooks.register(model, args.codec, bits=args.bits) would do; this also
    # keeps each rank's hook state in accelerator.save_state / load_state
    state = register(accelerator, model, args.codec, bits=args.bits)

    step = 0
    if args.resume:
        accelerator.load_state(args.resume)
        step = state.stats()["steps"] if state else 0
        accelerator.print(f"resumed at optimizer step {step}")
        if state is not None:
            _emit("hook-start", {"rank": accelerator.process_index, "steps": step,
                                 "residual_norm": _residual_norm(state)})
    while step < args.max_steps:
        for xb, yb in loader:
            with accelerator.accumulate(model):
                loss = F.cross_entropy(model(xb), yb)
                accelerator.backward(loss)
                opt.step()  # the prepared optimizer steps only when gradients were synchronised
                opt.zero_grad()
            if accelerator.sync_gradients:
                step += 1
                if step % 50 == 0:
                    accelerator.print(f"step {step:4d}  loss {loss.item():.4f}")
                if step >= args.max_steps:
                    break
    if args.save_state:
        accelerator.save_state(args.save_state)

    if state is not None:
        s = state.stats()
        _emit("hook-stats", {"rank": accelerator.process_index, "steps": s["steps"],
                             "compression_ratio": round(s["compression_ratio"], 3), "nmse": s["nmse"],
                             "payload_bytes": s["payload_bytes"], "fp32_bytes": s["fp32_bytes"],
                             "residual_norm": _residual_norm(state)})
    if accelerator.is_main_process:
        xt, yt = load("test", args.data)
        torch.set_num_threads(os.cpu_count() or 1)  # the other ranks are done
        net = accelerator.unwrap_model(model).eval()
        with torch.no_grad():
            acc = (net(xt).argmax(1) == yt).float().mean().item()
        print(f"{args.codec} {args.bits}-bit: {step} optimizer steps, compression "
              f"{s['compression_ratio'] if state else 1:.2f}x, test accuracy {acc:.4f}", flush=True)
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main()
