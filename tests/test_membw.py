"""kernels_cpu.membw: the read loops behind the DRAM roofline must read every byte they time."""
import numpy as np
import pytest

from ktx.kernels_cpu import WorkerPool, membw


@pytest.mark.parametrize("ahead", membw.AHEADS)
def test_read_lines_sums_every_line(ahead):
    rng = np.random.default_rng(ahead)
    a = rng.integers(0, 2**63, size=8 * 64 + 8, dtype=np.uint64)
    base = (a.ctypes.data + 63) // 64 * 64
    first = (base - a.ctypes.data) // 8
    got = membw.read_lines(base, 64, ahead)  # 64 lines = 512 u64
    want = a[first:first + 512].sum(dtype=np.uint64)  # numpy wraps mod 2^64 like the i64 lanes
    assert np.uint64(got % 2**64) == want


def test_bandwidth_reports_a_tried_distance():
    with WorkerPool(2) as pool:
        gbps, ahead = membw.dram_read_gbps(pool, 8 << 20, reps=1)
    assert gbps > 0 and ahead in membw.AHEADS


def test_read_probe_reads_its_whole_buffer():
    n_bytes = 8 << 20
    with WorkerPool(2) as pool:
        probe = membw.ReadProbe(pool, n_bytes)
        gbps = probe.gbps(0.0)
    assert gbps > 0
    assert probe.last_sum == n_bytes // 8  # the buffer holds ones: one per 8-byte word read
