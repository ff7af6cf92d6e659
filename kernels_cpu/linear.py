"""One dense quantized linear on the CPU: y = x @ W^T with int8 activations and the GGUF's own codes.

The non-expert weights of a model (attention projections, dense and shared-expert MLPs, the lm_head) reuse
the routed-expert machinery: W is repacked once into the VNNI layout of repack.py (16-row groups, the whole
K run of a group contiguous), and the tile kernels of simd.py do the int8 dots. A batched weight
[B, R, K] (MLA's per-head attn_k_b / attn_v_b) is B independent matrices, stored like B experts:

    codes [B, Rp/16, K*bits/32, 64] u8   d [B, Rp/16, K/S, 16] f16   sc/dmin/m as repack.py  (Rp = R rounded up to 64)

Rows past R are padding: zero codes and zero scales (dequantize to 0), so any R works; the loop writes their
results into a scratch tile, never into y.

One call: the caller's thread and n - 1 pool workers run `linear_loop`:

    phase 1  claim chunks of QCHUNK activation rows from counter[1]; quantize them (quantize.py: int8 per 32);
             counter[2] counts finished chunks, and all workers wait until it reaches the chunk count
             (a latch, not a barrier: a worker that wakes late finds the work done and does not hold anyone)
    phase 2  claim items (batch b, IB consecutive blocks of NR*16 rows) with moe_loops.claim: each thread takes
             the items of its own contiguous segment in order (counters from counter[4]), then steals from the
             others'; each block runs the NT x NR*16 tile over all token tiles, so its weights stay in L2 while
             the activations stream past. Prefill items are one block; decode items hold >= ITEM_BYTES of
             weights. So a thread streams one contiguous run and the decode tile's prefetch of the next block
             (simd.py) is for its own next tile: MLA's attn_k_b [16, 512, 128] Q8_0 went from ~10.5 to ~18.5
             GB/s with bigger items (2 threads); with one shared counter, as before the segments, the threads
             still took items in turn: a Q4_K [129280, 2048] GEMV ran at 0.80 of the read next to it.

Prefill of 5/6-bit codes with T >= WIDE_MIN_TOKENS widens each block's row groups to bytes first (moe.py), and
K-quant prefill quantizes activations per 256 for the per-256 tiles (moe.per256_ok, quantize.quantize_row256).
Activation rows are laid out [B, Tp, K] with Tp = T rounded up to the token tile NT; tiles that would write
past T or R go through a scratch tile. Decode (T == 1) uses the 1 x 64 tile that streams every weight byte
once; prefill the 4 x 32 register tile.

Where the CPU has AMX, path "auto" runs prefill with T > BF16_MIN_TOKENS on the bf16 AMX tiles instead
(linear_bf16_loop, amx_bf16.py): x in bf16, each panel of up to 8 row-group pairs dequantized to bf16 per 1024 k,
tdpbf16ps over all token tiles. DeepSeek-V3-shaped weights, T = 512, 2 threads of the Xeon measured
(bench_cpu_linear --paths vnni,auto): 1.60-1.93x the vnni tiles. An explicit vnni/avx2/portable path never does.

Threads: decode calls this ~75 times per token, and waking the pool costs ~50 us here, as much as a whole
2 MB GEMV. So the caller's thread is always one of the workers (it starts at once); the last pool worker
sits out, so n threads run on n cores; calls up to INLINE_MACS do not wake the pool at all. A call returns
when counter[3] says every item is finished, not when every worker has returned: a worker that wakes late
finds nothing left to claim, and since each call has a fresh counter it cannot take the next call's items.
"""
from __future__ import annotations

import copy
import functools
import math
import threading

import numpy as np
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as QT
from gguf.quants import dequantize
from numba import literally, njit
from numba.core import types

from ktx.errors import KtxError

