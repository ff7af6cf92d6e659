"""Grouped-query attention over a plain KV cache (Llama, Qwen, Mixtral, Gemma).

The cache holds each layer's keys (after RoPE and any k-norm) and values:
    k [L, capacity, n_kv, head_dim]      v [L, capacity, n_kv, v_head_dim]      filled up to `length`
n_heads query heads share n_kv cache heads in groups of n_heads / n_kv (query head h reads cache head
h // group), so the cache is n_heads / n_kv times smaller than plain multi-head attention.

Query t (absolute position start + t) attends to cache row s when s <= start + t and, with a sliding
window W, start + t - s < W (the W most recent positions, itself included; llama.cpp's and
transformers' convention).
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(self, n_layers: int, capacity: int, n_kv: int, head_dim: int, v_head_dim: int, dtype=torch.float32):
        self.capacity = capacity
        self.k = torch.zeros(n_layers, capacity, n_kv, head_dim, dtype=dtype)
        self.v = torch.zeros(n_layers, capacity, n_kv, v_head_dim, dtype=dtype)
        self.length = 0  # tokens committed (advanced by the model after the last layer)

    @property
    def n_bytes(self) -> int:
        return self.k.numel() * self.k.element_size() + self.v.numel() * self.v.element_size()

    def reset(self, length: int = 0) -> None:
        self.length = length


def gqa_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, start: int, window: int = 0) -> torch.Tensor:
    """q [T, n_h, d]; k [S, n_kv, d], v [S, n_kv, dv] with S = start + T (the cache including this chunk)
    -> [T, n_h, dv]."""
    T, n_h, d = q.shape
    S, n_kv = k.shape[0], k.shape[1]
    qg = q.view(T, n_kv, n_h // n_kv, d).permute(1, 2, 0, 3)  # [n_kv, group, T, d]
    scores = (qg @ k.permute(1, 2, 0)[:, None]) * scale  # [n_kv, group, T, S]
    pos_q = start + torch.arange(T)[:, None]  # [T, 1]
    pos_k = torch.arange(S)[None, :]  # [1, S]
    masked = pos_k > pos_q
    if window:
        masked |= pos_q - pos_k >= window
    if masked.any():
        scores = scores.masked_fill(masked, float("-inf"))
    o = scores.softmax(-1) @ v.permute(1, 0, 2)[:, None]  # [n_kv, group, T, dv]
    return o.permute(2, 0, 1, 3).reshape(T, n_h, -1)  # [T, n_h, dv]
