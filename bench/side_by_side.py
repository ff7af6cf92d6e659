"""ktx against llama.cpp on one GGUF, on this machine, run alternately: the mission's comparison, measured here.

    python bench/side_by_side.py --llama-bench PATH/llama-bench --synthetic dsv3-bench [-p 512] [-n 64] [-r 3] [-t 2] [--rounds 2]
    python bench/side_by_side.py --llama-bench PATH/llama-bench --model model.gguf ...

llama.cpp is not a dependency: build its `llama-bench` yourself (any checkout; the sources also ship inside the
llama-cpp-python sdist on PyPI, under vendor/llama.cpp: `cmake -B build -DGGML_NATIVE=ON && cmake --build build
--target llama-bench`) and pass its path, or set LLAMA_BENCH. Both tools get the same prompt length, decode length,
repetitions and thread count (llama.cpp CPU-only: `-ngl 0`), and run in turn for --rounds rounds, so drift of a
shared machine's bandwidth falls on both. Decode GB/s for both = ktx's bytes of weights touched per token x tok/s;
the roofline is the DRAM read bandwidth ktx measured in the same round.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

# llama-bench runs in the environment this script was started with: importing ktx sets OMP_WAIT_POLICY=PASSIVE
# (for torch's pool), which an OpenMP build of llama.cpp inherits, and which measured tg64 38 instead of 63 tok/s
LLAMA_ENV = dict(os.environ)


def run_llama(exe: str, model: str, p: int, n: int, r: int, t: int) -> dict[str, float]:
    out = subprocess.run([exe, "-m", model, "-p", str(p), "-n", str(n), "-r", str(r), "-t", str(t), "-ngl", "0",
                          "-o", "json"], check=True, capture_output=True, text=True, env=LLAMA_ENV).stdout
    rows = json.loads(out)
    return {(f"pp{row['n_prompt']}" if row["n_prompt"] else f"tg{row['n_gen']}"): float(row["avg_ts"]) for row in rows}


def run_ktx(model: str, p: int, n: int, r: int, t: int) -> tuple[dict[str, float], dict]:
    ktx = [sys.executable, "-c", "from ktx.cli import main; main()"]
    out = subprocess.run(ktx + ["bench", "-m", model, "-p", str(p), "-n", str(n), "-r", str(r), "-t", str(t), "-o", "json"],
                         check=True, capture_output=True, text=True).stdout
    report = json.loads(out)
    return {row["test"]: float(row["tps"]) for row in report["results"]}, report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--llama-bench", default=os.environ.get("LLAMA_BENCH"), help="path of llama.cpp's llama-bench")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", "-m")
    src.add_argument("--synthetic", help="a ktx synthetic preset (dsv3-bench, qwen3-bench, ...)")
    ap.add_argument("-p", type=int, default=512)
    ap.add_argument("-n", type=int, default=64)
    ap.add_argument("-r", type=int, default=3)
    ap.add_argument("-t", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args()
    if not a.llama_bench or not os.access(a.llama_bench, os.X_OK):
        sys.exit("side_by_side: give --llama-bench PATH (or LLAMA_BENCH) of a built llama-bench executable; see this file's docstring")
    model = a.model
    if a.synthetic:
        from ktx.synthetic import synthetic_model

        model = str(synthetic_model(a.synthetic, progress=sys.stderr.isatty()))
    ll: dict[str, list[float]] = {}
    kt: dict[str, list[float]] = {}
    dram, bpt = [], None
    for rnd in range(a.rounds):
        for name, runner in (("llama.cpp", run_llama), ("ktx", None)):
            print(f"round {rnd + 1}/{a.rounds}: {name}", file=sys.stderr, flush=True)
            if runner:
                for k, v in run_llama(a.llama_bench, model, a.p, a.n, a.r, a.t).items():
                    ll.setdefault(k, []).append(v)
            else:
                res, report = run_ktx(model, a.p, a.n, a.r, a.t)
                for k, v in res.items():
                    kt.setdefault(k, []).append(v)
                dram.append(report["dram_gbps"])
                bpt = report["bytes_per_token"]
    print(f"model: {model}\nthreads: {a.t}, {a.rounds} rounds of {a.r} repetitions, alternating; ktx's DRAM read per round: "
          + ", ".join(f"{d:.1f}" for d in dram) + " GB/s")
    print("| test | llama.cpp t/s | ktx t/s | ktx / llama.cpp | decode GB/s (medians) llama.cpp / ktx | % of each round's DRAM read llama.cpp / ktx |")
    print("|---|---:|---:|---:|---:|---:|")
    for test in [k for k in kt if k in ll]:
        l_med, k_med = statistics.median(ll[test]), statistics.median(kt[test])
        cols = [test, " / ".join(f"{v:.1f}" for v in ll[test]), " / ".join(f"{v:.1f}" for v in kt[test]), f"{k_med / l_med:.2f}x"]
        if test.startswith("tg") and bpt:  # each round's runs against that round's DRAM figure
            pct = lambda runs: " ".join(f"{100 * bpt * v / 1e9 / d:.0f}%" for v, d in zip(runs, dram))  # noqa: E731
            cols += [f"{bpt * l_med / 1e9:.1f} / {bpt * k_med / 1e9:.1f}", f"{pct(ll[test])} / {pct(kt[test])}"]
        else:
            cols += ["-", "-"]
        print("| " + " | ".join(cols) + " |")


if __name__ == "__main__":
    main()
