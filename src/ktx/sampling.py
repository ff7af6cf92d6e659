"""Next-token sampling, in the order llama.cpp applies its samplers:
repetition penalty -> top-k -> top-p -> min-p -> temperature -> draw.  temperature 0 = greedy (argmax).

Repetition penalty (CTRL-style, as llama.cpp): for tokens seen in the last `repeat_last_n`, positive
logits are divided by the penalty and negative ones multiplied by it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ktx.errors import KtxError


@dataclass
class SamplingParams:
    temperature: float = 0.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    min_p: float = 0.0
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    seed: int | None = None

    def __post_init__(self):
        if self.temperature < 0:
            raise KtxError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise KtxError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p < 1:
            raise KtxError(f"min_p must be in [0, 1), got {self.min_p}")
        if self.top_k < 0:
            raise KtxError(f"top_k must be >= 0, got {self.top_k}")
        if self.repeat_penalty <= 0:
            raise KtxError(f"repeat_penalty must be > 0, got {self.repeat_penalty}")


class Sampler:
    def __init__(self, params: SamplingParams):
        self.p = params
        self.rng = np.random.default_rng(params.seed)

    def __call__(self, logits: np.ndarray, history: list[int]) -> int:
        """logits [vocab] float32 -> token id."""
        p = self.p
        logits = np.asarray(logits, dtype=np.float64)
        if p.repeat_penalty != 1.0 and history:
            seen = np.unique(np.asarray(history[-p.repeat_last_n:], dtype=np.int64))
            seen = seen[(seen >= 0) & (seen < logits.shape[0])]
            v = logits[seen]
            logits = logits.copy()
            logits[seen] = np.where(v > 0, v / p.repeat_penalty, v * p.repeat_penalty)
        if p.temperature == 0:
            return int(np.argmax(logits))
        ids = np.argsort(-logits, kind="stable")  # candidates, best first
        if p.top_k:
            ids = ids[: p.top_k]
        probs = np.exp(logits[ids] - logits[ids[0]])
        probs /= probs.sum()
        if p.top_p < 1.0:
            keep = int(np.searchsorted(np.cumsum(probs), p.top_p) + 1)
            ids, probs = ids[:keep], probs[:keep]
        if p.min_p > 0:
            keep = probs >= p.min_p * probs[0]
            ids, probs = ids[keep], probs[keep]
        z = logits[ids] / p.temperature
        probs = np.exp(z - z.max())
        probs /= probs.sum()
        return int(ids[self.rng.choice(len(ids), p=probs)])
