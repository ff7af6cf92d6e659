"""GGUF tensor types in numpy: the reference dequantizer, quantizers and random valid blocks.

This is the simple path beside every fast kernel: `dequantize` is bit-exact with
`gguf.quants.dequantize` (itself bit-exact with ggml), fully vectorised over blocks.

A GGUF tensor row of `n` elements is `n / block_size` blocks of `type_size` bytes each. Every block
type below has one class holding its byte layout (drawn next to the code that unpacks it) and three
classmethods working on a whole batch of blocks at once:

    dequantize_blocks(blocks: uint8 [B, type_size]) -> float32 [B, block_size]
    quantize_blocks(x: float32 [B, block_size])     -> uint8 [B, type_size]
    randomize(blocks: uint8 [B, type_size], rng)     overwrite the scale fields of random bytes in place

Multi-byte fields are little-endian. `f16` is IEEE half precision. Each dequantizer computes in
float32 in ggml's order, for example `(d * sc) * q - dmin * m`, with separately rounded products and
sums (no fused multiply-add), which is what makes the results bit-exact.

The floating types F32, F16 and BF16 are handled as one-element "blocks" of 4, 2 and 2 bytes.

Quantizers: F32, F16, BF16 and the legacy types (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1) round exactly like
ggml's reference quantizers (bit-exact with `gguf.quants.quantize`). The K-quants (Q4_K, Q5_K, Q6_K)
use a plain least-squares scale search of our own: valid blocks with small error, not bit-exact with
llama-quantize (which also weighs by an importance matrix).
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as T

from ktx.errors import KtxError

QK_K = 256  # elements per K-quant super-block
_CHUNK_ELEMENTS = 1 << 18  # blocks are processed in chunks of this many outputs so temporaries stay in cache

# Sane weight scale for `random_blocks`: real checkpoint weights have std of a few 1e-2.
_RANDOM_STD = 0.05


# ---------------------------------------------------------------------------------------------------
# shared bit helpers


def _f16(blocks: np.ndarray, offset: int) -> np.ndarray:
    """The f16 field at byte `offset` of each block, as float32 [B, 1]."""
    return blocks[:, offset : offset + 2].view(np.float16).astype(np.float32)


def _put_f16(blocks: np.ndarray, offset: int, value: np.ndarray) -> None:
    blocks[:, offset : offset + 2] = value.astype(np.float16).reshape(-1, 1).view(np.uint8)


def _f16_bytes(v: np.ndarray) -> np.ndarray:
    """float32 [B, n] -> its f16 bytes [B, 2n] (round to nearest even, as ggml)."""
    return v.astype(np.float16).view(np.uint8)


def _inverse(d: np.ndarray) -> np.ndarray:
    """1 / d, with 0 where d is 0 (an all-zero block quantizes to code 0 / the zero point)."""
    with np.errstate(divide="ignore"):
        return np.where(d == 0, np.float32(0), np.float32(1) / d)


def _symmetric_codes(x: np.ndarray, half: int) -> tuple[np.ndarray, np.ndarray]:
    """Q4_0 (half 8) / Q5_0 (half 16): ggml maps the element of largest magnitude to code 0 exactly, so d may be
    negative; x [B, 32] -> d [B, 1], codes [B, 32] in 0..2 half - 1."""
    peak = np.take_along_axis(x, np.abs(x).argmax(axis=1, keepdims=True), axis=1)  # [B, 1]
    d = peak / np.float32(-half)
    q = np.trunc(x * _inverse(d) + np.float32(half + 0.5)).astype(np.uint8)
    return d, np.minimum(q, 2 * half - 1)


def _affine_codes(x: np.ndarray, top: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Q4_1 (top 15) / Q5_1 (top 31): x = d * q + min; x [B, 32] -> d, min [B, 1], codes [B, 32] in 0..top."""
    lo, hi = x.min(axis=1, keepdims=True), x.max(axis=1, keepdims=True)  # [B, 1]
    d = (hi - lo) / np.float32(top)
    q = np.trunc((x - lo) * _inverse(d) + np.float32(0.5)).astype(np.uint8)
    return d, lo, np.minimum(q, top)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """uint8 [..., k] -> [..., 2k]: all low nibbles, then all high nibbles (ggml's order)."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _pack_nibbles(q: np.ndarray) -> np.ndarray:
    """Inverse of `_nibbles`: uint8 [..., 2k] with values < 16 -> [..., k]."""
    k = q.shape[-1] // 2
    return q[..., :k] | (q[..., k:] << 4)


def _round_half_away(x: np.ndarray) -> np.ndarray:
    """C `roundf` (ties away from zero), exactly: `trunc(x + 0.5)` would round 0.49999997 up."""
    a = np.abs(x)
    whole = np.floor(a)
    return np.copysign(whole + (a - whole >= 0.5), x)


def _random_scale(rng: np.random.Generator, n: int, code_rms: float) -> np.ndarray:
    """Per-block f32 scales whose products with codes of rms `code_rms` have std around _RANDOM_STD."""
    return (_RANDOM_STD / code_rms) * rng.uniform(0.5, 1.5, n).astype(np.float32)


# ---------------------------------------------------------------------------------------------------
# floating types: one element per "block"


class _Float:
    block_size = 1
    uint: type  # unsigned integer type of the same width, for bit tricks
    exp_bits: int
    mant_bits: int

    @classmethod
    def randomize(cls, blocks, rng):
        # Random sign and mantissa, exponent drawn from 2^-7 .. 2^-4: magnitudes in [0.008, 0.125).
        w = blocks.view(cls.uint)  # [B, 1]
        bias = (1 << (cls.exp_bits - 1)) - 1
        sign_mant = cls.uint((1 << (cls.exp_bits + cls.mant_bits)) | ((1 << cls.mant_bits) - 1))
        exponent = (bias - 7 + ((w >> cls.uint(cls.mant_bits)) & cls.uint(3))) << cls.uint(cls.mant_bits)
        w &= sign_mant
        w |= exponent


class F32(_Float):
    # f32 (4 bytes)
    qtype, type_size, uint, exp_bits, mant_bits = T.F32, 4, np.uint32, 8, 23

    @classmethod
    def dequantize_blocks(cls, blocks):
        return blocks.view(np.float32)

    @classmethod
    def quantize_blocks(cls, x):
        return x.astype(np.float32).view(np.uint8)


class F16(_Float):
    # f16 (2 bytes)
    qtype, type_size, uint, exp_bits, mant_bits = T.F16, 2, np.uint16, 5, 10

    @classmethod
    def dequantize_blocks(cls, blocks):
        return blocks.view(np.float16).astype(np.float32)

    @classmethod
    def quantize_blocks(cls, x):
        return x.astype(np.float16).view(np.uint8)  # IEEE round to nearest even, like F16C


class BF16(_Float):
    # bf16 (2 bytes) = the high half of an f32: sign | 8-bit exponent | 7-bit mantissa
    qtype, type_size, uint, exp_bits, mant_bits = T.BF16, 2, np.uint16, 8, 7

    @classmethod
    def dequantize_blocks(cls, blocks):
        return (blocks.view(np.uint16).astype(np.uint32) << 16).view(np.float32)

    @classmethod
    def quantize_blocks(cls, x):
        # ggml_compute_fp32_to_bf16: round to nearest even; a NaN is kept a (quiet) NaN.
        u = x.astype(np.float32).view(np.uint32)
        is_nan = (u & 0x7FFFFFFF) > 0x7F800000
        rounded = (u.astype(np.uint64) + (0x7FFF + ((u >> 16) & 1))) >> 16
        quiet_nan = (u >> 16) | 0x40
        return np.where(is_nan, quiet_nan, rounded).astype(np.uint16).view(np.uint8)


# ---------------------------------------------------------------------------------------------------
# legacy types: 32 elements per block, one f16 scale (and min)


class Q8_0:
    # | d: f16 | qs: 32 x int8 |      x[i] = d * qs[i]
    qtype, block_size, type_size = T.Q8_0, 32, 34

    @classmethod
    def dequantize_blocks(cls, blocks):
        d = _f16(blocks, 0)  # [B, 1]
        return blocks[:, 2:].view(np.int8).astype(np.float32) * d  # [B, 32]

    @classmethod
    def quantize_blocks(cls, x):
        d = np.abs(x).max(axis=1, keepdims=True) / np.float32(127)  # [B, 1]
        qs = _round_half_away(x * _inverse(d)).astype(np.int8)  # [B, 32]
        return np.concatenate([_f16_bytes(d), qs.view(np.uint8)], axis=1)

    @classmethod
    def randomize(cls, blocks, rng):
        _put_f16(blocks, 0, _random_scale(rng, len(blocks), 73.9))  # rms of uniform int8


class Q4_0:
    # | d: f16 | qs: 16 bytes |      qs[j] = q[j] | q[j+16] << 4,   x[i] = d * (q[i] - 8)
    qtype, block_size, type_size = T.Q4_0, 32, 18

    @classmethod
    def dequantize_blocks(cls, blocks):
        d = _f16(blocks, 0)  # [B, 1]
        q = _nibbles(blocks[:, 2:])  # [B, 32]
        return d * (q.astype(np.float32) - np.float32(8))

    @classmethod
    def quantize_blocks(cls, x):
        d, q = _symmetric_codes(x, 8)  # [B, 1], [B, 32]
        return np.concatenate([_f16_bytes(d), _pack_nibbles(q)], axis=1)

    @classmethod
    def randomize(cls, blocks, rng):
        _put_f16(blocks, 0, _random_scale(rng, len(blocks), 4.64))  # rms of -8..7


class Q4_1:
    # | d: f16 | m: f16 | qs: 16 bytes |      qs as Q4_0,   x[i] = d * q[i] + m
    qtype, block_size, type_size = T.Q4_1, 32, 20

    @classmethod
    def dequantize_blocks(cls, blocks):
        d, m = _f16(blocks, 0), _f16(blocks, 2)  # [B, 1] each
        q = _nibbles(blocks[:, 4:])  # [B, 32]
        return d * q.astype(np.float32) + m

    @classmethod
    def quantize_blocks(cls, x):
        d, lo, q = _affine_codes(x, 15)
        return np.concatenate([_f16_bytes(d), _f16_bytes(lo), _pack_nibbles(q)], axis=1)

    @classmethod
    def randomize(cls, blocks, rng):
        d = _random_scale(rng, len(blocks), 4.61)  # std of 0..15
        _put_f16(blocks, 0, d)
        _put_f16(blocks, 2, -7.5 * d)  # centre the codes' mean 7.5 on zero


class Q5_0:
    # | d: f16 | qh: u32 | qs: 16 bytes |
    #   bit i of qh = bit 4 of q[i];  qs[j] = low4(q[j]) | low4(q[j+16]) << 4;   x[i] = d * (q[i] - 16)
    qtype, block_size, type_size = T.Q5_0, 32, 22

    @classmethod
    def dequantize_blocks(cls, blocks):
        d = _f16(blocks, 0)  # [B, 1]
        high = np.unpackbits(blocks[:, 2:6], axis=1, bitorder="little")  # [B, 32]
        q = _nibbles(blocks[:, 6:]) | (high << 4)  # [B, 32]
        return d * (q.astype(np.float32) - np.float32(16))

    @classmethod
    def quantize_blocks(cls, x):
        d, q = _symmetric_codes(x, 16)  # [B, 1], [B, 32]
        qh = np.packbits(q >> 4, axis=1, bitorder="little")  # [B, 4]
        return np.concatenate([_f16_bytes(d), qh, _pack_nibbles(q & 0x0F)], axis=1)

    @classmethod
    def randomize(cls, blocks, rng):
        _put_f16(blocks, 0, _random_scale(rng, len(blocks), 9.25))  # rms of -16..15


class Q5_1:
    # | d: f16 | m: f16 | qh: u32 | qs: 16 bytes |      q as Q5_0,   x[i] = d * q[i] + m
    qtype, block_size, type_size = T.Q5_1, 32, 24

    @classmethod
    def dequantize_blocks(cls, blocks):
        d, m = _f16(blocks, 0), _f16(blocks, 2)  # [B, 1] each
        high = np.unpackbits(blocks[:, 4:8], axis=1, bitorder="little")  # [B, 32]
        q = _nibbles(blocks[:, 8:]) | (high << 4)  # [B, 32]
        return d * q.astype(np.float32) + m

    @classmethod
    def quantize_blocks(cls, x):
        d, lo, q = _affine_codes(x, 31)
        qh = np.packbits(q >> 4, axis=1, bitorder="little")  # [B, 4]
        return np.concatenate([_f16_bytes(d), _f16_bytes(lo), qh, _pack_nibbles(q & 0x0F)], axis=1)

    @classmethod
    def randomize(cls, blocks, rng):
        d = _random_scale(rng, len(blocks), 9.23)  # std of 0..31
        _put_f16(blocks, 0, d)
        _put_f16(blocks, 2, -15.5 * d)


# ---------------------------------------------------------------------------------------------------
# K-quants: 256-element super-blocks of sub-blocks, sub-block scales quantized against an f16 scale


def _unpack_scale_min(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K: 12 bytes -> 8 six-bit scales `sc` and 8 six-bit mins `m`, uint8 [B, 8] each.

    byte  0..3 : sc[0..3] (bits 0-5) | sc[4..7] bits 4-5 (bits 6-7)
    byte  4..7 : m[0..3]  (bits 0-5) | m[4..7]  bits 4-5 (bits 6-7)
    byte 8..11 : sc[4..7] bits 0-3 (low nibble) | m[4..7] bits 0-3 (high nibble)
    """
    a, b, c = packed[:, 0:4], packed[:, 4:8], packed[:, 8:12]  # [B, 4] each
    sc = np.concatenate([a & 0x3F, (c & 0x0F) | ((a >> 6) << 4)], axis=1)
    m = np.concatenate([b & 0x3F, (c >> 4) | ((b >> 6) << 4)], axis=1)
    return sc, m


