"""Dequantization of raw GGUF blocks on the GPU (Triton), bit-exact with `gguf.quants.dequantize`.

A quantized weight arrives as it sits in the file: a uint8 tensor [rows, row_bytes], each row a run of
blocks of QK elements. `dequant_tile` is the one place that knows the block layouts; the dequant
kernel here, the fused GEMV and the prefill GEMM (gemv.py) all call it. It returns a [BN, NB*QK] fp32
tile for BN rows and NB consecutive blocks, in natural element order. Shapes inside follow the block
structure ([BN, NB, sub-block, lane]) so that per-block values (d, scales) are loaded once per sub-block
and the quant bytes are contiguous along the last axis.

Block layouts (little-endian; d, dmin are fp16; QK elements per block):

    F16   QK=1    | f16 |                                 2 bytes
    BF16  QK=1    | bf16 | (top half of an fp32)          2 bytes
    Q8_0  QK=32   | d | qs[32] int8 |                     34 bytes   x = d * q
    Q4_0  QK=32   | d | qs[16] |                          18 bytes   x = d * (q - 8)
                  qs[i] = q[i] (low nibble) | q[i+16] << 4
    Q5_0  QK=32   | d | qh[4] | qs[16] |                  22 bytes   x = d * (q - 16)
                  q[i] = nibble as Q4_0, bit 4 = bit i of qh (as one little-endian uint32)
    Q4_K  QK=256  | d | dmin | scales[12] | qs[128] |     144 bytes  8 sub-blocks of 32
                  sub-block s: x = (d * sc[s]) * q - dmin * m[s]
                  qs[32c + l] = q[64c + l] (low nibble) | q[64c + 32 + l] << 4    (c = 0..3)
                  scales[12]: 6-bit sc[0..7] = a..h and m[0..7] = A..H, bit 7 on the left:
                      0..3   eeaaaaaa ffbbbbbb ggcccccc hhdddddd    sc[0..3], top bits of sc[4..7]
                      4..7   EEAAAAAA FFBBBBBB GGCCCCCC HHDDDDDD    m[0..3],  top bits of m[4..7]
                      8..11  EEEEeeee FFFFffff GGGGgggg HHHHhhhh    low nibbles of sc[4..7], m[4..7]
    Q5_K  QK=256  | d | dmin | scales[12] | qh[32] | qs[128] |   176 bytes
                  as Q4_K, plus bit 4 of q[32s + l] = bit s of qh[l]
    Q6_K  QK=256  | ql[128] | qh[64] | scales[16] int8 | d |     210 bytes  16 groups of 16
                  x = (d * scales[j // 16]) * (q - 32), q 6-bit; for j = 128h + jj (h = 0, 1):
                  low 4 bits: ql[64h + jj % 64] nibble jj // 64; high 2: qh[32h + jj % 32] >> 2*(jj // 32)

Every product above is exact in fp32 (fp16 d has 11 significant bits, the scales and quants at most
8 and 6), so a fused multiply-add on the GPU cannot change a result: bit-exactness does not depend on
FP contraction. fp16/bf16 outputs are the fp32 result rounded to nearest even.
"""

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ktx.errors import KtxError
from ktx.kernels_gpu.device import check_device


@dataclass(frozen=True)
class BlockFormat:
    name: str
    ggml_type: int  # GGMLQuantizationType value; kernels branch on it as a constexpr
    block_elems: int  # QK
    block_bytes: int


FORMATS = {
    f.name: f
    for f in (
        BlockFormat("F16", 1, 1, 2),
        BlockFormat("BF16", 30, 1, 2),
        BlockFormat("Q8_0", 8, 32, 34),
        BlockFormat("Q4_0", 2, 32, 18),
        BlockFormat("Q5_0", 6, 32, 22),
        BlockFormat("Q4_K", 12, 256, 144),
        BlockFormat("Q5_K", 13, 256, 176),
        BlockFormat("Q6_K", 14, 256, 210),
    )
}
_BY_ID = {f.ggml_type: f for f in FORMATS.values()}
OUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def block_format(qtype) -> BlockFormat:
    """Look up a format by name ("Q4_K") or GGML type id (an int or gguf.GGMLQuantizationType)."""
    if not isinstance(qtype, (str, int)) or isinstance(qtype, bool):  # GGMLQuantizationType is an int
        raise KtxError(f"GPU dequant: tensor type must be a name or a GGML type id, got {qtype!r}")
    fmt = FORMATS.get(qtype) if isinstance(qtype, str) else _BY_ID.get(int(qtype))
    if fmt is None:
        raise KtxError(f"GPU dequant: tensor type {qtype!r} is not supported; supported: {', '.join(FORMATS)}")
    return fmt


