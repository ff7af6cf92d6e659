"""NUMA topology from /sys/devices/system/node, and worker pools pinned to a node's CPUs.

On a two-socket machine each socket reads its local RAM at full speed and the other's at about half.
ktx splits every expert's intermediate dimension across the nodes (ShardedExperts): node n's workers run
only their slice, and the slices of the weights are different memory, so nothing is replicated.
"""

from __future__ import annotations

import os
from pathlib import Path

NODE_ROOT = Path("/sys/devices/system/node")


def parse_cpulist(text: str) -> list[int]:
    """'0-3,8,10-11' -> [0, 1, 2, 3, 8, 10, 11]"""
    cpus: list[int] = []
    for part in text.strip().split(","):
        if not part:
            continue
        lo, _, hi = part.partition("-")
        cpus.extend(range(int(lo), int(hi or lo) + 1))
    return cpus


def numa_nodes(root: Path = NODE_ROOT) -> list[list[int]]:
    """CPUs of each NUMA node that has any (usable by this process); one node with all CPUs if unknown."""
    allowed = set(os.sched_getaffinity(0))
    nodes = []
    for d in sorted(root.glob("node[0-9]*"), key=lambda p: int(p.name[4:])):
        try:
            cpus = [c for c in parse_cpulist((d / "cpulist").read_text()) if c in allowed]
        except (OSError, ValueError):
            continue
        if cpus:
            nodes.append(cpus)
    return nodes or [sorted(allowed)]


def pinned_pool(cpus: list[int], n_threads: int):
    """A kernels_cpu WorkerPool whose threads are pinned to `cpus` (each worker pins itself)."""
    from ktx.kernels_cpu import WorkerPool

    pool = WorkerPool(n_threads)
    pool.submit(lambda wid, n: os.sched_setaffinity(0, cpus)).wait()
    return pool
