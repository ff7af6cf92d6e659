"""The torch-free scheduler, and the scheduled model paths against the reference path.

Placements exercised (no GPU here: the "GPU" side is torch on the CPU, so the split and overlap logic run):
CPU-only kernels, hot experts on the GPU side, NUMA shards forced to 2 on this one-node machine, and
selective experts. References: the torch float path (`experts="reference"`) and plain numpy.
"""

import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import ktx
from ktx.convert import convert_hf_to_gguf
from ktx.placement import save_profile
from ktx.scheduler import Scheduler, select_top, split_routing
from tiny_models import make_deepseek_v3, router_margins

# int8 activations (per 32 values) in the CPU kernels: ~0.4% relative error per expert output, which
# reaches the logits (|logit| up to ~15 here) as up to ~0.1 absolute.
KERNEL_TOL = 0.25


def _same_top1(got, ref, ok):
    """Same top token wherever routing is clear and the reference's top-2 gap exceeds the kernel tolerance."""
    top2 = np.sort(ref, -1)[:, -2:]
    clear = ok & (top2[:, 1] - top2[:, 0] > 2 * KERNEL_TOL)
    return clear.mean() > 0.5 and (got.argmax(-1) == ref.argmax(-1))[clear].all()


def test_scheduler_imports_no_torch():
    code = "import sys, ktx.scheduler; assert 'torch' not in sys.modules, sorted(m for m in sys.modules if 'torch' in m)"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_split_routing_partitions_slots():
    rng = np.random.default_rng(0)
    ids = rng.integers(-1, 16, size=(20, 4)).astype(np.int32)
    w = rng.random((20, 4)).astype(np.float32)
    mask = np.zeros(16, bool)
    mask[[1, 5, 7]] = True
    s = split_routing(ids, w, mask)
    for t in range(20):
        for j in range(4):
            e = ids[t, j]
            hot = e >= 0 and mask[e]
            assert s.gpu_ids[t, j] == (e if hot else -1) and s.cpu_ids[t, j] == (-1 if hot else e)
            assert s.gpu_w[t, j] + s.cpu_w[t, j] == w[t, j]


def test_select_top_keeps_largest_weights_unrenormalised():
    ids = np.array([[3, 1, 2, 0]], np.int32)
    w = np.array([[0.1, 0.4, 0.2, 0.3]], np.float32)
    ids2, w2 = select_top(ids, w, 2)
    assert ids2.tolist() == [[1, 0]] and np.allclose(w2, [[0.4, 0.3]])


class _SlowJob:
    def __init__(self, y, delay):
        self.y, self.t_done = y, None
        self._t = threading.Thread(target=self._run, args=(delay,))
        self._t.start()

    def _run(self, delay):
        time.sleep(delay)
        self.t_done = time.perf_counter()

    def wait(self):
        self._t.join()
        return self.y


class _SlowBackend:
    def submit(self, x, ids, w):
        return _SlowJob(np.full_like(x, 2.0), 0.05)


def test_submit_returns_at_once_and_overlap_is_measured():
    sched = Scheduler({0: _SlowBackend()})
    x = np.ones((3, 8), np.float32)
    t0 = time.perf_counter()
    sched.submit(0, x, np.zeros((3, 2), np.int32), np.ones((3, 2), np.float32))
    assert time.perf_counter() - t0 < 0.04  # did not wait for the CPU job
    time.sleep(0.03)  # "GPU" work
    sched.gpu_done(0)
    assert np.all(sched.wait(0) == 2.0)
    tl = sched.new_step()
    assert tl.layers == 1 and tl.cpu_busy >= 0.05 and 0.02 <= tl.gpu_busy < tl.cpu_busy
    assert tl.overlap_fraction > 0.9


@pytest.fixture(scope="module")
def q8_model(tmp_path_factory):
    d = tmp_path_factory.mktemp("sched")
    hf_dir, model = make_deepseek_v3(d / "hf", seed=5, hidden_size=256, moe_intermediate_size=512)
    path = convert_hf_to_gguf(hf_dir, d / "m-q8_0.gguf", "q8_0")
    ids = np.random.default_rng(4).integers(4, model.config.vocab_size, size=32).tolist()
    ref = ktx.load(path, cache_len=64, experts="reference").logits(ids)
    return path, ids, ref, router_margins(model, ids) > 1e-2, d


def test_cpu_kernel_path_matches_reference(q8_model):
    path, ids, ref, ok, _ = q8_model
    m = ktx.load(path, cache_len=64)
    assert "reference" not in m.net.experts[1].kernel_path
    got = m.logits(ids)
    assert np.abs(got - ref).max() <= KERNEL_TOL
    assert _same_top1(got, ref, ok)
    assert m.net.scheduler.timeline.layers == 2  # both MoE layers went through the scheduler


def test_hot_experts_on_gpu_side_match_reference(q8_model):
    path, ids, ref, ok, d = q8_model
    rec = ktx.load(path, cache_len=64, experts="reference")
    rec.net.routing_counts = {}
    rec.logits(ids)
    save_profile(d / "profile.json", rec.net.routing_counts, path)
    m = ktx.load(path, cache_len=64, gpu_experts=3, routing_profile=d / "profile.json")
    for layer, mask in m.net.scheduler.gpu_mask.items():
        hottest = np.argsort(-rec.net.routing_counts[layer], kind="stable")[:3]
        assert mask.sum() == 3 and mask[hottest].all()
    got = m.logits(ids)
    assert np.abs(got - ref).max() <= KERNEL_TOL
    assert _same_top1(got, ref, ok)


def test_two_numa_shards_give_the_same_output(q8_model):
    path, ids, _, _, _ = q8_model
    one = ktx.load(path, cache_len=64).logits(ids)
    m = ktx.load(path, cache_len=64, numa_shards=2)
    assert m.net.experts[1].kernel_path.startswith("2 shards")
    two = m.logits(ids)
    assert np.abs(two - one).max() <= 1e-3 * np.abs(one).max()  # only float summation order differs


def test_experts_per_token_drops_smallest_contributions(q8_model):
    path, ids, ref, _, _ = q8_model
    full = ktx.load(path, cache_len=64, experts="reference")
    m = ktx.load(path, cache_len=64, experts="reference", experts_per_token=1)
    assert m.net.scheduler.experts_per_token == 1
    got = m.logits(ids)
    assert not np.allclose(got, ref)  # it changes the model ...
    assert np.abs(got - full.logits(ids)).max() < 0.5 * np.abs(ref).max()  # ... but stays close to it
    with pytest.raises(ktx.KtxError):
        ktx.load(path, experts="reference", experts_per_token=9)