def check_raw(raw: torch.Tensor, fmt: BlockFormat, what: str) -> int:
    """Check a raw [rows, row_bytes] uint8 weight; return the number of elements per row."""
    if not isinstance(raw, torch.Tensor) or raw.dtype != torch.uint8 or raw.dim() != 2:
        raise KtxError(f"{what}: expected raw GGUF bytes as a uint8 [rows, row_bytes] tensor, got {raw.dtype} {tuple(raw.shape)}")
    if raw.shape[1] % fmt.block_bytes:
        raise KtxError(f"{what}: row of {raw.shape[1]} bytes is not a whole number of {fmt.name} blocks ({fmt.block_bytes} bytes)")
    if raw.numel() and (raw.stride(1) != 1 or raw.stride(0) % 2 or raw.data_ptr() % 2):
        raise KtxError(f"{what}: raw bytes must be row-contiguous, 2-byte aligned, with an even row stride (the "
                       "fp16 scales are read in place); call .contiguous()")
    return raw.shape[1] // fmt.block_bytes * fmt.block_elems


# ---------------------------------------------------------------------------------------------------
# Triton: one tile of dequantized weights
# ---------------------------------------------------------------------------------------------------


@triton.jit
def _f16_at(p, mask):
    """fp16 stored at byte pointer p (2-byte aligned: every block size and offset here is even)."""
    return tl.load(p.to(tl.pointer_type(tl.float16)), mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _u8_at(p, mask):
    return tl.load(p, mask=mask, other=0).to(tl.int32)


@triton.jit
def _k_scale_min(b, ok):
    """6-bit (sc, m) of the 8 sub-blocks of a Q4_K/Q5_K block at byte pointer b [BN, NB] -> [BN, NB, 8]."""
    s = tl.arange(0, 8)[None, None, :]
    b3 = b[:, :, None]
    ok3 = ok[:, :, None]
    lo = s < 4
    a = _u8_at(b3 + 4 + s, ok3)  # scales[s]: sc (s < 4) or the top bits of m[s] (s >= 4)
    c = _u8_at(b3 + 8 + s, ok3)  # scales[s + 4]: m (s < 4) or the low nibbles of sc, m (s >= 4)
    e = _u8_at(b3 + s, ok3)  # scales[s - 4]: the top bits of sc[s] (only read for s >= 4)
    sc = tl.where(lo, a & 63, (c & 15) | ((e >> 6) << 4))
    m = tl.where(lo, c & 63, (c >> 4) | ((a >> 6) << 4))
    return sc.to(tl.float32), m.to(tl.float32)


@triton.jit
def dequant_tile(row_ptr, blk0, nblk, QTYPE: tl.constexpr, NB: tl.constexpr):
    """Dequantize blocks blk0 .. blk0+NB-1 of BN rows -> fp32 [BN, NB*QK].

    row_ptr: [BN, 1] uint8 pointers to the start of each row. Blocks at or past nblk read as zero.
    """
    blk = blk0 + tl.arange(0, NB)[None, :]  # [1, NB]
    BN: tl.constexpr = row_ptr.shape[0]
    if QTYPE == 1:  # F16
        return tl.load(row_ptr.to(tl.pointer_type(tl.float16)) + blk, mask=blk < nblk, other=0.0).to(tl.float32)
    elif QTYPE == 30:  # BF16: the bits are the top half of an fp32
        h = tl.load(row_ptr.to(tl.pointer_type(tl.uint16)) + blk, mask=blk < nblk, other=0)
        return (h.to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    elif QTYPE == 8:  # Q8_0
        b = row_ptr + blk * 34  # [BN, NB]
        ok = blk < nblk  # [1, NB]: broadcast by the loads
        d = _f16_at(b, ok)[:, :, None]
        l = tl.arange(0, 32)[None, None, :]
        q = tl.load((b[:, :, None] + 2 + l).to(tl.pointer_type(tl.int8)), mask=ok[:, :, None], other=0)
        return tl.reshape(q.to(tl.float32) * d, (BN, NB * 32))
    elif QTYPE == 2:  # Q4_0
        b = row_ptr + blk * 18
        ok = blk < nblk  # [1, NB]: broadcast by the loads
        d = _f16_at(b, ok)[:, :, None]
        l = tl.arange(0, 32)[None, None, :]
        q = (_u8_at(b[:, :, None] + 2 + (l % 16), ok[:, :, None]) >> (4 * (l // 16))) & 15
        return tl.reshape(d * (q - 8).to(tl.float32), (BN, NB * 32))
    elif QTYPE == 6:  # Q5_0
        b = row_ptr + blk * 22
        ok = blk < nblk  # [1, NB]: broadcast by the loads
        d = _f16_at(b, ok)[:, :, None]
        l = tl.arange(0, 32)[None, None, :]
        b3 = b[:, :, None]
        ql = (_u8_at(b3 + 6 + (l % 16), ok[:, :, None]) >> (4 * (l // 16))) & 15
        qh = (_u8_at(b3 + 2 + l // 8, ok[:, :, None]) >> (l % 8)) & 1
        return tl.reshape(d * ((ql | (qh << 4)) - 16).to(tl.float32), (BN, NB * 32))
    elif QTYPE == 12 or QTYPE == 13:  # Q4_K, Q5_K
        BB: tl.constexpr = 144 if QTYPE == 12 else 176
        QS: tl.constexpr = 16 if QTYPE == 12 else 48
        b = row_ptr + blk * BB
        ok = blk < nblk  # [1, NB]: broadcast by the loads
        sc, m = _k_scale_min(b, ok)  # [BN, NB, 8]
        dsc = (_f16_at(b, ok)[:, :, None] * sc)[:, :, :, None]  # [BN, NB, 8, 1]
        dm = (_f16_at(b + 2, ok)[:, :, None] * m)[:, :, :, None]
        s = tl.arange(0, 8)[None, None, :, None]
        l = tl.arange(0, 32)[None, None, None, :]
        b4 = b[:, :, None, None]
        ok4 = ok[:, :, None, None]
        q = (_u8_at(b4 + QS + 32 * (s // 2) + l, ok4) >> (4 * (s % 2))) & 15  # [BN, NB, 8, 32]
        if QTYPE == 13:
            q = q | (((_u8_at(b4 + 16 + l, ok4) >> s) & 1) << 4)
        return tl.reshape(dsc * q.to(tl.float32) - dm, (BN, NB * 256))
    else:  # Q6_K (14)
        b = row_ptr + blk * 210
        ok = blk < nblk  # [1, NB]: broadcast by the loads
        g = tl.arange(0, 16)[None, None, :]  # group of 16 elements
        sc = tl.load((b[:, :, None] + 192 + g).to(tl.pointer_type(tl.int8)), mask=ok[:, :, None], other=0)
        dsc = (_f16_at(b + 208, ok)[:, :, None] * sc.to(tl.float32))[:, :, :, None]  # [BN, NB, 16, 1]
        g4 = g[:, :, :, None]
        l = tl.arange(0, 16)[None, None, None, :]
        b4 = b[:, :, None, None]
        ok4 = ok[:, :, None, None]
        ql = (_u8_at(b4 + 64 * (g4 // 8) + 16 * (g4 % 4) + l, ok4) >> (4 * ((g4 % 8) // 4))) & 15
        qh = (_u8_at(b4 + 128 + 32 * (g4 // 8) + 16 * (g4 % 2) + l, ok4) >> (2 * ((g4 % 8) // 2))) & 3
        return tl.reshape(dsc * ((ql | (qh << 4)) - 32).to(tl.float32), (BN, NB * 256))


@triton.jit
def _round_to(x, DTYPE: tl.constexpr):
    """fp32 -> DTYPE rounding to nearest even. bf16 is rounded by hand: the interpreter truncates."""
    if DTYPE == tl.bfloat16:
        u = x.to(tl.uint32, bitcast=True)
        r = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).to(tl.uint16)
        r = tl.where(x != x, 0x7FC0, r).to(tl.uint16)  # a NaN must not round into infinity
        return r.to(tl.bfloat16, bitcast=True)
    else:
        return x.to(DTYPE)


@triton.jit
def _dequant_kernel(raw_ptr, out_ptr, rows, n_cols, row_stride, nblk,
                    QTYPE: tl.constexpr, QK: tl.constexpr, BN: tl.constexpr, NB: tl.constexpr):
    r = tl.program_id(0) * BN + tl.arange(0, BN)[:, None]  # [BN, 1]
    blk0 = tl.program_id(1) * NB
    row_ptr = raw_ptr + tl.minimum(r, rows - 1).to(tl.int64) * row_stride
    w = dequant_tile(row_ptr, blk0, nblk, QTYPE, NB)  # [BN, NB*QK]
    k = blk0 * QK + tl.arange(0, NB * QK)[None, :]
    tl.store(out_ptr + r.to(tl.int64) * n_cols + k, _round_to(w, out_ptr.dtype.element_ty), mask=(r < rows) & (k < n_cols))


def dequantize(raw: torch.Tensor, qtype, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Raw GGUF blocks [rows, row_bytes] (uint8) -> [rows, n_cols] in fp32, fp16 or bf16."""
    fmt = block_format(qtype)
    n_cols = check_raw(raw, fmt, f"dequantize {fmt.name}")
    if dtype not in OUT_DTYPES:
        raise KtxError(f"dequantize {fmt.name}: output dtype must be one of {OUT_DTYPES}, got {dtype}")
    check_device(f"dequantize {fmt.name}", raw)
    rows = raw.shape[0]
    out = torch.empty(rows, n_cols, dtype=dtype, device=raw.device)
    if rows == 0 or n_cols == 0:
        return out
    nblk = n_cols // fmt.block_elems
    nb = 256 // fmt.block_elems  # 256 elements per tile whatever the format
    bn = 8
    grid = (triton.cdiv(rows, bn), triton.cdiv(nblk, nb))
    _dequant_kernel[grid](raw, out, rows, n_cols, raw.stride(0), nblk,
                          QTYPE=fmt.ggml_type, QK=fmt.block_elems, BN=bn, NB=nb)
    return out


# ---------------------------------------------------------------------------------------------------
# Plain torch reference (the simple path beside the kernel)
# ---------------------------------------------------------------------------------------------------


def _f16(b: torch.Tensor) -> torch.Tensor:
    """[..., 2] uint8 -> [...] fp32 (the fp16 they encode)."""
    return b.contiguous().view(torch.float16).squeeze(-1).float()


def dequantize_reference(raw: torch.Tensor, qtype, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The same result as `dequantize`, written with whole-tensor torch ops on any device."""
    fmt = block_format(qtype)
    n_cols = check_raw(raw, fmt, f"dequantize_reference {fmt.name}")
    rows = raw.shape[0]
    if fmt.name == "F16":
        return raw.contiguous().view(torch.float16).float().to(dtype)
    if fmt.name == "BF16":
        return raw.contiguous().view(torch.bfloat16).float().to(dtype)
    blocks = raw.reshape(-1, fmt.block_bytes).long()  # [n_blocks, block_bytes]
    nib = torch.tensor([0, 4], device=raw.device)
    if fmt.name == "Q8_0":
        q = raw.reshape(-1, 34)[:, 2:].contiguous().view(torch.int8).float()
        x = q * _f16(raw.reshape(-1, 34)[:, :2])[:, None]
    elif fmt.name in ("Q4_0", "Q5_0"):
        d = _f16(raw.reshape(-1, fmt.block_bytes)[:, :2])[:, None]  # [n, 1]
        qs = blocks[:, -16:]
        q = ((qs[:, None, :] >> nib[None, :, None]) & 15).reshape(-1, 32)  # [n, 32]
        if fmt.name == "Q5_0":
            qh = blocks[:, 2] | blocks[:, 3] << 8 | blocks[:, 4] << 16 | blocks[:, 5] << 24
            q = q | ((qh[:, None] >> torch.arange(32, device=raw.device)) & 1) << 4
        x = d * (q - (8 if fmt.name == "Q4_0" else 16)).float()
    elif fmt.name in ("Q4_K", "Q5_K"):
        r8 = raw.reshape(-1, fmt.block_bytes)
        d, dmin = _f16(r8[:, 0:2])[:, None], _f16(r8[:, 2:4])[:, None]
        sb = blocks[:, 4:16]
        sc = torch.cat([sb[:, 0:4] & 63, (sb[:, 8:12] & 15) | (sb[:, 0:4] >> 6) << 4], 1).float()  # [n, 8]
        m = torch.cat([sb[:, 4:8] & 63, (sb[:, 8:12] >> 4) | (sb[:, 4:8] >> 6) << 4], 1).float()
        qs = blocks[:, -128:].reshape(-1, 4, 1, 32)
        q = ((qs >> nib[None, None, :, None]) & 15).reshape(-1, 8, 32)
        if fmt.name == "Q5_K":
            qh = blocks[:, 16:48]
            q = q | ((qh[:, None, :] >> torch.arange(8, device=raw.device)[None, :, None]) & 1) << 4
        x = ((d * sc)[:, :, None] * q.float() - (dmin * m)[:, :, None]).reshape(-1, 256)
    else:  # Q6_K
        ql = blocks[:, 0:128].reshape(-1, 2, 1, 64)
        qh = blocks[:, 128:192].reshape(-1, 2, 1, 32)
        sc = raw.reshape(-1, 210)[:, 192:208].contiguous().view(torch.int8).float()  # [n, 16]
        d = _f16(raw.reshape(-1, 210)[:, 208:210])[:, None]
        lo = ((ql >> nib[None, None, :, None]) & 15).reshape(-1, 2, 4, 32)
        hi = ((qh >> (2 * torch.arange(4, device=raw.device))[None, None, :, None]) & 3)
        q = (lo | hi << 4) - 32  # [n, 2, 4, 32]
        x = ((d * sc)[:, :, None] * q.reshape(-1, 16, 16).float()).reshape(-1, 256)
    return x.reshape(rows, n_cols).to(dtype)
