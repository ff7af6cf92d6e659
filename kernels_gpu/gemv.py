"""Matrix products straight on raw GGUF blocks: y[T, N] = x[T, K] @ W^T, W as it sits in the file.

W is a uint8 tensor [N, row_bytes] (one GGUF row of K elements per output feature, any format of
dequant.py). Nothing is re-quantized: the weights keep the GGUF's own quality.

Decode (`gemv`, T = 1..8): memory bound, so every weight byte is read once. A program owns BN output
rows and walks its share of K in tiles of 256 elements (one K-quant super-block, or 8 blocks of 32),
dequantizing each [BN, 256] tile in registers (`dequant_tile`) and reducing it against every token's
x slice. When N alone gives too few programs to fill the GPU (e.g. N = 576 for kv_a), K is split over
a second grid axis; the [S, T, N] fp32 partial sums are added afterwards, in a fixed order.

    grid = (cdiv(N, BN), S)        program (n, s): rows n*BN.., blocks [s*bps, (s+1)*bps)
    W tile  [BN, 256] fp32  (dequantized)
    x tile  [T, 256]        (tiny, stays in L1/L2)
    acc     [TP, BN] fp32   (TP = T rounded up to a power of two)

Prefill (`gemm`, T > 8): compute bound. Program (m, n) owns a [BM, BN] output tile and, per K tile,
dequantizes a [BN, 256] weight tile and multiplies with `tl.dot` in the activation dtype (fp16/bf16)
with an fp32 accumulator. Under the interpreter the dot runs in fp32 (bf16 dot is wrong there).
"""

import torch
import triton
import triton.language as tl

from ktx.errors import KtxError
from ktx.kernels_gpu.dequant import block_format, check_raw, dequant_tile, dequantize_reference
from ktx.kernels_gpu.device import check_device, interpreting, sm_count

MAX_GEMV_TOKENS = 8
TILE_K = 256  # elements per K step: one K-quant super-block, 8 blocks of 32, 256 F16 values
ACT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, part_ptr, T, N, K, w_stride, nblk, blk_per_split,
                 QTYPE: tl.constexpr, QK: tl.constexpr, TP: tl.constexpr, BN: tl.constexpr, NB: tl.constexpr):
    n = tl.program_id(0) * BN + tl.arange(0, BN)[:, None]  # [BN, 1]
    split = tl.program_id(1)
    row_ptr = w_ptr + tl.minimum(n, N - 1).to(tl.int64) * w_stride
    t = tl.arange(0, TP)[:, None]  # [TP, 1]
    acc = tl.zeros((TP, BN), tl.float32)
    b_begin = split * blk_per_split
    b_end = tl.minimum(b_begin + blk_per_split, nblk)
    for blk0 in range(b_begin, b_end, NB):
        w = dequant_tile(row_ptr, blk0, b_end, QTYPE, NB)  # [BN, NB*QK]
        k = blk0 * QK + tl.arange(0, NB * QK)  # [NB*QK]
        for i in tl.static_range(TP):
            xi = tl.load(x_ptr + i * K + k, mask=(k < b_end * QK) & (i < T), other=0.0).to(tl.float32)
            part = tl.sum(w * xi[None, :], axis=1)  # [BN]
            acc += tl.where(t == i, part[None, :], 0.0)
    n_out = tl.program_id(0) * BN + tl.arange(0, BN)[None, :]  # [1, BN]
    tl.store(part_ptr + (split * T + t) * N + n_out, acc, mask=(t < T) & (n_out < N))


@triton.jit
def _gemm_kernel(x_ptr, w_ptr, y_ptr, T, N, K, w_stride, nblk,
                 QTYPE: tl.constexpr, QK: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, NB: tl.constexpr,
                 UPCAST: tl.constexpr):
    m = tl.program_id(0) * BM + tl.arange(0, BM)[:, None]  # [BM, 1]
    n = tl.program_id(1) * BN + tl.arange(0, BN)[:, None]  # [BN, 1] (rows of W)
    row_ptr = w_ptr + tl.minimum(n, N - 1).to(tl.int64) * w_stride
    acc = tl.zeros((BM, BN), tl.float32)
    for blk0 in range(0, nblk, NB):
        w = dequant_tile(row_ptr, blk0, nblk, QTYPE, NB)  # [BN, BK] fp32
        k = blk0 * QK + tl.arange(0, NB * QK)[None, :]  # [1, BK]
        a = tl.load(x_ptr + m.to(tl.int64) * K + k, mask=(m < T) & (k < K), other=0.0)  # [BM, BK]
        if UPCAST:
            acc = tl.dot(a.to(tl.float32), tl.trans(w), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, tl.trans(w.to(a.dtype)), acc)
    n_out = tl.program_id(1) * BN + tl.arange(0, BN)[None, :]  # [1, BN]
    tl.store(y_ptr + m.to(tl.int64) * N + n_out, acc.to(y_ptr.dtype.element_ty), mask=(m < T) & (n_out < N))