def _pack_scale_min(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Inverse of `_unpack_scale_min`: uint8 [B, 8] each (values < 64) -> [B, 12]."""
    a = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    b = m[:, :4] | ((m[:, 4:] >> 4) << 6)
    c = (sc[:, 4:] & 0x0F) | ((m[:, 4:] & 0x0F) << 4)
    return np.concatenate([a, b, c], axis=1)


def _dequantize_scale_min(blocks: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Q4_K/Q5_K after the codes are unpacked: q uint8 [B, 8, 32] -> float32 [B, 256]."""
    d, dmin = _f16(blocks, 0), _f16(blocks, 2)  # [B, 1] each
    sc, m = _unpack_scale_min(blocks[:, 4:16])  # [B, 8] each
    scale = (d * sc.astype(np.float32))[:, :, None]  # [B, 8, 1]
    offset = (dmin * m.astype(np.float32))[:, :, None]  # [B, 8, 1]
    return (scale * q.astype(np.float32) - offset).reshape(len(blocks), QK_K)


def _fit_scale_min(x: np.ndarray, qmax: int) -> tuple[np.ndarray, np.ndarray]:
    """Best `s, lo` with x ~ s * q + lo, q in 0..qmax, lo <= 0, per sub-block: x [B, S, n] -> [B, S] each.

    Tries a few code stretches around (max - min) / qmax; for each it rounds to codes and solves the
    2-parameter least squares for (s, lo) given those codes, then keeps the smallest squared error.
    `lo` is kept <= 0 because the file stores the min as an unsigned multiple of `dmin`.
    """
    n = x.shape[-1]
    lo0 = np.minimum(x.min(axis=-1), 0)  # [B, S]
    span = x.max(axis=-1) - lo0
    span = np.where(span > 0, span, np.float32(1))  # a constant sub-block: any scale is exact
    best_s, best_lo = span / qmax, lo0
    best_err = np.full(lo0.shape, np.inf, dtype=np.float32)
    sum_x = x.sum(axis=-1)
    for stretch in np.linspace(-0.5, 1.0, 7, dtype=np.float32):
        inv = (qmax + stretch) / span  # [B, S]
        q = np.clip(np.rint((x - lo0[..., None]) * inv[..., None]), 0, qmax)  # [B, S, n]
        sum_q, sum_qq, sum_qx = q.sum(-1), (q * q).sum(-1), (q * x).sum(-1)
        det = n * sum_qq - sum_q * sum_q
        with np.errstate(divide="ignore", invalid="ignore"):
            s = (n * sum_qx - sum_q * sum_x) / det
            lo = (sum_qq * sum_x - sum_q * sum_qx) / det
            # With the min clamped to zero, the best scale alone is sum(qx) / sum(qq).
            s = np.where(lo > 0, sum_qx / sum_qq, s)
        lo = np.minimum(lo, 0)
        err = ((s[..., None] * q + lo[..., None] - x) ** 2).sum(-1)
        better = np.isfinite(err) & (det > 0) & (err < best_err)
        best_s, best_lo, best_err = np.where(better, s, best_s), np.where(better, lo, best_lo), np.where(better, err, best_err)
    return np.maximum(best_s, 0), best_lo


def _quantize_scale_min(x: np.ndarray, qmax: int) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K quantizer body: x [B, 256] -> (header: uint8 [B, 16] = d | dmin | scales, q: uint8 [B, 8, 32])."""
    xs = x.reshape(len(x), 8, 32)
    s, lo = _fit_scale_min(xs, qmax)  # [B, 8] each
    d = (s.max(axis=1) / 63).astype(np.float16)  # [B]
    dmin = (-lo.min(axis=1) / 63).astype(np.float16)
    d32, dmin32 = d.astype(np.float32)[:, None], dmin.astype(np.float32)[:, None]  # [B, 1]
    with np.errstate(divide="ignore", invalid="ignore"):
        sc = np.clip(np.rint(s / d32), 0, 63)
        m = np.clip(np.rint(-lo / dmin32), 0, 63)
    sc, m = np.nan_to_num(sc).astype(np.uint8), np.nan_to_num(m).astype(np.uint8)  # [B, 8] each
    # Final codes against the scales as they will be decoded (f16 d times 6-bit sc).
    scale = (d32 * sc)[:, :, None]  # [B, 8, 1]
    offset = (dmin32 * m)[:, :, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.rint((xs + offset) / scale)
    q = np.clip(np.nan_to_num(q, posinf=0, neginf=0), 0, qmax).astype(np.uint8)  # [B, 8, 32]
    header = np.concatenate([d.view(np.uint8).reshape(-1, 2), dmin.view(np.uint8).reshape(-1, 2), _pack_scale_min(sc, m)], axis=1)
    return header, q


def _randomize_scale_min(blocks: np.ndarray, rng: np.random.Generator, q_mean: float, q_std: float) -> None:
    # Equal 6-bit scale and min per sub-block, both in 32..63, with dmin = q_mean * d: every sub-block
    # is centred on zero. Done on the packed bytes (layout in _unpack_scale_min) to stay cheap:
    # setting bits 5 and 7 of bytes 0..3 puts bit 5 into all eight scales; bytes 4..7 repeat them as
    # the mins; bytes 8..11 repeat their low nibble (sc[4..7]) as the high one (m[4..7]).
    packed = blocks[:, 4:16]  # [B, 12]
    packed[:, 0:4] |= 0xA0
    packed[:, 4:8] = packed[:, 0:4]
    packed[:, 8:12] = (packed[:, 8:12] & 0x0F) * 0x11
    d = _random_scale(rng, len(blocks), 47.5 * q_std)
    _put_f16(blocks, 0, d)
    _put_f16(blocks, 2, q_mean * d)


class Q4_K:
    # | d: f16 | dmin: f16 | scales: 12 bytes | qs: 128 bytes |
    #   8 sub-blocks of 32; scales packs 8 six-bit sc and 8 six-bit m (see _unpack_scale_min).
    #   qs is 4 chunks of 32 bytes; chunk c holds sub-block 2c in its low nibbles and 2c+1 in its high.
    #   x[32 j + l] = (d * sc[j]) * q - dmin * m[j]
    qtype, block_size, type_size = T.Q4_K, QK_K, 144

    @classmethod
    def dequantize_blocks(cls, blocks):
        q = _nibbles(blocks[:, 16:].reshape(-1, 4, 32)).reshape(-1, 8, 32)  # [B, 8, 32]
        return _dequantize_scale_min(blocks, q)

    @classmethod
    def quantize_blocks(cls, x):
        header, q = _quantize_scale_min(x, 15)
        qs = _pack_nibbles(q.reshape(-1, 4, 64)).reshape(-1, 128)
        return np.concatenate([header, qs], axis=1)

    @classmethod
    def randomize(cls, blocks, rng):
        _randomize_scale_min(blocks, rng, 7.5, 4.61)


class Q5_K:
    # | d: f16 | dmin: f16 | scales: 12 bytes | qh: 32 bytes | qs: 128 bytes |
    #   as Q4_K, and bit j of qh[l] is bit 4 of element l of sub-block j.
    #   x[32 j + l] = (d * sc[j]) * q - dmin * m[j],  q in 0..31
    qtype, block_size, type_size = T.Q5_K, QK_K, 176
    _BITS = np.arange(8, dtype=np.uint8)[:, None]  # [8, 1]

    @classmethod
    def dequantize_blocks(cls, blocks):
        low = _nibbles(blocks[:, 48:].reshape(-1, 4, 32)).reshape(-1, 8, 32)  # [B, 8, 32]
        high = (blocks[:, None, 16:48] >> cls._BITS << 4) & 16  # [B, 8, 32]: bit j of qh[l] -> [j, l]
        return _dequantize_scale_min(blocks, low | high)

    @classmethod
    def quantize_blocks(cls, x):
        header, q = _quantize_scale_min(x, 31)
        qh = np.packbits((q >> 4).transpose(0, 2, 1), axis=2, bitorder="little").reshape(-1, 32)
        qs = _pack_nibbles((q & 0x0F).reshape(-1, 4, 64)).reshape(-1, 128)
        return np.concatenate([header, qh, qs], axis=1)

    @classmethod
    def randomize(cls, blocks, rng):
        _randomize_scale_min(blocks, rng, 15.5, 9.23)


class Q6_K:
    # | ql: 128 bytes | qh: 64 bytes | scales: 16 x int8 | d: f16 |
    #   16 sub-blocks of 16 with int8 scales; 6-bit codes q, value q - 32. Each half h of 128 elements
    #   (ql[64h : 64h+64], qh[32h : 32h+32]) holds, for l in 0..31:
    #     element 128h + l      : low4 = ql[64h + l]      & 15,  high2 = qh[32h + l]      & 3
    #     element 128h + l + 32 : low4 = ql[64h + l + 32] & 15,  high2 = qh[32h + l] >> 2 & 3
    #     element 128h + l + 64 : low4 = ql[64h + l]      >> 4,  high2 = qh[32h + l] >> 4 & 3
    #     element 128h + l + 96 : low4 = ql[64h + l + 32] >> 4,  high2 = qh[32h + l] >> 6
    #   x[16 j + i] = (d * scales[j]) * (q - 32)
    qtype, block_size, type_size = T.Q6_K, QK_K, 210
    _SHIFTS = np.array([0, 2, 4, 6], dtype=np.uint8)[:, None]  # [4, 1]

    @classmethod
    def dequantize_blocks(cls, blocks):
        low = _nibbles(blocks[:, :128].reshape(-1, 2, 64))  # [B, 2, 128]
        high = (blocks[:, 128:192].reshape(-1, 2, 1, 32) >> cls._SHIFTS) & 3  # [B, 2, 4, 32]
        q = low | (high.reshape(-1, 2, 128) << 4)  # [B, 2, 128]
        d = _f16(blocks, 208)  # [B, 1]
        scale = (d * blocks[:, 192:208].view(np.int8).astype(np.float32))[:, :, None]  # [B, 16, 1]
        return (scale * (q.reshape(-1, 16, 16).astype(np.float32) - np.float32(32))).reshape(-1, QK_K)

    @classmethod
    def quantize_blocks(cls, x):
        xs = x.reshape(len(x), 16, 16)
        s = _fit_scale_symmetric(xs)  # [B, 16]
        peak = np.take_along_axis(s, np.abs(s).argmax(axis=1, keepdims=True), axis=1)[:, 0]  # [B]
        d = (np.abs(peak) / 127).astype(np.float16)
        d32 = d.astype(np.float32)[:, None]  # [B, 1]
        with np.errstate(divide="ignore", invalid="ignore"):
            sc = np.nan_to_num(np.clip(np.rint(s / d32), -128, 127)).astype(np.int8)  # [B, 16]
            q = np.rint(xs / (d32 * sc)[:, :, None])
        q = (np.clip(np.nan_to_num(q, posinf=0, neginf=0), -32, 31) + 32).astype(np.uint8)  # [B, 16, 16]
        q = q.reshape(-1, 2, 4, 32)  # [B, half, quarter, l]
        ql = (q[:, :, :2] & 0x0F) | ((q[:, :, 2:] & 0x0F) << 4)  # [B, 2, 2, 32]
        qh = ((q >> 4) << cls._SHIFTS).sum(axis=2, dtype=np.uint8)  # [B, 2, 32]
        return np.concatenate([ql.reshape(-1, 128), qh.reshape(-1, 64), sc.view(np.uint8), d.view(np.uint8).reshape(-1, 2)], axis=1)

    @classmethod
    def randomize(cls, blocks, rng):
        # Scales 64..127 (llama-quantize uses most of the int8 range); d ~ 5e-5/(97*18.5), often an f16 subnormal, as in real files.
        blocks[:, 192:208] = 64 + (blocks[:, 192:208] & 63)
        _put_f16(blocks, 208, _random_scale(rng, len(blocks), 97 * 18.5))


def _fit_scale_symmetric(x: np.ndarray) -> np.ndarray:
    """Best `s` with x ~ s * q, q in -32..31 (Q6_K), per sub-block: x [B, S, n] -> [B, S].

    The element of largest magnitude maps to -32 (the longer side), stretched a little either way;
    for each candidate the codes are rounded and `s = sum(qx) / sum(qq)` is the least-squares scale.
    """
    peak = np.take_along_axis(x, np.abs(x).argmax(axis=-1)[..., None], axis=-1)[..., 0]  # [B, S]
    peak = np.where(peak != 0, peak, np.float32(1))
    best_s = peak / -32
    best_err = np.full(peak.shape, np.inf, dtype=np.float32)
    for stretch in np.linspace(-1.0, 0.5, 7, dtype=np.float32):
        inv = -(32 + stretch) / peak  # [B, S]
        q = np.clip(np.rint(x * inv[..., None]), -32, 31)  # [B, S, n]
        with np.errstate(divide="ignore", invalid="ignore"):
            s = (q * x).sum(-1) / (q * q).sum(-1)
        err = ((s[..., None] * q - x) ** 2).sum(-1)
        better = np.isfinite(err) & (err < best_err)
        best_s, best_err = np.where(better, s, best_s), np.where(better, err, best_err)
    return best_s


# ---------------------------------------------------------------------------------------------------
# public API

_TYPES = {cls.qtype: cls for cls in (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K)}
SUPPORTED = tuple(_TYPES)


def _traits(qtype):
    try:
        qt = T(int(qtype))
    except ValueError:
        raise KtxError(f"unknown GGML tensor type {qtype!r}; supported: {', '.join(t.name for t in SUPPORTED)}") from None
    if qt not in _TYPES:
        raise KtxError(
            f"tensor type {qt.name} is not supported by ktx; supported: {', '.join(t.name for t in SUPPORTED)}. "
            "Re-quantize the model to one of these (llama-quantize)."
        )
    return _TYPES[qt]


def block_size(qtype) -> tuple[int, int]:
    """(elements per block, bytes per block) of a GGML tensor type."""
    cls = _traits(qtype)
    return cls.block_size, cls.type_size


def row_bytes(qtype, n: int) -> int:
    """Bytes of one row of `n` elements."""
    cls = _traits(qtype)
    if n % cls.block_size:
        raise KtxError(
            f"a row of {n} elements is not a whole number of {cls.qtype.name} blocks ({cls.block_size} elements each); "
            "the tensor shape does not fit this type"
        )
    return n // cls.block_size * cls.type_size


def _map_blocks(fn, blocks: np.ndarray, out_width: int, out_dtype) -> np.ndarray:
    """fn over [B, k] blocks in cache-sized chunks -> out_dtype [B, out_width]."""
    out = np.empty((len(blocks), out_width), dtype=out_dtype)
    step = max(1, _CHUNK_ELEMENTS // max(out_width, blocks.shape[1]))
    for start in range(0, len(blocks), step):
        out[start : start + step] = fn(blocks[start : start + step])
    return out


def dequantize(raw: np.ndarray, qtype) -> np.ndarray:
    """GGUF tensor data -> float32 [..., n_per_row], bit-exact with `gguf.quants.dequantize`.

    `raw` is what `gguf.GGUFReader` gives: uint8 [..., bytes_per_row] for block types and BF16,
    float32 / float16 [..., n] for F32 / F16. Raw uint8 bytes are accepted for every type.
    """
    cls = _traits(qtype)
    raw = np.ascontiguousarray(raw)
    if raw.ndim == 0:
        raise KtxError(f"{cls.qtype.name} tensor data must have at least one dimension, got a scalar")
    if raw.dtype != np.uint8:
        native = {T.F32: (np.float32,), T.F16: (np.float16,), T.BF16: (np.uint16, np.int16)}.get(cls.qtype, ())
        if raw.dtype not in native:
            raise KtxError(f"{cls.qtype.name} tensor data must be uint8 bytes{''.join(', or ' + np.dtype(t).name for t in native)}; got {raw.dtype}")
        raw = raw.view(np.uint8)
    lead, nbytes = raw.shape[:-1], raw.shape[-1]
    if nbytes % cls.type_size:
        raise KtxError(
            f"a {cls.qtype.name} row of {nbytes} bytes is not a whole number of {cls.type_size}-byte blocks; "
            "the tensor data is truncated or its type is wrong"
        )
    blocks = raw.reshape(-1, cls.type_size)  # [B, type_size]
    out = _map_blocks(cls.dequantize_blocks, blocks, cls.block_size, np.float32)  # [B, block_size]
    return out.reshape(*lead, nbytes // cls.type_size * cls.block_size)


def quantize(x: np.ndarray, qtype) -> np.ndarray:
    """float32 [..., n] -> uint8 [..., row_bytes(qtype, n)] in GGUF layout."""
    cls = _traits(qtype)
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim == 0:
        raise KtxError(f"cannot quantize a scalar to {cls.qtype.name}; give at least one dimension")
    nb = row_bytes(cls.qtype, x.shape[-1])
    blocks = x.reshape(-1, cls.block_size)  # [B, block_size]
    out = _map_blocks(cls.quantize_blocks, blocks, cls.type_size, np.uint8)  # [B, type_size]
    return out.reshape(*x.shape[:-1], nb)


def random_blocks(qtype, shape, rng: np.random.Generator) -> np.ndarray:
    """Random valid tensor data of logical shape [..., n] -> uint8 [..., row_bytes(qtype, n)].

    Codes are random bytes; scales are finite f16 chosen so that the dequantized values look like
    weights (std around 0.05). Fast enough for GB-sized synthetic models (no quantizer involved).
    """
    cls = _traits(qtype)
    shape = tuple(int(s) for s in shape)
    if not shape:
        raise KtxError(f"random {cls.qtype.name} data needs a shape with at least one dimension")
    nb = row_bytes(cls.qtype, shape[-1])
    n_blocks = int(np.prod(shape[:-1], dtype=np.int64)) * nb // cls.type_size
    out = np.empty((n_blocks, cls.type_size), dtype=np.uint8)
    step = max(1, (4 * _CHUNK_ELEMENTS) // cls.type_size)  # about 1 MiB of blocks at a time, in cache
    for start in range(0, n_blocks, step):
        chunk = out[start : start + step]  # [b, type_size]
        words = rng.integers(0, np.iinfo(np.uint64).max, (chunk.size + 7) // 8, dtype=np.uint64, endpoint=True)
        chunk[:] = words.view(np.uint8)[: chunk.size].reshape(chunk.shape)
        cls.randomize(chunk, rng)
    return out.reshape(*shape[:-1], nb)
