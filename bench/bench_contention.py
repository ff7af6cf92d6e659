"""Decode speed when another process wants a core: ktx's threads beside busy processes, against the same decode
on a quiet machine and against fewer threads, measured in the same run.

    python bench/bench_contention.py                          # the default model (Gemma-3-270M)
    python bench/bench_contention.py --synthetic dsv3-bench -n 64 -t 2 --busy 1

A desktop or a shared server rarely leaves every core to one program. A decode step that waits at barriers for
all its threads runs at the pace of the one the OS has descheduled: with thread-counting barriers, one busy
process beside a 2-thread decode cut it to a third, below one thread alone (bench/RESULTS.md). This prints, for
--threads and for one thread: tok/s quiet and beside --busy processes that spin in pure Python, and the ratios.
With t threads and b busy processes on c cores, each runnable thread gets min(1, c / (t + b)) of a core: that
fraction of the quiet speed is the fair share (2 threads beside 1 busy process on 2 cores: 67%).
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time


def decode_tps(model, n: int, reps: int) -> float:
    rates = []
    for _ in range(reps):
        model.generate("The capital of France is", n)
        rates.append(model.stats.new_tokens / model.stats.decode_s)
    return statistics.median(rates)


def measure(path, threads: int, n: int, reps: int, busy: int) -> tuple[float, float]:
    import ktx

    m = ktx.load(path, threads=threads, cache_len=max(256, n + 32))
    decode_tps(m, 8, 1)  # warm
    quiet = decode_tps(m, n, reps)
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(busy)]
    try:
        time.sleep(0.3)
        loaded = decode_tps(m, n, reps)
    finally:
        for h in hogs:
            h.kill()
    return quiet, loaded


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--model", "-m")
    src.add_argument("--synthetic", help="a ktx synthetic preset (dsv3-bench, qwen3-bench, ...)")
    ap.add_argument("-n", type=int, default=100, help="tokens per decode")
    ap.add_argument("-r", type=int, default=3, help="decodes per measurement (median)")
    ap.add_argument("-t", "--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--busy", type=int, default=1, help="busy processes beside the decode")
    a = ap.parse_args()
    if a.synthetic:
        from ktx.synthetic import synthetic_model

        path = synthetic_model(a.synthetic, progress=sys.stderr.isatty())
    elif a.model:
        path = a.model
    else:
        from ktx.default_model import default_model_path

        path = default_model_path()
    cores = os.cpu_count() or 1
    print(f"model: {path}\n{cores} cores; {a.busy} busy process(es) beside; tg{a.n}, median of {a.r}")
    rows = [(t, *measure(path, t, a.n, a.r, a.busy)) for t in sorted({a.threads, 1}, reverse=True)]
    print("| threads | quiet tok/s | beside busy tok/s | beside / quiet | fair share |")
    print("|---:|---:|---:|---:|---:|")
    for t, quiet, loaded in rows:
        print(f"| {t} | {quiet:.1f} | {loaded:.1f} | {loaded / quiet:.0%} | {min(1.0, cores / (t + a.busy)):.0%} |")
    if len(rows) == 2:
        print(f"beside busy: {rows[0][0]} threads give {rows[0][2] / rows[1][2]:.2f}x one thread's speed")


if __name__ == "__main__":
    main()
