"""`ktx bench`: prefill and decode speed in the manner of llama-bench, measured against the DRAM roofline.

Tests, each repeated `reps` times after one warm-up run:
  pp<P>   one prefill of P random tokens (at context depth D: after D cached tokens)  -> P / seconds
  tg<N>   N decode steps of one token each, starting at depth D                        -> N / seconds
Both call the model's forward on `Model.engine`'s cache directly, so sampling, tokenizer and streaming
are not part of the numbers (as in llama-bench).

Decode reads every weight it uses once per token, so its speed is bounded by memory bandwidth:
  bytes touched per token = non-expert weights, each once (token_embd: one row, the embedding is a lookup;
                            all of it when there is no `output` tensor, since the tied head reads it all)
                            + n_expert_used / n_expert of the routed-expert weights (`*_exps` tensors),
                            n_expert and n_expert_used from `{general.architecture}.expert_count` and
                            `.expert_used_count` (deepseek2, qwen3moe, qwen2moe, llama/Mixtral; none: dense)
  achieved GB/s           = bytes touched per token x tok/s
  roofline                = achieved GB/s / DRAM read bandwidth, measured in the same run as the best of
                            kernels_cpu.membw's read loops (with and without prefetch) over BANDWIDTH_BYTES,
                            before and after the tests
  paired roofline         = median over a decode test's repetitions of its GB/s over the mean of sustained reads
                            (membw.ReadProbe: PAIRED_SECONDS of passes over PAIRED_BYTES) just before and after
                            it: on a shared machine the bandwidth on offer drifts (38-97 GB/s seen for 2 threads on
                            one VM in one day), so a limit measured minutes away can be either side of what the
                            test had
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ktx.errors import KtxError

BANDWIDTH_BYTES = 1 << 30
PAIRED_BYTES = 256 << 20
PAIRED_SECONDS = 0.3


@dataclass
class TestResult:
    test: str  # "pp512", "tg128", "pp512 @ d1024"
    n_prompt: int
    n_gen: int
    depth: int
    samples_tps: list[float]
    gbps: float | None = None  # weights read per second (decode tests only)
    roofline: float | None = None  # gbps / DRAM read bandwidth
    paired_roofline: float | None = None  # median of each repetition's GB/s over reads just before and after it
    timeline: dict | None = None  # the scheduler's CPU/GPU busy and overlap over the last repetition
    profile: dict | None = None  # decode through a compiled program: share of the step per part (all repetitions)

    @property
    def tps(self) -> float:
        return statistics.fmean(self.samples_tps)

    @property
    def tps_std(self) -> float:
        return statistics.stdev(self.samples_tps) if len(self.samples_tps) > 1 else 0.0


@dataclass
class BenchReport:
    model: str
    path: str
    size_bytes: int
    n_params: int
    bytes_per_token: int
    threads: int
    experts: str
    kernel_paths: list[str]
    dram_gbps: float | None
    results: list[TestResult] = field(default_factory=list)
    device_path: str = ""  # where attention and the dense layers ran (ktx.load's "model path" line)

    def to_json(self) -> str:
        d = asdict(self)
        d["results"] = [{**asdict(r), "tps": r.tps, "tps_std": r.tps_std} for r in self.results]
        return json.dumps(d, indent=2)

    def to_markdown(self) -> str:
        rows = ["| model | size | params | threads | test | t/s ± std | GB/s |", "|---|---:|---:|---:|---|---:|---:|"]
        for r in self.results:
            gbps = f"{r.gbps:.1f}" if r.gbps is not None else "-"
            rows.append(f"| {self.model} | {self.size_bytes / 2**30:.2f} GiB | {self.n_params / 1e9:.2f} B | {self.threads} "
                        f"| {r.test} | {r.tps:.2f} ± {r.tps_std:.2f} | {gbps} |")
        lines = ["\n".join(rows), ""]
        lines.append(f"weights touched per decoded token: {self.bytes_per_token / 1e6:.0f} MB")
        if self.dram_gbps:
            lines.append(f"DRAM read bandwidth (best read loop over {BANDWIDTH_BYTES / 2**30:.1f} GiB, {self.threads} threads, "
                         "before and after the tests): "
                         f"{self.dram_gbps:.1f} GB/s")
            for r in self.results:
                if r.roofline is not None:
                    paired = (f", {100 * r.paired_roofline:.0f}% of the reads next to each repetition (paired)"
                              if r.paired_roofline is not None else "")
                    lines.append(f"{r.test}: {r.gbps:.1f} GB/s = {100 * r.roofline:.0f}% of the DRAM roofline{paired}")
        for r in self.results:
            if r.timeline and r.timeline.get("moe_layers"):
                t = r.timeline
                lines.append(f"{r.test} overlap: routed experts (CPU) busy {t['cpu_busy_s']:.3f} s, shared experts/GPU side "
                             f"{t['gpu_busy_s']:.3f} s, overlapped {100 * t['overlap_fraction']:.0f}% of the shorter")
            if r.profile:
                parts = ", ".join(f"{k} {100 * v:.0f}%" for k, v in list(r.profile.items())[:8] if v >= 0.005)
                lines.append(f"{r.test} step, compiled program: {parts}")
        lines.append("kernel paths: " + "; ".join(self.kernel_paths))
        if self.device_path:
            lines.append(self.device_path)
        return "\n".join(lines)


def touched_bytes_per_token(gguf, experts_per_token: int | None = None) -> int:
    """Bytes of weights one decode step reads (see the module docstring); experts_per_token: --experts-per-token."""
    arch = gguf.get("general.architecture")
    n_expert = int(gguf.get(f"{arch}.expert_count", 0) or 0)
    used = int(gguf.get(f"{arch}.expert_used_count", 0) or 0)
    used = min(used, experts_per_token) if experts_per_token else used
    tied = "output.weight" not in gguf.tensors
    n_blocks = int(gguf.get(f"{arch}.block_count", 0) or 0) - int(gguf.get(f"{arch}.nextn_predict_layers", 0) or 0)
    total = 0
    for t in gguf.tensors.values():
        if t.name.startswith("blk.") and int(t.name.split(".")[1]) >= n_blocks > 0:
            continue  # NextN (multi-token prediction) layers: not read by a decode step
        if "_exps." in t.name and n_expert:
            total += t.n_bytes * used // n_expert
        elif t.name == "token_embd.weight" and not tied:
            total += t.n_bytes // t.shape[0]  # one row
        else:
            total += t.n_bytes
    return total


def _time_pp(model, p: int, depth: int, rng) -> float:
    import torch

    eng = model.engine
    eng.cache.reset(depth)
    ids = torch.from_numpy(rng.integers(0, model.config.vocab_size, p))  # [p]
    t0 = time.perf_counter()
    model.net.forward(ids, eng.cache, last_only=True)
    return p / (time.perf_counter() - t0)


def _time_tg(model, n: int, depth: int, rng) -> float:
    import torch

    eng = model.engine
    eng.cache.reset(depth)
    ids = torch.from_numpy(rng.integers(0, model.config.vocab_size, n))  # [n]
    t0 = time.perf_counter()
    for i in range(n):
        model.net.forward(ids[i : i + 1], eng.cache, last_only=True)
    return n / (time.perf_counter() - t0)


def _timeline(model) -> dict | None:
    """The scheduler's statistics since the last call (None for a model without one)."""
    sched = getattr(model.net, "scheduler", None)
    return sched.new_step().summary() if sched is not None else None


