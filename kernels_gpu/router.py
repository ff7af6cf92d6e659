"""MoE router: expert scores, group-limited top-k, weights. One program per token.

    logits [T, E] fp32 (hidden @ W_gate^T, computed by the caller)
    -> expert_ids [T, k] int32, expert_weights [T, k] fp32, best choice first

DeepSeek-V3 (scoring "sigmoid"):
    score  = sigmoid(logits)                    # [E]
    choice = score + e_score_correction_bias    # the bias only steers selection
    group score = sum of the top 2 choices in each of n_group equal groups; keep the topk_group best groups
    ids = top-k of choice over the kept groups (others at -inf)
    w   = score[ids] (no bias), / (sum + 1e-20) if norm_topk_prob, * routed_scaling_factor
DeepSeek-V2 (scoring "softmax"): score = softmax(logits), no bias; group score = the group's max
("group_limited_greedy"; n_group = 1 is plain greedy top-k); same tail.

Ties go to the lower expert index (torch.topk leaves the order unspecified). E is padded to a power
of two; group membership is e // (E / n_group), so E / n_group need not be one.
"""

import torch
import triton
import triton.language as tl

from ktx.errors import KtxError
from ktx.kernels_gpu.device import check_device, check_scalar


@triton.jit
def _first_argmax(x, idx, BIG: tl.constexpr):
    best = tl.max(x, axis=0)
    return best, tl.min(tl.where(x == best, idx, BIG), axis=0)


