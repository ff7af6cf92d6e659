"""AMX prefill tiles inside the MoE loops (Numba, nogil): one 16-token x 16-row output block per kernel call.

For expert e, row group rg (16 rows of a repacked matrix, repack.py) and a token tile of 16 slots t0..t0+15:

    A  xq[t0 : t0 + 16, :K]           int8, lda = K bytes     (slots of AMX experts are padded to 16, zeros)
    B  codes[e, rg]  [K/4, 64]        the byte plane (Q8_0) is the B tile layout as is, ldb = 64
       or, for the packed layouts (4, 5, 6 bits: repack.py), codes[e, rg] widened into a per-worker scratch
       [K/4, 64] once per (expert, row group) and reused by all of that expert's token tiles. Per code block
       of kb k (vectors v0.. of 64 bytes; step s = 4 k of the block, B row kb/4 block + s):
           B[., 4 r + j] = (v[s / 2] >> 4 (s % 2)) & 15  |  ((v_hi >> hb s) & (2^hb - 1)) << 4
       with hb = bits - 4 high bits per code in the block's last vector (none for 4 bits)
    C  cbuf [K/G, 16, 16] int32       the "steps" microkernel (amx.py) stores one tile per scale group of G
                                      weights: one ldtilecfg per call, K/G x (tilezero, 2 x tileloadd,
                                      tdpbsud, tilestored)

and then, per group g (k0 = G g), the affine sum of simd.py, in float32 (per token t, row r):

    acc[t, r] += (C[g, t, r] - zero * xs_g[t]) * (d[r, k0/S] * sc[r, g]) * dx[t, k0/32]
    acc[t, r] -= xsf[t, k0/32] * dmin[r, k0/256] * m[r, k0/32]          (K-quants, once per 32)

The microkernel is a bare function address called with amx.py's C ABI: the native one (llvmlite JIT, only
where amx_available()) or amx.tdpbsud_steps_model (a Numba cfunc), so these loops run and are tested on
CPUs without AMX. Layout constants come from the layout id (simd.py's V // 1000) through the LAY table, at
run time: these functions are compiled once, not once per variant (a call per 16 x 16 x K block is cheap).
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import carray, njit
from numba.core import types
from numba.extending import intrinsic

from .repack import LAYOUTS
from .simd import widen

# per layout id (simd.LAYOUT_IDS order): G, S, zero, sc kind (0 none, 1 u8, 2 i8), mins, code bits, k per block
LAY = tuple((lay.G, lay.S, lay.zero, {None: 0, "u8": 1, "i8": 2}[lay.sc], int(lay.mins), lay.bits, lay.kb)
            for lay in LAYOUTS.values())

_i8p = ir.IntType(8).as_pointer()


@intrinsic
def call_tile_kernel(typingctx, fn, a, lda, b, ldb, c, ldc, K, zero_c):
    """fn(a, lda, b, ldb, c, ldc, K, zero_c) through the address fn (amx.py's microkernel ABI)."""
    args = (fn, a, lda, b, ldb, c, ldc, K, zero_c)
    if not all(isinstance(t, types.Integer) for t in args):
        return None

    def codegen(context, builder, signature, vals):
        i32, i64 = ir.IntType(32), ir.IntType(64)
        v = [context.cast(builder, x, t, types.int64) for x, t in zip(vals, signature.args)]
        fnty = ir.FunctionType(ir.VoidType(), [_i8p, i64, _i8p, i64, _i8p, i64, i64, i32])
        f = builder.inttoptr(v[0], fnty.as_pointer())
        builder.call(f, [builder.inttoptr(v[1], _i8p), v[2], builder.inttoptr(v[3], _i8p), v[4],
                         builder.inttoptr(v[5], _i8p), v[6], v[7], builder.trunc(v[8], i32)])
        return context.get_dummy_value()

    return types.void(*args), codegen


@intrinsic
def u8_ptr(typingctx, addr):
    """An address as a uint8 pointer (for numba.carray views of the repacked arrays)."""
    if not isinstance(addr, types.Integer):
        return None

    def codegen(context, builder, signature, vals):
        return builder.inttoptr(context.cast(builder, vals[0], signature.args[0], types.int64), _i8p)

    return types.CPointer(types.uint8)(addr), codegen


@intrinsic
def f16_at(typingctx, addr):
    """The float16 at an address, as float32 (Numba arrays have no float16)."""
    if not isinstance(addr, types.Integer):
        return None

    def codegen(context, builder, signature, vals):
        p = builder.inttoptr(context.cast(builder, vals[0], signature.args[0], types.int64), ir.HalfType().as_pointer())
        return builder.fpext(builder.load(p, align=2), ir.FloatType())

    return types.float32(addr), codegen


@njit(nogil=True, cache=True)
def b_operand(lay, md, e, rg, K, wbuf):
    """Address of the B operand [K/4, 64] of (e, rg): the byte plane itself, or wbuf after widening packed codes
    (simd.widen: the tile kernels' vector unpacking, ~40x a scalar byte loop)."""
    src = np.int64(md[0] + e * md[1] + rg * md[2])
    dst = np.int64(wbuf.ctypes.data)  # int64 like src (ctypes.data is uint64)
    if LAY[lay][5] == 8:
        return src
    widen_codes(LAY[lay][5], K, src, dst)
    return dst


@njit(nogil=True, cache=True, inline="always")
def widen_codes(bits, K, src, dst):
    """One row group's packed codes at src -> bytes [K/4, 64] at dst (bits 4, 5 or 6; a literal for widen)."""
    if bits == 4:
        widen(4, K, src, dst)
    elif bits == 5:
        widen(5, K, src, dst)
    else:
        widen(6, K, src, dst)


@njit(nogil=True, cache=True)
def amx_tile(lay, fn, md, e, rg, K, b_addr, xq, xd, xs, xsf, t0, cbuf, out, r0, c0):
    """out[r0 : r0 + 16, c0 : c0 + 16] = slots t0..t0+15 times rows of (e, rg): one steps-kernel call over K,
    then the per-group scales. cbuf: int32 scratch of at least [K/G, 16, 16]."""
    G, S, zero, sck, mins, _, _ = LAY[lay]
    call_tile_kernel(fn, xq.ctypes.data + t0 * K, K, b_addr, 64, cbuf.ctypes.data, 64, K, 1)
    d_a, sc_a = md[3] + e * md[4] + rg * md[5], md[6] + e * md[7] + rg * md[8]
    dm_a, m_a = md[9] + e * md[10] + rg * md[11], md[12] + e * md[13] + rg * md[14]
    acc = np.zeros((16, 16), np.float32)  # [16 tokens, 16 rows]
    s = np.empty(16, np.float32)  # d * sc per row, exact in f32
    mn = np.empty(16, np.float32)  # dmin * m per row
    for g in range(K // G):
        k0 = g * G
        for r in range(16):
            s[r] = f16_at(d_a + (k0 // S) * 32 + 2 * r)
        if sck:
            sc = carray(u8_ptr(sc_a + 16 * g), 16)
            for r in range(16):
                s[r] *= np.float32(np.int8(sc[r])) if sck == 2 else np.float32(sc[r])
        first32 = mins and k0 % 32 == 0
        if first32:
            m = carray(u8_ptr(m_a + 16 * (k0 // 32)), 16)
            for r in range(16):
                mn[r] = f16_at(dm_a + (k0 // 256) * 32 + 2 * r) * np.float32(m[r])
        for t in range(16):
            x16 = k0 // 16
            xsum = xs[t0 + t, x16] + (xs[t0 + t, x16 + 1] if G == 32 else 0)
            dx = xd[t0 + t, k0 // 32]
            for r in range(16):
                acc[t, r] += np.float32(cbuf[g, t, r] - zero * xsum) * (s[r] * dx)
            if first32:
                f = xsf[t0 + t, k0 // 32]
                for r in range(16):
                    acc[t, r] -= f * mn[r]
    for t in range(16):
        for r in range(16):
            out[r0 + t, c0 + r] = acc[t, r]
