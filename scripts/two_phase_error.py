"""NMSE of the two-phase exchange's mean vs the all-gather's without error feedback, codecs only.

Each of W ranks rounds its gradient once; all-gather averages the W decoded copies, two-phase
re-encodes that mean once more (as the owner of a shard does).  Usage: python scripts/two_phase_error.py
"""
import torch

from ddp_qhooks.codecs import Layout, make_codec


def roundtrip(codec, x, key):
    layout = Layout.flat(x.numel())
    body = torch.empty(codec.body_nbytes(layout), dtype=torch.uint8)
    codec.encode(x, body, layout, key)
    out = torch.empty_like(x)
    codec.decode([body], layout, out)
    return out


def main(n=200_000):
    torch.manual_seed(0)
    print("codec            block  W  NMSE all-gather  NMSE two-phase  ratio  bytes all-gather / two-phase")
    for name, bits, block in [("stochastic", 8, None), ("stochastic", 4, None), ("stochastic", 4, 256),
                              ("uniform", 4, 256), ("stochastic", 2, 256)]:
        codec = make_codec(name, bits=bits, block_size=block)
        for world in (3, 4, 8):
            grads = [torch.randn(n) * (1 + 0.3 * r) + 0.1 * torch.randn(n).pow(3) for r in range(world)]
            mean = sum(grads) / world
            gathered = sum(roundtrip(codec, g, 10 + r) for r, g in enumerate(grads)) / world
            two_phase = roundtrip(codec, gathered, 99)
            e_ag = float(((gathered - mean).norm() / mean.norm()) ** 2)
            e_tp = float(((two_phase - mean).norm() / mean.norm()) ** 2)
            print(f"{name}:{bits:<8} {str(block):>5} {world:2d}  {e_ag:15.2e}  {e_tp:14.2e}  {e_tp / e_ag:5.1f}  "
                  f"{(world - 1) / (2 * (world - 1) / world):.2f}")


if __name__ == "__main__":
    main()