@triton.jit
def _router_kernel(logit_ptr, bias_ptr, ids_ptr, w_ptr, E, group_size, scaling,
                   EP: tl.constexpr, N_GROUP: tl.constexpr, GP: tl.constexpr, TOPK_GROUP: tl.constexpr,
                   TOP_K: tl.constexpr, KP: tl.constexpr, SIGMOID: tl.constexpr, HAS_BIAS: tl.constexpr, NORM: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    e = tl.arange(0, EP)
    em = e < E
    logit = tl.load(logit_ptr + t * E + e, mask=em, other=float("-inf")).to(tl.float32)  # [EP]
    if SIGMOID:
        score = tl.where(em, 1.0 / (1.0 + tl.exp(-logit)), 0.0)
    else:
        z = tl.exp(logit - tl.max(logit, axis=0))
        score = z / tl.sum(z, axis=0)
    choice = score
    if HAS_BIAS:
        choice = choice + tl.load(bias_ptr + e, mask=em, other=0.0)
    # padding lanes and NaN scores can never win, so every id is an expert (a NaN row picks expert 0)
    choice = tl.where(em & (choice == choice), choice, float("-inf"))

    if N_GROUP > 1:
        group = e // group_size  # [EP]
        g = tl.arange(0, GP)
        gscore = tl.full((GP,), float("-inf"), tl.float32)
        for i in tl.static_range(N_GROUP):
            mine = tl.where(group == i, choice, float("-inf"))
            top1, at = _first_argmax(mine, e, EP)
            if SIGMOID:  # sum of the two best; the second may equal the first
                top1 = top1 + tl.max(tl.where(e == at, float("-inf"), mine), axis=0)
            gscore = tl.where(g == i, top1, gscore)
        keep = e < 0  # all False
        for _ in tl.static_range(TOPK_GROUP):
            _, gi = _first_argmax(gscore, g, GP)
            keep = keep | (group == gi)
            gscore = tl.where(g == gi, float("-inf"), gscore)
        choice = tl.where(keep, choice, float("-inf"))

    k = tl.arange(0, KP)  # top_k padded to a power of two (V2-Lite uses 6)
    ids = tl.zeros((KP,), tl.int32)
    w = tl.zeros((KP,), tl.float32)
    for i in tl.static_range(TOP_K):
        _, at = _first_argmax(choice, e, EP)
        ids = tl.where(k == i, at, ids)
        w = tl.where(k == i, tl.sum(tl.where(e == at, score, 0.0), axis=0), w)
        choice = tl.where(e == at, float("-inf"), choice)
    if NORM:
        w = w / (tl.sum(w, axis=0) + 1e-20)
    tl.store(ids_ptr + t * TOP_K + k, ids, mask=k < TOP_K)
    tl.store(w_ptr + t * TOP_K + k, w * scaling, mask=k < TOP_K)


def route(logits: torch.Tensor, top_k: int, *, scoring: str = "sigmoid", bias: torch.Tensor | None = None,
          n_group: int = 1, topk_group: int = 1, norm_topk_prob: bool = True,
          routed_scaling_factor: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [T, E] -> (expert_ids [T, top_k] int32, expert_weights [T, top_k] fp32)."""
    _check(logits, top_k, scoring, bias, n_group, topk_group, routed_scaling_factor)
    check_device("route", logits, *([] if bias is None else [bias]))
    t, n_expert = logits.shape
    ids = torch.empty(t, top_k, dtype=torch.int32, device=logits.device)
    w = torch.empty(t, top_k, dtype=torch.float32, device=logits.device)
    if t:
        _router_kernel[(t,)](logits.contiguous(), logits if bias is None else bias.float().contiguous(), ids, w,
                             n_expert, n_expert // n_group, routed_scaling_factor,
                             EP=triton.next_power_of_2(n_expert), N_GROUP=n_group,
                             GP=triton.next_power_of_2(n_group), TOPK_GROUP=topk_group, TOP_K=top_k,
                             KP=triton.next_power_of_2(top_k),
                             SIGMOID=scoring == "sigmoid", HAS_BIAS=bias is not None, NORM=norm_topk_prob)
    return ids, w


def _check(logits, top_k, scoring, bias, n_group, topk_group, routed_scaling_factor):
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.dtype != torch.float32:
        raise KtxError(f"route: logits must be fp32 [T, E], got {logits.dtype} {tuple(logits.shape)}")
    n_expert = logits.shape[1]
    if scoring not in ("sigmoid", "softmax"):
        raise KtxError(f"route: scoring must be 'sigmoid' (DeepSeek-V3) or 'softmax' (DeepSeek-V2), got {scoring!r}")
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (top_k, n_group, topk_group)):
        raise KtxError(f"route: top_k, n_group and topk_group must be integers, got {top_k!r}, {n_group!r}, {topk_group!r}")
    check_scalar("route", "routed_scaling_factor", routed_scaling_factor)
    if bias is not None and (not isinstance(bias, torch.Tensor) or not bias.is_floating_point()):
        raise KtxError("route: e_score_correction_bias must be a floating-point tensor")
    if bias is not None and bias.shape != (n_expert,):
        raise KtxError(f"route: e_score_correction_bias must be [{n_expert}], got {tuple(bias.shape)}")
    if n_group < 1 or n_expert % n_group or not 1 <= topk_group <= n_group:
        raise KtxError(f"route: {n_expert} experts cannot form {n_group} groups keeping {topk_group}")
    if scoring == "sigmoid" and n_group > 1 and n_expert // n_group < 2:
        raise KtxError("route: the top-2 group score needs at least 2 experts per group")
    if not 1 <= top_k <= n_expert * topk_group // n_group:
        raise KtxError(f"route: top_k={top_k} is more than the {n_expert * topk_group // n_group} experts in the kept groups")


def route_reference(logits: torch.Tensor, top_k: int, *, scoring: str = "sigmoid", bias: torch.Tensor | None = None,
                    n_group: int = 1, topk_group: int = 1, norm_topk_prob: bool = True,
                    routed_scaling_factor: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain torch, same contract (ids ordered by descending choice score)."""
    score = logits.sigmoid() if scoring == "sigmoid" else logits.softmax(-1)  # [T, E]
    choice = score if bias is None else score + bias
    if n_group > 1:
        grouped = choice.view(choice.shape[0], n_group, -1)  # [T, G, E/G]
        gscore = grouped.topk(2, -1).values.sum(-1) if scoring == "sigmoid" else grouped.amax(-1)  # [T, G]
        keep = torch.zeros_like(gscore, dtype=torch.bool).scatter_(1, gscore.topk(topk_group, -1).indices, True)
        choice = choice.masked_fill(~keep.repeat_interleave(choice.shape[1] // n_group, 1), float("-inf"))
    ids = choice.topk(top_k, -1).indices  # [T, k]
    w = score.gather(1, ids)
    if norm_topk_prob:
        w = w / (w.sum(-1, keepdim=True) + 1e-20)
    return ids.int(), w * routed_scaling_factor
