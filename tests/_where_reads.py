"""Where each host read counted by test_engine.test_host_reads_per_step comes from, per codec
(reads per step by thread, T = training, C = completion, and the innermost ddp_qhooks frames):

    PYTHONPATH=. python tests/_where_reads.py [codec ...]
"""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import _dist  # noqa: E402
import test_engine  # noqa: E402
from ddp_qhooks.codecs import CODECS  # noqa: E402

if __name__ == "__main__":
    codecs = sys.argv[1:] or list(CODECS)
    got = _dist.results(test_engine._w_reads, 2, codecs, {"exchange": "allgather"}, 3, 3, True, timeout_s=300)[0]
    for name, (caller, completion, _, at) in got.items():
        print(f"== {name}: {caller + completion:g} per step")
        for (thread, op, where), n in sorted(at.items()):
            print(f"  {n:g} {thread} {op}: {where}")
