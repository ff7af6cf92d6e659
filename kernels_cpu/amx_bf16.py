"""AMX prefill in bf16: the repacked weights of one item dequantized to bf16 B tiles, then tdpbf16ps over the whole K.

The int8 AMX tiles (amx.full_tile_module) must store a C tile and run the float scale code for every group of
16-32 weights, because K-quant and Q8_0 scales change per group and per row; that float code is the same per
output as the vnni tiles', so int8 AMX measured no faster than vnni (bench/RESULTS.md). Here the scales go into
the weights instead: per work item (expert, NR row groups), each row group's codes are dequantized once into a
bf16 scratch laid out as tdpbf16ps B tiles (dequant_module), and every 32-token tile of the expert then runs

    for each 32 k:  tileloadd A_h <- x_bf16[16 h : 16 h + 16, k : k + 32]   (h = 0, 1: 32 tokens)
                    tileloadd B_r <- W_bf16 pair rows of row group r, k/2 .. k/2 + 15
                    tdpbf16ps C_h,r += A_h B_r                            (f32 accumulators, whole K)
    tilestored C_h,r -> out                                              (tile_module)

with no per-group work at all. Dequantizing costs ~25 vector ops per 64 weights (0.13 ns a weight on the Xeon
measured), once per item, against 2 x 64 x (tokens of the expert) flops on those weights: so the bf16 tiles pay
off only for experts with many tokens (BF16_MIN_TOKENS).

Numerics: w = s * (q - zero) - mn in f32 (s = d * sc, mn = dmin * m: the GGUF formula, the same values gguf's
dequantize gives up to f32 rounding), then w and the activations are rounded to bf16 (round to nearest even:
8 significant bits, relative error <= u = 2^-8 each), products are exact in f32 and summed in f32. So
|y - y_ref| <= (2u + u^2) * sum_k |w_k x_k| + f32 summation error. The int8 path's bound is set by the per-32
activation scale instead (quantize.py); measured on random experts (tests, bench/RESULTS.md) the bf16 path's
relative RMS error against float weights-as-stored was 0.4-0.5%, the int8 path's 1.0-1.7%.

B tile layout (bf16 "VNNI pairs"): for row group r, pair row p (k = 2p, 2p + 1) holds 16 dwords, dword n =
bf16(w[16 r + n, 2p + 1]) << 16 | bf16(w[16 r + n, 2p]); a row group's scratch is [K/2, 64 B] = 32 K bytes, pair
rows 16 s .. 16 s + 15 form the B tile of k step s. The dequant kernel is plain vector IR (any x86-64 CPU runs
it, so it is tested everywhere); only tile_module holds tile instructions and loads only where amx_available().
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit
from numba.core import types
from numba.extending import intrinsic

from ktx.errors import KtxError

from .repack import LAYOUTS
from .simd import V16F, V16I, _fn, _group_scales, _operand, _prefetch, _ptr, call_codegen, i8, i64, jit_host

BF16_TILE_TOKENS = 32  # tokens per tile call: two A tiles of 16 rows
MAX_NR = 2  # row groups per tile call: 2 A + NR B + 2 NR C tiles <= 8 registers
A_BYTES = 1 << 20  # an expert whose bf16 activations exceed this runs in panels (moe_loops._bf16_panel)
PANEL_K = 1024  # k per panel step: PANEL_PAIRS x 2 x 16 rows x 1024 of bf16 = 512 KB of B tiles, L2-resident
PANEL_PAIRS = 8  # row-group pairs per panel (256 rows)
BF16_MIN_TOKENS = 48  # experts with more tokens than this in a prefill take the bf16 tiles (moe.py): at 64 tokens per
# expert they measured 1.17-1.28x the vnni tiles, at 32 0.99-1.04x (bench/RESULTS.md)
# the dequant kernel prefetches its codes this far ahead (prefetcht1): cold items (weights from DRAM) dequantized
# in 27-30 us instead of 33 (2 x 16 rows x 7168 of Q4_K; 4096 and 16384 measured alike, noisy DRAM)
DQ_PF_AHEAD = 16384
_DQ_ARGS = ("k0", "K", "codes", "d", "sc", "dmin", "m", "dst")


class _BFloat(ir.Type):
    """LLVM's bfloat, which llvmlite's IR builder lacks: fptrunc to it is LLVM's own bf16 rounding (nearest
    even), vcvtneps2bf16 where the CPU has AVX512-BF16 (every AMX CPU does), integer code elsewhere."""

    def _to_string(self):
        return "bfloat"


V16BF = ir.VectorType(_BFloat(), 16)
V16S = ir.VectorType(ir.IntType(16), 16)
_INTERLEAVE = ir.Constant(ir.VectorType(ir.IntType(32), 32), [i // 2 + 16 * (i % 2) for i in range(32)])


def bf16_pairs(b, f_even, f_odd):
    """One pair row (<32 x i16>): word 2 n = bf16(f_even[n]), word 2 n + 1 = bf16(f_odd[n])."""
    lo, hi = (b.bitcast(b.fptrunc(f, V16BF), V16S) for f in (f_even, f_odd))
    return b.shuffle_vector(lo, hi, _INTERLEAVE)


def dequant_module(layout: str) -> ir.Module:
    """`void ktx_bf16_dq_L(k0, K, codes, d, sc, dmin, m, dst)`: weights k0 .. k0 + K of one row group (16 rows) of
    the repacked layout (the addresses of its fields from k = 0, repack.py; k0 and K multiples of 256) -> dst
    [K/2, 64 B], the B tiles above. Per group of G k: the scale and
    minimum vectors (simd._group_scales, one per row), bias = -(zero * s + mn); per 4 k: the 64-byte operand
    (16 rows x 4 codes, simd._operand: the tiles' own unpacking), each code byte j -> float -> fma(q, s, bias),
    then k pairs (0, 1) and (2, 3) rounded and interleaved into two pair rows."""
    lay = next(lay for lay in LAYOUTS.values() if lay.name == layout)
    mod = ir.Module(name=f"ktx_bf16_dq_{layout}")
    fn = ir.Function(mod, ir.FunctionType(ir.VoidType(), [i64] * len(_DQ_ARGS)), name=f"ktx_bf16_dq_{layout}")
    a = dict(zip(_DQ_ARGS, fn.args), ds=ir.Constant(i64, 0), ss=ir.Constant(i64, 0), dms=ir.Constant(i64, 0),
             ms=ir.Constant(i64, 0))
    b = ir.IRBuilder(fn.append_basic_block("entry"))
    c = lambda v: ir.Constant(i64, v)  # noqa: E731
    v16 = lambda v: ir.Constant(V16I, [v] * 16)  # noqa: E731
    fma = _fn(b, "llvm.fma.v16f32", V16F, [V16F, V16F, V16F])
    G = lay.G
    entry = b.block
    loop, done = b.append_basic_block("dq_g"), b.append_basic_block("dq_done")
    g0 = b.sdiv(a["k0"], c(G))
    n_groups = b.add(g0, b.sdiv(a["K"], c(G)))  # one past the last group
    b.cbranch(b.icmp_signed(">", n_groups, g0), loop, done)
    b.position_at_end(loop)
    g = b.phi(i64)
    g.add_incoming(g0, entry)
    scales, mins = _group_scales(b, a, lay, 1, g, True)
    s = scales[0]
    bias = b.fmul(s, ir.Constant(V16F, [float(-lay.zero)] * 16))
    if mins[0] is not None:
        bias = b.fsub(bias, mins[0])
    base = b.add(a["codes"], b.mul(b.mul(g, c(G)), c(2 * lay.bits)))  # the group's codes (simd._group_dots)
    for line in range(0, G * 2 * lay.bits, 64):  # this run DQ_PF_AHEAD bytes on (the codes stream from DRAM)
        _prefetch(b, _ptr(b, base, c(DQ_PF_AHEAD + line), i8), locality=2)
    out = b.add(a["dst"], b.mul(b.sub(g, g0), c(32 * G)))  # G/2 pair rows of 64 bytes
    for j in range(G // 4):
        v = b.bitcast(_operand(b, base, lay, j), V16I)
        f = []
        for byte in range(4):
            q = b.lshr(v, v16(8 * byte)) if byte else v
            if byte < 3:
                q = b.and_(q, v16(0xFF))
            f.append(b.call(fma, [b.uitofp(q, V16F), s, bias]))
        for p in range(2):
            b.store(bf16_pairs(b, f[2 * p], f[2 * p + 1]), _ptr(b, out, c(128 * j + 64 * p), ir.VectorType(ir.IntType(16), 32)), align=64)
    g1 = b.add(g, c(1))
    g.add_incoming(g1, b.block)
    b.cbranch(b.icmp_signed("<", g1, n_groups), loop, done)
    b.position_at_end(done)
    b.ret_void()
    return mod


def tile_module(nr: int) -> ir.Module:
    """`void ktx_bf16_tile_NR(K, wb, ws, xb, lda, out, ldo, acc)`: out[t, 16 r + i] (f32, row stride ldo floats)
    (+)= sum_{k < K} x[t, k] w[16 r + i, k] for BF16_TILE_TOKENS tokens (xb: bf16 rows, lda bytes apart) and NR
    row groups (wb: dequant_module's B tiles from k on, row groups ws bytes apart); acc != 0 adds to out (the C
    tiles start from it: a K range at a time, moe_loops), else overwrites it. Tiles: A tmm0-1, B tmm2-3, C tmm4-7."""
    if not 0 < nr <= MAX_NR:
        raise ValueError(f"a bf16 AMX tile holds 1..{MAX_NR} row groups, not {nr}")
    from .amx import tile_function

    halves = BF16_TILE_TOKENS // 16
    ctile = lambda h, r: 4 + 2 * h + r  # noqa: E731
    shapes = {**{h: (16, 64) for h in range(halves)}, **{2 + r: (16, 64) for r in range(nr)},
              **{ctile(h, r): (16, 64) for h in range(halves) for r in range(nr)}}
    mod, a, b, (tilezero, tileload, tilestore, dp) = tile_function(
        f"ktx_bf16_tile_{nr}", ("K", "wb", "ws", "xb", "lda", "out", "ldo", "acc"), shapes, "tdpbf16ps")
    c = lambda v: ir.Constant(i64, v)  # noqa: E731
    t8 = lambda v: ir.Constant(i8, v)  # noqa: E731
    void = ir.VoidType()
    ldo = b.mul(a["ldo"], c(4))
    c_ptr = lambda h, r: _ptr(b, a["out"], b.mul(b.add(b.mul(c(16 * h), a["ldo"]), c(16 * r)), c(4)), i8)  # noqa: E731
    load_c, zero_c, start = (b.append_basic_block(n) for n in ("bf16_load_c", "bf16_zero_c", "bf16_start"))
    b.cbranch(b.icmp_signed("!=", a["acc"], c(0)), load_c, zero_c)
    b.position_at_end(load_c)
    for h in range(halves):
        for r in range(nr):
            b.call(tileload, [t8(ctile(h, r)), c_ptr(h, r), ldo])
    b.branch(start)
    b.position_at_end(zero_c)
    for h in range(halves):
        for r in range(nr):
            b.call(tilezero, [t8(ctile(h, r))])
    b.branch(start)
    b.position_at_end(start)
    loop, done = b.append_basic_block("bf16_k"), b.append_basic_block("bf16_done")
    n_steps = b.sdiv(a["K"], c(32))
    b.cbranch(b.icmp_signed(">", n_steps, c(0)), loop, done)
    b.position_at_end(loop)
    s = b.phi(i64)
    s.add_incoming(c(0), start)
    for h in range(halves):
        b.call(tileload, [t8(h), _ptr(b, a["xb"], b.add(b.mul(c(16 * h), a["lda"]), b.mul(s, c(64))), i8), a["lda"]])
    for r in range(nr):
        b.call(tileload, [t8(2 + r), _ptr(b, a["wb"], b.add(b.mul(c(r), a["ws"]), b.mul(s, c(1024))), i8), c(64)])
    for h in range(halves):
        for r in range(nr):
            b.call(dp, [t8(ctile(h, r)), t8(h), t8(2 + r)])
    s1 = b.add(s, c(1))
    s.add_incoming(s1, b.block)
    b.cbranch(b.icmp_signed("<", s1, n_steps), loop, done)
    b.position_at_end(done)
    for h in range(halves):
        for r in range(nr):
            b.call(tilestore, [t8(ctile(h, r)), c_ptr(h, r), ldo])
    b.call(_fn(b, "llvm.x86.tilerelease", void, []), [])
    b.ret_void()
    return mod


_JIT = {}  # key -> (engine that owns the machine code, address)


def dequant_address(layout: str) -> int:
    """Address of dequant_module(layout), compiled for this CPU (vector IR only: safe on any x86-64)."""
    key = ("dq", layout)
    if key not in _JIT:
        engine = jit_host(dequant_module(layout))
        _JIT[key] = (engine, engine.get_function_address(f"ktx_bf16_dq_{layout}"))
    return _JIT[key][1]


def tile_assembly(nr: int) -> str:
    """Sapphire Rapids assembly of tile_module(nr): the compile-only check, safe on any CPU."""
    import llvmlite.binding as llvm

    from .amx import _target_machine

    mod = llvm.parse_assembly(str(tile_module(nr)))
    mod.verify()
    return _target_machine().emit_assembly(mod)


def tile_address(nr: int) -> int:
    """Address of tile_module(nr), JIT-compiled once per process; KtxError where AMX cannot run."""
    from .amx import _target_machine, amx_available

    key = ("tile", nr)
    if key not in _JIT:
        ok, why = amx_available()
        if not ok:
            raise KtxError(f"AMX kernels cannot run on this machine: {why}; use the vnni/avx2 path (path='auto')")
        import llvmlite.binding as llvm

        mod = llvm.parse_assembly(str(tile_module(nr)))
        mod.verify()
        engine = llvm.create_mcjit_compiler(mod, _target_machine())
        engine.finalize_object()
        _JIT[key] = (engine, engine.get_function_address(f"ktx_bf16_tile_{nr}"))
    return _JIT[key][1]


@intrinsic
def call_dequant(typingctx, fn, k0, K, codes, d, sc, dmin, m, dst):
    """The dequant kernel at address fn (dequant_address) on one row group's field addresses."""
    return types.void(fn, k0, K, codes, d, sc, dmin, m, dst), call_codegen


@intrinsic
def call_bf16_tile(typingctx, fn, K, wb, ws, xb, lda, out, ldo, acc):
    """The bf16 tile at address fn (tile_address)."""
    return types.void(fn, K, wb, ws, xb, lda, out, ldo, acc), call_codegen


@njit(nogil=True, cache=True, inline="always")
def dequant_row_groups(fn, md, e, rg, nr, k0, K, dst):
    """Weights k0 .. k0 + K of row groups rg .. rg + nr - 1 of matrix e (md: moe_loops' descriptor) -> dst, 32 K
    bytes apart."""
    for r in range(nr):
        call_dequant(fn, k0, K, md[0] + e * md[1] + (rg + r) * md[2], md[3] + e * md[4] + (rg + r) * md[5],
                     md[6] + e * md[7] + (rg + r) * md[8], md[9] + e * md[10] + (rg + r) * md[11],
                     md[12] + e * md[13] + (rg + r) * md[14], dst.ctypes.data + r * 32 * K)


@njit(nogil=True, cache=True)
def to_bf16(src, dst):
    """dst (uint16 [K]) = src (float32 [K]) rounded to bf16, nearest even (finite values: checked upstream)."""
    u = src.view(np.uint32)
    for k in range(src.shape[0]):
        v = u[k]
        dst[k] = np.uint16((v + np.uint32(0x7FFF) + ((v >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16))

