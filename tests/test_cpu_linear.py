"""ktx.kernels_cpu.QuantLinear against gguf.quants.dequantize and float64 numpy.

Two-sided like test_kernels_cpu.py: tight against a float64 matmul on activations quantized the documented
way (int8 per 32, per 256 for K-quant prefill: `q8_emulate`, `act_block`), so any layout, padding or
indexing bug fails; and against the exact float64 matmul within `quant_error_bound` (with the activations' block),
the error int8 activations are allowed to cause.
"""
from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
from hypothesis import given, settings
from hypothesis import strategies as st
from test_kernels_cpu import PATHS, deq, per256_forced, q8_emulate, rand_raw

import ktx.kernels_cpu.linear as linear
from ktx.errors import KtxError
from ktx.kernels_cpu import QuantLinear, WorkerPool
from ktx.kernels_cpu.moe import per256_tiles
from ktx.kernels_cpu.quantize import quant_error_bound
from ktx.kernels_cpu.repack import LAYOUTS

BLOCK = {QT.Q8_0: 32, QT.Q4_0: 32, QT.Q5_0: 32, QT.Q4_K: 256, QT.Q5_K: 256, QT.Q6_K: 256}
# every type on the best path; on the others one of each kind (byte plane with zero 128, nibbles + mins, G = 16)
CASES = [(PATHS[-1], t) for t in LAYOUTS] + [(p, t) for p in PATHS[:-1] for t in (QT.Q8_0, QT.Q4_K, QT.Q6_K)]


@pytest.fixture(scope="module")
def pool():
    with WorkerPool(2) as p:
        yield p


def act_block(qt, T, K, p256=None):
    """Activation block as linear.py documents it: where the per-256 tiles run (p256; None: this CPU's choice,
    moe.per256_tiles), per 256 for prefill (T >= 2) of K-quants (K a multiple of 256), else per 32."""
    p256 = per256_tiles() if p256 is None else p256
    return 256 if p256 and T >= 2 and K % 256 == 0 and qt in (QT.Q4_K, QT.Q5_K, QT.Q6_K) else 32


def check(y, x, Ws, block=32):
    """y [B, T, R] from the kernel vs float64 references; x [B, T, K], Ws B x [R, K] float64; block: the
    activations' quantization block (act_block)."""
    for b, W in enumerate(Ws):
        xb = x[b].astype(np.float64)
        emulated = q8_emulate(xb, block) @ W.T  # [T, R]
        exact = xb @ W.T
        slack = 1e-5 * (np.abs(xb) @ np.abs(W).T) + 1e-30  # float32 accumulation over K
        assert np.all(np.abs(y[b] - emulated) <= slack + 1e-6 * np.abs(emulated).max()), \
            f"matrix {b}: kernel differs from the int8-activation reference"
        bound = np.stack([quant_error_bound(xt, np.abs(W), block) for xt in xb])  # [T, R]
        assert np.all(np.abs(y[b] - exact) <= bound + slack), f"matrix {b}: error above the int8 bound"


@pytest.mark.parametrize("path,qt", CASES, ids=[f"{p}-{t.name}" for p, t in CASES])
@settings(max_examples=5, deadline=None)
@given(data=st.data())
def test_matches_dequantized_matmul(pool, path, qt, data):
    rows = data.draw(st.one_of(st.integers(1, 200), st.sampled_from([64, 128, 576])), "rows")
    cols = BLOCK[qt] * data.draw(st.integers(1, 2 if BLOCK[qt] == 256 else 8), "blocks")
    T = data.draw(st.sampled_from([1, 1, 2, 3, 4, 5, 6, 7, 8, 9, 33]), "T")
    B = data.draw(st.sampled_from([None, 1, 3]), "B")  # None: a plain [R, K] matrix
    threads = data.draw(st.sampled_from(["inline", "pool"]), "threads")
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), "seed"))
    raw = rand_raw(rng, qt, B or 1, rows, cols)  # [B, R, row_bytes]
    x = rng.standard_normal((B or 1, T, cols)).astype(np.float32)
    x[:, :, :32] *= 100  # one loud block: per-32 scales must not leak across blocks
    op = QuantLinear(raw if B else raw[0], qt, rows, cols, pool, path=path, name="blk.0.attn_q.weight")
    p256 = data.draw(st.booleans(), "per256 tiles")
    saved = linear.INLINE_MACS
    linear.INLINE_MACS = 0 if threads == "pool" else 1 << 62
    try:
        with per256_forced(p256):
            y = op(x if B else x[0])
    finally:
        linear.INLINE_MACS = saved
    assert y.dtype == np.float32 and y.shape == ((B, T, rows) if B else (T, rows))
    check(y if B else y[None], x, [deq(r, qt) for r in raw], act_block(qt, T, cols, p256))


