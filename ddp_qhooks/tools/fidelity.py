"""Fidelity table: bits per value and quantization error (NMSE) of every codec configuration.

    python -m ddp_qhooks.tools.fidelity                 # real Fashion-MNIST gradients + synthetic tensors
    python -m ddp_qhooks.tools.fidelity --markdown --json fidelity.json

Inputs:

* ``real``: gradients captured while a small CNN (``data.SmallCNN``) trains on Fashion-MNIST
  (Debian package ``dataset-fashion-mnist``; ``--data DIR`` or ``FASHION_MNIST_DIR`` elsewhere),
  one flat gradient per captured step, with the model's parameter layout (so ``block_size="layer"``
  means one scale per layer);
* ``gaussian``: N(0, 1) vectors; ``heavy``: Student-t with 2 degrees of freedom (heavy tails, like
  gradients of embedding and attention layers), both with a 4-parameter layout.

For each configuration one codec instance encodes the sequence of tensors in order (stateful codecs
such as ``adaptive`` and ``kmeans`` see a realistic history) with a fresh key per tensor.
``bits/value`` is exact: 8 * payload bytes (16-byte header and padding included) / values.
``NMSE`` = ||x - decode(encode(x))||^2 / ||x||^2, averaged over the tensors; it is the error of one
step *without* error feedback (which carries the error into later steps instead of losing it).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from . import data
from ..codecs import CODECS, Layout, fidelity_configs, make_codec
from ..codecs.wire import payload_nbytes

# (label, codec, bits, options): every registered codec's ``fidelity_configs`` (see codecs/base.py)
CONFIGS = fidelity_configs()


def real_gradients(steps: int = 120, capture_every: int = 20, batch: int = 64, seed: int = 0, path=None):
    """Flat gradients of SmallCNN on Fashion-MNIST at steps capture_every, 2*capture_every, ..."""
    x, y = data.load("train", path)
    torch.manual_seed(seed)
    model = data.SmallCNN()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(seed)
    captured = []
    for step in range(1, steps + 1):
        idx = torch.randint(0, x.shape[0], (batch,), generator=g)
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        if step % capture_every == 0:
            captured.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]).clone())
        opt.step()
    return Layout([p.numel() for p in model.parameters()]), captured


def synthetic(kind: str, n: int = 1 << 18, count: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    numels = [n // 2, n // 4, n // 8, n - n // 2 - n // 4 - n // 8]
    tensors = []
    for _ in range(count):
        if kind == "gaussian":
            t = torch.randn(n, generator=g)
        else:  # Student-t, 2 dof: normal / sqrt(chi2_2 / 2), chi2_2 = -2 log U
            u = torch.rand(n, generator=g).clamp_min_(1e-12)
            t = torch.randn(n, generator=g) / torch.sqrt(-torch.log(u))
        tensors.append(t)
    return Layout(numels), tensors


def measure(codec_name, bits, options, layout, tensors, seed: int = 0) -> dict:
    codec = make_codec(codec_name, bits=bits, **options)
    body = torch.empty(codec.body_nbytes(layout), dtype=torch.uint8)
    out = torch.empty(layout.numel)
    nmses = []
    t0 = time.perf_counter()
    for i, x in enumerate(tensors):
        info = codec.encode(x, body, layout, key=seed * 1_000_003 + i)
        if not info.finite:
            raise RuntimeError(f"{codec_name}: non-finite encode on finite input")
        codec.decode([body], layout, out)
        nmses.append(float(((x.double() - out.double()) ** 2).sum() / (x.double() ** 2).sum()))
    return {"bits_per_value": 8 * payload_nbytes(body.numel()) / layout.numel, "nmse": statistics.fmean(nmses),
            "seconds": time.perf_counter() - t0}


def run(inputs, configs=None) -> list[dict]:
    rows = []
    for label, name, bits, opts in (fidelity_configs() if configs is None else configs):
        if name not in CODECS:
            continue
        row = {"config": label, "codec": name, "bits": bits, "options": opts}
        for kind, (layout, tensors) in inputs.items():
            row[kind] = measure(name, bits, opts, layout, tensors)
        rows.append(row)
    return rows


def format_table(rows, kinds, markdown=True) -> str:
    head = ["config"] + [f"{k} {m}" for k in kinds for m in ("bits/value", "NMSE")]
    lines = []
    for r in rows:
        cells = [r["config"]]
        for k in kinds:
            cells += [f"{r[k]['bits_per_value']:.3f}", _fmt(r[k]["nmse"])]
        lines.append(cells)
    if markdown:
        out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        return "\n".join(out + ["| " + " | ".join(c) + " |" for c in lines])
    widths = [max(len(h), *(len(l[i]) for l in lines)) for i, h in enumerate(head)]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(cells, widths)) for cells in [head] + lines)


def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    return f"{v:.3g}" if 1e-3 <= v < 1e3 else f"{v:.2e}"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=None, help="Fashion-MNIST directory (default: FASHION_MNIST_DIR or the Debian path)")
    p.add_argument("--no-real", action="store_true", help="skip the Fashion-MNIST gradients (synthetic tensors only)")
    p.add_argument("--numel", type=int, default=1 << 18, help="values per synthetic tensor")
    p.add_argument("--codecs", nargs="+", default=None, help="only these codec names")
    p.add_argument("--markdown", action="store_true")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    inputs = {}
    if not a.no_real:
        inputs["real"] = real_gradients(path=a.data)
    inputs["gaussian"] = synthetic("gaussian", a.numel)
    inputs["heavy"] = synthetic("heavy", a.numel)
    # read now, so that codecs registered at runtime are included
    configs = fidelity_configs(None if a.codecs is None else [n for n in a.codecs if n in CODECS])
    rows = run(inputs, configs)
    desc = {k: f"{len(t)} tensors of {lay.numel} values" for k, (lay, t) in inputs.items()}
    print("inputs: " + "; ".join(f"{k}: {v}" for k, v in desc.items()))
    print(format_table(rows, list(inputs), a.markdown))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"inputs": desc, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
