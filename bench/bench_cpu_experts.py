"""CPU routed-expert kernels against this machine's own limits, measured in the same run.

    /work/venv/bin/python bench/bench_cpu_experts.py [--threads 2] [--types Q4_K,Q6_K,Q8_0] [--experts 16] [--tokens 64]
                                                     [--paths vnni,amx]

Limits: DRAM read bandwidth (kernels_cpu.membw: the best of read loops with and without prefetch, all workers
reading disjoint parts of a 1 GiB buffer; during decode, also membw.ReadProbe's sustained read, 0.1 s
over 256 MiB, before and after each token) and the
vpdpbusd peak (all workers running 16 independent vpdpbusd zmm chains). Cases, DeepSeek-V3 expert shape
(hidden 7168, expert FFN 2048):
  decode   1 token through 8 experts; a rotating choice out of --experts, so the 8 x 3 matrices (>190 MB)
           come from DRAM; GB/s = repacked bytes streamed / time (and GGUF bytes / time); each token's rate
           also over the mean of the read probe's just before and just after it (the read on offer drifts
           within seconds here); medians over DECODE_TOKENS tokens (12 had left single runs 10 points apart)
  prefill  T tokens (--tokens, a comma list: 64,128,256,512), each through the same 8 experts (T tokens per
           expert); GOPS = 2 * MACs / time; best of PREFILL_REPS repetitions against the peak measured at the
           start, and the median over the repetitions of each one's rate against the peak measured just before
           and just after it (the paired ratio, robust to the host taking a core for a while); then the
           prefill tile alone (tile_alone: one thread, its weights and the T tokens' activations in L2), the
           ceiling that the tile's instruction mix sets for the whole op
Weights are random valid blocks (random codes, small finite f16 scales).
"""
from __future__ import annotations

import argparse
import time

import gguf
import numba
import numpy as np
from gguf import GGMLQuantizationType as QT
from llvmlite import ir
from numba import literally, njit
from numba.core import types
from numba.extending import intrinsic

from ktx.kernels_cpu import MoEExperts, WorkerPool, cpu_features, membw
from ktx.kernels_cpu.moe import PREFILL_TILE, WIDE_MIN_TOKENS
from ktx.kernels_cpu.moe_loops import _mat_tile, _widened, pf_slice
from ktx.kernels_cpu.quantize import quantize_row, quantize_row256

H, I_FF = 7168, 2048
DECODE_TOKENS = 40
PREFILL_REPS = 8


def dram_read_gbs(pool: WorkerPool, nbytes: int = 1 << 30) -> tuple[float, int]:
    """(GB/s, prefetch distance) of the best of membw's read loops, all workers reading disjoint parts."""
    return membw.dram_read_gbps(pool, nbytes)


@intrinsic
def _vnni_loop(typingctx, n):
    """n iterations of 16 independent vpdpbusd zmm; returns a lane so nothing is optimised away."""
    sig = types.int32(types.int64)

    def codegen(context, b, signature, args):
        v16, v64 = ir.VectorType(ir.IntType(32), 16), ir.VectorType(ir.IntType(8), 64)
        fn = b.module.declare_intrinsic("llvm.x86.avx512.vpdpbusd.512", fnty=ir.FunctionType(v16, [v16, v64, v64]))
        entry = b.block
        loop, done = b.append_basic_block("l"), b.append_basic_block("d")
        b.branch(loop)
        b.position_at_end(loop)
        i = b.phi(ir.IntType(64))
        i.add_incoming(ir.Constant(ir.IntType(64), 0), entry)
        accs = [b.phi(v16) for _ in range(16)]
        byte = b.trunc(args[0], ir.IntType(8))  # an operand the optimiser cannot fold
        wa = b.insert_element(ir.Constant(v64, ir.Undefined), byte, ir.Constant(ir.IntType(32), 0))
        wa = b.shuffle_vector(wa, ir.Constant(v64, ir.Undefined), ir.Constant(ir.VectorType(ir.IntType(32), 64), [0] * 64))
        nxt = []
        for j, a in enumerate(accs):
            a.add_incoming(ir.Constant(v16, [j] * 16), entry)
            nxt.append(b.call(fn, [a, wa, wa]))
        i1 = b.add(i, ir.Constant(ir.IntType(64), 1))
        i.add_incoming(i1, b.block)
        for a, v in zip(accs, nxt):
            a.add_incoming(v, b.block)
        b.cbranch(b.icmp_signed("<", i1, args[0]), loop, done)
        b.position_at_end(done)
        s = nxt[0]
        for v in nxt[1:]:
            s = b.add(s, v)
        return b.extract_element(s, ir.Constant(ir.IntType(32), 0))

    return sig, codegen


@njit(nogil=True, cache=True)
def _vnni_run(n):
    return _vnni_loop(n)


def vnni_peak_gops(pool: WorkerPool, iters: int = 20_000_000) -> float:
    _vnni_run(10)
    best = 0.0
    for _ in range(3):
        t = time.perf_counter()
        pool.run(lambda wid, n: _vnni_run(iters))
        best = max(best, pool.n_threads * iters * 16 * 128 / (time.perf_counter() - t) / 1e9)
    return best


