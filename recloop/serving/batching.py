"""Dynamic batching of the features + ranking stages across concurrent requests.

Much of a ranking call's cost is fixed per call, not per row: Feast's request handling, building the
ranker's input frame, a torch call. One worker thread therefore takes every request waiting when it becomes free and runs them as
one Feast read and one ranker call: with no concurrency a batch is one request (no added delay), under
load batches grow and the fixed cost is shared, so throughput rises with load instead of queueing up.
This is the dynamic batching of model servers (Triton, TF Serving), without a batching timeout.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)


@dataclass
class Job:
    """One request's share of a batch: `payload` in, `result` (or `error`) out, and the batch's timings."""

    payload: Any
    submitted: float = field(default_factory=time.perf_counter)
    result: Any = None
    error: BaseException | None = None
    timings: dict[str, float] = field(default_factory=dict)
    done: threading.Event = field(default_factory=threading.Event)


class Batcher:
    """Runs `process(jobs)` on one worker thread over whatever jobs are waiting (at most `max_batch`).

    `process` fills each job's `result` or `error` and `timings`; an exception escaping it fails every job
    of the batch with that exception.
    """

    def __init__(self, process: Callable[[Sequence[Job]], None], *, max_batch: int = 64, name: str = "batcher") -> None:
        self.process = process
        self.max_batch = max_batch
        self._queue: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=f"recloop-{name}", daemon=True)
        self._thread.start()

    def run(self, payload: Any) -> Job:
        """Submit `payload` and wait for its batch; returns the finished job (its `error` re-raised)."""
        job = Job(payload)
        self._queue.put(job)
        job.done.wait()
        if job.error is not None:
            raise job.error
        return job

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            jobs = [first]
            while len(jobs) < self.max_batch:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self._queue.put(None)  # stop after this batch
                    break
                jobs.append(nxt)
            started = time.perf_counter()
            try:
                self.process(jobs)
            except BaseException as err:  # noqa: BLE001 - handed to every waiting request, which re-raises it
                for job in jobs:
                    job.error = err
            for job in jobs:
                job.timings["batch_wait"] = started - job.submitted
                job.timings["batch_size"] = float(len(jobs))
                job.done.set()

    def close(self) -> None:
        """Finish the jobs already submitted, then stop the worker."""
        self._queue.put(None)
        self._thread.join()
