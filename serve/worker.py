"""One thread runs every model call, in arrival order, behind a bounded queue.

    worker = ModelWorker(max_pending=16)
    result = await asyncio.wrap_future(worker.submit(explorer.transition, request))   # raises Busy when full

The models are not re-entrant and the machine has few cores: concurrent requests
would only thrash. Requests beyond `max_pending` (running + waiting) are refused
at once with `Busy` (answered 503), so a burst cannot build an unbounded backlog.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor


class Busy(Exception):
    """The model queue is full (answered with 503)."""


class ModelWorker:
    def __init__(self, max_pending: int = 16):
        if max_pending < 1:
            raise ValueError("max_pending must be >= 1")
        self.max_pending = max_pending
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")
        self._pending = 0
        self._lock = threading.Lock()
        self.served = 0
        self.refused = 0

    @property
    def pending(self) -> int:
        return self._pending

    def submit(self, fn, *args, **kwargs) -> Future:
        with self._lock:
            if self._pending >= self.max_pending:
                self.refused += 1
                raise Busy(f"model queue full ({self.max_pending} requests running or waiting); retry shortly")
            self._pending += 1
        future = self._executor.submit(fn, *args, **kwargs)
        future.add_done_callback(self._done)
        return future

    def _done(self, _future: Future) -> None:
        with self._lock:
            self._pending -= 1
            self.served += 1

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