def test_repeated_calls_pool_and_inline_agree(pool):
    """Back-to-back pool calls: a worker that wakes late must not touch the next call's items or scratch."""
    rng = np.random.default_rng(3)
    R, K = 300, 512
    raw = rand_raw(rng, QT.Q4_K, 1, R, K)[0]
    op = QuantLinear(raw, QT.Q4_K, R, K, pool)
    xs = [rng.standard_normal((T, K)).astype(np.float32) for T in (1, 5, 1, 2, 1, 40, 1) * 6]
    saved = linear.INLINE_MACS
    try:
        linear.INLINE_MACS = 0
        pooled = [op(x) for x in xs]
        linear.INLINE_MACS = 1 << 62
        inline = [op(x) for x in xs]
    finally:
        linear.INLINE_MACS = saved
    for a, b in zip(pooled, inline):
        np.testing.assert_array_equal(a, b)
    check(pooled[5][None], xs[5][None], [deq(raw, QT.Q4_K)], act_block(QT.Q4_K, 40, K))


@pytest.mark.parametrize("qt,B,R,K", [(QT.Q8_0, 16, 500, 128), (QT.Q6_K, None, 3000, 256)])
def test_decode_items_of_several_row_blocks(pool, qt, B, R, K):
    """Short-K decode: work items hold several row blocks (attn_k_b-like [16, 500, 128]: 3 of 8 blocks per
    item, the last one partial, rows padded), each tile prefetching the next; every row must still be right."""
    rng = np.random.default_rng(11)
    raw = rand_raw(rng, qt, B or 1, R, K)
    op = QuantLinear(raw if B else raw[0], qt, R, K, pool)
    n_rb = -(-R // 64)
    assert op._item_blocks(1, K, n_rb, 4) > 1  # the case under test
    x = rng.standard_normal((B or 1, 1, K)).astype(np.float32)
    saved = linear.INLINE_MACS
    try:
        for inline in (0, 1 << 62):
            linear.INLINE_MACS = inline
            y = op(x if B else x[0])
            check(y if B else y[None], x, [deq(r, qt) for r in raw])
    finally:
        linear.INLINE_MACS = saved


@settings(max_examples=6, deadline=None)
@given(qt=st.sampled_from([QT.Q8_0, QT.Q4_K]), blocks=st.integers(0, 4), rows=st.integers(1, 130),
       T=st.sampled_from([1, 3, 40]), seed=st.integers(0, 2**32 - 1))
def test_row_range_is_those_rows_of_the_matrix(pool, qt, blocks, rows, T, seed):
    """A row range shares the parent's repacked arrays (MLA's K/V expansion runs heads h0:h1 of one derived weight):
    y must be x @ W[r0:r1]^T for the rows of the dequantized matrix, whatever follows r1 in the parent."""
    rng = np.random.default_rng(seed)
    r0 = QuantLinear.ROW_ALIGN * blocks
    R, K = r0 + rows + int(rng.integers(0, 100)), 256
    raw = rand_raw(rng, qt, 1, R, K)[0]
    op = QuantLinear(raw, qt, R, K, pool)
    view = op.row_range(r0, r0 + rows)
    x = rng.standard_normal((T, K)).astype(np.float32)
    saved = linear.INLINE_MACS
    try:
        linear.INLINE_MACS = 0  # through the pool
        y = view(x)
    finally:
        linear.INLINE_MACS = saved
    assert y.shape == (T, rows) and view.nbytes == 0
    check(y[None], x[None], [deq(raw, qt)[r0:r0 + rows]], act_block(qt, T, K))
    with pytest.raises(KtxError, match="row_range"):
        op.row_range(r0 + 1, r0 + rows)


def test_reference_path_and_float_weights(pool):
    rng = np.random.default_rng(4)
    for qt in (QT.Q6_K, QT.F16):
        raw = rand_raw(rng, qt, 2, 70, 256)  # [2, 70, row_bytes]
        x = rng.standard_normal((2, 3, 256)).astype(np.float32)
        op = QuantLinear(raw, qt, 70, 256, pool, path="reference" if qt == QT.Q6_K else "auto")
        assert op.path == "reference" and "reference" in op.kernel_path
        exact = np.stack([x[b].astype(np.float64) @ deq(raw[b], qt).T for b in range(2)])
        np.testing.assert_allclose(op(x), exact, rtol=1e-4, atol=1e-5 * np.abs(exact).max())


def test_supports_and_metadata(pool):
    assert QuantLinear.supports(QT.Q4_K, 129280, 2048) and QuantLinear.supports(QT.Q8_0, 512, 128)
    assert QuantLinear.supports(int(QT.Q6_K), 1, 256)
    assert not QuantLinear.supports(QT.Q4_K, 64, 128)  # 128 is not a multiple of the 256 K-quant block
    assert not QuantLinear.supports(QT.Q8_0, 64, 48)
    assert not QuantLinear.supports(QT.F16, 64, 256) and not QuantLinear.supports(QT.Q2_K, 64, 256)
    assert not QuantLinear.supports(12345, 64, 256)
    raw = rand_raw(np.random.default_rng(5), QT.Q4_K, 1, 100, 512)[0]
    op = QuantLinear(raw, QT.Q4_K, 100, 512, pool)
    assert "Q4_K" in op.kernel_path
    # 100 rows pad to 128: 0.5 B codes + 2/256 d + 1/32 sc + 2/256 dmin + 1/32 m per weight
    assert op.nbytes == 128 * 512 * (0.5 + 2 / 256 + 1 / 32 + 2 / 256 + 1 / 32)


def test_bad_inputs_raise_ktxerror(pool):
    rng = np.random.default_rng(6)
    raw = rand_raw(rng, QT.Q8_0, 2, 64, 64)  # [2, 64, 68]
    plain = QuantLinear(raw[0], QT.Q8_0, 64, 64, pool, name="blk.1.attn_output.weight")
    heads = QuantLinear(raw, QT.Q8_0, 64, 64, pool, name="blk.1.attn_k_b.weight")
    good = rng.standard_normal((3, 64)).astype(np.float32)
    bad = [(plain, good.astype(np.float64)), (plain, good[:, :32]), (plain, good[0]), (plain, good[None]),
           (plain, list(good)), (heads, good), (heads, np.stack([good] * 3)), (heads, good[None].astype(np.float16))]
    for op, x in bad:
        with pytest.raises(KtxError, match="input should be float32"):
            op(x)
    with pytest.raises(KtxError, match="raw bytes"):
        QuantLinear(raw[0], QT.Q8_0, 64, 96, pool)
    with pytest.raises(KtxError, match="raw bytes"):
        QuantLinear(raw[0].astype(np.int8), QT.Q8_0, 64, 64, pool)
    with pytest.raises(KtxError, match="unknown CPU kernel path"):
        QuantLinear(raw[0], QT.Q8_0, 64, 64, pool, path="fast")
    with pytest.raises(KtxError, match="int8 CPU kernels"):
        QuantLinear(raw[0], QT.Q8_0, 64, 48, pool, path="portable")
    with pytest.raises(KtxError, match="unknown GGML type"):
        QuantLinear(raw[0], 12345, 64, 64, pool)
    assert plain(np.zeros((0, 64), np.float32)).shape == (0, 64)