from .amx import tile_source
from .amx_bf16 import BF16_MIN_TOKENS, BF16_TILE_TOKENS, PANEL_K, PANEL_PAIRS, dequant_address, to_bf16
from .amx_bf16 import tile_address as bf16_tile_address
from .moe import DECODE_TILE, PREFILL_TILE, WIDE_MIN_TOKENS, _check_path, per256_ok, per256_tiles  # (tokens, row groups of 16) per tile
from .moe_loops import _bf16_panel, _mat_tile, _widened, aligned_bytes, atomic_read, claim, fetch_add, pf_slice, sched_yield
from .pool import WorkerPool
from .quantize import quantize_row, quantize_row256
from .repack import FLOAT_TYPES, LAYOUTS, R_GROUP, aligned_empty, decode_blocks, descriptor, field_shapes, interleave
from .simd import variant

ROW_PAD = 16 * math.lcm(DECODE_TILE[1], PREFILL_TILE[1])  # rows padded so both tiles' row blocks fit
QCHUNK = 8  # activation rows per quantization claim
REPACK_ROWS = 4096  # rows repacked at a time: bounded temporaries even for the lm_head
KEEP_SCRATCH = 1 << 16  # activation elements whose scratch an instance keeps between calls
AMX_MAX_OUT_BYTES = 64 << 20  # the bf16 AMX prefill pads y to [B, Tp, Rp] when T or R is ragged: at most this
ITEM_BYTES = 32768  # decode: weight bytes per work item at least (short K: several row blocks)
ITEMS_PER_THREAD = 8  # ... but at least this many items per thread
INLINE_MACS = 1 << 22  # up to this many multiply-adds the caller's thread alone beats waking the pool
_LABEL = {"vnni": "avx512-vnni vpdpbusd", "avx2": "avx2 vpmaddubsw", "portable": "portable llvm-vector"}


