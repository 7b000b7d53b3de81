"""The explorer's model worker: one model call at a time, in arrival order (the models are not re-entrant)."""

from __future__ import annotations

import threading
import time

from serve.worker import ModelWorker


def test_model_calls_run_one_at_a_time_in_arrival_order():
    worker = ModelWorker(max_pending=8)
    lock, running, overlaps, order = threading.Lock(), [0], [], []

    def call(i):
        with lock:
            running[0] += 1
            overlaps.append(running[0])
        time.sleep(0.02)  # long enough for a second thread, if there were one, to start its call
        with lock:
            running[0] -= 1
            order.append(i)

    try:
        futures = [worker.submit(call, i) for i in range(6)]
        for future in futures:
            future.result(timeout=30)
    finally:
        worker.close()
    assert max(overlaps) == 1 and order == list(range(6))
    assert worker.pending == 0 and worker.served == 6
