"""MoEExperts.submit refuses malformed calls with a KtxError before any kernel touches memory: ids that a cast
would wrap or truncate into a valid expert, 1-D routing, mismatched shapes, non-finite inputs."""
import numpy as np
import pytest
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