def _check(x: torch.Tensor, w_raw: torch.Tensor, qtype, what: str):
    fmt = block_format(qtype)
    k = check_raw(w_raw, fmt, f"{what} {fmt.name} weight")
    check_device(what, x, w_raw)
    if x.dim() != 2 or x.shape[1] != k:
        raise KtxError(f"{what}: activations {tuple(x.shape)} do not match a {fmt.name} weight of {k} columns; expected [T, {k}]")
    if x.dtype not in ACT_DTYPES:
        raise KtxError(f"{what}: activations must be fp32, fp16 or bf16, got {x.dtype}")
    return fmt, k


def gemv(x: torch.Tensor, w_raw: torch.Tensor, qtype) -> torch.Tensor:
    """Decode: x [T, K] (T <= 8) @ W^T with W raw GGUF blocks [N, row_bytes] -> y [T, N] in x's dtype."""
    fmt, k = _check(x, w_raw, qtype, "gemv")
    t, n = x.shape[0], w_raw.shape[0]
    if not 1 <= t <= MAX_GEMV_TOKENS:
        raise KtxError(f"gemv: {t} tokens; the decode kernel takes 1..{MAX_GEMV_TOKENS}, use gemm for more")
    if n == 0 or k == 0:  # nothing to launch; an empty sum is zero
        return torch.zeros(t, n, dtype=x.dtype, device=x.device)
    x = x.contiguous()
    nblk = k // fmt.block_elems
    nb = TILE_K // fmt.block_elems
    bn = 16
    programs = triton.cdiv(n, bn)
    tiles = triton.cdiv(nblk, nb)
    splits = max(1, min(tiles, triton.cdiv(4 * sm_count(x.device), programs)))
    blk_per_split = triton.cdiv(tiles, splits) * nb
    splits = triton.cdiv(nblk, blk_per_split)
    part = torch.empty(splits, t, n, dtype=torch.float32, device=x.device)  # [S, T, N]
    _gemv_kernel[(programs, splits)](x, w_raw, part, t, n, k, w_raw.stride(0), nblk, blk_per_split,
                                     QTYPE=fmt.ggml_type, QK=fmt.block_elems, TP=triton.next_power_of_2(t),
                                     BN=bn, NB=nb)
    return part.sum(0).to(x.dtype)


def gemm(x: torch.Tensor, w_raw: torch.Tensor, qtype) -> torch.Tensor:
    """Prefill: x [T, K] @ W^T with W raw GGUF blocks [N, row_bytes] -> y [T, N] in x's dtype."""
    fmt, k = _check(x, w_raw, qtype, "gemm")
    t, n = x.shape[0], w_raw.shape[0]
    if t == 0 or n == 0 or k == 0:  # nothing to launch; an empty sum is zero
        return torch.zeros(t, n, dtype=x.dtype, device=x.device)
    x = x.contiguous()
    y = torch.empty(t, n, dtype=x.dtype, device=x.device)
    bm, bn = (16, 16) if interpreting() else (64, 64)
    grid = (triton.cdiv(t, bm), triton.cdiv(n, bn))
    _gemm_kernel[grid](x, w_raw, y, t, n, k, w_raw.stride(0), k // fmt.block_elems,
                       QTYPE=fmt.ggml_type, QK=fmt.block_elems, BM=bm, BN=bn, NB=TILE_K // fmt.block_elems,
                       UPCAST=interpreting() or x.dtype == torch.float32, num_warps=8, num_stages=2)
    return y


def quant_linear(x: torch.Tensor, w_raw: torch.Tensor, qtype) -> torch.Tensor:
    """x [T, K] @ W^T on raw GGUF blocks: the GEMV for decode-sized T, the GEMM otherwise."""
    _check(x, w_raw, qtype, "quant_linear")
    return gemv(x, w_raw, qtype) if 1 <= x.shape[0] <= MAX_GEMV_TOKENS else gemm(x, w_raw, qtype)


def quant_linear_reference(x: torch.Tensor, w_raw: torch.Tensor, qtype) -> torch.Tensor:
    """Plain torch: dequantize the whole weight to fp32, matmul in fp32, round to x's dtype."""
    w = dequantize_reference(w_raw, qtype)  # [N, K] fp32
    return (x.float() @ w.T).to(x.dtype)
