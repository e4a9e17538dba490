"""Codec micro-benchmark: encode / decode throughput next to ``tensor.clone()`` bandwidth.

    python -m ddp_qhooks.microbench                      # 25 MiB bucket, 1 thread, all codecs
    python -m ddp_qhooks.microbench --numel 1048576 --codecs uniform --bits 8 4 --markdown

Throughput is GB/s of fp32 input (4 bytes per value) for one bucket, median of ``--repeat`` timed
runs after warm-up.  Both baselines are measured in the same run on the same tensor:
``clone`` = ``x.clone()`` (allocates, as in the target) and ``copy`` = ``y.copy_(x)`` into a
preallocated tensor (pure memory bandwidth, a stricter yardstick).  Codec calls reuse their
buffers, as the hook does.  Not a test: it prints numbers.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from .codecs import CODECS, Layout, make_codec

QUANTIZERS = ("uniform", "stochastic")


def _median_time(fn, repeat: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run(numel: int, codecs, bits_list, repeat: int, block_size=None, device="cpu"):
    x = torch.randn(numel, generator=torch.Generator().manual_seed(0)).to(device)
    y = torch.empty_like(x)
    sync = torch.cuda.synchronize if str(device).startswith("cuda") else (lambda: None)

    def timed(fn):
        def wrapped():
            fn()
            sync()
        return _median_time(wrapped, repeat)

    t_clone = timed(lambda: x.clone())
    t_copy = timed(lambda: y.copy_(x))
    gbs = lambda t: 4 * numel / t / 1e9
    rows = []
    layout = Layout.flat(numel)
    for name in codecs:
        for bits in (bits_list if name in QUANTIZERS else [None]):
            opts = {"block_size": block_size} if (block_size and name in QUANTIZERS) else {}
            codec = make_codec(name, bits=bits or 8, **opts)
            body = torch.empty(codec.body_nbytes(layout), dtype=torch.uint8, device=device)
            out = torch.empty_like(x)
            t_enc = timed(lambda: codec.encode(x, body, layout, key=1))
            t_dec = timed(lambda: codec.decode([body], layout, out))
            rows.append({"codec": name, "bits": codec.bits, "encode_gbs": gbs(t_enc), "decode_gbs": gbs(t_dec),
                         "encode_vs_clone": t_clone / t_enc, "decode_vs_clone": t_clone / t_dec,
                         "encode_vs_copy": t_copy / t_enc, "decode_vs_copy": t_copy / t_dec})
    return {"clone_gbs": gbs(t_clone), "copy_gbs": gbs(t_copy), "rows": rows}


def format_table(result, markdown: bool) -> str:
    head = ["codec", "bits", "encode GB/s", "decode GB/s", "enc/clone", "dec/clone", "enc/copy", "dec/copy"]
    lines = []
    for r in result["rows"]:
        lines.append([r["codec"], str(r["bits"]), f"{r['encode_gbs']:.2f}", f"{r['decode_gbs']:.2f}",
                      f"{r['encode_vs_clone']:.2f}", f"{r['decode_vs_clone']:.2f}",
                      f"{r['encode_vs_copy']:.2f}", f"{r['decode_vs_copy']:.2f}"])
    title = f"clone: {result['clone_gbs']:.2f} GB/s, copy_: {result['copy_gbs']:.2f} GB/s"
    if markdown:
        out = [title, "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        out += ["| " + " | ".join(l) + " |" for l in lines]
        return "\n".join(out)
    widths = [max(len(h), *(len(l[i]) for l in lines)) if lines else len(h) for i, h in enumerate(head)]
    fmt = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths))
    return "\n".join([title, fmt(head)] + [fmt(l) for l in lines])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--numel", type=int, default=25 * 2**20 // 4, help="values per bucket (default: 25 MiB of fp32)")
    p.add_argument("--codecs", nargs="+", default=list(CODECS), choices=sorted(CODECS))
    p.add_argument("--bits", nargs="+", type=int, default=[8, 4, 2, 1])
    p.add_argument("--block-size", type=int, default=None)
    p.add_argument("--repeat", type=int, default=9)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (target is stated for 1)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--markdown", action="store_true")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    result = run(a.numel, a.codecs, a.bits, a.repeat, a.block_size, a.device)
    print(f"numel={a.numel} threads={a.threads} device={a.device} torch={torch.__version__}")
    print(format_table(result, a.markdown))


if __name__ == "__main__":
    main()
