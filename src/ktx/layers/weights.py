"""Dequantized weights on demand, with a byte budget.

Weights stay in the GGUF mmap. A layer asks `store.get(name)` for a float32 torch tensor; the store
dequantizes it (numpy reference, `ktx.quants`) and keeps it while the cache stays under its budget,
evicting the least recently used tensors first. So a file whose float32 expansion is larger than RAM
still runs (slowly: each use re-dequantizes what was evicted), and a small one runs from cache.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch

from ktx.errors import KtxError
from ktx.gguf_file import GGUFModel
from ktx.quants import dequantize


class WeightStore:
    def __init__(self, model: GGUFModel, budget_bytes: int):
        self.model = model
        self.budget = int(budget_bytes)
        self._cache: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self._used = 0

    def has(self, name: str) -> bool:
        return self.model.has(name)

    def get(self, name: str, index: int | None = None) -> torch.Tensor:
        """float32 weight `name` (numpy-order shape); `index` picks one slice of a stacked tensor (an expert)."""
        key = (name, index)
        w = self._cache.get(key)
        if w is not None:
            self._cache.move_to_end(key)
            return w
        t = self.model.tensor(name)
        raw = t.data if index is None else t.data[index]
        shape = t.shape if index is None else t.shape[1:]
        try:
            arr = np.asarray(dequantize(raw, t.qtype), dtype=np.float32).reshape(shape)
        except KtxError as e:
            raise KtxError(f"{t.file}: tensor {name} ({t.type_name}): {e}") from None
        w = torch.from_numpy(arr if arr.flags.writeable and arr.flags.c_contiguous else arr.copy())
        self._remember(key, w)
        return w

    def _remember(self, key: tuple, w: torch.Tensor) -> None:
        size = w.numel() * 4
        if size > self.budget:
            return
        while self._used + size > self.budget and self._cache:
            _, old = self._cache.popitem(last=False)
            self._used -= old.numel() * 4
        self._cache[key] = w
        self._used += size
