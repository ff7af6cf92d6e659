"""The machine's DRAM read bandwidth, the roofline that decode speed is reported against.

A read loop's rate from DRAM depends on how many lines it keeps in flight, not only on the memory: on Zen 5
(2 threads) a plain vectorised sum measured 48-51 GB/s while the decode tiles, which prefetch their run
ahead with prefetchnta, streamed 55-72 GB/s. A roofline below what a kernel reaches says nothing, so the
limit is the best of several read loops: 64-byte vector loads into four accumulators, without software
prefetch and with prefetchnta 1, 4, 8 and 16 KiB ahead (the tiles' own distance is simd.PF_AHEAD). Each worker
reads its own contiguous part of one buffer; best of `reps` per loop.
"""
from __future__ import annotations

import time

import numpy as np
from llvmlite import ir
from numba import njit
from numba.core import cgutils, types
from numba.extending import intrinsic

AHEADS = (0, 1024, 4096, 8192, 16384)  # prefetch distances tried, in bytes (0: none)
_i8, _i32, _i64 = ir.IntType(8), ir.IntType(32), ir.IntType(64)
_V = ir.VectorType(_i64, 8)  # one 64-byte line


@intrinsic
def _read_lines(typingctx, start, n_lines, ahead):
    """Sum (as 8 x i64 lanes, folded to one i64) of n_lines 64-byte lines from address start, prefetching each
    line `ahead` bytes on (prefetchnta) when ahead > 0; four accumulators, so the adds never bound the loop."""
    sig = types.int64(types.int64, types.int64, types.int64)

    def codegen(context, b, signature, args):
        base, n, ah = (context.cast(b, v, t, types.int64) for v, t in zip(args, signature.args))
        pf = cgutils.get_or_insert_function(b.module, ir.FunctionType(ir.VoidType(), [_i8.as_pointer(), _i32, _i32, _i32]),
                                            "llvm.prefetch.p0")
        zero = ir.Constant(_V, [0] * 8)
        n4 = b.sdiv(n, ir.Constant(_i64, 4))
        entry = b.block
        loop, done = b.append_basic_block("rd"), b.append_basic_block("rd_done")
        b.cbranch(b.icmp_signed(">", n4, ir.Constant(_i64, 0)), loop, done)
        b.position_at_end(loop)
        i = b.phi(_i64)
        i.add_incoming(ir.Constant(_i64, 0), entry)
        accs = [b.phi(_V) for _ in range(4)]
        nxt = []
        with_pf = b.icmp_signed(">", ah, ir.Constant(_i64, 0))
        for j, acc in enumerate(accs):
            acc.add_incoming(zero, entry)
            addr = b.add(base, b.mul(b.add(b.mul(i, ir.Constant(_i64, 4)), ir.Constant(_i64, j)), ir.Constant(_i64, 64)))
            v = b.load(b.inttoptr(addr, _V.as_pointer()), align=64)
            pf_addr = b.select(with_pf, b.add(addr, ah), addr)  # prefetching the line being loaded is a no-op
            b.call(pf, [b.inttoptr(pf_addr, _i8.as_pointer()), ir.Constant(_i32, 0), ir.Constant(_i32, 0),
                        ir.Constant(_i32, 1)])
            nxt.append(b.add(acc, v))
        fold = b.add(b.add(nxt[0], nxt[1]), b.add(nxt[2], nxt[3]))
        i1 = b.add(i, ir.Constant(_i64, 1))
        i.add_incoming(i1, b.block)
        for acc, v in zip(accs, nxt):
            acc.add_incoming(v, b.block)
        b.cbranch(b.icmp_signed("<", i1, n4), loop, done)
        b.position_at_end(done)
        tot = b.phi(_V)
        tot.add_incoming(zero, entry)
        tot.add_incoming(fold, loop)
        s = b.extract_element(tot, ir.Constant(_i32, 0))
        for k in range(1, 8):
            s = b.add(s, b.extract_element(tot, ir.Constant(_i32, k)))
        return s

    return sig, codegen


@njit(nogil=True, cache=True)
def read_lines(start, n_lines, ahead):
    return _read_lines(start, n_lines, ahead)


def dram_read_gbps(pool, n_bytes: int = 1 << 30, reps: int = 3, aheads=AHEADS) -> tuple[float, int]:
    """(best GB/s, its prefetch distance) of `pool`'s workers each reading a contiguous 1/n of an n_bytes buffer,
    over aheads x reps passes (after ReadProbe's settling pass)."""
    probe = ReadProbe(pool, n_bytes)
    return max((probe.pass_gbps(ahead), ahead) for ahead in aheads for _ in range(reps))


class ReadProbe:
    """The read bandwidth on offer right now, for pairing with a measurement: `gbps()` runs read passes over one
    buffer, allocated, written and read once here, for `seconds` and returns their median GB/s. A one-shot read
    of a freshly written buffer is no such probe: it measured 43-85 GB/s while passes over a warm one held 85-88
    (Zen 5, 2 threads, 256 MiB; the fresh buffer's dirty lines are written back during the read)."""

    def __init__(self, pool, n_bytes: int = 256 << 20, ahead: int = 8192):
        self.pool, self.ahead = pool, ahead
        self._buf = np.ones(n_bytes // 8 + 8, np.uint64)
        self._base = (self._buf.ctypes.data + 63) // 64 * 64
        self._per = n_bytes // 64 // pool.n_threads  # lines per worker
        self._sums = np.zeros(pool.n_threads, np.int64)
        self.pass_gbps()  # compile (or load from cache), and one pass to settle the pages and dirty lines

    def pass_gbps(self, ahead: int | None = None) -> float:
        """GB/s of one pass of every worker over its part, prefetching `ahead` bytes on (default: the probe's)."""
        base, per, sums = self._base, self._per, self._sums
        ahead = self.ahead if ahead is None else ahead

        def read(wid, n):
            sums[wid] = read_lines(base + wid * per * 64, per, ahead)

        t = time.perf_counter()
        self.pool.run(read)
        dt = time.perf_counter() - t
        self.last_sum = int(sums.sum())  # of the pass's words (all ones): the tests check every line was read
        return per * 64 * self.pool.n_threads / dt / 1e9

    def gbps(self, seconds: float = 0.3) -> float:
        """Median GB/s of passes for `seconds` (at least one)."""
        rates, t0 = [self.pass_gbps()], time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            rates.append(self.pass_gbps())
        return float(np.median(rates))
