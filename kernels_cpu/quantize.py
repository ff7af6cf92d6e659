"""Activations -> int8 per block of 32, on the fly, for the integer dot kernels.

For one row x[K] (K a multiple of 32), block b = x[32 b : 32 b + 32]:

    dx[b]  = max |x_b| / 127             (float32; 0 for an all-zero block)
    xq[k]  = round(x[k] / dx[b])          int8 in [-127, 127] (never -128: the AVX2 sign trick needs it)
    xs[h]  = sum of xq over 16-wide half blocks   (int32; the integer start value for code offsets)
    xsf[b] = dx[b] * sum of xq over the block     (float32; multiplies the K-quant minimums)

Error bound: |x[k] - dx[b] xq[k]| <= dx[b] / 2, so a dot with weights w changes by at most
sum_b dx[b] / 2 * sum_{k in b} |w[k]|  (quant_error_bound below; the tests derive their tolerance from it).

quantize_row256 writes the same arrays with one dx per 256 (repeated over its 8 blocks): for K-quant prefill
only, where the tiles fold it with the weights' per-256 d (simd.py); its bound is quant_error_bound with block=256.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from .vec import quant_blocks


@njit(nogil=True, cache=True)
def quantize_row(x, xq, xd, xs, xsf):
    """x float32 [K] -> xq int8 [K], xd float32 [K/32], xs int32 [K/16], xsf float32 [K/32]."""
    if _contiguous(x, xq, xd, xs, xsf):  # vector IR (vec.quant_blocks), else the scalar loop below
        quant_blocks(x.ctypes.data, xq.ctypes.data, xd.ctypes.data, xs.ctypes.data, xsf.ctypes.data, x.shape[0] // 32, 1)
        return
    for b in range(x.shape[0] // 32):
        _block(x, b, _scale(x, 32 * b, 32 * b + 32), xq, xd, xs, xsf)


@njit(nogil=True, cache=True, inline="always")
def _contiguous(x, xq, xd, xs, xsf):
    return (x.strides[0] == 4 and xq.strides[0] == 1 and xd.strides[0] == 4 and xs.strides[0] == 4
            and xsf.strides[0] == 4)


@njit(nogil=True, cache=True, inline="always")
def _scale(x, lo, hi):
    """dx = max |x[lo:hi]| / 127, the scale of the int8 codes of those elements."""
    amax = np.float32(0.0)
    for k in range(lo, hi):
        amax = max(amax, abs(x[k]))
    return amax / np.float32(127.0)


@njit(nogil=True, cache=True, inline="always")
def _block(x, b, d, xq, xd, xs, xsf):
    """Block b (32 elements) of x as int8 codes at scale d, with its two 16-sums and d * sum."""
    inv = np.float32(1.0) / d if d > 0 else np.float32(0.0)
    s0 = 0
    s1 = 0
    for i in range(32):
        q = np.int32(np.rint(x[32 * b + i] * inv))
        q = min(127, max(-127, q))
        xq[32 * b + i] = q
        if i < 16:
            s0 += q
        else:
            s1 += q
    xd[b] = d
    xs[2 * b] = s0
    xs[2 * b + 1] = s1
    xsf[b] = d * np.float32(s0 + s1)


def quant_error_bound(x: np.ndarray, w_abs: np.ndarray, block: int = 32) -> np.ndarray:
    """Worst-case |W x - W dequant(quant(x))| per output row: x [K], w_abs = |W| [R, K] -> [R]; block: the
    activations' scale block, 32 (quantize_row) or 256 (quantize_row256)."""
    dx = np.abs(x.reshape(-1, block)).max(axis=1) / 127.0  # [K/block]
    return 0.5 * (w_abs.reshape(w_abs.shape[0], -1, block).sum(axis=2) @ dx)


@njit(nogil=True, cache=True)
def quantize_row256(x, xq, xd, xs, xsf):
    """The arrays of quantize_row, but one scale per superblock of 256 (K a multiple of 256): xd[b] repeats
    the superblock's dx = max |x| / 127 over its 8 blocks, so every consumer of the per-32 format reads it as
    is, and K-quant tiles (simd.py's per-256 variants) can sum sc * int dot over a superblock before scaling.
    llama.cpp quantizes activations the same way (Q8_K) for its K-quant dots. Error bound: dx[b] / 2 per
    element as for quantize_row, with the superblock's dx (quant_error_bound, block=256)."""
    if _contiguous(x, xq, xd, xs, xsf):
        quant_blocks(x.ctypes.data, xq.ctypes.data, xd.ctypes.data, xs.ctypes.data, xsf.ctypes.data, x.shape[0] // 256, 8)
        return
    for sb in range(x.shape[0] // 256):
        d = _scale(x, 256 * sb, 256 * sb + 256)
        for b in range(8 * sb, 8 * sb + 8):
            _block(x, b, d, xq, xd, xs, xsf)
