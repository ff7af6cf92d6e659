"""MoE routers: which experts each token goes to, and with what weight.

DeepSeek-V3 (sigmoid, "noaux_tc"): s = sigmoid(logits); choice = s + e_score_correction_bias;
  group score = sum of the top-2 `choice` in each of n_group groups; keep the topk_group best groups;
  top-k of `choice` inside them; the weights are `s` (without bias) at those experts,
  renormalised to sum 1 if `norm`, times `scale`.
DeepSeek-V2 / Qwen / Mixtral (softmax): p = softmax(logits); optional group limit (group score = max p);
  top-k of p; optional renormalisation; times `scale`.
"""

from __future__ import annotations

import torch


def _group_mask(choice: torch.Tensor, n_group: int, topk_group: int, per_group: str) -> torch.Tensor:
    T, E = choice.shape
    grouped = choice.view(T, n_group, E // n_group)
    score = grouped.topk(2, dim=-1)[0].sum(-1) if per_group == "top2sum" else grouped.max(-1)[0]  # [T, G]
    keep = torch.zeros_like(score).scatter_(1, score.topk(topk_group, dim=-1)[1], 1.0)
    return keep.bool().unsqueeze(-1).expand(T, n_group, E // n_group).reshape(T, E)


def route(logits: torch.Tensor, k: int, *, gating: str, bias: torch.Tensor | None = None, n_group: int = 1,
          topk_group: int = 1, norm: bool = False, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [T, E] float32 -> (expert ids [T, k] int64, weights [T, k] float32)."""
    logits = logits.float()
    if gating == "sigmoid":
        probs = logits.sigmoid()
        choice = probs + bias if bias is not None else probs
        per_group = "top2sum"
    else:
        probs = logits.softmax(-1)
        choice, per_group = probs, "max"
    if n_group > 1 and topk_group < n_group:
        choice = choice.masked_fill(~_group_mask(choice, n_group, topk_group, per_group), float("-inf"))
    ids = choice.topk(k, dim=-1)[1]  # [T, k]
    weights = probs.gather(1, ids)
    if norm:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    return ids, weights * scale
