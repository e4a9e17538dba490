"""Codec micro-benchmark: encode / decode throughput next to ``tensor.clone()`` bandwidth.

    python -m ddp_qhooks.tools.microbench                      # 25 MiB bucket, 1 thread, all codecs
    python -m ddp_qhooks.tools.microbench --numel 1048576 --codecs uniform --bits 8 4 --markdown

Rows ``<codec>+compile`` (every codec with a ``compile`` option: uniform, stochastic, qsgd, sign, ternary, log,
mulaw, adaptive) use the codecs' ``compile=True`` option (fused
kernels built by torch.compile: ~15 s of compilation before the first timed run, needs a C++
compiler; ``--no-compile`` skips them).  If compilation fails those rows say so and are not timed.

Throughput is GB/s of fp32 input (4 bytes per value) for one bucket, median of ``--repeat`` timed
runs after warm-up.  Both baselines are measured in the same run on the same tensor, interleaved
with every codec's runs: ``clone`` = ``x.clone()`` (allocates, as in the target; the allocator is
warmed so that it reuses heap blocks, its fastest regime) and ``copy`` = ``y.copy_(x)`` into a
preallocated tensor.  Ratios are baseline time / codec time.  Codec calls reuse their buffers, as
the hook does.  Not a test: it prints numbers.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from ..codecs import CODECS, Layout, _fused, codec_options, compilable, make_codec, valid_bits


def default_codecs() -> tuple:
    """Every registered codec, in registry order (the default rows)."""
    return tuple(CODECS)


def _bits_for(name: str, bits_list) -> list:
    """The requested widths this codec accepts; [None] (its default) for fixed-width codecs."""
    valid = valid_bits(name)
    if len({make_codec(name, bits=b).bits for b in valid}) == 1:
        return [None]
    return [b for b in bits_list if b in valid]


def _timer(fn, sync):
    def timed() -> float:
        t0 = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - t0
    return timed


class _NaiveTorch:
    """Reference point: the textbook torch version (allocating ops, float->uint8 cast) at 8 bits."""

    name, bits = "naive-torch", 8

    def encode(self, x, body, layout, key=0):
        lo, hi = torch.aminmax(x)
        scale = (hi - lo).clamp_min(1e-30) / 255
        self._meta = (lo, scale)
        body[: x.numel()].copy_(((x - lo) / scale).round_().to(torch.uint8))

    def decode(self, bodies, layout, out):
        lo, scale = self._meta
        torch.add(bodies[0][: out.numel()].to(torch.float32) * scale, lo, out=out)


def run(numel: int, codecs, bits_list, repeat: int, block_size=None, device="cpu", naive=True, compiled=False):
    x = torch.randn(numel, generator=torch.Generator().manual_seed(0)).to(device)
    y = torch.empty_like(x)
    sync = torch.cuda.synchronize if str(device).startswith("cuda") else (lambda: None)
    # Let the C allocator serve same-sized blocks from its heap (as in a training loop) rather
    # than fresh, page-faulting mmaps: that makes clone() faster, i.e. the baseline stricter.
    torch.empty(2 * numel, device=device).fill_(0)
    clone_t, copy_t = _timer(lambda: x.clone(), sync), _timer(lambda: y.copy_(x), sync)
    for _ in range(3):
        clone_t(), copy_t()
    gbs = lambda t: 4 * numel / t / 1e9
    rows, all_clone, all_copy = [], [], []
    layout = Layout.flat(numel)
    configs = [(name, bits) for name in codecs for bits in _bits_for(name, bits_list)]
    if compiled and str(device) == "cpu":  # the fused kernels are CPU-only
        configs += [(name + "+compile", bits) for name in codecs if compilable(name) for bits in _bits_for(name, bits_list)]
    if naive:
        configs.append(("naive-torch", 8))
    for name, bits in configs:
        if name == "naive-torch":
            codec = _NaiveTorch()
            body = torch.empty(numel, dtype=torch.uint8, device=device)
        else:
            base = name.replace("+compile", "")
            opts = {"block_size": block_size} if (block_size and "block_size" in codec_options(base)) else {}
            if name.endswith("+compile"):
                opts["compile"] = True
            codec = make_codec(base, bits=bits or 8, **opts)
            body = torch.empty(codec.body_nbytes(layout), dtype=torch.uint8, device=device)
        out = torch.empty_like(x)
        err = torch.empty_like(x)
        enc_t = _timer(lambda: codec.encode(x, body, layout, key=1), sync)
        # what the hook runs with error feedback: the encoder also writes the residual x - deq(q)
        ef_t = _timer(lambda: codec.encode(x, body, layout, key=1, error_out=err), sync) if name != "naive-torch" \
            else None
        dec_t = _timer(lambda: codec.decode([body], layout, out), sync)
        for _ in range(2):
            enc_t(), dec_t(), ef_t and ef_t()
        if name.endswith("+compile") and _fused._broken:
            rows.append({"codec": name, "bits": codec.bits, "unavailable": "compile failed, see the warning above"})
            continue
        # baselines interleaved with the codec, so drifting machine speed hits both alike
        t = {"clone": [], "copy": [], "enc": [], "dec": [], "ef": []}
        for _ in range(repeat):
            for k, fn in (("clone", clone_t), ("enc", enc_t), ("copy", copy_t), ("dec", dec_t), ("ef", ef_t)):
                if fn is not None:
                    t[k].append(fn())
        m = {k: statistics.median(v) for k, v in t.items() if v}
        if name == "naive-torch":
            # its own allocations push clone() onto fresh pages; compare with the codec rows' clone
            m["clone"] = statistics.median(all_clone) if all_clone else m["clone"]
        else:
            all_clone += t["clone"]
            all_copy += t["copy"]
        rows.append({"codec": name, "bits": codec.bits, "encode_gbs": gbs(m["enc"]), "decode_gbs": gbs(m["dec"]),
                     "encode_vs_clone": m["clone"] / m["enc"], "decode_vs_clone": m["clone"] / m["dec"],
                     "encode_vs_copy": m["copy"] / m["enc"], "decode_vs_copy": m["copy"] / m["dec"],
                     "encode_ef_gbs": gbs(m["ef"]) if "ef" in m else None,
                     "encode_ef_vs_clone": m["clone"] / m["ef"] if "ef" in m else None})
    return {"clone_gbs": gbs(statistics.median(all_clone)), "copy_gbs": gbs(statistics.median(all_copy)), "rows": rows}


def format_table(result, markdown: bool) -> str:
    head = ["codec", "bits", "encode GB/s", "decode GB/s", "enc/clone", "dec/clone", "enc/copy", "dec/copy",
            "enc+EF GB/s", "enc+EF/clone"]
    lines = []
    for r in result["rows"]:
        if "unavailable" in r:
            lines.append([r["codec"], str(r["bits"]), r["unavailable"]] + [""] * (len(head) - 3))
            continue
        lines.append([r["codec"], str(r["bits"]), f"{r['encode_gbs']:.2f}", f"{r['decode_gbs']:.2f}",
                      f"{r['encode_vs_clone']:.2f}", f"{r['decode_vs_clone']:.2f}",
                      f"{r['encode_vs_copy']:.2f}", f"{r['decode_vs_copy']:.2f}",
                      "–" if r["encode_ef_gbs"] is None else f"{r['encode_ef_gbs']:.2f}",
                      "–" if r["encode_ef_vs_clone"] is None else f"{r['encode_ef_vs_clone']:.2f}"])
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
    p.add_argument("--codecs", nargs="+", default=list(default_codecs()), choices=sorted(CODECS),
                   help="default: every registered codec (" + " ".join(default_codecs()) + ")")
    p.add_argument("--bits", nargs="+", type=int, default=[8, 4, 2, 1])
    p.add_argument("--block-size", type=int, default=None)
    p.add_argument("--repeat", type=int, default=9)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (target is stated for 1)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--markdown", action="store_true")
    p.add_argument("--no-naive", action="store_true", help="skip the naive-torch reference row")
    p.add_argument("--no-compile", dest="compile", action="store_false",
                   help="skip the rows of the quantizers with compile=True")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    result = run(a.numel, a.codecs, a.bits, a.repeat, a.block_size, a.device, naive=not a.no_naive, compiled=a.compile)
    print(f"numel={a.numel} threads={a.threads} device={a.device} torch={torch.__version__}")
    print(format_table(result, a.markdown))


if __name__ == "__main__":
    main()
