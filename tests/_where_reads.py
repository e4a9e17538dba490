"""Where each host read counted by test_engine.test_host_reads_per_step comes from, per codec
(reads per step by thread, T = training, C = completion, and the innermost ddp_qhooks frames);
``--read-free``: on the codecs' accelerator path, forced on the CPU
(test_engine.test_every_codec_reads_nothing_on_an_accelerator):

    PYTHONPATH=. python tests/_where_reads.py [--read-free] [codec ...]
"""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import _dist  # noqa: E402
import test_engine  # noqa: E402
from ddp_qhooks.codecs import CODECS  # noqa: E402

if __name__ == "__main__":
    args = sys.argv[1:]
    read_free = "--read-free" in args
    codecs = [a for a in args if a != "--read-free"] or list(CODECS)
    got = _dist.results(test_engine._w_reads, 2, codecs, {"exchange": "allgather"}, 3, 3, True, read_free,
                        timeout_s=300)[0]
    for name, (caller, completion, _, at) in got.items():
        print(f"== {name}: {caller + completion:g} per step")
        for (thread, op, where), n in sorted(at.items()):
            print(f"  {n:g} {thread} {op}: {where}")
