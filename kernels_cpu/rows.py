"""A few rows of a GGUF tensor, dequantized in one compiled call: the token embedding of each decoded token.

ktx.quants.dequantize (numpy, bit-exact with gguf-py) costs tens of numpy calls per row, and right after a decode
step has streamed ~600 MB through the caches they ran cold: on the synthetic DeepSeek-V3-shaped model (Zen 5),
fetching one Q4_K row took 32 us (median) and dequantizing it 48 us, 1-2% of a 9.7 ms step. Here the row is read
through its address and dequantized in one Numba loop, with the same float32 operations in the same order as
ktx.quants (so the same bits; tests/test_quants.py checks every type below against it): Q8_0, Q4_K, Q6_K, F16,
BF16 and F32, the types llama.cpp's recipes give token_embd. Other types take ktx.quants.dequantize.
"""
from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as T
from numba import njit

from ktx.quants import dequantize

_F16 = np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(np.float32)  # every f16 bit pattern, exactly
_KINDS = {T.F32: 0, T.F16: 1, T.BF16: 2, T.Q8_0: 3, T.Q4_K: 4, T.Q6_K: 5}


class RowTable:
    """Rows of one tensor (the token embedding), looked up by id: `table(ids)` -> float32 [len(ids), n].

    Made once per model. Its pages are touched once here (one byte a row): a decode step's first touch of a
    random token's row otherwise page-faulted in the memory-mapped GGUF (mean 49 us against a 17.5 us median)."""

    def __init__(self, data: np.ndarray, qtype, touch: bool = True):
        self.data, self.qtype = data, T(qtype)
        self.kind = _KINDS.get(self.qtype, -1) if data.ndim == 2 and data.flags.c_contiguous else -1
        if self.kind >= 0:
            self.raw = data.view(np.uint8).reshape(data.shape[0], -1)
            b = self.raw.shape[1]
            self.n = (b // 4, b // 2, b // 2, b // 34 * 32, b // 144 * 256, b // 210 * 256)[self.kind]
            if touch:
                _touch(self.raw)

    def __call__(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if self.kind < 0:
            return dequantize(self.data[ids], self.qtype).reshape(len(ids), -1)
        out = np.empty((len(ids), self.n), np.float32)
        if not _rows(self.raw, ids, self.kind, _F16, out):
            raise IndexError(f"token id out of range for an embedding of {self.raw.shape[0]} rows: {ids.tolist()}")
        return out


def dequantize_rows(data: np.ndarray, qtype, ids: np.ndarray) -> np.ndarray:
    """float32 [len(ids), n] from rows `ids` of a tensor's data as gguf.GGUFReader gives it ([rows, ...])."""
    return RowTable(data, qtype, touch=False)(ids)


@njit(cache=True, nogil=True)
def _touch(raw):
    s = 0
    for i in range(raw.shape[0]):
        s += raw[i, 0]
    return s


@njit(cache=True, nogil=True, inline="always")
def _b(r, i):
    return np.int64(r[i])  # a byte as int64: Numba types uint8-with-int64 arithmetic as float64


@njit(cache=True, nogil=True)
def _f16_at(r, i, tab):
    return tab[_b(r, i) | (_b(r, i + 1) << 8)]


@njit(cache=True, nogil=True)
def _rows(raw, ids, kind, tab, out):
    """False (nothing written) if an id is out of range."""
    for i in range(ids.shape[0]):
        if ids[i] < 0 or ids[i] >= raw.shape[0]:
            return False
    n = out.shape[1]
    ou = out.view(np.uint32)
    for i in range(ids.shape[0]):
        r = raw[ids[i]]
        o = out[i]
        if kind == 0:  # F32
            for j in range(n):
                ou[i, j] = np.uint32(_b(r, 4 * j) | (_b(r, 4 * j + 1) << 8) | (_b(r, 4 * j + 2) << 16) |
                                     (_b(r, 4 * j + 3) << 24))
        elif kind == 1:  # F16
            for j in range(n):
                o[j] = _f16_at(r, 2 * j, tab)
        elif kind == 2:  # BF16: the high half of an f32
            for j in range(n):
                ou[i, j] = np.uint32((_b(r, 2 * j) << 16) | (_b(r, 2 * j + 1) << 24))
        elif kind == 3:  # Q8_0: | d f16 | 32 x int8 |, x = q * d
            for b in range(n // 32):
                base = 34 * b
                d = _f16_at(r, base, tab)
                for j in range(32):
                    q = _b(r, base + 2 + j)
                    o[32 * b + j] = np.float32(q - 256 if q > 127 else q) * d
        elif kind == 4:  # Q4_K: | d | dmin | 12 bytes of 6-bit sc, m | 128 bytes of nibbles |
            for b in range(n // 256):
                base = 144 * b
                d, dmin = _f16_at(r, base, tab), _f16_at(r, base + 2, tab)
                s = base + 4
                for j in range(8):
                    if j < 4:
                        sc, m = _b(r, s + j) & 63, _b(r, s + 4 + j) & 63
                    else:
                        sc = (_b(r, s + 4 + j) & 15) | ((_b(r, s + j - 4) >> 6) << 4)
                        m = (_b(r, s + 4 + j) >> 4) | ((_b(r, s + j) >> 6) << 4)
                    scale, offset = d * np.float32(sc), dmin * np.float32(m)
                    qs = base + 16 + 32 * (j // 2)  # sub-blocks 2c and 2c + 1: chunk c's low, then high nibbles
                    for l in range(32):
                        q = (_b(r, qs + l) & 15) if j % 2 == 0 else (_b(r, qs + l) >> 4)
                        o[256 * b + 32 * j + l] = scale * np.float32(q) - offset
        else:  # Q6_K: | ql 128 | qh 64 | 16 x int8 scales | d |, x = (d * sc) * (q - 32)
            for b in range(n // 256):
                base = 210 * b
                d = _f16_at(r, base + 208, tab)
                for e in range(256):
                    h, k = e // 128, e % 128
                    lo = (_b(r, base + 64 * h + k) & 15) if k < 64 else (_b(r, base + 64 * h + k - 64) >> 4)
                    hi = (_b(r, base + 128 + 32 * h + k % 32) >> (2 * (k // 32))) & 3
                    sc = _b(r, base + 192 + e // 16)
                    scale = d * np.float32(sc - 256 if sc > 127 else sc)
                    o[256 * b + e] = scale * (np.float32(lo | (hi << 4)) - np.float32(32))
    return True
