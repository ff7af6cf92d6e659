"""The bf16 AMX prefill path (kernels_cpu/amx_bf16.py) against independent references.

  - the dequant kernel (vector IR, runs on any CPU) against gguf.quants.dequantize rounded to bf16 in numpy,
    in the tdpbf16ps B tile layout, for every repacked type;
  - to_bf16 against numpy's round-to-nearest-even;
  - the sapphirerapids assembly of the tile holds tdpbf16ps (compile-only);
  - on a CPU with AMX: the tile against float64 numpy, whole K and in K ranges (acc), and MoEExperts' bf16
    experts against a numpy emulation of bf16 weights and activations (skipped elsewhere).
"""
from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
from gguf.quants import dequantize

from ktx.kernels_cpu import amx, amx_bf16
from ktx.kernels_cpu.moe_loops import aligned_bytes
from test_kernels_cpu import _routed, q8_emulate, rand_raw, silu  # not random_gguf_blocks: it imports triton

OK, WHY = amx.amx_available()
needs_amx = pytest.mark.skipif(not OK, reason=f"needs AMX: {WHY}")
TYPES = [QT.Q8_0, QT.Q4_0, QT.Q5_0, QT.Q4_K, QT.Q5_K, QT.Q6_K]


def _bf16_bits(x):  # float32 -> bf16 bits, round to nearest even (numpy, independent of the kernels)
    u = np.asarray(x, np.float32).view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def _f(bits):  # bf16 bits -> float64
    return (bits.astype(np.uint32) << 16).view(np.float32).astype(np.float64)


def _raw(qt, E, R, K, seed):
    return rand_raw(np.random.default_rng(seed), qt, E, R, K)


@pytest.mark.parametrize("qt", TYPES, ids=[t.name for t in TYPES])
def test_dequant_kernel_gives_gguf_weights_in_bf16_b_tiles(qt):
    from ktx.kernels_cpu import MoEExperts

    K, R, E = 512, 256, 2
    g, d = _raw(qt, E, R, K, 1), _raw(qt, E, K, R, 5)
    ex = MoEExperts((g, qt), (g, qt), (d, qt), hidden=K, inter=R, path="portable")
    dst = aligned_bytes(2 * 32 * K)
    e, rg = 1, 4
    fn = amx_bf16.dequant_address(qt.name)
    amx_bf16.dequant_row_groups(fn, ex.mats[0].md, e, rg, 2, 0, K, dst)
    # B tile layout: [row group, pair row p, row n, k - 2p]
    got = dst.view(np.uint16).reshape(2, K // 2, 16, 2).transpose(0, 2, 1, 3).reshape(32, K)
    ref = dequantize(g[e][16 * rg:16 * rg + 32], qt).astype(np.float32)
    exact = _bf16_bits(ref)
    # the kernel's f32 value (fma(q, d*sc, bias)) may differ from gguf's by an f32 ulp: then by one bf16 ulp
    # (compared as numbers: -0 and 0 are the same weight)
    assert np.mean(_f(got) == _f(exact)) > 0.999
    assert np.all(np.abs(_f(got) - ref) <= 2.0 ** -8 * np.abs(ref) + 1e-30)
    part = aligned_bytes(2 * 32 * 256)  # a k range (the panels' steps): k 256 .. 511 alone
    amx_bf16.dequant_row_groups(fn, ex.mats[0].md, e, rg, 2, 256, 256, part)
    np.testing.assert_array_equal(part.view(np.uint16).reshape(2, 128, 16, 2).transpose(0, 2, 1, 3).reshape(32, 256),
                                  got[:, 256:])


def test_to_bf16_rounds_to_nearest_even():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.standard_normal(4096) * 10.0 ** rng.integers(-30, 30, 4096),
                        (np.arange(1, 512, dtype=np.uint32) << 15 | 0x3F800000).view(np.float32)]).astype(np.float32)
    dst = np.empty(x.shape, np.uint16)  # ties included: mantissas ending in 0x8000
    amx_bf16.to_bf16(x, dst)
    np.testing.assert_array_equal(dst, _bf16_bits(x))


@pytest.mark.parametrize("nr", [1, 2])
def test_bf16_tile_compiles_for_sapphirerapids(nr):
    asm = amx_bf16.tile_assembly(nr)
    for op in ("ldtilecfg", "tileloadd", "tdpbf16ps", "tilestored", "tilerelease", "tilezero"):
        assert op in asm, op


