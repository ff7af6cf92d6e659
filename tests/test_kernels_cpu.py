"""ktx.kernels_cpu against independent references: /proc/cpuinfo, gguf.quants.dequantize and float64 numpy.

The MoE check is two-sided:
  1. against a float64 reference that quantizes activations the documented way (int8 per 32, numpy code
     written here): tight, so any layout, scale or offset bug fails;
  2. against the exact float64 reference, within the worst-case bound that int8 activation quantization
     implies (derived in `_bound`): the error the kernels are allowed to have.
"""
from __future__ import annotations

import contextlib
import os

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as QT
from gguf.quants import dequantize
from hypothesis import given, settings
from hypothesis import strategies as st
from numba import njit

from ktx.kernels_cpu import MoEExperts, WorkerPool, cpu_features
from ktx.kernels_cpu.cpu_features import cpuinfo_flags
from ktx.kernels_cpu.moe import per256_tiles
from ktx.kernels_cpu.quantize import quantize_row, quantize_row256
from ktx.kernels_cpu.repack import LAYOUTS, decode_blocks, dequantize_fields, interleave
from ktx.kernels_cpu.vec import axpy, silu_mul
from ktx.errors import KtxError

_SCALE_OFFSETS = {QT.Q8_0: [0], QT.Q4_0: [0], QT.Q5_0: [0], QT.Q4_K: [0, 2], QT.Q5_K: [0, 2], QT.Q6_K: [208]}
FEAT = cpu_features()
PATHS = ["portable"] + (["avx2"] if FEAT.avx2 else []) + (["vnni"] if FEAT.avx512_vnni and FEAT.avx512bw else [])


@pytest.fixture(scope="module")
def pool():
    with WorkerPool(2) as p:
        yield p