def _expert_paths(experts) -> list[str]:
    """Each experts kernel path once: paths that differ only in their layer's weight types ("(Q4_K/Q4_K/Q6_K, ...")
    become one line listing the type triples, so the rest (the AMX verdict, say) is not repeated per triple."""
    types = re.compile(r"\(([A-Z0-9_]+/[A-Z0-9_]+/[A-Z0-9_]+), ")
    merged: dict[str, list[str]] = {}
    for path in sorted({e.kernel_path for e in experts}):
        m = types.search(path)
        key = types.sub("(@TYPES@, ", path, count=1) if m else path
        merged.setdefault(key, []).append(m.group(1) if m else "")
    return [key.replace("@TYPES@", " | ".join(ts)) for key, ts in merged.items()]


def _program_profile(model) -> dict | None:
    """Where the compiled decode steps since the last call spent their time (None when decode ran per op)."""
    progs = [p for p in model.net.programs().values() if p is not None]
    return progs[0].take_profile() if progs else None


def _fill_depth(model, depth: int, rng) -> None:
    import torch

    model.engine.cache.reset(0)
    if depth:
        model.net.forward(torch.from_numpy(rng.integers(0, model.config.vocab_size, depth)), model.engine.cache, last_only=True)


def run_bench(path: str | Path, *, n_prompt: list[int], n_gen: list[int], depths: list[int], reps: int,
              threads: int | None = None, experts: str = "auto", model_name: str | None = None,
              measure_bandwidth: bool = True, log=lambda msg: None, **load_kwargs) -> BenchReport:
    """Load the model at `path` and run every (depth, test) pair; pp and tg of 0 tokens are skipped.
    load_kwargs go to `ktx.load` (placement, --experts-per-token, NUMA shards)."""
    import ktx

    if reps < 1:
        raise KtxError(f"-r {reps}: need at least one repetition")
    if any(v < 0 for v in [*n_prompt, *n_gen, *depths]):
        raise KtxError("-p, -n and -d take token counts >= 0")
    tests = [("pp", p) for p in n_prompt if p > 0] + [("tg", n) for n in n_gen if n > 0]
    if not tests:
        raise KtxError("nothing to run: give -p or -n with a count > 0")
    threads = threads or os.cpu_count() or 1
    cache_len = max(depths) + max(n for _, n in tests) + 1
    model = ktx.load(path, cache_len=cache_len, threads=threads, experts=experts, **load_kwargs)
    gguf = model.gguf
    report = BenchReport(
        model=model_name or Path(gguf.path).name.removesuffix(".gguf"), path=str(gguf.path), size_bytes=gguf.n_bytes,
        n_params=sum(t.n_elements for t in gguf.tensors.values()), bytes_per_token=touched_bytes_per_token(gguf, load_kwargs.get("experts_per_token")),
        threads=threads, experts=experts, kernel_paths=_expert_paths(model.net.experts.values()) + [model.net.lin.describe()]
        + ([model.net.program_note] if model.net.program_note else []),
        dram_gbps=None, device_path=model.device_path,
    )
    rng = np.random.default_rng(0)
    with contextlib.ExitStack() as stack:
        probe = None
        if measure_bandwidth:  # a pool of its own: its threads sleep while the model runs
            from ktx.kernels_cpu import WorkerPool, membw

            pool = stack.enter_context(WorkerPool(threads))
            log("measuring DRAM read bandwidth")
            bw_before, ahead = membw.dram_read_gbps(pool, BANDWIDTH_BYTES)
            probe = membw.ReadProbe(pool, PAIRED_BYTES, ahead)
        _run_tests(model, report, tests, depths, reps, cache_len, rng, probe, log)
        model.engine.reset()
        if measure_bandwidth:
            log("measuring DRAM read bandwidth")
            report.dram_gbps = max(bw_before, membw.dram_read_gbps(pool, BANDWIDTH_BYTES)[0])
            for r in report.results:
                if r.gbps is not None:
                    r.roofline = r.gbps / report.dram_gbps
    return report