@needs_amx
@pytest.mark.parametrize("K", [64, 512])
def test_native_bf16_tile_matches_numpy(K):
    rng = np.random.default_rng(K)
    T, nr = amx_bf16.BF16_TILE_TOKENS, 2
    x = _bf16_bits(rng.standard_normal((T, K)))
    w = _bf16_bits(rng.standard_normal((16 * nr, K)))
    xb = aligned_bytes(T * K * 2).view(np.uint16).reshape(T, K)
    xb[:] = x
    wb = aligned_bytes(nr * 32 * K).view(np.uint16).reshape(nr, K // 2, 16, 2)
    wb[:] = w.reshape(nr, 16, K // 2, 2).transpose(0, 2, 1, 3)  # the B tile layout (amx_bf16's docstring)
    ref = _f(x) @ _f(w).T
    bound = 2 * K * np.finfo(np.float32).eps * (np.abs(_f(x)) @ np.abs(_f(w)).T)
    fn = amx_bf16.tile_address(nr)
    import ctypes

    call = ctypes.CFUNCTYPE(None, *[ctypes.c_int64] * 8)(fn)
    out = np.full((T, 40), np.nan, np.float32)  # ldo 40 > 32: the columns past the tile stay untouched
    call(K, wb.ctypes.data, 32 * K, xb.ctypes.data, 2 * K, out.ctypes.data, 40, 0)
    assert np.all(np.abs(out[:, :32] - ref) <= bound) and np.isnan(out[:, 32:]).all()
    half = K // 2  # two K ranges, the second adding to the first's C tiles (acc)
    call(half, wb.ctypes.data, 32 * K, xb.ctypes.data, 2 * K, out.ctypes.data, 40, 0)
    call(half, wb.ctypes.data + 32 * half, 32 * K, xb.ctypes.data + 2 * half, 2 * K, out.ctypes.data, 40, 1)
    assert np.all(np.abs(out[:, :32] - ref) <= bound)


def _emulated(x, ids, w, Ws, bf16_experts):
    """float64 y with the kernels' rounding: bf16 experts see x, their weights and h in bf16; the others x and h
    in int8 per 32 (quantize.py)."""
    y = np.zeros(x.shape, np.float64)
    for t, j, e in _routed(ids):
        Wg, Wu, Wd = Ws[e]
        xt = x[t:t + 1].astype(np.float64)
        if e in bf16_experts:
            xt = _f(_bf16_bits(xt))
            Wg, Wu, Wd = (_f(_bf16_bits(W)) for W in (Wg, Wu, Wd))
            h = _f(_bf16_bits(silu(xt @ Wg.T) * (xt @ Wu.T)))
        else:
            xt = q8_emulate(xt, 32)
            h = q8_emulate(silu(xt @ Wg.T) * (xt @ Wu.T), 32)
        y[t] += w[t, j] * (h @ Wd.T)[0]
    return y


@needs_amx
@pytest.mark.parametrize("qt_gu,qt_down", [(QT.Q4_K, QT.Q6_K), (QT.Q8_0, QT.Q8_0), (QT.Q5_K, QT.Q4_0)],
                         ids=["Q4_K-Q6_K", "Q8_0-Q8_0", "Q5_K-Q4_0"])
def test_moe_bf16_experts_match_the_bf16_emulation(qt_gu, qt_down):
    from ktx.kernels_cpu import MoEExperts, WorkerPool

    H, I, E = 256, 512, 5
    g, u, d = _raw(qt_gu, E, I, H, 10), _raw(qt_gu, E, I, H, 20), _raw(qt_down, E, H, I, 30)
    Ws = {e: tuple(dequantize(m[e], q).astype(np.float32) for m, q in ((g, qt_gu), (u, qt_gu), (d, qt_down)))
          for e in range(E)}
    rng = np.random.default_rng(0)
    # expert 0: 150 tokens (5 tiles, the last partial), 1: 100, 2: 20 (vector tiles); some slots -1. The batch
    # averages 90 tokens per expert, above BF16_MIN_TOKENS: moe_loops.plan_slots turns AMX on only then
    T = 150
    assert 270 / 3 > amx_bf16.BF16_MIN_TOKENS >= 20
    first = np.array([0] * 150)
    second = np.array([1] * 100 + [2] * 20 + [-1] * 30)
    ids = np.stack([first, second], 1).astype(np.int32)
    w = rng.random((T, 2)).astype(np.float32)
    x = rng.standard_normal((T, H)).astype(np.float32)
    with WorkerPool(2) as pool:
        ex = MoEExperts((g, qt_gu), (u, qt_gu), (d, qt_down), hidden=H, inter=I, pool=pool)
        assert ex.amx == "bf16" and "prefill: amx tdpbf16ps tiles" in ex.kernel_path
        y = ex.forward(x, ids, w)
    emu = _emulated(x, ids, w, Ws, bf16_experts={0, 1})  # expert 2's tokens: int8 (its vector tiles)
    scale = np.abs(emu).max()
    assert np.abs(y - emu).max() <= 2e-4 * scale
    # and the bf16 experts are really bf16: their tokens disagree with the int8 emulation by more than that
    int8 = _emulated(x, ids, w, Ws, bf16_experts=set())
    assert np.abs(y[:100] - int8[:100]).max() > 1e-3 * scale


@needs_amx
def test_moe_bf16_panels_match_the_bf16_emulation():
    """An expert whose bf16 activations exceed amx_bf16.A_BYTES runs in panels (moe_loops._bf16_panel: K in
    PANEL_K steps, the C tiles carried through out, row-group pairs grouped): 300 tokens x 2048 x 2 bytes."""
    from ktx.kernels_cpu import MoEExperts, WorkerPool

    qt = QT.Q4_K
    H, I, E, T = 2048, 512, 2, 300
    assert T * H * 2 > amx_bf16.A_BYTES and H > amx_bf16.PANEL_K
    g, u, d = _raw(qt, E, I, H, 40), _raw(qt, E, I, H, 50), _raw(qt, E, H, I, 60)
    Ws = {e: tuple(dequantize(m[e], qt).astype(np.float32) for m in (g, u, d)) for e in range(E)}
    rng = np.random.default_rng(1)
    ids = np.stack([np.zeros(T), np.where(np.arange(T) < 200, 1, -1)], 1).astype(np.int32)
    w = rng.random((T, 2)).astype(np.float32)
    x = rng.standard_normal((T, H)).astype(np.float32)
    with WorkerPool(2) as pool:
        y = MoEExperts((g, qt), (u, qt), (d, qt), hidden=H, inter=I, pool=pool).forward(x, ids, w)
    emu = _emulated(x, ids, w, Ws, bf16_experts={0, 1})
    assert np.abs(y - emu).max() <= 2e-4 * np.abs(emu).max()


@needs_amx
@pytest.mark.parametrize("qt,R,K,T,B", [(QT.Q4_K, 512, 2048, 100, 0), (QT.Q8_0, 200, 1024, 64, 0),
                                         (QT.Q6_K, 128, 512, 77, 4), (QT.Q5_0, 256, 2048, 96, 0)],
                         ids=["Q4_K-ragged-T", "Q8_0-ragged-R", "Q6_K-batched", "Q5_0-panels"])
def test_quant_linear_prefill_on_bf16_tiles_matches_the_bf16_emulation(qt, R, K, T, B):
    """QuantLinear(path="auto") runs prefill (T > BF16_MIN_TOKENS) on the bf16 tiles where AMX runs: y equals
    float64 products of bf16-rounded x and W (only f32 summation differs); an explicit vnni path stays int8."""
    from ktx.kernels_cpu import WorkerPool
    from ktx.kernels_cpu.linear import QuantLinear

    assert T > amx_bf16.BF16_MIN_TOKENS
    raw = _raw(qt, max(B, 1), R, K, 3)
    rng = np.random.default_rng(R + K)
    x = rng.standard_normal((max(B, 1), T, K)).astype(np.float32)
    W = [dequantize(raw[b], qt).astype(np.float32) for b in range(max(B, 1))]
    emu = np.stack([_f(_bf16_bits(x[b])) @ _f(_bf16_bits(W[b])).T for b in range(max(B, 1))])
    with WorkerPool(2) as pool:
        ys = {p: QuantLinear(raw if B else raw[0], qt, R, K, pool, path=p)(x if B else x[0]) for p in ("auto", "vnni")}
    for p, y in ys.items():
        y = y if B else y[None]
        assert y.shape == emu.shape and y.flags.c_contiguous
        err = np.abs(y - emu).max() / np.abs(emu).max()
        assert (err <= 1e-5) == (p == "auto"), (p, err)  # int8 activations miss the bf16 emulation by ~1e-3
