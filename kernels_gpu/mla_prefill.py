"""Causal flash attention for MLA prefill with the expanded keys and values.

    q [Tq, H, Dqk]   Dqk = qk_nope + qk_rope (e.g. 128 + 64 = 192)
    k [Tk, H, Dqk]
    v [Tk, H, Dv]    (e.g. 128)
    out[i, h] = softmax_j(scale * q[i, h] . k[j, h]) @ v[j, h],  over keys j <= i + (Tk - Tq)

Tk >= Tq: the last Tq keys are the new tokens and the first Tk - Tq an already cached prefix (chunked
prefill); with Tk = Tq this is plain causal attention.

Program (query block, head) keeps an online softmax over key blocks of BN, stopping at the causal
edge, so no work is spent above the diagonal. Dqk is rarely a power of two, which Triton's block
shapes must be; it is split as DA (the largest power of two <= Dqk) + DB (the rest, padded), and the
score is the sum of two dots: 192 = 128 + 64 costs no padding at all. Base-2 softmax.
"""

import torch
import triton
import triton.language as tl

from ktx.errors import KtxError
from ktx.kernels_gpu.device import check_device, check_scalar, interpreting

LOG2E = 1.4426950408889634
MIN_DQK = 16


@triton.jit
def _prefill_kernel(q_ptr, k_ptr, v_ptr, o_ptr, Tq, Tk, qk_scale,
                    sq_t, sq_h, sk_t, sk_h, sv_t, sv_h, so_t, so_h,
                    DA: tl.constexpr, DB: tl.constexpr, DBP: tl.constexpr, DV: tl.constexpr, DVP: tl.constexpr,
                    BM: tl.constexpr, BN: tl.constexpr, UPCAST: tl.constexpr):
    h = tl.program_id(1)
    i = tl.program_id(0) * BM + tl.arange(0, BM)  # [BM] query rows
    da = tl.arange(0, DA)
    db = tl.arange(0, DBP)
    dv = tl.arange(0, DVP)
    im = i < Tq
    q_row = q_ptr + i[:, None].to(tl.int64) * sq_t + h * sq_h
    qa = tl.load(q_row + da[None, :], mask=im[:, None], other=0.0)  # [BM, DA]
    qb = tl.load(q_row + DA + db[None, :], mask=im[:, None] & (db[None, :] < DB), other=0.0)  # [BM, DBP]
    if UPCAST:
        qa = qa.to(tl.float32)
        qb = qb.to(tl.float32)

    offset = Tk - Tq  # query i sits at key position i + offset
    m = tl.full((BM,), float("-inf"), tl.float32)
    l = tl.zeros((BM,), tl.float32)
    acc = tl.zeros((BM, DVP), tl.float32)
    end = tl.minimum(Tk, tl.program_id(0) * BM + BM + offset)  # keys past the block's last row are masked anyway
    for j0 in range(0, end, BN):
        j = j0 + tl.arange(0, BN)  # [BN]
        jm = j < Tk
        k_row = k_ptr + j[:, None].to(tl.int64) * sk_t + h * sk_h
        ka = tl.load(k_row + da[None, :], mask=jm[:, None], other=0.0)  # [BN, DA]
        kb = tl.load(k_row + DA + db[None, :], mask=jm[:, None] & (db[None, :] < DB), other=0.0)  # [BN, DBP]
        v = tl.load(v_ptr + j[:, None].to(tl.int64) * sv_t + h * sv_h + dv[None, :],
                    mask=jm[:, None] & (dv[None, :] < DV), other=0.0)  # [BN, DVP]
        if UPCAST:
            ka = ka.to(tl.float32)
            kb = kb.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(qa, tl.trans(ka)) + tl.dot(qb, tl.trans(kb))  # [BM, BN]
        causal = (j[None, :] <= i[:, None] + offset) & jm[None, :]
        s = tl.where(causal, s * qk_scale, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows past Tq see no key at all
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m - m_safe)
        l = l * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m = m_new
    out = acc / tl.where(l == 0.0, 1.0, l)[:, None]
    tl.store(o_ptr + i[:, None].to(tl.int64) * so_t + h * so_h + dv[None, :], out.to(o_ptr.dtype.element_ty),
             mask=im[:, None] & (dv[None, :] < DV))


def mla_prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale: float) -> torch.Tensor:
    """Causal attention: q [Tq, H, Dqk], k [Tk, H, Dqk], v [Tk, H, Dv] (Tk >= Tq) -> [Tq, H, Dv]."""
    device = check_device("mla_prefill", q, k, v)
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3 or q.shape[1:] != k.shape[1:] or v.shape[:2] != k.shape[:2]:
        raise KtxError(f"mla_prefill: expected q [Tq, H, Dqk], k [Tk, H, Dqk], v [Tk, H, Dv]; got "
                       f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape[0] < q.shape[0]:
        raise KtxError(f"mla_prefill: {q.shape[0]} queries but only {k.shape[0]} keys; keys must include the queries")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise KtxError(f"mla_prefill: q, k, v must share one of fp32/fp16/bf16; got {q.dtype}, {k.dtype}, {v.dtype}")
    if min(q.stride(2), k.stride(2), v.stride(2)) != 1 or max(q.stride(2), k.stride(2), v.stride(2)) != 1:
        raise KtxError("mla_prefill: the last dimension of q, k and v must be contiguous")
    if q.shape[2] < MIN_DQK or v.shape[2] < 1:
        raise KtxError(f"mla_prefill: head sizes Dqk={q.shape[2]} (>= {MIN_DQK}: the dot needs 16 lanes) and "
                       f"Dv={v.shape[2]} (>= 1) are too small")
    check_scalar("mla_prefill", "softmax_scale", softmax_scale)
    tq, n_heads, dqk = q.shape
    dv = v.shape[2]
    out = torch.empty(tq, n_heads, dv, dtype=q.dtype, device=device)  # [Tq, H, Dv]
    if tq == 0 or n_heads == 0:
        return out
    da = 1 << (dqk.bit_length() - 1)
    db = dqk - da
    bm, bn = (16, 16) if interpreting() else (64, 64)
    grid = (triton.cdiv(tq, bm), n_heads)
    _prefill_kernel[grid](q, k, v, out, tq, k.shape[0], softmax_scale * LOG2E,
                          q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                          out.stride(0), out.stride(1),
                          DA=da, DB=db, DBP=max(16, triton.next_power_of_2(db)), DV=dv,
                          DVP=max(16, triton.next_power_of_2(dv)), BM=bm, BN=bn,
                          UPCAST=interpreting() or q.dtype == torch.float32)
    return out


def mla_prefill_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale: float) -> torch.Tensor:
    """Plain torch in fp32: full score matrix with the causal mask (key j visible to query i if j <= i + Tk - Tq)."""
    tq, tk = q.shape[0], k.shape[0]
    scores = torch.einsum("ihd,jhd->hij", q.float(), k.float()) * softmax_scale  # [H, Tq, Tk]
    visible = torch.arange(tk, device=q.device)[None, :] <= torch.arange(tq, device=q.device)[:, None] + (tk - tq)
    scores = scores.masked_fill(~visible, float("-inf"))
    return torch.einsum("hij,jhd->ihd", torch.softmax(scores, dim=-1), v.float()).to(q.dtype)  # [Tq, H, Dv]
