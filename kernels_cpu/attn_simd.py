"""float32 attention micro-kernels for the decode program (decode_loops._attend), emitted as LLVM IR.

Decode attention is two small products per layer, for each block of four query heads that read the same
cache head:
    scores  s[i]   = q_i . row                  (four dots against one cache row: the row is loaded once)
    values  o_i   += sum_t p_i[t] * row_t        (a block of up to 8 cache rows, accumulated in registers)
Written as Numba loops these ran at 24-52 GFLOP/s on one core: the value update stored every partial sum back
to memory and, with four outputs that might alias the row, was not vectorized. Here the vectors are explicit
(<16 x float>, llvm.fma): `scores4` keeps four accumulator chains per 16 columns; `pv4` keeps four 16-wide
accumulators per column chunk in registers across the row block and stores them once.

    scores4(q, q_stride, row, n, out)             q_i = q + i * q_stride (bytes); n a multiple of 16; out[0..3]
    pv4(o, o_stride, p, p_stride, rows, row_stride, n_rows, n)
                                                   o_i += sum_{t < n_rows} p[i * p_stride + t] * rows[t * row_stride]

All arguments are i64 (addresses, strides in bytes, counts). Compiled with llvmlite for the host CPU, once per
process (`kernel_addresses`), and called by address from Numba (decode_loops.call4 / call8). Vector width 16
lowers to whatever the CPU has (two ymm on AVX2, SSE elsewhere): the code is plain LLVM vector IR.
"""
from __future__ import annotations

from llvmlite import ir

from .simd import V16F, _c64, _ptr, f32, i64, jit_host

_FMA = "llvm.fma.v16f32"


def _fma(b, a, x, y):
    return b.call(_declare(b, _FMA, V16F, [V16F, V16F, V16F]), [a, x, y])


def _declare(b, name, ret, args):
    try:
        return b.module.get_global(name)
    except KeyError:
        return ir.Function(b.module, ir.FunctionType(ret, args), name=name)


def _splat(b, v):
    u = b.insert_element(ir.Constant(V16F, ir.Undefined), v, ir.Constant(ir.IntType(32), 0))
    return b.shuffle_vector(u, ir.Constant(V16F, ir.Undefined), ir.Constant(ir.VectorType(ir.IntType(32), 16), [0] * 16))


def _loop(b, n, body, init):
    """for i in range(n) (n > 0 assumed by callers) with loop-carried values `init` -> final values; body(i, vals) -> vals."""
    entry = b.block
    head, done = b.append_basic_block("loop"), b.append_basic_block("done")
    b.branch(head)
    b.position_at_end(head)
    i = b.phi(i64)
    i.add_incoming(_c64(0), entry)
    phis = []
    for v in init:
        p = b.phi(v.type)
        p.add_incoming(v, entry)
        phis.append(p)
    out = body(i, phis)
    i1 = b.add(i, _c64(1))
    tail = b.block
    i.add_incoming(i1, tail)
    for p, v in zip(phis, out):
        p.add_incoming(v, tail)
    b.cbranch(b.icmp_signed("<", i1, n), head, done)
    b.position_at_end(done)
    return out


def _scores4(mod):
    fn = ir.Function(mod, ir.FunctionType(ir.VoidType(), [i64] * 5), name="ktx_scores4")
    q, qs, row, n, out = fn.args
    b = ir.IRBuilder(fn.append_basic_block("entry"))
    zero = ir.Constant(V16F, [0.0] * 16)

    def body(c, accs):
        off = b.mul(c, _c64(64))
        r = b.load(_ptr(b, row, off, V16F), align=4)
        return [_fma(b, b.load(_ptr(b, b.add(q, b.mul(qs, _c64(i))), off, V16F), align=4), r, accs[i]) for i in range(4)]

    accs = _loop(b, b.sdiv(n, _c64(16)), body, [zero] * 4)
    add = _declare(b, "llvm.vector.reduce.fadd.v16f32", f32, [f32, V16F])
    for i in range(4):
        s = b.call(add, [ir.Constant(f32, 0.0), accs[i]], fastmath=("reassoc",))  # a tree sum
        b.store(s, _ptr(b, out, _c64(4 * i), f32), align=4)
    b.ret_void()


def _pv4(mod):
    fn = ir.Function(mod, ir.FunctionType(ir.VoidType(), [i64] * 8), name="ktx_pv4")
    o, os_, p, ps, rows, rs, n_rows, n = fn.args
    b = ir.IRBuilder(fn.append_basic_block("entry"))

    def chunk(c, _):
        off = b.mul(c, _c64(64))
        outs = [_ptr(b, b.add(o, b.mul(os_, _c64(i))), off, V16F) for i in range(4)]
        init = [b.load(ptr, align=4) for ptr in outs]

        def step(t, accs):
            r = b.load(_ptr(b, b.add(rows, b.mul(t, rs)), off, V16F), align=4)
            res = []
            for i in range(4):
                w = b.load(_ptr(b, p, b.add(b.mul(ps, _c64(i)), b.mul(t, _c64(4))), f32), align=4)
                res.append(_fma(b, _splat(b, w), r, accs[i]))
            return res

        accs = _loop(b, n_rows, step, init)
        for ptr, v in zip(outs, accs):
            b.store(v, ptr, align=4)
        return []

    _loop(b, b.sdiv(n, _c64(16)), chunk, [])
    b.ret_void()


_ENGINE = []


def kernel_addresses() -> tuple[int, int]:
    """(scores4, pv4) native addresses, compiled on first use and kept for the process."""
    if not _ENGINE:
        mod = ir.Module(name="ktx_attn")
        _scores4(mod)
        _pv4(mod)
        engine = jit_host(mod)
        _ENGINE.append((engine, engine.get_function_address("ktx_scores4"), engine.get_function_address("ktx_pv4")))
    return _ENGINE[0][1], _ENGINE[0][2]
