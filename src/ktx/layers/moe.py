"""Routed experts and the MLP they are made of.

An experts backend takes one MoE layer's routing and returns the weighted sum of expert outputs:
  y[t] = sum_j w[t, j] * down_e(silu(gate_e(x[t])) * up_e(x[t])),   e = ids[t, j]  (-1 = skip)
Backends speak numpy (the scheduler imports no torch) and are asynchronous: `submit(x, ids, w)` returns a
job at once and `job.wait()` gives y [T, H], so the caller can run the shared experts meanwhile.

- `TorchExperts`: the float reference (dequantize each chosen expert, float32 matmuls), synchronous.
- `kernel_experts(...)`: `ktx.kernels_cpu.MoEExperts`, int8/int4 kernels on long-lived worker threads.
- `ShardedExperts`: one expert op split along the intermediate dimension into shards (one per NUMA node,
  each with its own pinned workers); every shard reads only its slice of the weights (no replication),
  and the partial down-projections add up to the whole.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ktx.layers.weights import WeightStore


def mlp(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    """SwiGLU MLP: down(silu(gate x) * up x); weights in [out, in] order."""
    return (F.silu(x @ w_gate.T) * (x @ w_up.T)) @ w_down.T


def experts_torch(store: WeightStore, prefix: str, x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Float reference of the routed-experts op: x [T, H], ids [T, k] (-1 = skip), w [T, k] -> [T, H]."""
    y = torch.zeros_like(x)
    for e in torch.unique(ids).tolist():
        if e < 0:
            continue
        tok, slot = torch.nonzero(ids == e, as_tuple=True)
        g = store.get(prefix + "ffn_gate_exps.weight", e)  # [I, H]
        u = store.get(prefix + "ffn_up_exps.weight", e)
        d = store.get(prefix + "ffn_down_exps.weight", e)  # [H, I]
        y.index_add_(0, tok, mlp(x[tok], g, u, d) * w[tok, slot, None])
    return y


def moe_step(net, i: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, shared=None) -> torch.Tensor:
    """One scheduled MoE layer of `net` (which has .scheduler, .store, .routing_counts): the routed experts go
    to the CPU workers at once; `shared()` (the shared experts) and any GPU-side hot experts run meanwhile;
    then join. x [T, H], ids/weights [T, k] -> [T, H], on x's device: the CPU job gets host copies (no-ops
    when x is on the CPU) and its result is copied back."""
    p = f"blk.{i}."
    xh, ids_h, w_h = x.cpu(), ids.cpu(), weights.cpu()
    if getattr(net, "routing_counts", None) is not None:
        counts = net.routing_counts.setdefault(i, np.zeros(net.cfg.n_expert, np.int64))
        np.add.at(counts, ids_h.flatten().numpy(), 1)
    split = net.scheduler.submit(i, xh.numpy(), ids_h.numpy(), w_h.numpy())
    y = shared() if shared is not None else torch.zeros_like(x)
    if split.has_gpu_work:  # hot experts: the float reference from host weights (not yet device-resident)
        hot = experts_torch(net.store, p, xh, torch.from_numpy(split.gpu_ids).long(), torch.from_numpy(split.gpu_w))
        y = y + hot.to(x.device)
    if y.is_cuda:
        torch.cuda.synchronize(y.device)  # the device side is done here, for the scheduler's timeline
    net.scheduler.gpu_done(i)
    return torch.from_numpy(net.scheduler.wait(i)).to(x.device) + y


class _Done:
    def __init__(self, y: np.ndarray):
        self.y = y

    def wait(self) -> np.ndarray:
        return self.y


class TorchExperts:
    kernel_path = "torch reference (dequantize + float32 matmul)"

    def __init__(self, store: WeightStore, prefix: str):
        self.store, self.prefix = store, prefix  # prefix "blk.N."

    def submit(self, x: np.ndarray, ids: np.ndarray, w: np.ndarray) -> _Done:
        y = experts_torch(self.store, self.prefix, torch.from_numpy(x), torch.from_numpy(ids).long(), torch.from_numpy(w))
        return _Done(y.numpy())


def _raw(gguf_model, prefix: str, kind: str):
    t = gguf_model.tensor(f"{prefix}ffn_{kind}_exps.weight")
    return t.data, t.qtype


def kernel_experts(gguf_model, prefix: str, hidden: int, inter: int, pool, path: str = "auto", cache_dir=None):
    """The quantized CPU expert op for one layer (numpy in/out, submit/wait)."""
    from ktx.kernels_cpu import MoEExperts

    return MoEExperts(gate=_raw(gguf_model, prefix, "gate"), up=_raw(gguf_model, prefix, "up"), down=_raw(gguf_model, prefix, "down"),
                      hidden=hidden, inter=inter, pool=pool, path=path, cache_dir=cache_dir,
                      cache_key=_cache_key(gguf_model, prefix) if cache_dir else None)


def _cache_key(gguf_model, prefix: str) -> str:
    """A file-name-safe key: the model's name plus a hash of its identity (paths, sizes, mtimes) and the layer."""
    import hashlib

    digest = hashlib.sha256(gguf_model.identity().encode()).hexdigest()[:16]
    return f"{gguf_model.path.stem}-{digest}-{prefix.rstrip('.')}"


def shard_bounds(inter: int, n: int, align: int) -> list[tuple[int, int]]:
    """Split [0, inter) into n contiguous ranges whose boundaries are multiples of `align` (quant block)."""
    blocks = inter // align
    cuts = [round(i * blocks / n) * align for i in range(n + 1)]
    return [(a, b) for a, b in zip(cuts, cuts[1:]) if b > a]


def slice_inter(raw_gate, raw_up, raw_down, qtype_down, lo: int, hi: int):
    """Views (no copies) of one intermediate-dimension slice: gate/up rows [lo, hi), down columns [lo, hi)."""
    import gguf

    block, type_bytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(qtype_down)]
    b0, b1 = lo // block * type_bytes, hi // block * type_bytes
    if raw_down.dtype != np.uint8:  # F32/F16 tensors come typed: slice elements, not bytes
        b0, b1 = lo, hi
    return raw_gate[:, lo:hi], raw_up[:, lo:hi], raw_down[:, :, b0:b1]


class _ShardJob:
    def __init__(self, jobs):
        self.jobs = jobs

    def wait(self) -> np.ndarray:
        parts = [j.wait() for j in self.jobs]
        out = parts[0].copy()
        for p in parts[1:]:
            out += p
        return out


class ShardedExperts:
    """Shards of one layer's experts along the intermediate dimension; outputs are summed."""

    def __init__(self, shards: list):
        self.shards = shards
        self.kernel_path = f"{len(shards)} shards x " + shards[0].kernel_path

    def submit(self, x: np.ndarray, ids: np.ndarray, w: np.ndarray) -> _ShardJob:
        return _ShardJob([s.submit(x, ids, w) for s in self.shards])
