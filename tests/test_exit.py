"""Interpreter exit after a successful run must not abort: callbacks the hook hands to collective
futures are tracked until the backend thread drops them, and an exit handler waits for that
(a Gloo thread that needs the GIL during finalization aborts the process; see exchange.then)."""
import threading
import time

import torch

from ddp_qhooks import exchange


def _pending() -> int:
    return len(exchange._pending_callbacks)


def test_callback_tracked_until_the_future_drops_it():
    before = _pending()
    fut = torch.futures.Future()
    chained = exchange.then(fut, lambda f: f.value() + 1)
    assert _pending() == before + 1
    fut.set_result(41)
    assert chained.wait() == 42
    assert _pending() == before
    assert exchange._drain_callbacks(0.05) == before


def test_exit_drain_waits_for_a_callback_completed_on_another_thread():
    before = _pending()
    fut = torch.futures.Future()
    ran = []
    exchange.then(fut, lambda f: ran.append(f.value()))

    def complete_later():
        time.sleep(0.2)
        fut.set_result(7)
    worker = threading.Thread(target=complete_later)
    worker.start()
    t0 = time.monotonic()
    left = exchange._drain_callbacks(5.0)
    waited = time.monotonic() - t0
    worker.join()
    assert left == before and ran == [7]
    assert 0.15 < waited < 4.0


def test_exit_drain_is_bounded_for_a_collective_that_never_completes():
    before = _pending()
    fut = torch.futures.Future()
    exchange.then(fut, lambda f: None)
    t0 = time.monotonic()
    assert exchange._drain_callbacks(0.2) == before + 1
    assert time.monotonic() - t0 < 1.5
    fut.set_result(None)
    assert _pending() == before
