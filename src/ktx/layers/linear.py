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

Weights that multiply the same input (`FUSE`: q_a with kv_a, gate with up, q with k and v) go through
`lin.many(x, names)`. The quantized backend repacks such a group as one matrix (rows stacked) when the
members share type and width, so decode makes one kernel call instead of two or three: fewer pool wake-ups,
one longer weight stream.
"""

from __future__ import annotations

import re

import numpy as np
import torch
from gguf import GGMLQuantizationType as QT
from gguf.quants import quantize

from ktx.layers.weights import WeightStore

# attention projections, dense and shared-expert MLPs, the lm_head (llama.cpp tensor names)
DENSE = re.compile(r"^(blk\.\d+\.(attn_(q|q_a|q_b|k|v|kv_a_mqa|k_b|v_b|output)|ffn_(gate|up|down)(_shexp)?)|output)\.weight$")
# groups of one layer's weights applied to the same input, first match wins (GQA's q/k/v before MLA's q/kv_a)
FUSE = (("attn_q", "attn_k", "attn_v"), ("attn_q_a", "attn_kv_a_mqa"), ("attn_q", "attn_kv_a_mqa"),
        ("ffn_gate", "ffn_up"), ("ffn_gate_shexp", "ffn_up_shexp"))


class FloatLinears:
    kernel_path = "dense weights: float32 torch matmul on dequantized weights"

    def __init__(self, store: WeightStore):
        self.store = store

    def __call__(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return x @ self.store.get(name).T  # [T, K] @ [K, R]

    def heads(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return torch.bmm(x, self.store.get(name).transpose(1, 2))  # [B, T, K] @ [B, K, R]

    def many(self, x: torch.Tensor, names: list[str]) -> list[torch.Tensor]:
        """[x @ W^T for W in names]: several weights on one input (see FUSE)."""
        return [self(x, n) for n in names]

    def derived(self, key: str, make):
        """An int8 op for a float32 weight [R, K] that the model derives from GGUF tensors (make() builds it, e.g.
        MLA's per-head K/V expansion, which needs W_UK transposed); None: the float path keeps the floats."""
        return None

    def prepare(self, names) -> None:
        """Make the backend ready for these tensors up front (nothing to do for the float path)."""

    def describe(self) -> str:
        return self.kernel_path


class QuantLinears(FloatLinears):
    def __init__(self, store: WeightStore, pool, path: str = "auto"):
        super().__init__(store)
        self.pool, self.path = pool, path
        self.ops: dict[str, object] = {}  # name -> QuantLinear, or None for the float path
        self.fused: dict[tuple[str, ...], tuple[object, list[int]]] = {}  # names -> (stacked QuantLinear, rows each)
        self.derived_ops: dict[str, object] = {}  # key -> QuantLinear of a derived weight (see derived), or None

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

    def many(self, x: torch.Tensor, names: list[str]) -> list[torch.Tensor]:
        hit = self.fused.get(tuple(names))
        if hit is None:
            return super().many(x, names)
        op, rows = hit
        return list(torch.from_numpy(op(x.numpy())).split(rows, dim=-1))

    def derived(self, key: str, make):
        """make()'s float32 [R, K] quantized once to Q8_0 (8-bit codes per 32: the derived weight keeps the
        precision of the 4-6-bit codes it came from) and repacked, kept under `key`; None where K is not a multiple
        of 32."""
        from ktx.kernels_cpu import QuantLinear

        op = self.derived_ops.get(key, False)
        if op is False:
            W = make().float().contiguous().numpy()
            op = None if W.shape[1] % 32 else QuantLinear(quantize(W, QT.Q8_0), QT.Q8_0, *W.shape, self.pool,
                                                           path=self.path, name=key)
            self.derived_ops[key] = op
        return op

    def _fuse(self, names: tuple[str, ...]) -> bool:
        """One stacked QuantLinear for weights of one type and width (raw rows concatenated, then repacked)."""
        from ktx.kernels_cpu import QuantLinear

        ts = [self.store.model.tensor(n) for n in names]
        rows = [t.shape[-2] for t in ts]
        if len({(t.qtype, t.shape[-1], t.data.dtype, len(t.shape)) for t in ts}) != 1 or len(ts[0].shape) != 2 \
                or ts[0].data.dtype != np.uint8 or not QuantLinear.supports(ts[0].qtype, sum(rows), ts[0].shape[-1]):
            return False
        raw = np.concatenate([np.asarray(t.data) for t in ts])  # [sum rows, row_bytes]
        op = QuantLinear(raw, ts[0].qtype, sum(rows), ts[0].shape[-1], self.pool, path=self.path, name="+".join(names))
        self.fused[names] = (op, rows)
        return True

    def prepare(self, names) -> None:
        """Repack every dense weight now (with a progress bar on big models), not inside the first token; the FUSE
        groups as stacked matrices."""
        from ktx.progress import progress_bar

        names = list(names)
        have = set(names)
        groups, grouped = [], set()
        for p in sorted({n[: n.index(".", 4) + 1] for n in names if n.startswith("blk.")}):
            for g in FUSE:
                full = tuple(f"{p}{k}.weight" for k in g)
                if all(n in have and n not in grouped for n in full):
                    groups.append(full)
                    grouped.update(full)
        size = lambda ns: sum(self.store.model.tensor(n).n_bytes for n in ns)  # noqa: E731
        with progress_bar(disable=size(names) < 256 << 20) as bar:
            task = bar.add_task("repacking dense weights", total=size(names))
            for g in groups:
                if not self._fuse(g):
                    grouped.difference_update(g)
                bar.advance(task, size(g))
            for n in names:
                if n not in grouped:
                    self._op(n)
                    bar.advance(task, size([n]))

    def describe(self) -> str:
        fast = [op for op in self.ops.values() if op is not None] + [op for op, _ in self.fused.values()]
        if not fast:
            return FloatLinears.kernel_path
        paths = sorted({op.kernel_path.split(" (")[0] for op in fast})
        kinds = "/".join(sorted({op.qtype.name for op in fast}))
        n = len(fast) + sum(len(rows) - 1 for _, rows in self.fused.values())
        line = (f"dense weights: {n} tensors ({kinds}) on {', '.join(paths)}, repacked, int8 activations per 32"
                f" ({len(self.fused)} stacked groups)")
        slow = sorted({self.store.model.tensor(n).type_name for n, op in self.ops.items() if op is None})
        if slow:
            line += f"; {len(self.ops) - len(fast)} ({'/'.join(slow)}) as float32 torch matmul"
        derived = [k for k, op in self.derived_ops.items() if op is not None]
        if derived:  # built by the load's warm-up: in `ktx bench`'s kernel paths, not in the load's own line
            line += f"; {len(derived)} derived Q8_0 weights ({'/'.join(sorted({k.split('.', 2)[-1] for k in derived}))})"
        return line


def dense_names(gguf) -> list[str]:
    """The tensors a model multiplies as dense linears (the tied embedding too, when it serves as the lm_head)."""
    names = [n for n in gguf.tensors if DENSE.match(n)]
    if not gguf.has("output.weight"):
        names.append("token_embd.weight")
    return names
