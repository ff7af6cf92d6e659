"""Split each MoE layer across devices and overlap them. Imports no torch (a test checks it).

For one MoE layer and one batch of tokens:

    split = sched.submit(layer, x, ids, w)   # routing [T, k] -> CPU part and GPU part; CPU workers start now
    ...caller runs the shared experts and split.gpu_ids/gpu_w (hot experts) on the GPU...
    sched.gpu_done(layer)                    # marks the end of the GPU span for the timeline
    y_cpu = sched.wait(layer)                # joins the CPU job -> [T, H]

An expert is "GPU-resident" when `gpu_mask[layer][e]` is set (the N hottest experts of that layer with
--gpu-experts N); every other chosen expert is a CPU job. A slot that goes to the other side is marked -1
(skip) with weight 0, so both sides see the same [T, k] shapes.

Selective experts (--experts-per-token K < the model's k): keep each token's K highest-weight experts
and drop the rest *without* renormalising: the kept weights are the model's own, so the output is the
model's output minus the smallest contributions (renormalising would inflate every kept expert).

The timeline records, per step, CPU busy time (submit -> CPU job finished), GPU busy time (submit ->
gpu_done) and how much of the CPU time the GPU work overlapped.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np


@dataclass
class Split:
    cpu_ids: np.ndarray  # [T, k] int32, -1 = not on the CPU
    cpu_w: np.ndarray  # [T, k] float32
    gpu_ids: np.ndarray  # [T, k] int32, -1 = not on the GPU
    gpu_w: np.ndarray  # [T, k] float32

    @property
    def has_gpu_work(self) -> bool:
        return bool((self.gpu_ids >= 0).any())


def select_top(ids: np.ndarray, w: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Keep each token's k highest-weight experts (no renormalisation) -> ids, w of width k."""
    if k >= ids.shape[1]:
        return ids, w
    order = np.argsort(-w, axis=1, kind="stable")[:, :k]  # [T, k]
    return np.take_along_axis(ids, order, 1), np.take_along_axis(w, order, 1)


def split_routing(ids: np.ndarray, w: np.ndarray, gpu_mask: np.ndarray | None) -> Split:
    ids = np.ascontiguousarray(ids, dtype=np.int32)
    w = np.ascontiguousarray(w, dtype=np.float32)
    if gpu_mask is None or not gpu_mask.any():
        return Split(ids, w, np.full_like(ids, -1), np.zeros_like(w))
    on_gpu = (ids >= 0) & gpu_mask[np.maximum(ids, 0)]  # [T, k]
    return Split(np.where(on_gpu, -1, ids).astype(np.int32), np.where(on_gpu, 0, w).astype(np.float32),
                 np.where(on_gpu, ids, -1).astype(np.int32), np.where(on_gpu, w, 0).astype(np.float32))


@dataclass
class _Pending:
    job: object | None
    t_submit: float
    t_gpu_done: float | None = None
    shape: tuple = ()


@dataclass
class Timeline:
    """Accumulated over the layers of the current step (reset by `new_step`)."""

    cpu_busy: float = 0.0
    gpu_busy: float = 0.0
    overlap: float = 0.0
    wait: float = 0.0  # time the caller spent blocked in wait()
    layers: int = 0
    history: list = field(default_factory=list)

    @property
    def overlap_fraction(self) -> float:
        """Share of the shorter side's busy time that ran concurrently with the other side."""
        shorter = min(self.cpu_busy, self.gpu_busy)
        return self.overlap / shorter if shorter > 0 else 0.0

    def summary(self) -> dict:
        return {"cpu_busy_s": self.cpu_busy, "gpu_busy_s": self.gpu_busy, "overlap_s": self.overlap,
                "overlap_fraction": self.overlap_fraction, "wait_s": self.wait, "moe_layers": self.layers}


class Scheduler:
    """Hands CPU expert jobs to a backend per layer; `backends[layer].submit(x, ids, w)` -> job with wait()."""

    def __init__(self, backends: dict, gpu_mask: dict | None = None, experts_per_token: int | None = None):
        self.backends = backends
        self.gpu_mask = gpu_mask or {}  # layer -> bool [E]
        self.experts_per_token = experts_per_token
        self.timeline = Timeline()
        self._pending: dict[int, _Pending] = {}

    def new_step(self) -> Timeline:
        """Start a new step's statistics; returns the finished one."""
        done, self.timeline = self.timeline, Timeline()
        return done

    def submit(self, layer: int, x: np.ndarray, ids: np.ndarray, w: np.ndarray) -> Split:
        if layer in self._pending:
            raise RuntimeError(f"layer {layer} submitted twice without wait()")
        if self.experts_per_token:
            ids, w = select_top(ids, w, self.experts_per_token)
        split = split_routing(ids, w, self.gpu_mask.get(layer))
        t0 = time.perf_counter()
        job = None
        if (split.cpu_ids >= 0).any():
            job = self.backends[layer].submit(np.ascontiguousarray(x, dtype=np.float32), split.cpu_ids, split.cpu_w)
        self._pending[layer] = _Pending(job, t0, shape=x.shape)
        return split

    def gpu_done(self, layer: int) -> None:
        self._pending[layer].t_gpu_done = time.perf_counter()

    def wait(self, layer: int) -> np.ndarray:
        p = self._pending.pop(layer)
        t_wait = time.perf_counter()
        y = p.job.wait() if p.job is not None else np.zeros(p.shape, np.float32)
        t_end = time.perf_counter()
        cpu_end = getattr(p.job, "t_done", None) or t_end if p.job is not None else p.t_submit
        gpu_end = p.t_gpu_done or t_wait
        tl = self.timeline
        tl.cpu_busy += cpu_end - p.t_submit
        tl.gpu_busy += gpu_end - p.t_submit
        tl.overlap += max(0.0, min(cpu_end, gpu_end) - p.t_submit)
        tl.wait += t_end - t_wait
        tl.layers += 1
        return y
