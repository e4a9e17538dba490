"""Where each host read counted by test_engine.test_host_reads_per_step comes from, per codec
(reads per step by thread, T = training, C = completion, and the innermost ddp_qhooks frames):

    PYTHONPATH=. python tests/_where_reads.py [codec ...]
"""
import sys, threading, traceback, collections
sys.path.insert(0, __import__("os").path.dirname(__file__))
import torch
import test_engine as te
import _dist
from ddp_qhooks.engine import completion as completion_mod
from ddp_qhooks.codecs import CODECS


def frames():
    st = traceback.extract_stack()[:-2]
    out = [f"{f.filename.split('ddp_qhooks/')[-1]}:{f.lineno} {f.name}" for f in st if "ddp_qhooks/" in f.filename]
    return " <- ".join(reversed(out[-4:]))


class Rec(te._HostReads):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.name()
        if name in te.HOST_READS:
            with self.lock:
                self.log.append((threading.current_thread().name, name, frames()))
        return func(*args, **(kwargs or {}))


def w(rank, world, codecs, steps=3, warmup=3):
    out = {}
    real_advance = completion_mod.Completion._advance
    for name in codecs:
        log, lock = [], threading.Lock()
        counting = {"on": False}

        def advance(self, *a):
            if not counting["on"]:
                return real_advance(self, *a)
            with Rec(log, lock):
                return real_advance(self, *a)
        completion_mod.Completion._advance = advance
        real_tolist = torch.Tensor.tolist

        def tolist(self):
            if counting["on"]:
                with lock:
                    log.append((threading.current_thread().name, "tolist", frames()))
            return real_tolist(self)
        torch.Tensor.tolist = tolist
        try:
            sizes = [[40000, 64], [30000, 7]]
            params, _ = te._units(rank, 0, sizes)
            state = te._state(name, measure_error=False, exchange="allgather")
            te._run_steps(state, params, sizes, rank, warmup, False)
            counting["on"] = True
            with Rec(log, lock):
                te._run_steps(state, params, sizes, rank, steps, False)
            counting["on"] = False
        finally:
            completion_mod.Completion._advance = real_advance
            torch.Tensor.tolist = real_tolist
        c = collections.Counter(("C" if t.startswith("ddp_qhooks") else "T", n, f) for t, n, f in log)
        out[name] = (len(log) / steps, {k: v / steps for k, v in c.items()})
    return out


if __name__ == "__main__":
    codecs = sys.argv[1:] or list(CODECS)
    got = _dist.results(w, 2, codecs, timeout_s=300)[0]
    for name, (tot, c) in got.items():
        print(f"== {name}: {tot}")
        for (t, n, f), v in sorted(c.items()):
            print(f"  {v:g} {t} {n}: {f}")
