"""Fashion-MNIST with PyTorch Lightning, 2 CPU processes, gradients quantized by ddp_qhooks.

    pip install lightning
    python examples/lightning_train.py                          # stochastic 8-bit + error feedback
    python examples/lightning_train.py --codec uniform --bits 4 --max-steps 100
    python examples/lightning_train.py --save-ckpt run.ckpt --max-steps 100
    python examples/lightning_train.py --resume run.ckpt --max-steps 200      # hook state resumes too
    python examples/lightning_train.py --strategy plain-ddp     # shows Lightning's CPU caveat: fails

Run it directly: Lightning starts the other process itself by re-running this script with the
same arguments (``LOCAL_RANK`` set), so everything at module level runs on every rank.
``--strategy plain-ddp`` uses Lightning's own ``DDPStrategy(ddp_comm_hook=...)``, which on CPU
never registers the hook; the ``RequireCommHook`` callback turns that into an error at the first step.

Every rank prints one ``hook-stats {...}`` JSON line at the end; rank 0 then prints the test accuracy.
"""
import argparse
import json
import os

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import lightning.pytorch as pl
from lightning.pytorch.strategies import DDPStrategy

import ddp_qhooks
from ddp_qhooks.tools.data import SmallCNN, load
from ddp_qhooks.integrations.lightning import QuantizedDDPStrategy, RequireCommHook


class LitCNN(pl.LightningModule):
    def __init__(self, lr: float):
        super().__init__()
        self.model = SmallCNN()
        self.lr = lr

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.model(x), y)
        self.log("loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def _emit(tag: str, record: dict) -> None:
    # one write per line, so the lines of concurrently printing ranks do not interleave
    print(f"{tag} {json.dumps(record)}\n", end="", flush=True)


def _residual_norm(state) -> float:
    return sum(float(r.double().pow(2).sum()) for r in state.state_dict()["residuals"].values()) ** 0.5


class ReportHookState(pl.Callback):
    """Prints where the hook state starts (non-zero step after a resume) on every rank."""

    def on_train_start(self, trainer, pl_module):
        state = getattr(trainer.strategy, "hook_state", None)
        if state is not None:
            _emit("hook-start", {"rank": trainer.global_rank, "steps": state.stats()["steps"],
                                 "residual_norm": _residual_norm(state)})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--codec", default="stochastic", choices=sorted(ddp_qhooks.CODECS))
    p.add_argument("--bits", type=int, default=8)
    p.add_argument("--max-steps", type=int, default=300, help="optimizer steps in total (including resumed ones)")
    p.add_argument("--batch", type=int, default=64, help="per process")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--devices", type=int, default=2)
    p.add_argument("--accumulate", type=int, default=1, help="accumulate_grad_batches")
    p.add_argument("--strategy", choices=["quantized", "plain-ddp"], default="quantized")
    p.add_argument("--save-ckpt", help="write a checkpoint (with the hook state of every rank) here at the end")
    p.add_argument("--resume", help="checkpoint to resume from")
    p.add_argument("--data", help="Fashion-MNIST directory (default: see ddp_qhooks.tools.data)")
    args = p.parse_args()

    torch.set_num_threads(1)
    pl.seed_everything(0, verbose=False)
    x, y = load("train", args.data)
    train = DataLoader(TensorDataset(x, y), batch_size=args.batch, shuffle=True)  # Lightning adds a DistributedSampler

    if args.strategy == "quantized":
        strategy = QuantizedDDPStrategy(codec=args.codec, bits=args.bits)
    else:  # Lightning's own way: registers the hook on CUDA only
        state = ddp_qhooks.QuantizedHookState(process_group=None, codec=args.codec, bits=args.bits)
        strategy = DDPStrategy(ddp_comm_state=state, ddp_comm_hook=ddp_qhooks.quantized_allgather_hook)

    model = LitCNN(args.lr)
    trainer = pl.Trainer(accelerator="cpu", devices=args.devices, strategy=strategy, max_steps=args.max_steps,
                         accumulate_grad_batches=args.accumulate, callbacks=[RequireCommHook(), ReportHookState()],
                         logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, train, ckpt_path=args.resume)
    if args.save_ckpt:
        trainer.save_checkpoint(args.save_ckpt)  # a collective: every rank calls it, rank 0 writes

    if args.strategy == "quantized":
        state = strategy.hook_state  # this process's QuantizedHookState
    s = state.stats()
    _emit("hook-stats", {"rank": trainer.global_rank, "steps": s["steps"],
                         "compression_ratio": round(s["compression_ratio"], 3), "nmse": s["nmse"],
                         "payload_bytes": s["payload_bytes"], "fp32_bytes": s["fp32_bytes"],
                         "residual_norm": _residual_norm(state)})
    if trainer.is_global_zero:
        xt, yt = load("test", args.data)
        torch.set_num_threads(os.cpu_count() or 1)  # the other ranks are done
        model.eval()
        with torch.no_grad():
            acc = (model.model(xt).argmax(1) == yt).float().mean().item()
        print(f"{args.codec} {args.bits}-bit: {s['steps']} hook steps, compression {s['compression_ratio']:.2f}x, "
              f"test accuracy {acc:.4f}", flush=True)


if __name__ == "__main__":
    main()
