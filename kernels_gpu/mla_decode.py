"""MLA decode attention in the absorbed form, split-KV flash decoding over a paged latent cache.

In the absorbed form the query has already been multiplied by W_UK, so every head attends straight
over the compressed cache: one latent row per token, shared by all heads,

    q        [B, H, DV + DR]     q_nope @ W_UK (DV = kv_lora_rank, e.g. 512) | q_pe (DR = rope dims, e.g. 64)
    kv_cache [pages, PAGE, DV + DR]   per token: kv_c (normed latent, DV) | k_pe (roped, DR)
    block_table [B, max_pages] int32  page ids of each sequence, in order
    seq_lens    [B] int32
    score[h, t] = scale * (q[h, :DV] . kv_c[t] + q[h, DV:] . k_pe[t])
    out[b, h]   = softmax_t(score) @ kv_c        [B, H, DV]   (W_UV is applied afterwards)

The cache rows are the bytes that dominate decode, so the grid is built to read them once and in
parallel: program (b, head group, split) takes BH heads (the rows are shared, so one load of a row
serves BH heads through a [BH, D] x [D, BT] dot) and one contiguous slice of the sequence. It keeps
an online softmax (running max m, sum l, accumulator [BH, DV]) and writes its normalised partial
output with its log-sum-exp. A second kernel merges the S splits of each head:

    out = sum_s exp(lse_s - M) o_s / sum_s exp(lse_s - M),   M = max_s lse_s   (empty splits: lse = -inf)

The number of splits S grows until B * head_groups * S fills the GPU twice over (from its SM count),
bounded so that each split still has a few hundred tokens; the interpreter uses a fixed small value.
Softmax runs in base 2: the scale is multiplied by log2(e) once.

Entry checks: the kernel follows block-table entries as page numbers, so before the launch every
length must fit the table and every entry a sequence uses must name a page of the cache (one read
back from the device; `indices_checked=True` skips it for a table already checked this step).
"""

import math

import torch
import triton
import triton.language as tl

from ktx.errors import KtxError
from ktx.kernels_gpu.device import check_device, check_scalar, interpreting, sm_count

BLOCK_H = 16  # heads per program (tl.dot needs at least 16 rows)
BLOCK_T = 32  # tokens per inner step
MIN_TOKENS_PER_SPLIT = 256
INTERPRETER_SPLITS = 4
LOG2E = 1.4426950408889634


