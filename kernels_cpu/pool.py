"""Long-lived worker threads for GIL-free kernels.

Waking a fresh thread pool per MoE layer costs milliseconds on a small machine, so the workers live as long
as the model. A job is a callable `fn(worker_id, n_workers)`; every worker runs it once and the job's
`wait()` returns when all have finished. The callables spend their time inside Numba `nogil` functions,
which split work between themselves through an atomic counter (dynamic scheduling: a fast worker takes the
next chunk, which is work stealing without queues). Jobs run in submission order, one at a time.
"""
from __future__ import annotations

import queue
import threading
from typing import Callable


class Job:
    """Handle for one submitted job; `wait()` returns the value of `finish()` (if given) after all workers."""

    def __init__(self, fn: Callable[[int, int], None], n: int, finish: Callable[[], object] | None):
        self.fn, self.finish = fn, finish
        self._left = n
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._error: BaseException | None = None
        self._result = None

    def _run(self, wid: int, n: int) -> None:
        try:
            self.fn(wid, n)
        except BaseException as e:  # surfaced in wait(), on the caller's thread
            self._error = e
        with self._lock:
            self._left -= 1
            last = self._left == 0
        if last:
            if self._error is None and self.finish is not None:
                try:
                    self._result = self.finish()
                except BaseException as e:
                    self._error = e
            self._done.set()

    def wait(self):
        self._done.wait()
        if self._error is not None:
            raise self._error
        return self._result


class WorkerPool:
    """`n_threads` daemon workers; `submit(fn)` runs fn(worker_id, n_threads) on each of them."""

    def __init__(self, n_threads: int = 2):
        if n_threads < 1:
            raise ValueError(f"WorkerPool needs at least one thread, got {n_threads}")
        self.n_threads = n_threads
        self._queues = [queue.SimpleQueue() for _ in range(n_threads)]
        self._threads = [threading.Thread(target=self._loop, args=(i,), daemon=True, name=f"ktx-cpu-{i}")
                         for i in range(n_threads)]
        self._submit_lock = threading.Lock()
        self._spinners: list[Callable[[], None]] = []
        for t in self._threads:
            t.start()

    def _loop(self, wid: int) -> None:
        q = self._queues[wid]
        while True:
            job = q.get()
            if job is None:
                return
            job._run(wid, self.n_threads)

    def add_spinner(self, leave: Callable[[], None]) -> None:
        """Register a user whose jobs may keep a worker spinning after their work is done (the decode program's
        workers wait for the next token): every other submit, and close, call leave() first, so their job does
        not queue behind a spin."""
        self._spinners.append(leave)

    def submit(self, fn: Callable[[int, int], None], finish: Callable[[], object] | None = None,
               workers: int | None = None, spinner: Callable[[], None] | None = None) -> Job:
        """Run fn(worker_id, n_threads) on workers 0 .. workers - 1 (default: all). Callers that work beside the
        pool themselves (the decode program, QuantLinear) take one worker fewer: waking one only to run nothing
        cost a thread switch and a GIL hand-off per call. spinner: the leave function of the registered spinner
        (add_spinner) submitting this job, which is not asked to leave; all others are."""
        if not self._threads:
            raise RuntimeError("WorkerPool is closed")
        for leave in self._spinners:
            if leave is not spinner:
                leave()
        k = self.n_threads if workers is None else max(1, min(workers, self.n_threads))
        job = Job(fn, k, finish)
        with self._submit_lock:  # every queue sees jobs in the same order
            for q in self._queues[:k]:
                q.put(job)
        return job

    def run(self, fn: Callable[[int, int], None]) -> None:
        self.submit(fn).wait()

    def run_here(self, fn: Callable[[int, int], None], finish: Callable[[], object] | None = None):
        """submit(fn, finish).wait(), with the calling thread as the last worker (fn(n - 1, n) runs here): one
        thread fewer to wake, and no GIL hand-off to a worker that would only start what the caller could. An
        error in the caller's share waits for the workers first and raises theirs if they had one."""
        n = self.n_threads
        job = self.submit(fn, workers=n - 1) if n > 1 else None
        try:
            fn(n - 1, n)
        except BaseException:
            if job is not None:
                job.wait()
            raise
        if job is not None:
            job.wait()
        return finish() if finish is not None else None

    def close(self) -> None:
        for leave in self._spinners:
            leave()
        for q in self._queues:
            q.put(None)
        for t in self._threads:
            t.join()
        self._threads = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