def rand_raw(rng, qt, E, R, K, scale=2e-3):
    """Random valid GGUF rows [E, R, row_bytes]: random codes, small finite f16 scales."""
    if qt in (QT.F32, QT.F16, QT.BF16):
        w = (rng.standard_normal((E, R, K)) * 0.05).astype(np.float32)
        if qt == QT.F32:
            return w.view(np.uint8)
        if qt == QT.F16:
            return w.astype(np.float16).view(np.uint8)
        return (w.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)
    bs, ts = GGML_QUANT_SIZES[qt]
    raw = rng.integers(0, 256, size=(E, R, K // bs * ts), dtype=np.uint8)
    blocks = raw.reshape(-1, ts)
    for o in _SCALE_OFFSETS[qt]:
        blocks[:, o:o + 2] = (rng.random(len(blocks)) * scale).astype(np.float16).view(np.uint8).reshape(-1, 2)
    return raw


def deq(raw, qt):  # [R, row_bytes] -> float64 [R, K], independent of the code under test
    if qt == QT.F32:
        return raw.view(np.float32).astype(np.float64)
    if qt == QT.F16:
        return raw.view(np.float16).astype(np.float64)
    if qt == QT.BF16:
        return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    return dequantize(raw, qt).astype(np.float64)


def q8_emulate(x, block=32):
    """int8 per block (32, or 256 for quantize_row256) as documented in quantize.py, written independently:
    float32 amax/127, round(x * (1/d))."""
    b = x.astype(np.float32).reshape(x.shape[0], -1, block)
    d = np.abs(b).max(axis=2, keepdims=True) / np.float32(127)
    inv = np.where(d > 0, np.float32(1) / np.where(d > 0, d, 1), np.float32(0)).astype(np.float32)
    q = np.clip(np.rint(b * inv), -127, 127)
    return (q * d).reshape(x.shape).astype(np.float64)


def silu(v):
    return v / (1 + np.exp(-v))


def _routed(ids):
    """(token, slot, expert) of every routed choice (expert -1 = none)."""
    for t in range(ids.shape[0]):
        for j in range(ids.shape[1]):
            if ids[t, j] >= 0:
                yield t, j, ids[t, j]


def reference(x, ids, w, Ws, quantize_acts, blocks=(32, 32)):
    """float64 y [T, H]; with quantize_acts, x and h go through q8_emulate first (blocks: x's and h's)."""
    y = np.zeros(x.shape, np.float64)
    for t, j, e in _routed(ids):
        Wg, Wu, Wd = Ws[e]
        xt = x[t:t + 1].astype(np.float64)
        if quantize_acts:
            xt = q8_emulate(xt, blocks[0])
        h = silu(xt @ Wg.T) * (xt @ Wu.T)
        if quantize_acts:
            h = q8_emulate(h, blocks[1])
        y[t] += w[t, j] * (h @ Wd.T)[0]
    return y


def _bound(x, ids, w, Ws, blocks=(32, 32)):
    """Worst case |y_kernel - y_exact| from int8 activations, per element of y (blocks: x's and h's, 32|256).

    x -> xq: |dx| <= d/2 per element, so |d g_i| <= bg_i = sum_b d_b/2 sum_{k in b} |Wg[i,k]| (same for u).
    h = silu(g) u with |silu'| <= 1.1: |dh_i| <= 1.1 bg_i (|u_i| + bu_i) + (|silu(g_i)| + 1.1 bg_i) bu_i;
    h is then quantized per block: + (max_b |h| + max_b dh) / 254. Down sums |Wd| times that; y sums |w| times.
    A relative 1e-5 of sum |w||Wd||h| covers float32 accumulation."""
    bx, bh = blocks
    y = np.zeros(x.shape, np.float64)
    for t, j, e in _routed(ids):
        Wg, Wu, Wd = Ws[e]
        xt = x[t].astype(np.float64)
        dx = np.repeat(np.abs(xt.reshape(-1, bx)).max(axis=1) / 127 / 2, bx)
        bg, bu = np.abs(Wg) @ dx, np.abs(Wu) @ dx
        g, u = Wg @ xt, Wu @ xt
        dh = 1.1 * bg * (np.abs(u) + bu) + (np.abs(silu(g)) + 1.1 * bg) * bu
        h = silu(g) * u
        hq = np.repeat((np.abs(h).reshape(-1, bh).max(axis=1) + dh.reshape(-1, bh).max(axis=1)) / 254, bh)
        y[t] += abs(w[t, j]) * (np.abs(Wd) @ (dh + hq) + 1e-5 * (np.abs(Wd) @ np.abs(h)))
    return y


def test_cpu_features_match_cpuinfo():
    flags = cpuinfo_flags()
    if not flags:
        pytest.skip("no /proc/cpuinfo flags on this system")
    f = cpu_features()
    for name, flag in [("avx2", "avx2"), ("avx512f", "avx512f"), ("avx512bw", "avx512bw"),
                       ("avx512_vnni", "avx512_vnni"), ("amx_tile", "amx_tile"), ("amx_int8", "amx_int8")]:
        assert getattr(f, name) == (flag in flags), name
    assert "cpu:" in f.describe()
    info = open("/proc/cpuinfo").read()
    vendor = info.split("vendor_id", 1)[1].split(":", 1)[1].split()[0]
    family = int(info.split("cpu family", 1)[1].split(":", 1)[1].split()[0])
    assert f.split_512 == (vendor == "AuthenticAMD" and family == 0x19 and "avx512f" in flags)  # Zen 4 only


@pytest.mark.parametrize("qt", list(LAYOUTS))
def test_layout_fields_dequantize_exactly(qt):
    rng = np.random.default_rng(int(qt))
    raw = rand_raw(rng, qt, 1, 16, 512, scale=1.0)[0]
    f = decode_blocks(raw, qt, 512)
    np.testing.assert_array_equal(dequantize_fields(f, LAYOUTS[qt]), dequantize(raw, qt).astype(np.float32))


def _code_at(codes, bits, r, k):
    """Code of row r, column k read from a repacked code run [R/16, ., 64], bit by bit as the repack.py
    docstring draws it (written out per element here, independent of pack_codes / unpack_codes)."""
    rg, i = r // 16, 4 * (r % 16) + k % 4  # byte within a 64-byte vector
    run = codes[rg].reshape(-1)
    if bits == 8:
        return int(run[64 * (k // 4) + i])
    kb = {4: 8, 5: 32, 6: 16}[bits]  # k per code block
    base = (k // kb) * 16 * kb * bits // 8  # byte offset of the block in the row group's run
    s = (k % kb) // 4  # step (4 k) within the block
    lo = (int(run[base + 64 * (s // 2) + i]) >> (4 * (s % 2))) & 15
    if bits == 4:
        return lo
    hb = bits - 4
    hi = (int(run[base + 64 * (kb // 8) + i]) >> (hb * s)) & ((1 << hb) - 1)
    return lo | hi << 4


@pytest.mark.parametrize("qt", list(LAYOUTS), ids=lambda q: q.name)
def test_repacked_arrays_dequantize_exactly_and_size(qt):
    """The kernel arrays (packed code runs + per-16-row scale vectors) against gguf-py, element by element
    on a sample, exactly; and their size per weight: the packed 5/6-bit runs at GGUF size or within the
    K-quant scale unpacking (Q6_K 0.82 B/weight as GGUF's 210/256, no longer 1.07)."""
    rng = np.random.default_rng(int(qt) + 7)
    R, K = 32, 512
    raw = rand_raw(rng, qt, 1, R, K, scale=1.0)[0]
    lay = LAYOUTS[qt]
    a = interleave(decode_blocks(raw, qt, K), lay)
    W = dequantize(raw, qt).astype(np.float32)  # [R, K]
    for r, k in zip(rng.integers(0, R, 600), rng.integers(0, K, 600)):
        rg, rr = r // 16, r % 16
        q = _code_at(a["codes"], lay.bits, r, k)
        w = np.float32(q - lay.zero) * np.float32(a["d"][rg, k // lay.S, rr])
        if lay.sc:
            w *= np.float32(a["sc"][rg, k // lay.G, rr])
        if lay.mins:
            w -= np.float32(a["dmin"][rg, k // 256, rr]) * np.float32(a["m"][rg, k // 32, rr])
        assert w == W[r, k], (r, k)
    nbytes = sum(v.nbytes for v in a.values())
    assert nbytes == R * K * lay.bytes_per_weight()
    bs, ts = GGML_QUANT_SIZES[qt]
    kquant_scales = (8 + 8 - 12) / 256 if lay.mins else 0  # 6-bit sc, m (12 B per 256) stored as bytes (16 B)
    assert nbytes / (R * K) == pytest.approx(ts / bs + kquant_scales)


@contextlib.contextmanager
def per256_forced(on: bool):
    """Run the per-256 K-quant prefill tiles (on) or the per-32 ones whatever the CPU (moe.per256_tiles)."""
    old = os.environ.get("KTX_PER256_TILES")
    os.environ["KTX_PER256_TILES"] = "1" if on else "0"
    try:
        yield
    finally:
        if old is None:
            del os.environ["KTX_PER256_TILES"]
        else:
            os.environ["KTX_PER256_TILES"] = old


def act_blocks(ids, t_gu, t_down, p256=None, H=256, I=256):
    """Activation blocks (x's, h's) as moe.py documents them: per 32, except, where the per-256 tiles run (p256;
    None: this CPU's choice, moe.per256_tiles), in a prefill (some expert has two tokens) over K (H for gate and
    up, I for down) a multiple of 256 whose weights are K-quants (packed or widened alike): per 256
    (quantize_row256)."""
    routed = ids[ids >= 0]
    counts = np.bincount(routed) if routed.size else np.zeros(1, np.int64)
    prefill = counts.max() > 1 and (per256_tiles() if p256 is None else p256)

    def per256(t, K):
        return prefill and K % 256 == 0 and t in (QT.Q4_K, QT.Q5_K, QT.Q6_K)
    return (256 if per256(t_gu, H) else 32), (256 if per256(t_down, I) else 32)


CASES = [(p, QT.Q4_K, QT.Q4_K) for p in PATHS] + [(p, QT.Q8_0, QT.Q8_0) for p in PATHS] + \
        [(p, QT.Q4_K, QT.Q6_K) for p in PATHS] + \
        [(PATHS[-1], t, t) for t in (QT.Q4_0, QT.Q5_0, QT.Q5_K, QT.Q6_K)] + \
        [("auto", t, t) for t in (QT.F16, QT.BF16, QT.F32)] + [("reference", QT.Q4_K, QT.Q6_K)]


@pytest.mark.parametrize("path,t_gu,t_down", CASES, ids=[f"{p}-{a.name}-{b.name}" for p, a, b in CASES])
@settings(max_examples=4, deadline=None)
@given(data=st.data())
def test_moe_forward_matches_reference(pool, path, t_gu, t_down, data):
    H = data.draw(st.sampled_from([256, 512]), "H")
    I = data.draw(st.sampled_from([256, 512]), "I")
    E = data.draw(st.integers(4, 8), "E")
    T = data.draw(st.sampled_from([1, 1, 2, 5, 17, 70]), "T")
    k = data.draw(st.integers(1, 4), "k")
    seed = data.draw(st.integers(0, 2**32 - 1), "seed")
    rng = np.random.default_rng(seed)
    g, u, d = rand_raw(rng, t_gu, E, I, H), rand_raw(rng, t_gu, E, I, H), rand_raw(rng, t_down, E, H, I)
    x = rng.standard_normal((T, H)).astype(np.float32)
    ids = rng.integers(-1, E, size=(T, k)).astype(np.int32)  # repeats across tokens and -1 (skip)
    w = rng.random((T, k)).astype(np.float32)
    p256 = data.draw(st.booleans(), "per256 tiles")
    ex = MoEExperts((g, t_gu), (u, t_gu), (d, t_down), hidden=H, inter=I, pool=pool, path=path)
    with per256_forced(p256):
        y = ex.forward(x, ids, w)
    assert y.shape == (T, H) and y.dtype == np.float32
    Ws = {e: (deq(g[e], t_gu), deq(u[e], t_gu), deq(d[e], t_down)) for e in range(E)}
    exact = reference(x, ids, w, Ws, quantize_acts=False)
    if ex.path == "reference":  # float weights: no activation quantization at all
        np.testing.assert_allclose(y, exact, rtol=1e-4, atol=1e-4 * (np.abs(exact).max() + 1e-30))
        return
    blocks = act_blocks(ids, t_gu, t_down, p256)
    emulated = reference(x, ids, w, Ws, quantize_acts=True, blocks=blocks)
    scale = np.abs(emulated).max() + 1e-30
    assert np.abs(y - emulated).max() <= 2e-3 * scale, "kernel differs from the int8-activation reference"
    assert np.all(np.abs(y - exact) <= _bound(x, ids, w, Ws, blocks) + 1e-6 * scale), "error above the int8 bound"


@pytest.mark.parametrize("I", [256, 320, 384, 512, 1024])
def test_decode_items_of_several_tiles_match_reference(pool, I):
    """Decode items of phase_gate_up run gate's tiles as one run, then up's (moe_loops._decode_run): runs of 8
    tiles (I = 512: one item, 1024: two), 4 (I = 256), 1 (I = 320: 5 tiles) and 2 (I = 384), each expert's h
    complete before its down."""
    rng = np.random.default_rng(I)
    H, E, t = 256, 6, QT.Q8_0
    g, u, d = rand_raw(rng, t, E, I, H), rand_raw(rng, t, E, I, H), rand_raw(rng, t, E, H, I)
    x = rng.standard_normal((1, H)).astype(np.float32)
    ids = rng.choice(E, size=(1, 4), replace=False).astype(np.int32)
    w = rng.random((1, 4)).astype(np.float32)
    y = MoEExperts((g, t), (u, t), (d, t), hidden=H, inter=I, pool=pool, path=PATHS[-1]).forward(x, ids, w)
    Ws = {e: (deq(g[e], t), deq(u[e], t), deq(d[e], t)) for e in range(E)}
    emulated = reference(x, ids, w, Ws, quantize_acts=True, blocks=act_blocks(ids, t, t, False))
    assert np.abs(y - emulated).max() <= 2e-3 * (np.abs(emulated).max() + 1e-30)


def test_decode_tiles_on_64_slots_quantize_their_activations(pool):
    """8 tokens through 8 experts each, no expert twice (64 experts): the decode tiles (phase_both) on 64 slots,
    where a batch would quantize x on the workers; phase_both's path must quantize it too."""
    rng = np.random.default_rng(64)
    H, I, E, t = 256, 256, 64, QT.Q8_0
    g, u, d = rand_raw(rng, t, E, I, H), rand_raw(rng, t, E, I, H), rand_raw(rng, t, E, H, I)
    x = rng.standard_normal((8, H)).astype(np.float32)
    ids = rng.permutation(E).reshape(8, 8).astype(np.int32)
    w = rng.random((8, 8)).astype(np.float32)
    ex = MoEExperts((g, t), (u, t), (d, t), hidden=H, inter=I, pool=pool, path=PATHS[-1])
    ex.forward(rng.standard_normal((8, H)).astype(np.float32), ids, w)  # leaves other activations in the scratch
    y = ex.forward(x, ids, w)
    Ws = {e: (deq(g[e], t), deq(u[e], t), deq(d[e], t)) for e in range(E)}
    emulated = reference(x, ids, w, Ws, quantize_acts=True, blocks=act_blocks(ids, t, t, False))
    assert np.abs(y - emulated).max() <= 2e-3 * (np.abs(emulated).max() + 1e-30)


def test_decode_kit_takes_views_both_id_dtypes_and_job_mode(pool):
    """Steps of up to KIT_TOKENS tokens go to the decode kit before any Python check (moe.py, MoEExperts._decode):
    its compiled step checks shapes and row strides itself. Strided rows (handed back to the general path), a[None]
    views (stride 0 on the size-1 axis), int32 and int64 ids, forward and submit, a prefill between steps that regrows
    the scratch under the kits, and a step in which every choice is -1: each against the int8-activation reference."""
    rng = np.random.default_rng(11)
    H, I, E, t = 256, 256, 12, QT.Q4_K
    g, u, d = rand_raw(rng, t, E, I, H), rand_raw(rng, t, E, I, H), rand_raw(rng, t, E, H, I)
    ex = MoEExperts((g, t), (u, t), (d, t), hidden=H, inter=I, pool=pool, path=PATHS[-1])
    Ws = {e: (deq(g[e], t), deq(u[e], t), deq(d[e], t)) for e in range(E)}
    wide = rng.standard_normal((3, 2 * H)).astype(np.float32)
    xs = {"rows": rng.standard_normal((3, H)).astype(np.float32), "strided": wide[:, ::2], "none-axis": wide[0, :H][None]}
    for step, (name, x) in enumerate([*xs.items(), ("prefill", None), *xs.items(), ("no expert", xs["rows"][:1])]):
        if x is None:  # grows every scratch buffer: the kits made so far must not keep the old addresses
            ex.forward(rng.standard_normal((40, H)).astype(np.float32), rng.integers(0, E, (40, 4)).astype(np.int32),
                       np.ones((40, 4), np.float32))
            continue
        T = x.shape[0]
        ids = rng.permutation(E)[:3 * T].reshape(T, 3).astype(np.int32 if step % 2 else np.int64)  # no expert twice
        if name == "no expert":
            ids[:] = -1
        w = rng.random((T, 3)).astype(np.float32)
        y = ex.forward(x, ids, w) if step % 3 else ex.submit(x, ids, w).wait()
        ref = reference(np.ascontiguousarray(x), ids, w, Ws, quantize_acts=True, blocks=act_blocks(ids, t, t))
        assert y.shape == (T, H) and np.isfinite(y).all(), name
        assert np.abs(y - ref).max() <= 2e-3 * (np.abs(ref).max() + 1e-30), name


def test_submit_returns_before_wait_and_paths_reject_missing_isa(pool):
    rng = np.random.default_rng(1)
    g, u, d = (rand_raw(rng, QT.Q8_0, 4, 256, 256) for _ in range(3))
    ex = MoEExperts((g, QT.Q8_0), (u, QT.Q8_0), (d, QT.Q8_0), hidden=256, inter=256, pool=pool)
    x = rng.standard_normal((3, 256)).astype(np.float32)
    ids = np.array([[0, 1], [1, -1], [3, 3]], np.int32)
    job = ex.submit(x, ids, np.ones((3, 2), np.float32))
    y = job.wait()
    Ws = {e: (deq(g[e], QT.Q8_0), deq(u[e], QT.Q8_0), deq(d[e], QT.Q8_0)) for e in range(4)}
    ref = reference(x, ids, np.ones((3, 2)), Ws, quantize_acts=True, blocks=act_blocks(ids, QT.Q8_0, QT.Q8_0))
    assert np.abs(y - ref).max() <= 2e-3 * np.abs(ref).max()
    assert ex.kernel_path
    if not FEAT.avx512_vnni:
        with pytest.raises(KtxError):
            MoEExperts((g, QT.Q8_0), (u, QT.Q8_0), (d, QT.Q8_0), hidden=256, inter=256, pool=pool, path="vnni")


def test_pool_submit_to_some_workers_keeps_order():
    """WorkerPool.submit(workers=k) runs fn on workers 0 .. k-1 only and waits for just those; the jobs after it
    still run in submission order on every worker."""
    import threading

    seen, lock, gate = [], threading.Lock(), threading.Event()

    def rec(tag):
        def fn(wid, n):
            if tag == "first":
                gate.wait(5)
            with lock:
                seen.append((tag, wid, n))
        return fn

    with WorkerPool(3) as p:
        a = p.submit(rec("first"), workers=1)
        b = p.submit(rec("some"), workers=2)
        c = p.submit(rec("all"))
        gate.set()
        a.wait(), b.wait(), c.wait()
    assert sorted(t for t in seen if t[0] == "first") == [("first", 0, 3)]
    assert sorted(t for t in seen if t[0] == "some") == [("some", 0, 3), ("some", 1, 3)]
    assert sorted(w for tag, w, _ in seen if tag == "all") == [0, 1, 2]
    order0 = [tag for tag, w, _ in seen if w == 0]
    assert order0 == ["first", "some", "all"]  # worker 0 ran them in submission order


def test_disk_cache_roundtrip(pool, tmp_path):
    rng = np.random.default_rng(2)
    g, u, d = (rand_raw(rng, QT.Q4_K, 4, 256, 256) for _ in range(3))
    x = rng.standard_normal((2, 256)).astype(np.float32)
    ids = np.array([[0, 2], [3, 1]], np.int32)
    w = np.full((2, 2), 0.5, np.float32)
    kw = dict(hidden=256, inter=256, pool=pool, cache_dir=tmp_path, cache_key="model.blk.3")
    y1 = MoEExperts((g, QT.Q4_K), (u, QT.Q4_K), (d, QT.Q4_K), **kw).forward(x, ids, w)
    assert len(list(tmp_path.glob("*.done"))) == 3
    ex2 = MoEExperts((g, QT.Q4_K), (u, QT.Q4_K), (d, QT.Q4_K), **kw)
    assert isinstance(ex2.mats[0].arrays["codes"], np.memmap)
    np.testing.assert_array_equal(ex2.forward(x, ids, w), y1)


@pytest.mark.parametrize("t_gu,t_down", [(QT.Q6_K, QT.Q5_0), (QT.Q5_K, QT.Q6_K), (QT.Q4_K, QT.Q6_K)],
                         ids=["Q6_K-Q5_0", "Q5_K-Q6_K", "Q4_K-Q6_K"])
@pytest.mark.parametrize("p256", [True, False], ids=["per256", "per32"])
def test_prefill_with_widened_codes_matches_reference(pool, t_gu, t_down, p256):
    """A prefill with >= WIDE_MIN_TOKENS per expert widens 5/6-bit codes to bytes per work item and runs the
    byte-plane tile (wide variants); held to the same two references as the packed path."""
    Vs = _prefill_40_tokens(pool, t_gu, t_down, p256, 256, 512, int(t_gu) * 31 + int(t_down))
    assert any(V // 10000 % 10 for V in Vs), "the wide variants did not run"


@pytest.mark.parametrize("qt", [QT.Q8_0, QT.Q4_0, QT.Q4_K], ids=["Q8_0", "Q4_0", "Q4_K"])
@pytest.mark.parametrize("p256", [True, False], ids=["per256", "per32"])
def test_byte_and_4bit_prefill_many_tokens_reads_packed(pool, qt, p256):
    """Q8_0, Q4_0 and Q4_K prefill with >= WIDE_MIN_TOKENS per expert: codes read as they are (never widened),
    Q4_K on the per-256 tiles where they run, Q8_0 and Q4_0 per 32 always, against the two references."""
    Vs = _prefill_40_tokens(pool, qt, qt, p256, 512, 256, int(qt) + 7 * p256)
    assert not any(V // 10000 % 10 for V in Vs) and any(V >= 100000 for V in Vs) == (p256 and qt == QT.Q4_K)


def _prefill_40_tokens(pool, t_gu, t_down, p256, H, I, seed):
    """40 tokens, each through 2 of 3 experts (>= WIDE_MIN_TOKENS per expert), held to the int8-activation
    reference and the exact one's bound; returns the tile variants that ran."""
    rng = np.random.default_rng(seed)
    E, T = 3, 40
    g, u, d = rand_raw(rng, t_gu, E, I, H), rand_raw(rng, t_gu, E, I, H), rand_raw(rng, t_down, E, H, I)
    x = rng.standard_normal((T, H)).astype(np.float32)
    ids = np.stack([np.arange(T) % E, (np.arange(T) + 1) % E], axis=1).astype(np.int32)
    w = rng.random((T, 2)).astype(np.float32)
    ex = MoEExperts((g, t_gu), (u, t_gu), (d, t_down), hidden=H, inter=I, pool=pool, path=PATHS[-1])
    with per256_forced(p256):
        y = ex.forward(x, ids, w)
    Ws = {e: (deq(g[e], t_gu), deq(u[e], t_gu), deq(d[e], t_down)) for e in range(E)}
    blocks = act_blocks(ids, t_gu, t_down, p256, H, I)
    emulated = reference(x, ids, w, Ws, quantize_acts=True, blocks=blocks)
    scale = np.abs(emulated).max()
    assert np.abs(y - emulated).max() <= 2e-3 * scale
    exact = reference(x, ids, w, Ws, quantize_acts=False)
    assert np.all(np.abs(y - exact) <= _bound(x, ids, w, Ws, blocks) + 1e-6 * scale)
    return [V for key in ex._entries for V in key[1:]]


def test_forward_raises_a_worker_error_instead_of_hanging():
    """A decode forward runs both phases in one compiled call per thread, the caller spinning until every worker is
    done (moe_loops.phase_both); a prefill has barriers between its phases: a worker that fails before its share
    must make forward raise its error, not leave the caller waiting; and the next forward runs normally."""
    from ktx.kernels_cpu.moe import _Scratch

    rng = np.random.default_rng(3)
    g, u, d = (rand_raw(rng, QT.Q8_0, 4, 256, 256) for _ in range(3))
    with WorkerPool(2) as p:
        ex = MoEExperts((g, QT.Q8_0), (u, QT.Q8_0), (d, QT.Q8_0), hidden=256, inter=256, pool=p)
        x, ids, w = rng.standard_normal((1, 256)).astype(np.float32), np.array([[0, 2]], np.int32), np.ones((1, 2), np.float32)
        y0 = ex.forward(x, ids, w)
        entry = ex._entry

        def failing(disp, args, n, *extra):
            fn = entry(disp, args, n, *extra)

            def run(*a):
                if a[-2] == 0:  # worker 0 (the caller is the last worker)
                    raise RuntimeError("worker failed")
                return fn(*a)
            return run
        xp, idp, wp = np.repeat(x, 70, axis=0), np.repeat(ids, 70, axis=0), np.repeat(w, 70, axis=0)  # a prefill
        yp = ex.forward(xp, idp, wp)
        ex._entry = failing
        for s in _Scratch._free:
            s.kits.clear()  # decode kits keep their compiled step
        for args in ((x, ids, w), (xp, idp, wp)):
            with pytest.raises(RuntimeError, match="worker failed"):
                ex.forward(*args)
        ex._entry = entry
        for s in _Scratch._free:
            s.kits.clear()
        np.testing.assert_array_equal(ex.forward(x, ids, w), y0)
        np.testing.assert_array_equal(ex.forward(xp, idp, wp), yp)


def test_forward_reads_no_stale_scratch(pool):
    """MoEExperts reuses its buffers (quantized x and h, g, u) between forwards without zeroing them: poisoned
    with 0xFF (NaN floats, -1 codes), a prefill with padding slots and skipped choices, then a decode, must still
    match the int8-activation reference."""
    from ktx.kernels_cpu.moe import _Scratch

    rng = np.random.default_rng(7)
    E, H, I, t = 5, 256, 256, QT.Q4_K
    g, u, d = rand_raw(rng, t, E, I, H), rand_raw(rng, t, E, I, H), rand_raw(rng, t, E, H, I)
    ex = MoEExperts((g, t), (u, t), (d, t), hidden=H, inter=I, pool=pool, path=PATHS[-1])
    Ws = {e: (deq(g[e], t), deq(u[e], t), deq(d[e], t)) for e in range(E)}
    ex.forward(rng.standard_normal((90, H)).astype(np.float32), rng.integers(0, E, (90, 3)).astype(np.int32),
               np.ones((90, 3), np.float32))  # sizes the scratch beyond what follows
    for T in (37, 1):
        for s in _Scratch._free:
            for buf in s.bufs.values():
                buf[:] = 0xFF
        x = rng.standard_normal((T, H)).astype(np.float32)
        ids = rng.integers(-1, E, (T, 3)).astype(np.int32)
        w = rng.random((T, 3)).astype(np.float32)
        y = ex.forward(x, ids, w)
        emulated = reference(x, ids, w, Ws, quantize_acts=True, blocks=act_blocks(ids, t, t, None, H, I))
        assert np.isfinite(y).all()
        assert np.abs(y - emulated).max() <= 2e-3 * np.abs(emulated).max()


def test_quantize_row256_matches_numpy_per_256():
    """quantize_row256 against q8_emulate(block=256); xs/xsf as the per-32 format defines them; one loud
    superblock must not change the next one's scale."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal(768).astype(np.float32)
    x[:256] *= 50
    xq, xd = np.zeros(768, np.int8), np.zeros(24, np.float32)
    xs, xsf = np.zeros(48, np.int32), np.zeros(24, np.float32)
    quantize_row256(x, xq, xd, xs, xsf)
    np.testing.assert_array_equal(xq.astype(np.float32) * np.repeat(xd, 32), q8_emulate(x[None], 256)[0])
    assert np.all(xd.reshape(3, 8) == xd.reshape(3, 8)[:, :1]) and xd[8] < xd[0] / 10
    np.testing.assert_array_equal(xs, xq.reshape(48, 16).sum(axis=1))
    np.testing.assert_allclose(xsf, xd * xq.reshape(24, 32).sum(axis=1), rtol=1e-6)


@settings(max_examples=30, deadline=None)
@given(data=st.data())
def test_quantize_row_matches_numpy_per_32(data):
    """quantize_row (vector IR, vec.quant_blocks) against q8_emulate, codes and scales exactly: all-zero blocks,
    blocks at very different scales, ties at .5 (x = (n + 0.5) dx), and a strided view (the scalar loop)."""
    K = 32 * data.draw(st.integers(1, 70), "blocks")
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), "seed"))
    x = (rng.standard_normal(K) * rng.choice([0.0, 1e-6, 1.0, 300.0], K // 32).repeat(32)).astype(np.float32)
    ties = data.draw(st.booleans(), "ties")
    if ties:  # amax 127 in every block (dx = 1): x = n + 0.5 rounds to even
        x = (rng.integers(-127, 127, K) + 0.5).astype(np.float32)
        x[::32] = 127
    strided = data.draw(st.booleans(), "strided")
    src = np.repeat(x, 2)[::2] if strided else x
    xq, xd = np.zeros(K, np.int8), np.zeros(K // 32, np.float32)
    xs, xsf = np.zeros(K // 16, np.int32), np.zeros(K // 32, np.float32)
    quantize_row(src, xq, xd, xs, xsf)
    want_d = np.abs(x.reshape(-1, 32)).max(axis=1) / np.float32(127)
    np.testing.assert_array_equal(xd, want_d)
    np.testing.assert_array_equal(xq.astype(np.float32) * np.repeat(xd, 32), q8_emulate(x[None])[0])
    np.testing.assert_array_equal(xs, xq.reshape(-1, 16).astype(np.int64).sum(axis=1))
    np.testing.assert_allclose(xsf, xd * xq.reshape(-1, 32).sum(axis=1), rtol=1e-6)


@pytest.mark.parametrize("p256", [True, False], ids=["per256", "per32"])
def test_kquant_prefill_runs_per256_tiles_and_decode_does_not(pool, p256):
    """Which tiles run: per-256 variants (V >= 100000) in a Q4_K prefill where per256_tiles (else none), none in a
    decode step."""
    rng = np.random.default_rng(6)
    g, u, d = (rand_raw(rng, QT.Q4_K, 4, 256, 256) for _ in range(3))
    ex = MoEExperts((g, QT.Q4_K), (u, QT.Q4_K), (d, QT.Q4_K), hidden=256, inter=256, pool=pool, path=PATHS[-1])
    x = rng.standard_normal((8, 256)).astype(np.float32)
    with per256_forced(p256):
        ex.forward(x[:1], np.array([[0, 1]], np.int32), np.ones((1, 2), np.float32))
        assert not any(V >= 100000 for key in ex._entries for V in key[1:])
        ex.forward(x, np.tile(np.array([[0, 1]], np.int32), (8, 1)), np.ones((8, 2), np.float32))
    assert sum(V >= 100000 for key in ex._entries for V in key[1:3]) == (3 if p256 else 0)  # gate, up and down


@pytest.mark.parametrize("t_down", [QT.Q8_0, QT.Q5_0])
@pytest.mark.parametrize("T", [1, 5, 40])
def test_moe_expert_size_not_a_multiple_of_256(pool, t_down, T):
    """DeepSeek-V2-Lite's experts are 1408 wide (5.5 x 256): down's rows are then 32-blocks (Q8_0/Q5_0), gate and
    up K-quants over hidden. Any multiple of 64 runs on the kernels; here 320."""
    H, I, E, k = 256, 320, 6, 2
    rng = np.random.default_rng(T)
    g, u, d = rand_raw(rng, QT.Q4_K, E, I, H), rand_raw(rng, QT.Q4_K, E, I, H), rand_raw(rng, t_down, E, H, I)
    x = rng.standard_normal((T, H)).astype(np.float32)
    ids = rng.integers(0, E, size=(T, k)).astype(np.int32)
    w = rng.random((T, k)).astype(np.float32)
    y = MoEExperts((g, QT.Q4_K), (u, QT.Q4_K), (d, t_down), hidden=H, inter=I, pool=pool).forward(x, ids, w)
    Ws = {e: (deq(g[e], QT.Q4_K), deq(u[e], QT.Q4_K), deq(d[e], t_down)) for e in range(E)}
    exact = reference(x, ids, w, Ws, quantize_acts=False)
    blocks = act_blocks(ids, QT.Q4_K, t_down, H=H, I=I)
    assert blocks[1] == 32  # I = 320: down never takes per-256 activations
    assert np.all(np.abs(y - exact) <= _bound(x, ids, w, Ws, blocks) + 1e-6 * np.abs(exact).max())


@njit
def _silu_mul(g, u, out):
    silu_mul(g.ctypes.data, u.ctypes.data, out.ctypes.data, g.size)


@njit
def _axpy(y, x, w):
    axpy(y.ctypes.data, x.ctypes.data, w, y.size)


def test_vector_silu_mul_and_axpy_match_numpy():
    """vec.py's polynomial exp against numpy's float64 SiLU: over the whole float range that matters (|g| <= 87,
    relative error within 1e-6, a few float32 ulps), and 0 below -87 where the true value is < 1e-35."""
    rng = np.random.default_rng(3)
    g = np.concatenate([np.linspace(-87, 87, 4000), rng.standard_normal(4000) * 8, [0.0, -0.0, 1e-30, -1e-30, 1e30,
                        -1e30, -88.0, -200.0, 90.0, 1e4]]).astype(np.float32)
    g = np.concatenate([g, np.zeros(-g.size % 16, np.float32)])
    u = rng.standard_normal(g.size).astype(np.float32)
    out = np.empty_like(g)
    _silu_mul(g, u, out)
    gd = g.astype(np.float64)
    with np.errstate(over="ignore"):
        ref = gd / (1 + np.exp(-gd)) * u
    assert np.all(np.abs(out - ref) <= 1e-6 * np.abs(ref) + 1e-30)
    y, x = rng.standard_normal(48).astype(np.float32), rng.standard_normal(48).astype(np.float32)
    want = y.astype(np.float64) + 0.3 * x.astype(np.float64)
    _axpy(y, x, np.float32(0.3))
    np.testing.assert_allclose(y, want, rtol=1e-6, atol=1e-6)