def _run_tests(model, report, tests, depths, reps, cache_len, rng, probe, log) -> None:
    log("warm-up")
    _time_pp(model, min(8, cache_len - 1), 0, rng)  # first touch of the weights, kernel compilation, repacking
    _time_tg(model, 2, 0, rng)
    for d in depths:
        _fill_depth(model, d, rng)
        for kind, n in tests:
            timer = _time_pp if kind == "pp" else _time_tg
            name = f"{kind}{n}" + (f" @ d{d}" if d else "")
            log(f"running {name}")
            samples, paired = [], []
            _program_profile(model)
            for _ in range(reps):
                _timeline(model)
                pair = probe is not None and kind == "tg"
                pre = probe.gbps(PAIRED_SECONDS) if pair else None
                samples.append(timer(model, n, d, rng))
                if pair:
                    paired.append(report.bytes_per_token * samples[-1] / 1e9
                                  / statistics.fmean([pre, probe.gbps(PAIRED_SECONDS)]))
            res = TestResult(name, n if kind == "pp" else 0, n if kind == "tg" else 0, d, samples, timeline=_timeline(model),
                             profile=_program_profile(model) if kind == "tg" else None)
            if kind == "tg":
                res.gbps = report.bytes_per_token * res.tps / 1e9
                res.paired_roofline = statistics.median(paired) if paired else None
            report.results.append(res)
