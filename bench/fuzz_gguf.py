"""Fuzz ktx's GGUF loader: N damaged copies of a small valid GGUF, each must load or raise one KtxError line.

    python bench/fuzz_gguf.py --examples 10000 [--seed 0] [--timeout 5]

Example i is built from random.Random(f"{seed}:{i}") by tests/gguf_mutants.py: stacked structured
mutations (one header field set to a huge count, an unknown type id, a bad offset, non-UTF-8 bytes, a
dropped or repeated field) and byte-level ones (bit flips, truncation, 8 bytes overwritten with a
huge count). Each load runs under a wall-clock timer, and the address space is capped at 1 GiB
above what the process had at the start, so a giant allocation shows up as a MemoryError ("other")
instead of swapping. A file that loads is checked against gguf-py's GGUFReader (the reference): the
same metadata and tensors, with the same bytes, inside the file. Prints one result line; exits 1 on any failure.
"""

from __future__ import annotations

import argparse
import random
import resource
import signal
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import gguf_mutants as gm  # noqa: E402

from ktx.errors import KtxError  # noqa: E402
from ktx.gguf_file import GGUFModel  # noqa: E402


class Timeout(Exception):
    pass


def _on_alarm(signum, frame):
    raise Timeout()


def _vm_size() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=10000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=5.0, help="seconds per load before it counts as a hang")
    args = ap.parse_args()

    import gguf  # noqa: F401  (imported before the address-space cap)

    resource.setrlimit(resource.RLIMIT_AS, (_vm_size() + (1 << 30), resource.RLIM_INFINITY))
    signal.signal(signal.SIGALRM, _on_alarm)
    segs = gm.base_segments()
    counts = {"ok": 0, "ktx": 0, "other": 0, "timeout": 0, "mismatch": 0}
    shown, slowest = [], (0.0, -1)
    tmp = Path(tempfile.mkdtemp(prefix="ktx-fuzz-", dir="/dev/shm" if Path("/dev/shm").is_dir() else None))
    path = tmp / "fuzz.gguf"
    t_start = time.perf_counter()
    for i in range(args.examples):
        rng = random.Random(f"{args.seed}:{i}")
        path.write_bytes(gm.mutate(segs, rng))
        t0 = time.perf_counter()
        signal.setitimer(signal.ITIMER_REAL, args.timeout)
        try:
            model = GGUFModel(path)
            signal.setitimer(signal.ITIMER_REAL, 0)
            why = gm.check_against_reference(path, model)
            kind = "ok" if why is None else "mismatch"
        except KtxError as e:
            msg = str(e)
            kind, why = ("ktx", None) if str(path) in msg and "\n" not in msg else ("other", f"bad message: {msg!r}")
        except Timeout:
            kind, why = "timeout", "timed out"
        except BaseException as e:  # noqa: BLE001  (anything else is the bug this script hunts)
            kind, why = "other", f"{type(e).__name__}: {e}"
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        dt = time.perf_counter() - t0
        slowest = max(slowest, (dt, i))
        counts[kind] += 1
        if why and len(shown) < 10:
            shown.append(f"  example {i}: {kind}: {why}"[:300])
    elapsed = time.perf_counter() - t_start
    path.unlink(missing_ok=True)
    tmp.rmdir()
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("\n".join(shown))
    print(f"GGUF fuzzing: {args.examples} examples (seed {args.seed}): loaded OK {counts['ok']}, KtxError {counts['ktx']}, "
          f"other exceptions {counts['other']}, timeouts {counts['timeout']}, mismatches vs gguf-py {counts['mismatch']}; "
          f"slowest load {slowest[0] * 1e3:.1f} ms (example {slowest[1]}), peak RSS {peak_mb:.0f} MB, {elapsed:.0f} s total")
    return 1 if counts["other"] or counts["timeout"] or counts["mismatch"] else 0


if __name__ == "__main__":
    sys.exit(main())
