"""Soak test of `ktx serve`: N concurrent streaming clients for a while, on a tiny model.

    python bench/soak_server.py                       # 8 clients, 300 s, synthetic dsv3-tiny, reference experts
    python bench/soak_server.py --clients 8 --duration 30 --model some.gguf --json

The server runs in a subprocess (`ktx serve`), so its resident memory is its own. Steps:

1. reference: every prompt once, sequentially, by a single streaming client (greedy, so the text is
   what that prompt gives whatever ran before it; the engine reuses cached prefixes between requests).
2. load: `--clients` threads loop over the prompts (each from its own offset) until `--duration` ends,
   streaming every request. Each answer must equal the reference text and finish_reason exactly.
   Every `--disconnect-every`-th request of a client hangs up after the first chunk instead (the
   server must cancel it and stay correct for the others).
3. memory: the server's VmRSS (/proc/PID/status) is sampled every second during the load; the
   least-squares slope (MiB/min) and first/last/max are printed. "Flat" means the fitted growth over
   the run is below max(16 MiB, 5% of the first sample).

Prompts mix /v1/completions and /v1/chat/completions, short and long, and chat turns that extend
an earlier conversation (prefix reuse in the engine's KV cache). Exit status 0 only if no request
failed, no answer differed and memory stayed flat.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

KEY = "sk-soak"
MODEL_ID = "soak"

WORDS = "the model will find water and light in time we think that small data system".split()


def prompts(n: int) -> list[tuple[str, dict]]:
    """(endpoint, body) pairs: varied lengths and max_tokens; chats that continue one another."""
    out = []
    for i in range(n):
        words = [WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(2 + (i * 5) % 23)]
        text = " ".join(words)
        max_tokens = 8 + (i * 11) % 25
        if i % 3 == 1:
            out.append(("/v1/chat/completions", {"messages": [{"role": "user", "content": text}], "max_tokens": max_tokens}))
        elif i % 3 == 2:  # the next turn of the previous chat: its prompt starts with that one's
            msgs = out[-1][1]["messages"] + [{"role": "assistant", "content": text}, {"role": "user", "content": words[-1]}]
            out.append(("/v1/chat/completions", {"messages": msgs, "max_tokens": max_tokens}))
        else:
            out.append(("/v1/completions", {"prompt": text, "max_tokens": max_tokens}))
    for _, body in out:
        body.update(model=MODEL_ID, temperature=0, stream=True, stream_options={"include_usage": True})
    return out


def stream(port: int, path: str, body: dict, hang_up: bool = False, timeout: float = 120) -> tuple[str, str, int]:
    """One streaming request -> (text, finish_reason, completion_tokens). Raises on any protocol error."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", path, body=json.dumps(body).encode(),
                     headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
        r = conn.getresponse()
        if r.status != 200:
            raise RuntimeError(f"HTTP {r.status}: {r.read()[:300]!r}")
        text, finish, used, done = [], None, None, False
        while True:
            line = r.readline()
            if not line:
                break
            line = line.strip()
            if not line:
                continue
            if not line.startswith(b"data: "):
                raise RuntimeError(f"not an SSE data line: {line[:100]!r}")
            if line == b"data: [DONE]":
                done = True
                break
            d = json.loads(line[6:])
            if "error" in d:
                raise RuntimeError(f"error chunk: {d['error']}")
            if hang_up:
                conn.sock.shutdown(socket.SHUT_RDWR)
                return "", "hung-up", 0
            for c in d["choices"]:
                text.append(c.get("text") or c.get("delta", {}).get("content") or "")
                finish = c["finish_reason"] or finish
            if d.get("usage"):
                used = d["usage"]["completion_tokens"]
        if not done or finish is None or used is None:
            raise RuntimeError(f"stream ended early (done={done}, finish={finish}, usage={used})")
        return "".join(text), finish, used
    finally:
        conn.close()


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def slope_per_min(samples: list[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, MiB) samples, in MiB per minute."""
    n = len(samples)
    if n < 2:
        return 0.0
    mt = sum(t for t, _ in samples) / n
    mv = sum(v for _, v in samples) / n
    var = sum((t - mt) ** 2 for t, _ in samples)
    return 60 * sum((t - mt) * (v - mv) for t, v in samples) / var if var else 0.0


def start_server(model: Path, port: int, cache_len: int, experts: str, log) -> subprocess.Popen:
    cmd = [sys.executable, "-c", "from ktx.cli import main; main()", "serve", "--model", str(model), "--port", str(port),
           "--api-key", KEY, "--model-id", MODEL_ID, "--cache-len", str(cache_len), "--experts", experts]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}; see {log.name}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return proc
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("server did not answer /health within 120 s")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(args) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="ktx-soak-"))
    model = args.model
    if model is None:
        from ktx.synthetic import PRESETS, write_synthetic

        model = write_synthetic(PRESETS["dsv3-tiny"], tmp / "dsv3-tiny.gguf")
    port = free_port()
    log = open(tmp / "server.log", "w")
    proc = start_server(model, port, args.cache_len, args.experts, log)
    try:
        work = prompts(args.prompts)
        t0 = time.perf_counter()
        ref = [stream(port, path, body) for path, body in work]
        ref_s = time.perf_counter() - t0

        samples: list[tuple[float, float]] = []
        stop = threading.Event()
        lock = threading.Lock()
        stats = dict(ok=0, hung_up=0, failed=0, mismatched=0, tokens=0, in_flight=0, max_in_flight=0)
        latencies: list[float] = []
        problems: list[str] = []

        def sample_rss():
            start = time.perf_counter()
            while not stop.is_set():
                samples.append((time.perf_counter() - start, rss_mib(proc.pid)))
                stop.wait(1.0)

        def client(c: int):
            n = 0
            while not stop.is_set():
                i = (c * 5 + n) % len(work)
                path, body = work[i]
                n += 1
                hang_up = args.disconnect_every > 0 and n % args.disconnect_every == 0
                with lock:
                    stats["in_flight"] += 1
                    stats["max_in_flight"] = max(stats["max_in_flight"], stats["in_flight"])
                t = time.perf_counter()
                try:
                    got = stream(port, path, body, hang_up)
                    key = "hung_up" if hang_up else "ok" if got == ref[i] else "mismatched"
                except Exception as e:  # noqa: BLE001 - every failure is counted and reported
                    got, key = None, "failed"
                    problems.append(f"client {c} prompt {i}: {type(e).__name__}: {e}")
                with lock:
                    stats["in_flight"] -= 1
                    stats[key] += 1
                    if key == "ok":
                        stats["tokens"] += got[2]
                        latencies.append(time.perf_counter() - t)
                    elif key == "mismatched":
                        problems.append(f"client {c} prompt {i}: got {got!r}, single-client gave {ref[i]!r}")

        sampler = threading.Thread(target=sample_rss, daemon=True)
        sampler.start()
        threads = [threading.Thread(target=client, args=(c,), daemon=True) for c in range(args.clients)]
        t0 = time.perf_counter()
        for th in threads:
            th.start()
        time.sleep(args.duration)
        stop.set()
        for th in threads:
            th.join(180)
        sampler.join(5)
        wall = time.perf_counter() - t0
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()

    rss = [v for _, v in samples]
    slope = slope_per_min(samples)
    growth = slope * wall / 60
    flat = bool(rss) and growth < max(16.0, 0.05 * rss[0])
    latencies.sort()
    pct = (lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))] if latencies else float("nan"))
    return dict(clients=args.clients, duration_s=round(wall, 1), prompts=len(work), reference_s=round(ref_s, 2),
                requests=stats["ok"] + stats["hung_up"] + stats["failed"] + stats["mismatched"],
                ok=stats["ok"], hung_up=stats["hung_up"], failed=stats["failed"], mismatched=stats["mismatched"],
                max_in_flight=stats["max_in_flight"], req_per_s=round(stats["ok"] / wall, 2),
                completion_tok_per_s=round(stats["tokens"] / wall, 1),
                latency_p50_s=round(pct(0.5), 3), latency_p99_s=round(pct(0.99), 3),
                rss_first_mib=round(rss[0], 1) if rss else None, rss_last_mib=round(rss[-1], 1) if rss else None,
                rss_max_mib=round(max(rss), 1) if rss else None, rss_slope_mib_per_min=round(slope, 3),
                rss_samples=len(rss), memory_flat=flat, problems=problems[:10], server_log=str(tmp / "server.log"),
                passed=stats["failed"] == 0 and stats["mismatched"] == 0 and stats["ok"] > 0 and flat)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, default=None, help="GGUF to serve (default: the synthetic dsv3-tiny preset)")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--duration", type=float, default=300.0, help="seconds of load")
    p.add_argument("--prompts", type=int, default=12)
    p.add_argument("--cache-len", type=int, default=256)
    p.add_argument("--experts", default="reference")
    p.add_argument("--disconnect-every", type=int, default=10, help="every Nth request of a client hangs up (0: never)")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    args = p.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    s = run(args)
    if args.json:
        print(json.dumps(s))
    else:
        print(f"soak: {s['clients']} clients x {s['duration_s']} s, {s['prompts']} prompts "
              f"(single-client reference pass {s['reference_s']} s)")
        print(f"  requests {s['requests']}: ok {s['ok']}, hung up on purpose {s['hung_up']}, failed {s['failed']}, "
              f"differed from single-client {s['mismatched']}; max in flight {s['max_in_flight']}")
        print(f"  {s['req_per_s']} req/s, {s['completion_tok_per_s']} completion tok/s, "
              f"latency p50 {s['latency_p50_s']} s, p99 {s['latency_p99_s']} s")
        print(f"  server RSS MiB: first {s['rss_first_mib']}, last {s['rss_last_mib']}, max {s['rss_max_mib']}, "
              f"slope {s['rss_slope_mib_per_min']} MiB/min over {s['rss_samples']} samples -> "
              f"{'flat' if s['memory_flat'] else 'GROWING'}")
        for line in s["problems"]:
            print(f"  problem: {line}")
        print("PASS" if s["passed"] else "FAIL")
    sys.exit(0 if s["passed"] else 1)


if __name__ == "__main__":
    main()
