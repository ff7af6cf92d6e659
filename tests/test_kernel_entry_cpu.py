"""MoEExperts.submit refuses malformed calls with a KtxError before any kernel touches memory: ids that a cast
would wrap or truncate into a valid expert, 1-D routing, mismatched shapes, non-finite inputs; and the slot plan
the MoE loops run on, against the same layout written out with numpy."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from gguf import GGMLQuantizationType as QT

from ktx.errors import KtxError
from ktx.kernels_cpu import MoEExperts, WorkerPool
from test_kernels_cpu import rand_raw

H, I, E = 256, 256, 4


@pytest.fixture(scope="module")
def experts():
    rng = np.random.default_rng(0)
    with WorkerPool(2) as pool:
        mats = [(rand_raw(rng, QT.Q8_0, E, R, K), QT.Q8_0) for R, K in ((I, H), (I, H), (H, I))]
        yield MoEExperts(*mats, hidden=H, inter=I, pool=pool)


X = np.ones((2, H), np.float32)
W2 = np.ones((2, 2), np.float32)


@pytest.mark.parametrize("ids, w, x, match", [
    (np.array([[2**32 + 1, 0], [1, 2]], np.int64), W2, X, "out of range"),  # would wrap to 1 as int32
    (np.array([[1.7, 0.0], [1.0, 2.0]]), W2, X, "must be integers"),  # would truncate to 1
    (np.array([[-0.5, 0.0], [1.0, 2.0]]), W2, X, "must be integers"),
    (np.array([[E, 0], [1, 2]]), W2, X, "out of range"),
    (np.array([[-2, 0], [1, 2]]), W2, X, "out of range"),
    (np.array([0, 1]), np.ones(2, np.float32), X, "ids and w \\[T, k\\]"),  # 1-D routing
    (np.array([[0, 1]]), np.ones((1, 2), np.float32), X, "ids and w \\[T, k\\]"),  # T mismatch
    (np.array([[0, 1], [1, 2]]), W2, np.ones((2, H + 1), np.float32), "x \\[T, 256\\]"),
    (np.array([[0, 1], [1, 2]]), np.array([[1, np.nan], [1, 1]], np.float32), X, "NaN/inf"),
    (np.array([[0, 1], [1, 2]]), W2, np.full((2, H), np.inf, np.float32), "NaN/inf"),
])
def test_submit_rejects(experts, ids, w, x, match):
    with pytest.raises(KtxError, match=match):
        experts.submit(x, ids, w)


def test_valid_calls_still_run(experts):
    y = experts.forward(X, np.array([[0, -1], [3, 2]], np.int64), W2)
    assert y.shape == (2, H) and np.isfinite(y).all()


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 12), st.integers(1, 4), st.integers(2, 9), st.booleans(), st.integers(0, 2**31 - 1))
def test_slot_plan_matches_a_numpy_sort(T, k, n_exp, amx, seed):
    """plan_slots against the layout written out with numpy: stable sort of (t, j) by expert, per-expert padding to the
    token tile (1 when no expert has two tokens, else 4) or to 16 for AMX experts (more than
    MIN_TOKENS_PER_EXPERT tokens, in a batch averaging more than that)."""
    from ktx.kernels_cpu import amx as amx_mod
    from ktx.kernels_cpu.moe_loops import plan_slots

    rng = np.random.default_rng(seed)
    ids = rng.integers(-1, n_exp, (T, k)).astype(np.int32)
    w = rng.random((T, k)).astype(np.float32)
    m = amx_mod.MIN_TOKENS_PER_EXPERT
    exp_e, exp_s0, exp_n, exp_amx, slot_tok, slot_w, nt, routed = plan_slots(ids, w, n_exp, 1, 4, m if amx else 1 << 62, 16)
    flat = ids.reshape(-1)
    order = np.argsort(flat, kind="stable")
    order = order[flat[order] >= 0]
    want_e, counts = np.unique(flat[order], return_counts=True)
    want_nt = 1 if counts.size == 0 or counts.max() == 1 else 4
    want_amx = (counts > m) & (counts.mean() > m) if amx and counts.size else np.zeros(counts.shape, bool)
    tile = np.where(want_amx, 16, want_nt)
    padded = -(-counts // tile) * tile
    assert nt == want_nt and routed == len(order)
    assert exp_e.tolist() == want_e.tolist() and exp_n.tolist() == counts.tolist()
    assert exp_s0.tolist() == (np.cumsum(padded) - padded).tolist() and exp_amx.astype(bool).tolist() == want_amx.tolist()
    assert len(slot_tok) == padded.sum()
    for i, e in enumerate(want_e):
        pairs = order[flat[order] == e]
        s0, n = exp_s0[i], counts[i]
        assert slot_tok[s0:s0 + n].tolist() == (pairs // k).tolist()
        assert slot_w[s0:s0 + n].tolist() == w.reshape(-1)[pairs].tolist()
        assert (slot_tok[s0 + n:s0 + padded[i]] == -1).all() and (slot_w[s0 + n:s0 + padded[i]] == 0).all()


def test_numba_cache_folder_follows_the_kernel_sources(tmp_path):
    """ktx keys Numba's cache by a hash of kernels_cpu's sources (under KTX_CACHE), in either import order; a
    NUMBA_CACHE_DIR the user set is left alone."""
    import hashlib
    import os
    import subprocess
    import sys
    from pathlib import Path

    import ktx.kernels_cpu

    src = Path(ktx.kernels_cpu.__file__).parent
    digest = hashlib.sha256()
    for f in sorted(src.glob("*.py")):
        digest.update(f.name.encode() + f.read_bytes())
    want = str(tmp_path / "numba" / digest.hexdigest()[:16])
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_CACHE_DIR"} | {"KTX_CACHE": str(tmp_path)}
    show = "import numba.core.config as c; print(c.CACHE_DIR)"
    for first in ("import ktx", "import numba; import ktx"):
        out = subprocess.run([sys.executable, "-c", f"{first}; {show}"], env=env, capture_output=True, text=True)
        assert out.stdout.strip() == want, (first, out.stdout, out.stderr)
    out = subprocess.run([sys.executable, "-c", f"import ktx; {show}"], env=env | {"NUMBA_CACHE_DIR": str(tmp_path / "mine")},
                         capture_output=True, text=True)
    assert out.stdout.strip() == str(tmp_path / "mine")