@njit(nogil=True, cache=True)
def _tile_loop(V, md, K, xq, xd, xs, xsf, out, buf, mdw, n):
    """n calls of prefill tile V on the first NR row groups of expert 0 of md, token tiles in turn over xq's rows."""
    literally(V)
    m = _widened(V, md, 0, 0, K, buf, mdw)
    NT = V // 10 % 10
    for i in range(n):
        t0 = i * NT % xq.shape[0]
        _mat_tile(V, m, 0, 0, K, xq, xd, xs, xsf, t0, out, t0 * 16 * (V % 10), 16 * (V % 10),
                  pf_slice(V, md, -1, 0, K, 0, xq.ctypes.data, NT))  # nothing to prefetch: lines in cache


def tile_alone(ex, x, seconds: float = 0.3) -> float:
    """The prefill tile of gate's layout alone, one thread, its weights (NR row groups of one expert) and
    x's rows in L2, as a fraction of one thread's vpdpbusd peak: the ceiling of the tile's instruction mix,
    which the whole op (memory, quantization, SiLU, threads) can approach but not pass."""
    Vg, _, _, x256 = ex._plan(*PREFILL_TILE, len(x) >= WIDE_MIN_TOKENS, False)[:4]
    K, NR, NT = H, Vg % 10, Vg // 10 % 10
    T = -(-len(x) // NT) * NT  # whole token tiles: x's rows again as padding (a partial last tile wrote past out)
    x = x[np.arange(T) % len(x)]
    xq, xd = np.zeros((T, K), np.int8), np.zeros((T, K // 32), np.float32)
    xs, xsf = np.zeros((T, K // 16), np.int32), np.zeros((T, K // 32), np.float32)
    for t in range(T):
        (quantize_row256 if x256 else quantize_row)(x[t], xq[t], xd[t], xs[t], xsf[t])
    out = np.zeros((T, 16 * NR), np.float32)
    args = (Vg, ex.mats[0].md, K, xq, xd, xs, xsf, out, np.zeros(NR * 16 * K, np.uint8), np.zeros(15, np.int64))
    # the compiled entry point: called with a plain int, the dispatcher retypes the literal on every call (~60 ms)
    run = _tile_loop.compile((types.literal(Vg),) + tuple(numba.typeof(a) for a in args[1:]) + (types.int64,))
    n = max(1, int(seconds * 4e11 / (2 * PREFILL_TILE[0] * 16 * NR * K)))  # ~seconds at 400 GOPS
    run(*args, n // 4)
    t = time.perf_counter()
    run(*args, n)
    gops = 2 * n * PREFILL_TILE[0] * 16 * NR * K / (time.perf_counter() - t) / 1e9
    _vnni_run(10)
    t = time.perf_counter()
    _vnni_run(20_000_000)
    one = 20_000_000 * 16 * 128 / (time.perf_counter() - t) / 1e9
    return gops / one


def short_peak(pool: WorkerPool) -> float:
    """The vpdpbusd peak over ~0.1 s (three ~20 ms loops, best), to pair with one prefill repetition."""
    return vnni_peak_gops(pool, 4_000_000)


def rand_raw(rng, qt, E, R, K):
    """Random valid GGUF blocks: random codes, f16 scales ~0.001 (finite)."""
    bs, ts = gguf.GGML_QUANT_SIZES[qt]
    raw = rng.integers(0, 256, size=(E, R, K // bs * ts), dtype=np.uint8)
    blocks = raw.reshape(-1, ts)
    for o in {QT.Q8_0: [0], QT.Q4_0: [0], QT.Q5_0: [0], QT.Q4_K: [0, 2], QT.Q5_K: [0, 2], QT.Q6_K: [208]}[qt]:
        d = (rng.random(len(blocks)) * 1e-3).astype(np.float16)
        blocks[:, o:o + 2] = d.view(np.uint8).reshape(-1, 2)
    return raw


def _experts(g, u, d, qt, pool, spec):
    """MoEExperts for a --paths entry: a path, or path:amx_kernel (amx = amx:bf16, amx:native = the int8 tiles)."""
    path, _, kernel = spec.partition(":")
    return MoEExperts((g, qt), (u, qt), (d, qt), hidden=H, inter=I_FF, pool=pool, path=path, amx_kernel=kernel or "bf16")


def bench_type(qt, pool, rng, n_experts, bw, peak, tokens=(64,), paths=("auto",)):
    g, u, d = rand_raw(rng, qt, n_experts, I_FF, H), rand_raw(rng, qt, n_experts, I_FF, H), rand_raw(rng, qt, n_experts, H, I_FF)
    t = time.perf_counter()
    ex = _experts(g, u, d, qt, pool, paths[0])
    t_repack = time.perf_counter() - t
    print(f"{qt.name:5s} kernels: {ex.kernel_path}")
    bytes_expert = sum(m.nbytes_per_expert() for m in ex.mats)
    gguf_expert = (g[0].nbytes + u[0].nbytes + d[0].nbytes)
    x = rng.standard_normal((max(tokens), H)).astype(np.float32)
    w8 = np.full((1, 8), 1 / 8, np.float32)
    ex.forward(x[:1], np.arange(8, dtype=np.int32)[None], w8)  # compile
    times = []
    probe = membw.ReadProbe(pool, 256 << 20, bw[1])
    reads = [probe.gbps(0.1)]  # reads[i], reads[i + 1]: the probe's rate just before and just after token i
    for it in range(DECODE_TOKENS + 2):  # the first two warm up
        ids = ((np.arange(8) + 8 * it) % n_experts).astype(np.int32)[None]
        t = time.perf_counter()
        ex.forward(x[:1], ids, w8)
        times.append(time.perf_counter() - t)
        reads.append(probe.gbps(0.1))
    ratios = [8 * bytes_expert / ti / 1e9 / ((reads[i] + reads[i + 1]) / 2) for i, ti in enumerate(times)]
    td = float(np.median(times[2:]))
    gbs = 8 * bytes_expert / td / 1e9
    bpw = bytes_expert / (3 * H * I_FF)
    print(f"{qt.name:5s} decode : {td * 1e3:7.2f} ms/token  {gbs:6.1f} GB/s repacked ({bytes_expert / 2**20:.1f} MiB/expert,"
          f" {bpw:.3f} B/weight) = {gbs / bw[0]:5.1%} of DRAM, {np.median(ratios[2:]):5.1%} of the read around each token"
          f"   | GGUF bytes {8 * gguf_expert / td / 1e9:6.1f} GB/s   (repack {t_repack:.1f} s)")
    # prefill: each path in `paths` on the same repacked weights (a second MoEExperts over the same arrays), the
    # paths alternating per repetition, so that a comparison sees the same machine state
    exs = [ex] + [_experts(g, u, d, qt, pool, p) for p in paths[1:]]
    for T in tokens:
        ids = np.tile(np.arange(8, dtype=np.int32), (T, 1))
        wT = np.full((T, 8), 1 / 8, np.float32)
        times = {p: [] for p in paths}
        for e in exs:
            e.forward(x[:T], ids, wT)
        # the peak just before and just after each repetition (like decode's read probe): the host takes a core
        # for seconds at a time here, and a peak measured once at the start paired some runs with the wrong machine
        peaks = [short_peak(pool)] if peak == peak else []
        for _ in range(PREFILL_REPS):
            for p, e in zip(paths, exs):
                t = time.perf_counter()
                e.forward(x[:T], ids, wT)
                times[p].append(time.perf_counter() - t)
            if peaks:
                peaks.append(short_peak(pool))
        macs = T * 8 * 3 * H * I_FF
        for p in paths:
            tp = min(times[p])
            gops = 2 * macs / tp / 1e9
            vs = f"  {min(times[paths[0]]) / tp:4.2f}x {paths[0]}" if p != paths[0] else ""
            paired = [2 * macs / ti / 1e9 / ((peaks[i] + peaks[i + 1]) / 2) for i, ti in enumerate(times[p])] if peaks else [np.nan]
            print(f"{qt.name:5s} prefill {p:8s}: {tp * 1e3:7.1f} ms / {T} tok x 8 experts  {gops:6.0f} GOPS = "
                  f"{gops / peak:5.1%} of VNNI peak, {np.median(paired):5.1%} of the peak around each repetition "
                  f"(median of {len(paired)}){vs}")
        if ex.path == "vnni" and cpu_features().avx512_vnni:
            print(f"{qt.name:5s} prefill tile alone ({PREFILL_TILE[0]} x {16 * PREFILL_TILE[1]}, in L2, 1 thread): "
                  f"{tile_alone(ex, x[:T]):5.1%} of one thread's peak (the tile's ceiling)")
    return td, gbs


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--types", default="Q4_K,Q6_K,Q8_0")
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--tokens", default="64", help="prefill tokens per expert, a comma list")
    ap.add_argument("--paths", default="auto", help="CPU kernel paths for prefill, a comma list (e.g. vnni,amx: "
                    "measured alternately on the same weights; decode runs on the first)")
    a = ap.parse_args()
    print(cpu_features().describe())
    with WorkerPool(a.threads) as pool:
        bw = dram_read_gbs(pool)
        peak = vnni_peak_gops(pool) if cpu_features().avx512_vnni else float("nan")
        print(f"limits ({a.threads} threads): DRAM read {bw[0]:.1f} GB/s (prefetch {bw[1]} B ahead), vpdpbusd peak {peak:.0f} GOPS")
        rng = np.random.default_rng(0)
        for name in a.types.split(","):
            bench_type(QT[name], pool, rng, a.experts, bw, peak, tuple(int(t) for t in a.tokens.split(",")),
                       tuple(a.paths.split(",")))


if __name__ == "__main__":
    main()
