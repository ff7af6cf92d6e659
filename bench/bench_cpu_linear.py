"""QuantLinear (dense int8-activation linears on the CPU) against this machine's limits, measured in the same run.

    /work/venv/bin/python bench/bench_cpu_linear.py [--threads 2] [--tokens 512] [--paths vnni,auto]

Limits: DRAM read bandwidth and the vpdpbusd peak, measured as in bench_cpu_experts.py. Cases, the non-expert
weights of a DeepSeek-V3-shaped model (hidden 2048) that decode reads once per token:
  overhead  one call on a tiny matrix (64 x 256 Q8_0, T = 1): the caller's thread alone, and with the pool
  decode    T = 1 GEMV; enough copies of each weight rotate that >= 256 MB stream per round (8x the L3), so
            the bytes come from DRAM; GB/s = repacked bytes / time (and the GGUF's bytes / time)
  prefill   T = --tokens GEMM; GOPS = 2 * T * rows * cols / time
  today     the float32 numpy GEMV on dequantized weights that the model runs without QuantLinear
Weights are random valid blocks (random codes, small finite f16 scales).
"""
from __future__ import annotations

import argparse
import itertools
import time

import numpy as np
from bench_cpu_experts import dram_read_gbs, rand_raw, vnni_peak_gops
from gguf import GGMLQuantizationType as QT

import ktx.kernels_cpu.linear as linear
from ktx.kernels_cpu import QuantLinear, WorkerPool, cpu_features

# (llama.cpp name, type, rows, cols, batch)
SHAPES = [
    ("output (lm_head)", QT.Q6_K, 129280, 2048, None),
    ("attn_q_b", QT.Q4_K, 3072, 768, None),
    ("attn_kv_a_mqa", QT.Q4_K, 576, 2048, None),
    ("attn_output", QT.Q4_K, 2048, 2048, None),
    ("ffn_gate_shexp", QT.Q4_K, 1536, 2048, None),
    ("ffn_down_shexp", QT.Q6_K, 2048, 1536, None),
    ("attn_k_b x16 heads", QT.Q8_0, 512, 128, 16),
]
ROTATE_BYTES = 256 << 20


def shape(B, R, K) -> str:
    return f"[{B}, {R}, {K}]" if B else f"[{R}, {K}]"


def per_call(fn, n: int, rounds: int = 5) -> float:
    fn()
    best = float("inf")
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - t) / n)
    return best


def overhead(pool, rng):
    op = QuantLinear(rand_raw(rng, QT.Q8_0, 1, 64, 256)[0], QT.Q8_0, 64, 256, pool)
    x = rng.standard_normal((1, 256)).astype(np.float32)
    t_inline = per_call(lambda: op(x), 2000)
    saved, linear.INLINE_MACS = linear.INLINE_MACS, 0
    t_pool = per_call(lambda: op(x), 2000)
    linear.INLINE_MACS = saved
    t_wake = per_call(lambda: pool.submit(lambda wid, n: None).wait(), 2000)
    print(f"per-call overhead, 64 x 256 Q8_0, T=1: {t_inline * 1e6:.1f} us on the caller's thread, "
          f"{t_pool * 1e6:.1f} us with the pool woken (pool.submit(noop).wait() alone: {t_wake * 1e6:.1f} us)")


def decode(pool, rng, bw):
    print(f"decode GEMV, T=1 (weights rotate through >= {ROTATE_BYTES >> 20} MB per round, so from DRAM):")
    total_t, total_b = 0.0, 0
    for name, qt, R, K, B in SHAPES:
        raw = rand_raw(rng, qt, B or 1, R, K)
        raw = raw if B else raw[0]
        first = QuantLinear(raw, qt, R, K, pool)
        ops = [first] + [QuantLinear(raw, qt, R, K, pool) for _ in range(-(-ROTATE_BYTES // first.nbytes) - 1)]
        x = rng.standard_normal((B, 1, K) if B else (1, K)).astype(np.float32)
        cycle = itertools.cycle(ops)
        t = per_call(lambda: next(cycle)(x), len(ops), rounds=3)
        total_t, total_b = total_t + t, total_b + first.nbytes
        gb = first.nbytes / t / 1e9
        print(f"  {name:20s} {qt.name} {shape(B, R, K)}  {t * 1e6:8.1f} us  {gb:5.1f} GB/s repacked"
              f" = {gb / bw:5.1%} of DRAM | GGUF bytes {raw.nbytes / t / 1e9:5.1f} GB/s  ({len(ops)} copies)")
    gb = total_b / total_t / 1e9
    print(f"  all of the above once: {total_t * 1e3:.2f} ms, {gb:.1f} GB/s = {gb / bw:.1%} of DRAM")
    # today's path for one shape: float32 weights, 4-7x the bytes
    R, K = 2048, 2048
    Ws = [rng.standard_normal((R, K)).astype(np.float32) for _ in range(-(-ROTATE_BYTES // (R * K * 4)))]
    x = rng.standard_normal((1, K)).astype(np.float32)
    cycle = itertools.cycle(Ws)
    t = per_call(lambda: x @ next(cycle).T, len(Ws), rounds=3)
    print(f"  today: float32 numpy GEMV [2048, 2048]: {t * 1e6:.1f} us ({R * K * 4 / t / 1e9:.1f} GB/s of float32)")


def prefill(pool, rng, T, peak, paths):
    print(f"prefill GEMM, T={T} (paths {', '.join(paths)}, alternating):")
    for name, qt, R, K, B in SHAPES[1:]:
        raw = rand_raw(rng, qt, B or 1, R, K)
        ops = [QuantLinear(raw if B else raw[0], qt, R, K, pool, path=p) for p in paths]
        x = rng.standard_normal((B, T, K) if B else (T, K)).astype(np.float32)
        best = {p: float("inf") for p in paths}
        for _ in range(3):
            for p, op in zip(paths, ops):
                best[p] = min(best[p], per_call(lambda: op(x), 3, rounds=1))
        for p in paths:
            gops = 2 * (B or 1) * T * R * K / best[p] / 1e9
            vs = f"  {best[paths[0]] / best[p]:4.2f}x {paths[0]}" if p != paths[0] else ""
            print(f"  {name:20s} {qt.name} {shape(B, R, K)} {p:5s} {best[p] * 1e3:7.2f} ms  {gops:6.0f} GOPS"
                  f" = {gops / peak:5.1%} of vpdpbusd peak{vs}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--paths", default="auto", help="comma list of QuantLinear paths for prefill (auto takes the bf16 "
                    "AMX tiles where the CPU has AMX): e.g. vnni,auto")
    a = ap.parse_args()
    print(cpu_features().describe())
    rng = np.random.default_rng(0)
    with WorkerPool(a.threads) as pool:
        bw = dram_read_gbs(pool)[0]
        peak = vnni_peak_gops(pool) if cpu_features().avx512_vnni else float("nan")
        print(f"limits ({a.threads} threads): DRAM read {bw:.1f} GB/s, vpdpbusd peak {peak:.0f} GOPS")
        print(f"path: {QuantLinear(rand_raw(rng, QT.Q4_K, 1, 64, 256)[0], QT.Q4_K, 64, 256, pool).kernel_path}")
        overhead(pool, rng)
        decode(pool, rng, bw)
        prefill(pool, rng, a.tokens, peak, a.paths.split(","))


if __name__ == "__main__":
    main()
