"""The dense matmuls of a model, y = x @ W^T for one GGUF weight W, behind one small interface.

Models never touch dense weights directly; they call `lin(x, name)` (x [T, K] -> [T, R]) and
`lin.heads(x, name)` (per-head matrices W [B, R, K]: x [B, T, K] -> [B, T, R], MLA's attn_k_b/attn_v_b).
Backends:

- `FloatLinears`: dequantize to float32 once (the `WeightStore` LRU budget) and use a torch matmul. Exact
  reference, but it reads 4-8x the GGUF's bytes per token.
- `QuantLinears`: the CPU int8-activation kernels (`ktx.kernels_cpu.QuantLinear`) straight on the repacked
  GGUF codes: the bytes a decoded token reads are the file's own. Weights whose type or shape the kernels
  do not take (F32/F16/BF16, K not a multiple of the quant block) go through the float path; the list is
  printed at load (`describe`) so a slow fallback is never silent.

Which tensors are dense linears is decided by name (`DENSE`), so every architecture shares the list.
"""

from __future__ import annotations

import re

import numpy as np
import torch

from ktx.layers.weights import WeightStore

# attention projections, dense and shared-expert MLPs, the lm_head (llama.cpp tensor names)
DENSE = re.compile(r"^(blk\.\d+\.(attn_(q|q_a|q_b|k|v|kv_a_mqa|k_b|v_b|output)|ffn_(gate|up|down)(_shexp)?)|output)\.weight$")


class FloatLinears:
    kernel_path = "dense weights: float32 torch matmul on dequantized weights"

    def __init__(self, store: WeightStore):
        self.store = store

    def __call__(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return x @ self.store.get(name).T  # [T, K] @ [K, R]

    def heads(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return torch.bmm(x, self.store.get(name).transpose(1, 2))  # [B, T, K] @ [B, K, R]

    def prepare(self, names) -> None:
        """Make the backend ready for these tensors up front (nothing to do for the float path)."""

    def describe(self) -> str:
        return self.kernel_path


class QuantLinears(FloatLinears):
    def __init__(self, store: WeightStore, pool, path: str = "auto"):
        super().__init__(store)
        self.pool, self.path = pool, path
        self.ops: dict[str, object] = {}  # name -> QuantLinear, or None for the float path
        self.kernel_path = "quantized CPU kernels"

    def _op(self, name: str):
        op = self.ops.get(name, False)
        if op is False:
            op = self.ops[name] = self._build(name)
        return op

    def _build(self, name: str):
        from ktx.kernels_cpu import QuantLinear

        t = self.store.model.tensor(name)
        rows, cols = t.shape[-2], t.shape[-1]
        if t.data.dtype != np.uint8 or not QuantLinear.supports(t.qtype, rows, cols):
            return None
        return QuantLinear(t.data, t.qtype, rows, cols, self.pool, path=self.path, name=name)

    def __call__(self, x: torch.Tensor, name: str) -> torch.Tensor:
        op = self._op(name)
        return super().__call__(x, name) if op is None else torch.from_numpy(op(x.numpy()))

    def heads(self, x: torch.Tensor, name: str) -> torch.Tensor:
        op = self._op(name)
        return super().heads(x, name) if op is None else torch.from_numpy(op(x.numpy()))

    def prepare(self, names) -> None:
        """Repack every dense weight now (with a progress bar on big models), not inside the first token."""
        from rich.console import Console
        from rich.progress import Progress

        names = list(names)
        total = sum(self.store.model.tensor(n).n_bytes for n in names)
        with Progress(transient=True, disable=total < 256 << 20, console=Console(stderr=True)) as bar:
            task = bar.add_task("repacking dense weights", total=total)
            for n in names:
                self._op(n)
                bar.advance(task, self.store.model.tensor(n).n_bytes)

    def describe(self) -> str:
        fast = [op for op in self.ops.values() if op is not None]
        if not fast:
            return FloatLinears.kernel_path
        paths = sorted({op.kernel_path.split(" (")[0] for op in fast})
        kinds = "/".join(sorted({op.qtype.name for op in fast}))
        line = f"dense weights: {len(fast)} tensors ({kinds}) on {', '.join(paths)}, repacked, int8 activations per 32"
        slow = sorted({self.store.model.tensor(n).type_name for n, op in self.ops.items() if op is None})
        if slow:
            line += f"; {len(self.ops) - len(fast)} ({'/'.join(slow)}) as float32 torch matmul"
        return line


def dense_names(gguf) -> list[str]:
    """The tensors a model multiplies as dense linears (the tied embedding too, when it serves as the lm_head)."""
    names = [n for n in gguf.tensors if DENSE.match(n)]
    if not gguf.has("output.weight"):
        names.append("token_embd.weight")
    return names
