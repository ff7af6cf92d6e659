"""The generation loop: prefill, then decode one token at a time through the KV cache.

The engine remembers which tokens its cache holds. A new request that starts with the same tokens
(the next turn of a chat) reuses that prefix and prefills only the rest; the result is the same as
recomputing from scratch, only faster.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from ktx.errors import KtxError
from ktx.sampling import Sampler, SamplingParams


@dataclass
class GenStats:
    prompt_tokens: int = 0
    reused_tokens: int = 0
    new_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    finish_reason: str = ""

    @property
    def prefill_tps(self) -> float:
        return (self.prompt_tokens - self.reused_tokens) / self.prefill_s if self.prefill_s else 0.0

    @property
    def decode_tps(self) -> float:
        return (self.new_tokens - 1) / self.decode_s if self.decode_s and self.new_tokens > 1 else 0.0

    def line(self) -> str:
        return (f"prefill {self.prompt_tokens - self.reused_tokens} tok @ {self.prefill_tps:.1f} tok/s"
                f" | decode {self.new_tokens} tok @ {self.decode_tps:.1f} tok/s")


class Engine:
    def __init__(self, model, cache_len: int):
        self.model = model
        self.cache = model.new_cache(cache_len)
        self.cached: list[int] = []  # tokens whose K/V are in the cache
        self.stats = GenStats()

    @property
    def capacity(self) -> int:
        return self.cache.capacity

    def reset(self) -> None:
        self.cache.reset(0)
        self.cached = []

    def logits(self, ids: list[int]) -> np.ndarray:
        """One prefill of `ids` from an empty cache -> float32 [T, vocab]."""
        self.reset()
        out = self.model.forward(torch.tensor(ids, dtype=torch.int64), self.cache).numpy()
        self.cached = list(ids)
        return out

    def _prefill(self, ids: list[int]) -> np.ndarray:
        common = 0
        for a, b in zip(self.cached, ids):
            if a != b:
                break
            common += 1
        common = min(common, len(ids) - 1)  # always run at least one token to get logits
        self.cache.reset(common)
        self.cached = self.cached[:common]
        self.stats.reused_tokens = common
        logits = self.model.forward(torch.tensor(ids[common:], dtype=torch.int64), self.cache, last_only=True)
        self.cached = list(ids)
        return logits[-1].numpy()

    def generate(self, prompt_ids: list[int], max_new_tokens: int, sampling: SamplingParams | None = None,
                 stop_ids: set[int] | frozenset = frozenset()) -> Iterator[int]:
        """Yield generated token ids. Stops at a stop id (not yielded), at max_new_tokens, or when the cache is full
        (finish_reason 'length'). Raises KtxError if the prompt itself does not fit."""
        if not prompt_ids:
            raise KtxError("empty prompt: give at least one token")
        if len(prompt_ids) >= self.capacity:
            raise KtxError(f"prompt of {len(prompt_ids)} tokens does not fit the KV cache of {self.capacity}; raise --cache-len.")
        sampler = Sampler(sampling or SamplingParams())
        self.stats = GenStats(prompt_tokens=len(prompt_ids))
        t0 = time.perf_counter()
        logits = self._prefill(prompt_ids)
        self.stats.prefill_s = time.perf_counter() - t0
        history = list(prompt_ids)
        t1 = time.perf_counter()
        self.stats.finish_reason = "length"
        for n in range(max_new_tokens):
            tok = sampler(logits, history)
            if tok in stop_ids:
                self.stats.finish_reason = "stop"
                break
            history.append(tok)
            self.stats.new_tokens += 1
            if n == 0:
                t1 = time.perf_counter()  # decode speed excludes the first token (it came from prefill)
            yield tok
            if n + 1 == max_new_tokens or len(self.cached) >= self.capacity:
                break
            logits = self.model.forward(torch.tensor([tok], dtype=torch.int64), self.cache, last_only=True)[-1].numpy()
            self.cached.append(tok)
            self.stats.decode_s = time.perf_counter() - t1