@triton.jit
def _mla_split_kernel(q_ptr, cache_ptr, table_ptr, lens_ptr, o_ptr, lse_ptr, H, max_pages, n_splits, qk_scale,
                      DV: tl.constexpr, DR: tl.constexpr, DVP: tl.constexpr, DRP: tl.constexpr,
                      PAGE: tl.constexpr, BH: tl.constexpr, BT: tl.constexpr, UPCAST: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1) * BH + tl.arange(0, BH)  # [BH]
    split = tl.program_id(2)
    D: tl.constexpr = DV + DR
    seq_len = tl.load(lens_ptr + b)
    per_split = tl.cdiv(tl.cdiv(seq_len, n_splits), BT) * BT
    start = split * per_split
    end = tl.minimum(start + per_split, seq_len)

    dv = tl.arange(0, DVP)
    dr = tl.arange(0, DRP)
    hm = h < H
    q_row = q_ptr + (b * H + h)[:, None] * D  # [BH, 1]
    q_nope = tl.load(q_row + dv[None, :], mask=hm[:, None] & (dv[None, :] < DV), other=0.0)  # [BH, DVP]
    q_pe = tl.load(q_row + DV + dr[None, :], mask=hm[:, None] & (dr[None, :] < DR), other=0.0)  # [BH, DRP]
    if UPCAST:
        q_nope = q_nope.to(tl.float32)
        q_pe = q_pe.to(tl.float32)

    m = tl.full((BH,), float("-inf"), tl.float32)
    l = tl.zeros((BH,), tl.float32)
    acc = tl.zeros((BH, DVP), tl.float32)
    for t0 in range(start, end, BT):
        tok = t0 + tl.arange(0, BT)  # [BT]
        valid = tok < end
        page = tl.load(table_ptr + b * max_pages + tok // PAGE, mask=valid, other=0)
        row = cache_ptr + (page.to(tl.int64) * PAGE + tok % PAGE)[:, None] * D  # [BT, 1]
        kv_c = tl.load(row + dv[None, :], mask=valid[:, None] & (dv[None, :] < DV), other=0.0)  # [BT, DVP]
        k_pe = tl.load(row + DV + dr[None, :], mask=valid[:, None] & (dr[None, :] < DR), other=0.0)  # [BT, DRP]
        if UPCAST:
            kv_c = kv_c.to(tl.float32)
            k_pe = k_pe.to(tl.float32)
        s = tl.dot(q_nope, tl.trans(kv_c)) + tl.dot(q_pe, tl.trans(k_pe))  # [BH, BT]
        s = tl.where(valid[None, :], s * qk_scale, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        p = tl.exp2(s - m_new[:, None])  # [BH, BT]
        alpha = tl.exp2(m - m_new)
        l = l * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(kv_c.dtype), kv_c)  # [BH, DVP]
        m = m_new

    empty = l == 0.0
    out = acc / tl.where(empty, 1.0, l)[:, None]
    lse = tl.where(empty, float("-inf"), m + tl.log2(tl.where(empty, 1.0, l)))  # base 2
    o_row = ((b * H + h) * n_splits + split)  # [BH]
    tl.store(o_ptr + o_row[:, None] * DVP + dv[None, :], out, mask=hm[:, None])
    tl.store(lse_ptr + o_row, lse, mask=hm)


@triton.jit
def _mla_merge_kernel(o_ptr, lse_ptr, out_ptr, n_splits, DV: tl.constexpr, DVP: tl.constexpr, SP: tl.constexpr):
    bh = tl.program_id(0)  # b * H + h
    s = tl.arange(0, SP)
    lse = tl.load(lse_ptr + bh * n_splits + s, mask=s < n_splits, other=float("-inf"))  # [SP]
    big = tl.max(lse, axis=0)
    w = tl.where(lse == float("-inf"), 0.0, tl.exp2(lse - big))  # [SP]
    dv = tl.arange(0, DVP)
    o = tl.load(o_ptr + (bh * n_splits + s)[:, None] * DVP + dv[None, :], mask=(s < n_splits)[:, None], other=0.0)
    out = tl.sum(o * w[:, None], axis=0) / tl.sum(w, axis=0)  # [DVP]
    tl.store(out_ptr + bh * DV + dv, out.to(out_ptr.dtype.element_ty), mask=dv < DV)


def choose_num_splits(max_seq_len: int, batch: int, n_heads: int, device: torch.device) -> int:
    """Splits of the sequence per (batch, head group): fill the GPU twice, a few hundred tokens each."""
    if interpreting():
        return max(1, min(INTERPRETER_SPLITS, triton.cdiv(max_seq_len, BLOCK_T)))
    programs = batch * triton.cdiv(n_heads, BLOCK_H)
    want = triton.cdiv(2 * sm_count(device), programs)
    return max(1, min(want, triton.cdiv(max_seq_len, MIN_TOKENS_PER_SPLIT)))


def _check(q, kv_cache, block_table, seq_lens, kv_lora: int):
    if q.dim() != 3 or kv_cache.dim() != 3 or q.shape[2] != kv_cache.shape[2]:
        raise KtxError(f"mla_decode: q {tuple(q.shape)} must be [B, H, D] and the cache {tuple(kv_cache.shape)} "
                       "[pages, page_size, D] with the same D = kv_lora_rank + rope dims")
    if not 0 < kv_lora < q.shape[2]:
        raise KtxError(f"mla_decode: kv_lora={kv_lora} must split D={q.shape[2]} into latent and rope parts")
    if q.dtype != kv_cache.dtype or q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise KtxError(f"mla_decode: q ({q.dtype}) and the cache ({kv_cache.dtype}) must share one of fp32/fp16/bf16")
    b = q.shape[0]
    if block_table.dim() != 2 or block_table.shape[0] != b or block_table.dtype != torch.int32:
        raise KtxError(f"mla_decode: block_table must be int32 [B={b}, max_pages], got {block_table.dtype} {tuple(block_table.shape)}")
    if seq_lens.shape != (b,) or seq_lens.dtype != torch.int32:
        raise KtxError(f"mla_decode: seq_lens must be int32 [B={b}], got {seq_lens.dtype} {tuple(seq_lens.shape)}")
    if not kv_cache.is_contiguous():
        raise KtxError("mla_decode: the latent cache must be contiguous [pages, page_size, D]")
    if kv_cache.shape[1] < 1:
        raise KtxError("mla_decode: the cache's page size must be >= 1")


def check_indices(block_table: torch.Tensor, seq_lens: torch.Tensor, n_pages: int, page: int) -> None:
    """Every length within the table's capacity, every page a sequence uses within the cache.

    One read back from the device for the whole batch; entries past a sequence's last page are never
    read and may hold anything.
    """
    lens = seq_lens.long()  # [B]
    capacity = block_table.shape[1] * page
    used = torch.arange(block_table.shape[1], device=lens.device)[None, :] * page < lens[:, None]  # [B, max_pages]
    bad_page = used & ((block_table < 0) | (block_table >= n_pages))
    bad_len = (lens < 0) | (lens > capacity)
    if not (bool(bad_page.any()) or bool(bad_len.any())):
        return
    if bool(bad_len.any()):
        b = int(bad_len.nonzero()[0, 0])
        raise KtxError(f"mla_decode: seq_lens[{b}] = {int(lens[b])} is outside 0..{capacity}; no sequence may need "
                       f"more than the block table's {block_table.shape[1]} pages of {page} tokens")
    b, i = (int(v) for v in bad_page.nonzero()[0])
    raise KtxError(f"mla_decode: block_table[{b}, {i}] = {int(block_table[b, i])} is not a page of the cache "
                   f"(0..{n_pages - 1}); sequence {b} has {int(lens[b])} tokens")


def mla_decode(q: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor,
               kv_lora: int, softmax_scale: float, num_splits: int | None = None,
               max_seq_len: int | None = None, indices_checked: bool = False) -> torch.Tensor:
    """Absorbed MLA decode: q [B, H, kv_lora + rope] over the paged latent cache -> [B, H, kv_lora].

    max_seq_len (a host int) sizes the splits. Before the launch, seq_lens and the block table entries
    in use are checked against the cache (`check_indices`, one read back from the device); a caller that
    runs many layers over one table can check it once and pass indices_checked=True to the others.
    """
    device = check_device("mla_decode", q, kv_cache, block_table, seq_lens)
    _check(q, kv_cache, block_table, seq_lens, kv_lora)
    check_scalar("mla_decode", "softmax_scale", softmax_scale)
    if num_splits is not None and (not isinstance(num_splits, int) or num_splits < 1):
        raise KtxError(f"mla_decode: num_splits must be a positive integer, got {num_splits!r}")
    bsz, n_heads, d = q.shape
    page = kv_cache.shape[1]
    block_table, seq_lens = block_table.contiguous(), seq_lens.contiguous()  # the kernel reads them as flat arrays
    if not indices_checked:
        check_indices(block_table, seq_lens, kv_cache.shape[0], page)
    if max_seq_len is None:
        max_seq_len = int(seq_lens.max()) if bsz else 0
    if max_seq_len > block_table.shape[1] * page:
        raise KtxError(f"mla_decode: a sequence of {max_seq_len} tokens needs more than the block table's "
                       f"{block_table.shape[1]} pages of {page}")
    out = torch.empty(bsz, n_heads, kv_lora, dtype=q.dtype, device=device)  # [B, H, DV]
    if bsz == 0 or n_heads == 0:
        return out
    splits = num_splits or choose_num_splits(max_seq_len, bsz, n_heads, device)
    q = q.contiguous()
    dvp, drp = triton.next_power_of_2(kv_lora), max(16, triton.next_power_of_2(d - kv_lora))
    o_part = torch.empty(bsz, n_heads, splits, dvp, dtype=torch.float32, device=device)  # [B, H, S, DVP]
    lse = torch.empty(bsz, n_heads, splits, dtype=torch.float32, device=device)  # [B, H, S], base 2
    grid = (bsz, triton.cdiv(n_heads, BLOCK_H), splits)
    _mla_split_kernel[grid](q, kv_cache, block_table, seq_lens, o_part, lse, n_heads, block_table.shape[1], splits,
                            softmax_scale * LOG2E, DV=kv_lora, DR=d - kv_lora, DVP=dvp, DRP=drp, PAGE=page,
                            BH=BLOCK_H, BT=BLOCK_T, UPCAST=interpreting() or q.dtype == torch.float32,
                            num_warps=8)  # the [BH, DV] accumulator and a [BT, DV] tile in registers
    _mla_merge_kernel[(bsz * n_heads,)](o_part, lse, out, splits, DV=kv_lora, DVP=dvp,
                                         SP=triton.next_power_of_2(splits))
    return out


def mla_decode_reference(q: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor,
                         seq_lens: torch.Tensor, kv_lora: int, softmax_scale: float) -> torch.Tensor:
    """Plain torch, one sequence at a time, in fp32: gather the pages, softmax, weighted sum of kv_c."""
    out = []
    page = kv_cache.shape[1]
    for b in range(q.shape[0]):
        n = int(seq_lens[b])
        pages = block_table[b, : math.ceil(n / page)].long()
        lat = kv_cache[pages].reshape(-1, kv_cache.shape[2])[:n].float()  # [n, D]
        scores = (q[b].float() @ lat.T) * softmax_scale  # [H, n]
        out.append(torch.softmax(scores, dim=-1) @ lat[:, :kv_lora])  # [H, DV]
    return torch.stack(out).to(q.dtype)
