"""Rotary position embedding, with YaRN frequency correction.

Convention: llama.cpp's "normal" rope for deepseek2 rotates adjacent pairs (x[2i], x[2i+1]) by angle
pos * inv_freq[i]. (transformers' DeepSeek-V3 with `rope_interleave` de-interleaves q_pe/k_pe and
rotates halves; since q and k get the same permutation, q.k is identical.) `neox=True` rotates
(x[i], x[i + d/2]) instead (Qwen, Llama-3 style GGUFs).

YaRN (DeepSeek-V3 long context): frequencies are blended between extrapolation (original) and
interpolation (divided by `factor`) with a linear ramp over dimensions [low, high], where a dimension's
wavelength crosses beta_fast / beta_slow rotations of the original context.
"""

from __future__ import annotations

import math

import torch


def yarn_inv_freq(dim: int, base: float, factor: float, orig_ctx: int, beta_fast: float = 32.0, beta_slow: float = 1.0) -> torch.Tensor:
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)

    def correction_dim(n_rot: float) -> float:
        return dim * math.log(orig_ctx / (n_rot * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(beta_fast)), 0)
    high = min(math.ceil(correction_dim(beta_slow)), dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    keep = 1 - ramp  # 1 = extrapolate (high-frequency dims keep their original frequency)
    return interpolation * (1 - keep) + extrapolation * keep


class Rope:
    def __init__(self, dim: int, base: float, *, yarn_factor: float = 1.0, orig_ctx: int = 4096, beta_fast: float = 32.0,
                 beta_slow: float = 1.0, cos_sin_scale: float = 1.0, neox: bool = False):
        self.dim, self.neox, self.scale = dim, neox, cos_sin_scale
        if yarn_factor > 1.0:
            self.inv_freq = yarn_inv_freq(dim, base, yarn_factor, orig_ctx, beta_fast, beta_slow)
        else:
            self.inv_freq = 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)  # [dim/2]
        self._table = (None, None, None)  # (positions, cos, sin) of the last call

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [T, dim/2] (times the YaRN scale); kept for the last positions tensor, since every layer of a
        forward pass rotates at the same positions (q and k: 2 * n_layers calls for one table)."""
        if self._table[0] is not positions:
            angles = positions.float()[:, None] * self.inv_freq[None, :].to(positions.device)  # [T, dim/2]
            self._table = (positions, torch.cos(angles) * self.scale, torch.sin(angles) * self.scale)
        return self._table[1], self._table[2]

    def __call__(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x [T, ..., dim], positions [T] -> rotated x (float32)."""
        cos, sin = self.cos_sin(positions)
        shape = (x.shape[0],) + (1,) * (x.dim() - 2) + (self.dim // 2,)
        cos, sin = cos.view(shape), sin.view(shape)
        x = x.float()
        if self.neox:
            x1, x2 = x[..., : self.dim // 2], x[..., self.dim // 2:]
            return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
        x1, x2 = x[..., 0::2], x[..., 1::2]
        return torch.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).flatten(-2)
