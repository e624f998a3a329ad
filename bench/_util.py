"""Shared by the benchmarks: peak-memory sampling."""

import contextlib
import threading

import psutil


class PeakRSS:
    """Samples resident memory every `interval` seconds: this process's, or with `children=True` this process's
    plus its children's (recursively; each sample then walks the process table, so a long benchmark on
    few cores samples less often: the sampling competes with what it measures). `reset()` starts a new
    peak (a stage of a benchmark)."""

    def __init__(self, *, children: bool = False, interval: float = 0.05) -> None:
        self.peak = 0
        self._interval = interval
        self._children = children
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._proc = psutil.Process()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> int:
        total = self._proc.memory_info().rss
        if self._children:
            for child in self._proc.children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    total += child.memory_info().rss
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(psutil.Error), self._lock:  # a reset never loses to a sample taken before it
                self.peak = max(self.peak, self.sample())
            self._stop.wait(self._interval)

    def reset(self) -> None:
        with self._lock:
            self.peak = self.sample()

    def __enter__(self) -> "PeakRSS":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
