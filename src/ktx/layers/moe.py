"""Routed experts and the MLP they are made of.

An experts backend takes one MoE layer's routing and returns the weighted sum of expert outputs:
  y[t] = sum_j w[t, j] * down_e(silu(gate_e(x[t])) * up_e(x[t])),   e = ids[t, j]
It is asynchronous: `submit` returns a job at once and `job.wait()` gives y, so the caller can run the
shared experts meanwhile. `TorchExperts` is the float reference (dequantize each chosen expert);
`KernelExperts` wraps the CPU kernels of `ktx.kernels_cpu` (int8/int4, worker threads).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ktx.layers.weights import WeightStore


def mlp(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    """SwiGLU MLP: down(silu(gate x) * up x); weights in [out, in] order."""
    return (F.silu(x @ w_gate.T) * (x @ w_up.T)) @ w_down.T


class _Done:
    def __init__(self, y: torch.Tensor):
        self.y = y

    def wait(self) -> torch.Tensor:
        return self.y


class TorchExperts:
    kernel_path = "torch reference (dequantize + float32 matmul)"

    def __init__(self, store: WeightStore, prefix: str):
        self.store, self.prefix = store, prefix  # prefix "blk.N."

    def submit(self, x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor) -> _Done:
        y = torch.zeros_like(x)  # [T, H]
        for e in torch.unique(ids).tolist():
            if e < 0:
                continue
            tok, slot = torch.nonzero(ids == e, as_tuple=True)
            g = self.store.get(self.prefix + "ffn_gate_exps.weight", e)  # [I, H]
            u = self.store.get(self.prefix + "ffn_up_exps.weight", e)
            d = self.store.get(self.prefix + "ffn_down_exps.weight", e)  # [H, I]
            y.index_add_(0, tok, mlp(x[tok], g, u, d) * w[tok, slot, None])
        return _Done(y)


class _KernelJob:
    def __init__(self, job):
        self.job = job

    def wait(self) -> torch.Tensor:
        return torch.from_numpy(self.job.wait())


class KernelExperts:
    """Routed experts on `ktx.kernels_cpu.MoEExperts` (quantized kernels on worker threads)."""

    def __init__(self, gguf_model, prefix: str, hidden: int, inter: int, pool, path: str = "auto", cache_dir=None):
        from ktx.kernels_cpu import MoEExperts

        def raw(kind):
            t = gguf_model.tensor(f"{prefix}ffn_{kind}_exps.weight")
            return t.data, t.qtype

        self.impl = MoEExperts(gate=raw("gate"), up=raw("up"), down=raw("down"), hidden=hidden, inter=inter, pool=pool,
                               path=path, cache_dir=cache_dir, cache_key=f"{gguf_model.identity()}#{prefix}")
        self.kernel_path = self.impl.kernel_path

    def submit(self, x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor) -> _KernelJob:
        x_np = np.ascontiguousarray(x.detach().numpy(), dtype=np.float32)
        return _KernelJob(self.impl.submit(x_np, ids.to(torch.int32).numpy(), w.float().contiguous().numpy()))