@njit(nogil=True, cache=True)
def linear_loop(V, md, B, T, Tp, R, K, IB, x, xq, xd, xs, xsf, y, counter, tid, n_threads):
    """x [B*T, K] f32 -> y [B*T, R] f32 via activation buffers [B*Tp, ...]; counter int64 [4 + n_threads], fresh
    zeros: [1] chunks claimed, [2] chunks quantized, [3] items finished (wait_items), [4:] claim's segments ([0] is
    linear_bf16_loop's panel counter, unused here); an item is IB consecutive row blocks of one matrix; thread tid
    of n_threads claims items from its own contiguous segment first (moe_loops.claim)."""
    literally(V)
    NT = V // 10 % 10
    NR = V % 10
    n_rows = B * T
    n_chunks = (n_rows + QCHUNK - 1) // QCHUNK
    while True:
        c = fetch_add(counter, 1, 1)
        if c >= n_chunks:
            break
        for i in range(c * QCHUNK, min(n_rows, (c + 1) * QCHUNK)):
            j = i // T * Tp + i % T
            if V // 100000 % 10:  # per-256 tile variant (K-quant prefill, moe.per256_ok)
                quantize_row256(x[i], xq[j], xd[j], xs[j], xsf[j])
            else:
                quantize_row(x[i], xq[j], xd[j], xs[j], xsf[j])
        fetch_add(counter, 2, 1)
    while atomic_read(counter, 2) < n_chunks:  # wait until every chunk is quantized
        sched_yield()

    rb_rows = NR * 16
    n_rb = (R + rb_rows - 1) // rb_rows
    n_ib = (n_rb + IB - 1) // IB
    tmp = np.empty((NT, rb_rows), np.float32)
    wbuf = aligned_bytes(rb_rows * (K if V // 10000 % 10 else 0))  # wide variants (moe.py): widened row groups
    mdw = np.empty(15, np.int64)
    while True:
        item = claim(counter, 4, tid, n_threads, B * n_ib)
        if item < 0:
            break
        b = item // n_ib
        for rb in range(item % n_ib * IB, min(n_rb, (item % n_ib + 1) * IB)):
            r0 = rb * rb_rows
            m = _widened(V, md, b, r0 // 16, K, wbuf, mdw)
            nb = b if rb + 1 < n_rb else -1  # prefetched while these tiles run: the next row block's weights
            for t0 in range(0, T, NT):
                pf = pf_slice(V, md, nb, r0 // 16 + NR, K, t0 // NT, xq.ctypes.data, T)
                if r0 + rb_rows <= R and t0 + NT <= T:
                    _mat_tile(V, m, b, r0 // 16, K, xq, xd, xs, xsf, b * Tp + t0, y, (b * T + t0) * R + r0, R, pf)
                else:
                    _mat_tile(V, m, b, r0 // 16, K, xq, xd, xs, xsf, b * Tp + t0, tmp, 0, rb_rows, pf)
                    for t in range(min(NT, T - t0)):
                        for r in range(min(rb_rows, R - r0)):
                            y[b * T + t0 + t, r0 + r] = tmp[t, r]
        fetch_add(counter, 3, 1)


@njit(nogil=True, cache=True)
def linear_bf16_loop(fn_dq, fn_t, md, B, T, Tp, Rp, K, pp, x, xb, yo, counter):
    """The bf16 AMX prefill (amx_bf16.py): x [B*T, K] f32 -> yo [B, Tp, Rp] f32 (Tp = T rounded up to
    BF16_TILE_TOKENS, Rp the repacked rows) via bf16 rows xb [B*Tp, K]; counter int64 [4], fresh zeros.
    Phase 1 as linear_loop's (bf16 copies instead of int8, padding rows zeroed); phase 2 items are panels of
    pp row-group pairs of one matrix, each run by moe_loops._bf16_panel (per PANEL_K of k the pairs' rows
    dequantized to bf16 B tiles, every 32-token tile against each pair, the C tiles carried over through yo)."""
    n_rows = B * Tp
    n_chunks = (n_rows + QCHUNK - 1) // QCHUNK
    while True:
        c = fetch_add(counter, 1, 1)
        if c >= n_chunks:
            break
        for i in range(c * QCHUNK, min(n_rows, (c + 1) * QCHUNK)):
            if i % Tp < T:
                to_bf16(x[i // Tp * T + i % Tp], xb[i])
            else:
                xb[i] = 0
        fetch_add(counter, 2, 1)
    while atomic_read(counter, 2) < n_chunks:
        sched_yield()

    n_pairs = Rp // 32
    n_ib = (n_pairs + pp - 1) // pp
    wp = aligned_bytes(pp * 64 * PANEL_K)
    while True:
        item = fetch_add(counter, 0, 1)
        if item >= B * n_ib:
            break
        b = item // n_ib
        p0 = item % n_ib * pp
        # matrix b as expert b, its Tp rows of xb as the expert's slots, yo [B * Tp, Rp] as the output rows
        _bf16_panel(fn_dq, fn_t, md, b, 2 * p0, min(pp, n_pairs - p0), K, wp, xb, b * Tp, Tp, yo, 0, Rp)
        fetch_add(counter, 3, 1)


@njit(nogil=True, cache=True)
def wait_items(counter, n_items):
    """Wait until n_items items are finished (counter[3]); workers still asleep then find nothing to claim."""
    while atomic_read(counter, 3) < n_items:
        sched_yield()


@functools.lru_cache(maxsize=1)
def _amx_source() -> tuple[str | None, str]:
    """("bf16", label) where the dense prefill takes the bf16 AMX tiles (the CPU runs AMX), else (None, why)."""
    return tile_source("auto", "bf16")


@functools.lru_cache(maxsize=None)
def _entry(V: int):
    """Compiled entry point for one variant literal: the dispatcher would otherwise retry its failing
    non-literal typing on every call (tens of ms), and one compile serves every QuantLinear."""
    i64 = types.int64
    f32, i8, i32 = (types.Array(t, 2, "C") for t in (types.float32, types.int8, types.int32))
    a64 = types.Array(i64, 1, "C")
    sig = (types.literal(V), a64, i64, i64, i64, i64, i64, i64, f32, i8, f32, i32, f32, f32, a64, i64, i64)
    return linear_loop.compile(sig)


class QuantLinear:
    """y = x @ W^T for one GGUF weight W, int8 activations x quantized weights, on the worker pool."""

    ROW_ALIGN = ROW_PAD  # row_range starts on a multiple of this

    def __init__(self, raw: np.ndarray, qtype: int, rows: int, cols: int, pool: WorkerPool, path: str = "auto",
                 name: str = ""):
        self.name, self.rows, self.cols, self.pool = name or "linear weight", rows, cols, pool
        try:
            self.qtype = QT(qtype)
        except ValueError:
            raise KtxError(f"{self.name}: unknown GGML type id {qtype}") from None
        self.path = _check_path(path)
        self.auto = path == "auto"  # auto also takes the bf16 AMX tiles for prefill where the CPU has AMX
        what = f"{self.name}: {self.qtype.name} [{rows}, {cols}]"
        if not self.supports(self.qtype, rows, cols):
            if self.qtype not in FLOAT_TYPES and self.qtype not in GGML_QUANT_SIZES:
                raise KtxError(f"{what}: type not readable by gguf-py; requantize the GGUF")
            if path != "auto" and path != "reference":
                raise KtxError(f"{what}: the int8 CPU kernels take {'/'.join(l.name for l in LAYOUTS.values())} with "
                               f"cols a multiple of the block; use path='reference' (dequantize + float matmul)")
            self.path = "reference"
        bs, ts = GGML_QUANT_SIZES[self.qtype]  # weights, bytes per block
        if cols % bs:
            raise KtxError(f"{what}: cols is not a multiple of the type's block of {bs}")
        shape = (rows, cols // bs * ts)
        if raw.dtype != np.uint8 or raw.ndim not in (2, 3) or raw.shape[-2:] != shape:
            raise KtxError(f"{what}: raw bytes should be uint8 {list(shape)} or [B, *{list(shape)}], "
                           f"got {raw.dtype} {list(raw.shape)}")
        self.raw = raw
        self.batched = raw.ndim == 3
        self.B = raw.shape[0] if self.batched else 1
        self._lock = threading.Lock()  # guards the per-instance activation scratch
        self.arrays: dict[str, np.ndarray] = {}
        if self.path != "reference":
            self._repack()
        self.nbytes = sum(a.nbytes for a in self.arrays.values())

    @staticmethod
    def supports(qtype: int, rows: int, cols: int) -> bool:
        try:
            lay = LAYOUTS.get(QT(qtype))
        except ValueError:
            return False
        return lay is not None and rows > 0 and cols > 0 and cols % GGML_QUANT_SIZES[QT(qtype)][0] == 0

    @property
    def kernel_path(self) -> str:
        if self.path == "reference":
            return f"reference gguf-py dequantize + numpy float32 matmul ({self.qtype.name})"
        return (f"{_LABEL[self.path]} gemv {DECODE_TILE[0]}x{16 * DECODE_TILE[1]} / gemm "
                f"{PREFILL_TILE[0]}x{16 * PREFILL_TILE[1]} ({self.qtype.name}, repacked, int8 acts per 32"
                f"{', per 256 for K-quant prefill' if per256_tiles() else ''})")

    def _repack(self):
        lay, K = LAYOUTS[self.qtype], self.cols
        Rp = -(-self.rows // ROW_PAD) * ROW_PAD
        self.arrays = {k: aligned_empty(s, dt, zero=True) for k, (s, dt) in field_shapes(lay, self.B, Rp, K).items()}
        raw = self.raw if self.batched else self.raw[None]
        for b in range(self.B):
            for r0 in range(0, self.rows, REPACK_ROWS):
                chunk = np.asarray(raw[b, r0:r0 + REPACK_ROWS])  # [n, row_bytes]
                n = -(-chunk.shape[0] // R_GROUP) * R_GROUP  # zero rows up to a whole group: zero codes, zero d
                if n != chunk.shape[0]:
                    chunk = np.concatenate([chunk, np.zeros((n - chunk.shape[0], chunk.shape[1]), np.uint8)])
                for f, a in interleave(decode_blocks(chunk, self.qtype, K), lay).items():
                    self.arrays[f][b, r0 // R_GROUP:(r0 + n) // R_GROUP] = a
        self.md = descriptor(self.arrays)
        self._bufs = (0, None)  # (rows, (xq, xd, xs, xsf)): grown on demand, reused across calls

    def row_range(self, r0: int, r1: int) -> QuantLinear:
        """The rows r0:r1 of W as a QuantLinear of their own that shares this one's repacked arrays (no copy):
        y = x @ W[r0:r1]^T. r0 must start a padded row block (a multiple of ROW_PAD); rows past r1 inside the last
        block are read and their results dropped, as for the padding of a whole matrix."""
        if self.path == "reference" or self.batched or not (0 <= r0 < r1 <= self.rows) or r0 % ROW_PAD:
            raise KtxError(f"{self.name}: row_range({r0}, {r1}) needs an unbatched repacked weight, 0 <= r0 < r1 <= "
                           f"{self.rows} and r0 a multiple of {ROW_PAD}")
        view = copy.copy(self)
        g0, g1 = r0 // R_GROUP, -(-r1 // ROW_PAD) * ROW_PAD // R_GROUP
        view.name, view.rows, view.raw = f"{self.name}[{r0}:{r1}]", r1 - r0, self.raw[r0:r1]
        view.arrays = {f: a[:, g0:g1] for f, a in self.arrays.items()}
        view.md, view.nbytes = descriptor(view.arrays), 0  # the bytes are the parent's
        view._lock, view._bufs = threading.Lock(), (0, None)
        return view

    def __call__(self, x: np.ndarray) -> np.ndarray:
        want = f"[B={self.B}, T, {self.cols}]" if self.batched else f"[T, {self.cols}]"
        if not isinstance(x, np.ndarray) or x.dtype != np.float32 or x.ndim != 2 + self.batched \
                or x.shape[-1] != self.cols or (self.batched and x.shape[0] != self.B):
            got = f"{x.dtype} {list(x.shape)}" if isinstance(x, np.ndarray) else type(x).__name__
            raise KtxError(f"{self.name}: input should be float32 {want}, got {got}")
        T = x.shape[-2]
        if self.path == "reference":
            return self._reference(x)
        if T > BF16_MIN_TOKENS and self.auto and _amx_source()[0] == "bf16":
            out = self._amx_bf16(x, T)
            if out is not None:
                return out
        y = np.empty(x.shape[:-1] + (self.rows,), np.float32)  # [B?, T, R]
        if T == 0:
            return y
        nt, nr = DECODE_TILE if T == 1 else PREFILL_TILE
        lay = LAYOUTS[self.qtype]
        wide = T >= WIDE_MIN_TOKENS and lay.bits in (5, 6)
        V = variant(lay.name, self.path, nt, nr, wide, nt > 1 and per256_ok(lay, wide, self.cols))
        Tp = -(-T // nt) * nt
        K = self.cols
        x2 = np.ascontiguousarray(x).reshape(self.B * T, K)
        run = _entry(V)
        n_rb = -(-self.rows // (16 * nr))
        IB = self._item_blocks(T, K, n_rb, nr)
        with self._lock:
            xq, xd, xs, xsf = self._scratch(self.B * Tp)
            n = self.pool.n_threads
            c = np.zeros(4 + n, np.int64)
            y2 = y.reshape(self.B * T, self.rows)
            args = (V, self.md, self.B, T, Tp, self.rows, K, IB, x2, xq, xd, xs, xsf, y2, c)
            if self.B * T * self.rows * K <= INLINE_MACS or n == 1:
                run(*args, 0, 1)
                return y
            # the caller is one of the n workers (the last): it starts at once, and the last pool worker stays out
            self.pool.submit(lambda wid, n_: run(*args, wid, n), workers=n - 1)
            run(*args, n - 1, n)
            wait_items(c, self.B * -(-n_rb // IB))
        return y

    def _amx_bf16(self, x: np.ndarray, T: int) -> np.ndarray | None:
        """Prefill on the bf16 AMX tiles (linear_bf16_loop); None where y would need a padded copy over
        AMX_MAX_OUT_BYTES (then the vector tiles run)."""
        K, B, R = self.cols, self.B, self.rows
        Tp = -(-T // BF16_TILE_TOKENS) * BF16_TILE_TOKENS
        Rp = self.arrays["codes"].shape[1] * 16
        direct = Tp == T and Rp == R  # the tiles can write y itself
        if not direct and B * Tp * Rp * 4 > AMX_MAX_OUT_BYTES:
            return None
        yo = np.empty((B, Tp, Rp), np.float32)
        n_pairs = Rp // 32
        n = self.pool.n_threads
        pp = max(1, min(PANEL_PAIRS, B * n_pairs // (2 * n)))  # at least 2 items per thread where possible
        x2 = np.ascontiguousarray(x).reshape(B * T, K)
        xb = aligned_empty((B * Tp, K), np.uint16)
        fn_dq, fn_t = dequant_address(LAYOUTS[self.qtype].name), bf16_tile_address(PREFILL_TILE[1])
        c = np.zeros(4, np.int64)
        args = (fn_dq, fn_t, self.md, B, T, Tp, Rp, K, pp, x2, xb, yo, c)
        n_items = B * -(-n_pairs // pp)
        if n == 1:
            linear_bf16_loop(*args)
        else:
            self.pool.submit(lambda wid, n_: linear_bf16_loop(*args), workers=n - 1)
            linear_bf16_loop(*args)
            wait_items(c, n_items)
        y = yo if direct else np.ascontiguousarray(yo[:, :T, :R])
        return y if self.batched else y[0]

    def _item_blocks(self, T: int, K: int, n_rb: int, nr: int) -> int:
        """Row blocks per work item: decode items of at least ITEM_BYTES of weights (a row block of a short-K
        matrix is a few KB: too short a stream for the hardware prefetcher, and one atomic claim per few KB),
        while keeping ITEMS_PER_THREAD items per thread for balance. Prefill items are one row block."""
        if T > 1:
            return 1
        rb_bytes = 16 * nr * K * LAYOUTS[self.qtype].bytes_per_weight()
        balance = self.B * n_rb // (ITEMS_PER_THREAD * self.pool.n_threads)
        return int(max(1, min(ITEM_BYTES // rb_bytes, balance)))

    def _scratch(self, n: int):
        """Activation buffers for n rows: kept when small (decode), fresh when large (a model has thousands of
        linears; keeping each one's prefill buffers would cost GBs, and a large call's work dwarfs np.empty)."""
        if self._bufs[0] >= n:
            return self._bufs[1]
        K = self.cols
        bufs = (aligned_empty((n, K), np.int8), aligned_empty((n, K // 32), np.float32),
                aligned_empty((n, K // 16), np.int32), aligned_empty((n, K // 32), np.float32))
        if n * K <= KEEP_SCRATCH:
            self._bufs = (n, bufs)
        return bufs

    def _reference(self, x):
        raw = self.raw if self.batched else self.raw[None]
        xb = x if self.batched else x[None]  # [B, T, K]
        W = [dequantize(np.asarray(raw[b]), self.qtype).astype(np.float32) for b in range(self.B)]  # B x [R, K]
        y = np.stack([xb[b] @ W[b].T for b in range(self.B)])  # [B, T, R]
        return y if self.batched else y[0]
