"""The AMX tile shim (kernels_cpu/amx.py) against independent references.

  - detection against /proc/cpuinfo's amx flags (the kernel's view, not CPUID through our JIT);
  - TILECFG bytes against the Intel SDM layout, unpacked here with struct;
  - the sapphirerapids assembly holds the tile instructions (compile-only: nothing runs here);
  - the numpy tile model, driven by the same packing and blocking code as the real kernel, against numpy
    matmuls: int8 x int8 -> int32 exactly, bf16 x bf16 -> f32 within a float32 accumulation bound, and
    a repacked GGUF expert matrix against gguf.quants.dequantize;
  - on a CPU with AMX, the real kernels against the same references (skipped elsewhere).
"""
from __future__ import annotations

import struct

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as QT
from gguf.quants import dequantize
from hypothesis import given, settings
from hypothesis import strategies as st

from ktx.errors import KtxError
from ktx.kernels_cpu import amx
from ktx.kernels_cpu.cpu_features import cpuinfo_flags
from ktx.kernels_cpu.quantize import quantize_row
from ktx.kernels_cpu.repack import LAYOUTS, decode_blocks, interleave
from test_kernels_cpu import PATHS, _bound, act_blocks, deq, rand_raw, reference


def _planned_amx(counts: np.ndarray) -> np.ndarray:
    """Which experts moe_loops.plan_slots sends to AMX tiles when expert e gets counts[e] tokens."""
    from ktx.kernels_cpu.moe_loops import plan_slots

    ids = np.repeat(np.arange(len(counts)), counts).astype(np.int32)[:, None]  # [T, 1]
    plan = plan_slots(ids, np.ones(ids.shape, np.float32), len(counts), 1, 4, amx.MIN_TOKENS_PER_EXPERT, 16)
    return plan[3].astype(bool)

OK, WHY = amx.amx_available()
FLAGS = cpuinfo_flags()
KERNELS = [lambda: amx.TileModel().kernel] + ([lambda: amx.native_kernel] if OK else [])
KERNEL_IDS = ["numpy-model"] + (["native"] if OK else [])


def test_detection_matches_cpuinfo():
    if FLAGS and not {"amx_tile", "amx_int8", "amx_bf16"} <= FLAGS:
        assert OK is False
        assert "AMX" in WHY or "arch_prctl" in WHY
    if not OK:
        assert WHY and not WHY.startswith("amx-int8")  # a reason a person can read
    assert amx.amx_available() is amx.amx_available()  # cached: the permission is asked once


def test_no_amx_here_reports_reason():
    if "amx_tile" in FLAGS:
        pytest.skip("this CPU has AMX")
    assert not OK
    assert "CPU lacks AMX-TILE (CPUID.7.0:EDX[24])" in WHY
    assert "EOPNOTSUPP" in WHY or "EINVAL" in WHY or "arch_prctl" not in WHY


@pytest.mark.parametrize("kind,ks", [("ssd", 64), ("sud", 16), ("sud", 32), ("bf16", 32)])
def test_tile_config_bytes_follow_the_sdm(kind, ks):
    cfg = amx.tile_config(amx.kernel_tiles(kind, ks))
    assert len(cfg) == 64
    palette, start_row, *rest = struct.unpack("<BB14x16H16B", cfg)
    colsb, rows = rest[:16], rest[16:]
    assert (palette, start_row) == (1, 0) and cfg[2:16] == bytes(14)
    esize = 2 if kind == "bf16" else 1
    kpack = 2 if kind == "bf16" else 4
    assert (rows[0], colsb[0]) == (16, 64)  # C: 16 x 16 x 4-byte accumulators
    assert (rows[1], colsb[1]) == (16, ks * esize)  # A: 16 tokens x KS elements
    assert (rows[2], colsb[2]) == (ks // kpack, 64)  # B: KS/kpack rows of 16 columns x kpack elements
    assert all(r == 0 for r in rows[3:]) and all(c == 0 for c in colsb[3:])


def test_tile_config_rejects_oversize():
    with pytest.raises(ValueError):
        amx.tile_config({0: (17, 64)})
    with pytest.raises(ValueError):
        amx.kernel_tiles("ssd", 128)


def test_kernels_compile_for_sapphirerapids():
    asm = amx.compile_assembly()
    for insn in ("tdpbssd", "tdpbsud", "tdpbf16ps", "ldtilecfg", "tileloadd", "tilestored", "tilezero", "tilerelease"):
        assert insn in asm, insn
    for spec in amx.DEFAULT_KERNELS:
        assert f"{amx.kernel_name(*spec)}:" in asm
    steps = asm[asm.index("ktx_amx_sud_k32_steps:"):asm.index(".Lfunc_end", asm.index("ktx_amx_sud_k32_steps:"))]
    loop = steps[steps.index("tdpbsud") - 200:steps.index("tdpbsud") + 200]
    assert "tilestored" in loop  # the steps kernel stores a C tile per K step, inside the loop
    obj = amx.compile_object()
    assert obj[:4] == b"\x7fELF"


@pytest.mark.parametrize("layout", ["Q8_0", "Q4_K", "Q6_K"])
def test_full_tiles_compile_for_sapphirerapids(layout):
    """The whole-tile kernels the MoE loops call where AMX runs: tile loop, stores and the vector scales."""
    asm = amx.full_tile_assembly(amx.tile_variant(layout, 2))
    for insn in ("ldtilecfg", "tilezero", "tileloadd", "tdpbsud", "tilestored", "tilerelease", "vcvtdq2ps", "vfmadd"):
        assert insn in asm, insn
    with pytest.raises(ValueError, match="row groups"):
        amx.tile_variant(layout, amx.MAX_TILE_NR + 1)


def _affine_tile_reference(lay, codes, d, sc, dmin, m, xq, xd, xs, xsf):
    """float64 numpy: out[t, 16 r + i] = sum_g dx[t, g32] (d sc)[r, g, i] sum_{k in g} (q - zero) xq
    - sum_32 xsf[t, .] (dmin m)[r, ., i], from the byte-plane codes [NR, K/4, 16 rows, 4]."""
    NR, K4 = codes.shape[:2]
    K, G = 4 * K4, lay.G
    q = codes.reshape(NR, K4, 16, 4).transpose(0, 2, 1, 3).reshape(NR * 16, K).astype(np.int64) - lay.zero  # [R, K]
    prod = (xq.astype(np.int64)[:, None, :] * q[None]).reshape(len(xq), NR * 16, K // G, G).sum(-1)  # [T, R, K/G]
    s = d.astype(np.float64).repeat(lay.S // G, axis=1)  # [NR, K/G, 16]
    if lay.sc:
        s = s * (sc.view(np.int8) if lay.sc == "i8" else sc).astype(np.float64)
    s = s.transpose(0, 2, 1).reshape(NR * 16, K // G)  # [R, K/G]
    dx = xd.astype(np.float64).repeat(32 // G, axis=1) if G < 32 else xd.astype(np.float64)  # [T, K/G]
    out = np.einsum("trg,rg,tg->tr", prod, s, dx)
    if lay.mins:
        mn = (dmin.astype(np.float64).repeat(8, axis=1) * m).transpose(0, 2, 1).reshape(NR * 16, K // 32)  # [R, K/32]
        out -= xsf.astype(np.float64) @ mn.T
    return out


@pytest.mark.skipif(not OK, reason="needs a CPU that runs AMX")
@pytest.mark.parametrize("layout", ["Q8_0", "Q4_0", "Q4_K", "Q5_K", "Q6_K"])
@pytest.mark.parametrize("nr", [1, 2])
def test_native_full_tile_matches_numpy_and_the_vnni_tile(layout, nr):
    """The real AMX tile against a float64 numpy sum of the same affine form, and bit for bit against the
    vnni tile (same per-group float operations) on the same byte-plane codes."""
    import ctypes

    from ktx.kernels_cpu import simd

    lay = LAYOUTS[QT[layout]]
    rng = np.random.default_rng(nr * 10 + simd.LAYOUT_IDS[layout])
    K = 512
    codes = rng.integers(0, 1 << lay.bits, (nr, K // 4, 64), dtype=np.uint8)
    d = (rng.random((nr, K // lay.S, 16)) * 1e-2).astype(np.float16)
    sc = rng.integers(0, 64, (nr, K // lay.G, 16), dtype=np.uint8)
    if lay.sc == "i8":
        sc = rng.integers(-32, 32, (nr, K // lay.G, 16), dtype=np.int8).view(np.uint8)
    dmin = (rng.random((nr, K // 256, 16)) * 1e-2).astype(np.float16)
    m = rng.integers(0, 64, (nr, K // 32, 16), dtype=np.uint8)
    T = amx.AMX_TILE_TOKENS
    x = rng.standard_normal((T, K)).astype(np.float32)
    xq, xd = np.empty((T, K), np.int8), np.empty((T, K // 32), np.float32)
    xs, xsf = np.empty((T, K // 16), np.int32), np.empty((T, K // 32), np.float32)
    for t in range(T):
        quantize_row(x[t], xq[t], xd[t], xs[t], xsf[t])
    fn_t = ctypes.CFUNCTYPE(None, *([ctypes.c_int64] * 18))

    def run(addr, t0, nt, last):  # tokens t0 .. t0 + nt through the kernel at addr (simd.tile's ABI)
        out = np.full((nt, 16 * nr), np.nan, np.float32)
        fn_t(addr)(K, codes.ctypes.data, codes[0].nbytes, d.ctypes.data, d[0].nbytes, sc.ctypes.data, sc[0].nbytes,
                   dmin.ctypes.data, dmin[0].nbytes, m.ctypes.data, m[0].nbytes, xq.ctypes.data + t0 * K,
                   xd.ctypes.data + t0 * (K // 32) * 4, xs.ctypes.data + t0 * (K // 16) * 4,
                   xsf.ctypes.data + t0 * (K // 32) * 4, out.ctypes.data, 16 * nr, last)
        return out

    scratch = np.zeros(4096, np.uint8)
    got = run(amx.full_tile_address(amx.tile_variant(layout, nr)), 0, T, scratch.ctypes.data)
    ref = _affine_tile_reference(lay, codes, d, sc, dmin, m, xq, xd, xs, xsf)
    assert np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max()
    if "vnni" in PATHS:
        V = simd.variant(layout, "vnni", 4, nr, wide=lay.bits != 8)
        vnni = np.concatenate([run(simd.tile_address(V), t0, 4, xq.ctypes.data) for t0 in range(0, T, 4)])
        np.testing.assert_array_equal(got, vnni)


def test_forcing_amx_without_amx_is_a_clear_error():
    if OK:
        pytest.skip("this CPU runs AMX")
    with pytest.raises(KtxError, match="'amx' cannot run on this machine"):
        amx.tile_source("amx")
    with pytest.raises(KtxError, match="AMX kernels cannot run"):
        amx.load_kernels()


def test_tile_source_and_expert_dispatch():
    assert amx.tile_source("vnni") == (None, "amx off: path='vnni'")
    assert amx.tile_source("auto", "model")[0] == "model"
    assert amx.tile_source("auto") == (("bf16", amx.BF16_LABEL) if OK else (None, f"amx unavailable: {WHY}"))
    assert amx.tile_source("auto", "native") == (None, amx.AMX_OFF_BY_DEFAULT if OK else f"amx unavailable: {WHY}")
    if OK:
        assert amx.tile_source("amx") == ("bf16", amx.BF16_LABEL)
        assert amx.tile_source("amx", "native") == ("native", "amx tdpbsud")
    with pytest.raises(KtxError, match="unknown AMX kernel"):
        amx.tile_source("auto", "emulator")
    m = amx.MIN_TOKENS_PER_EXPERT
    assert not _planned_amx(np.ones(8, np.int64)).any()  # decode: one token per expert
    assert not _planned_amx(np.array([m + 1, 1, 1, 1])).any()  # batch average at or below the threshold
    assert _planned_amx(np.array([3 * m, m, m + 1, 1])).tolist() == [True, False, True, False]


@pytest.mark.parametrize("make", KERNELS, ids=KERNEL_IDS)
@settings(max_examples=15, deadline=None)
@given(T=st.integers(1, 40), n_rg=st.integers(1, 3), k64=st.integers(1, 4), seed=st.integers(0, 2**31))
def test_int8_tiles_match_numpy(make, T, n_rg, k64, seed):
    rng = np.random.default_rng(seed)
    K, N = 64 * k64, 16 * n_rg
    a = rng.integers(-128, 128, (T, K), dtype=np.int8)  # [T, K]
    w = rng.integers(-128, 128, (N, K), dtype=np.int8)  # [N, K]
    got = amx.matmul_tiles(a, amx.pack_b_weights(w, 4), "ssd", 64, make())
    np.testing.assert_array_equal(got, a.astype(np.int64) @ w.T.astype(np.int64))
    wu = w.view(np.uint8)  # tdpbsud: the B bytes read unsigned
    got_u = amx.matmul_tiles(a, amx.pack_b_weights(wu, 4), "sud", 32, make())
    np.testing.assert_array_equal(got_u, a.astype(np.int64) @ wu.T.astype(np.int64))


def _bf16(x):  # float32 -> bf16 bits (round to nearest even), independent of amx.py
    u = x.astype(np.float32).view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


@pytest.mark.parametrize("make", KERNELS, ids=KERNEL_IDS)
@settings(max_examples=15, deadline=None)
@given(T=st.integers(1, 40), n_rg=st.integers(1, 3), k32=st.integers(1, 6), seed=st.integers(0, 2**31))
def test_bf16_tiles_match_numpy(make, T, n_rg, k32, seed):
    rng = np.random.default_rng(seed)
    K, N = 32 * k32, 16 * n_rg
    a = _bf16(rng.standard_normal((T, K)))  # [T, K] bf16 bits
    w = _bf16(rng.standard_normal((N, K)))  # [N, K]
    f = lambda u: (u.astype(np.uint32) << 16).view(np.float32).astype(np.float64)  # noqa: E731
    ref = f(a) @ f(w).T  # [T, N]
    got = amx.matmul_tiles(a, amx.pack_b_weights(w, 2), "bf16", 32, make())
    bound = 2 * K * np.finfo(np.float32).eps * (np.abs(f(a)) @ np.abs(f(w)).T)
    assert np.all(np.abs(got - ref) <= bound + 1e-30)


def test_pack_b_of_codes_is_the_vnni_byte_plane():
    rng = np.random.default_rng(1)
    q = rng.integers(0, 256, (32, 128), dtype=np.uint8)  # [R, K] codes
    B = amx.pack_b_weights(q, 4)  # [R/16, K/4, 64]
    for n in range(32):  # B[rg][k4][4 r + i] = q[16 rg + r, 4 k4 + i], written out
        for k in range(0, 128, 7):
            assert B[n // 16, k // 4, 4 * (n % 16) + k % 4] == q[n, k]


@pytest.mark.parametrize("qt", list(LAYOUTS), ids=lambda q: q.name)
@pytest.mark.parametrize("make", KERNELS, ids=KERNEL_IDS)
def test_repacked_expert_through_tiles_matches_gguf_dequant(qt, make):
    rng = np.random.default_rng(int(qt))
    R, K, T = 32, 512, 21
    bs, ts = GGML_QUANT_SIZES[qt]
    raw = rng.integers(0, 256, (R, K // bs * ts), dtype=np.uint8)
    off = {QT.Q6_K: [208], QT.Q4_K: [0, 2], QT.Q5_K: [0, 2]}.get(qt, [0])
    blocks = raw.reshape(-1, ts)
    for o in off:
        blocks[:, o:o + 2] = (rng.random(len(blocks)) * 2e-3).astype(np.float16).view(np.uint8).reshape(-1, 2)
    lay = LAYOUTS[qt]
    arrays = interleave(decode_blocks(raw, qt, K), lay)
    x = rng.standard_normal((T, K)).astype(np.float32)  # [T, K]
    xq, xd = np.zeros((T, K), np.int8), np.zeros((T, K // 32), np.float32)
    xs, xsf = np.zeros((T, K // 16), np.int32), np.zeros((T, K // 32), np.float32)
    for t in range(T):
        quantize_row(x[t], xq[t], xd[t], xs[t], xsf[t])
    got = amx.amx_expert_matmul(xq, xd, xs, xsf, arrays, lay, make())  # [T, R]
    W = dequantize(raw, qt).astype(np.float64)  # [R, K]
    xdq = xq.astype(np.float64) * np.repeat(xd.astype(np.float64), 32, axis=1)  # the activations the kernel sees
    ref = xdq @ W.T
    scale = np.abs(xdq) @ np.abs(W).T
    np.testing.assert_allclose(got, ref, rtol=0, atol=float(2e-5 * scale.max()) + 1e-12)


@pytest.mark.parametrize("ks", [16, 32])
def test_steps_kernel_models_match_numpy(ks):
    """The Numba cfunc model (the kernel the MoE loops call here), TileModel and, with AMX, the native kernel,
    all with the steps ABI, against per-step numpy products; zero_c=0 accumulates onto C."""
    rng = np.random.default_rng(ks)
    K = 4 * ks
    a = rng.integers(-127, 128, (16, K), dtype=np.int8)  # [16, K]
    w = rng.integers(0, 256, (16, K), dtype=np.uint8)  # [16 rows, K]
    B = amx.pack_b_weights(w, 4)[0]  # [K/4, 64]
    c0 = rng.integers(-1000, 1000, (K // ks, 16, 16), dtype=np.int32)
    prods = np.einsum("msk,nsk->smn", a.reshape(16, -1, ks).astype(np.int64), w.reshape(16, -1, ks).astype(np.int64))
    model = amx._SIG(amx.tdpbsud_steps_model(ks).address)  # called with the native kernels' ctypes ABI
    runs = {"numba": lambda A, B, C, z: model(A.ctypes.data, K, B.ctypes.data, 64, C.ctypes.data, 64, K, z),
            "numpy": lambda A, B, C, z: amx.TileModel().kernel("sud", ks, steps=True)(A, K, B, 64, C, 64, K, z)}
    if OK:
        runs["native"] = lambda A, B, C, z: amx.native_kernel("sud", ks, steps=True)(A, K, B, 64, C, 64, K, z)
    for name, run in runs.items():
        for zero_c in (1, 0):
            C = c0.copy()
            run(a, B, C, zero_c)
            np.testing.assert_array_equal(C, prods + (0 if zero_c else c0), err_msg=f"{name} zero_c={zero_c}")


# ---------------------------------------------------------------- the AMX path inside MoEExperts

H, I, E = 256, 512, 6
SOURCES = ["model"] + (["native"] if OK else [])


def _routing(rng):
    """ids [40, 2] with mixed per-expert counts: expert 0 has 22 tokens (a full and a partial A tile), 1 and 2
    have 9 and 14 (AMX, one partial tile), 3 and 4 have 2 and 3 (vector tiles), 5 none; some slots -1."""
    t = np.arange(40)
    first = np.array([0] * 22 + [1] * 9 + [3, 3, 4, 4] + [-1] * 5)
    second = np.where(t % 3 == 0, 2, np.where(t == 10, 4, -1))
    return np.stack([first, second], 1).astype(np.int32), rng.random((40, 2)).astype(np.float32)


def _experts(qt_gu, qt_down, seed):
    rng = np.random.default_rng(seed)
    g, u, d = rand_raw(rng, qt_gu, E, I, H), rand_raw(rng, qt_gu, E, I, H), rand_raw(rng, qt_down, E, H, I)
    Ws = {e: (deq(g[e], qt_gu), deq(u[e], qt_gu), deq(d[e], qt_down)) for e in range(E)}
    return ((g, qt_gu), (u, qt_gu), (d, qt_down)), Ws, rng


@pytest.fixture(scope="module")
def pool():
    from ktx.kernels_cpu import WorkerPool

    with WorkerPool(2) as p:
        yield p


MOE_CASES = [(QT.Q4_K, QT.Q6_K), (QT.Q6_K, QT.Q4_K), (QT.Q8_0, QT.Q8_0), (QT.Q5_K, QT.Q5_0)]


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("qt_gu,qt_down", MOE_CASES, ids=[f"{a.name}-{b.name}" for a, b in MOE_CASES])
def test_moe_amx_path_matches_dequant_reference(pool, qt_gu, qt_down, source):
    from ktx.kernels_cpu import MoEExperts

    mats, Ws, rng = _experts(qt_gu, qt_down, int(qt_gu) * 100 + int(qt_down))
    ids, w = _routing(rng)
    counts = np.bincount(ids[ids >= 0], minlength=E)
    assert _planned_amx(counts[counts > 0]).tolist() == [True, True, True, False, False]  # mixed on purpose
    x = rng.standard_normal((ids.shape[0], H)).astype(np.float32)
    path = "amx" if source == "native" else "auto"
    ex = MoEExperts(*mats, hidden=H, inter=I, pool=pool, path=path, amx_kernel=source)
    assert "prefill: amx tdpbsud" in ex.kernel_path
    y = ex.forward(x, ids, w)
    emulated = reference(x, ids, w, Ws, quantize_acts=True)  # int8 activations as quantize.py documents
    scale = np.abs(emulated).max()
    assert np.abs(y - emulated).max() <= 2e-4 * scale
    exact = reference(x, ids, w, Ws, quantize_acts=False)
    assert np.all(np.abs(y - exact) <= _bound(x, ids, w, Ws) + 1e-6 * scale)
    y1 = ex.forward(x[:1], ids[:1], w[:1])  # decode: one token, vector tiles only
    assert np.abs(y1 - emulated[:1]).max() <= 2e-4 * scale


def test_moe_amx_experts_really_run_on_the_tile_kernel(pool, monkeypatch):
    """A broken microkernel (C left at zero) breaks exactly the tokens routed to AMX experts: proof that the
    loops call the injected kernel for those experts, and only for them."""
    from numba import cfunc, types

    from ktx.kernels_cpu import MoEExperts
    from ktx.kernels_cpu import moe as moe_mod

    i64 = types.int64

    @cfunc(types.void(i64, i64, i64, i64, types.CPointer(types.int32), i64, i64, types.int32), nopython=True)
    def zeros(a, lda, b, ldb, c, ldc, K, zero_c):
        for i in range(K // 16 * 256):  # at least one 16 x 16 tile per K step (16 or 32)
            c[i] = 0

    mats, Ws, rng = _experts(QT.Q4_K, QT.Q6_K, 7)
    ids, w = _routing(rng)
    x = rng.standard_normal((ids.shape[0], H)).astype(np.float32)
    monkeypatch.setattr(moe_mod, "tile_kernel_address", lambda source, ks: zeros.address)
    y = MoEExperts(*mats, hidden=H, inter=I, pool=pool, amx_kernel="model").forward(x, ids, w)
    ref = reference(x, ids, w, Ws, quantize_acts=True)
    on_tiles = np.isin(ids, [0, 1, 2]).any(axis=1)  # tokens with an expert above the threshold
    vec = ~on_tiles & (ids >= 0).any(axis=1)
    assert vec.sum() >= 3 and np.abs(y[vec] - ref[vec]).max() <= 2e-4 * np.abs(ref[vec]).max()
    for t in np.nonzero(on_tiles)[0]:
        assert np.abs(y[t] - ref[t]).max() > 0.05 * np.abs(ref[t]).max(), t


def test_moe_prefill_in_auto_never_loads_native_kernels(pool):
    """No monkeypatching: a prefill big enough for the int8 AMX tiles (but not for the bf16 ones, which "auto" runs
    where AMX does: test_amx_bf16.py) runs the vector path in "auto" and never calls an int8 tile loader."""
    from ktx.kernels_cpu import MoEExperts

    mats, Ws, rng = _experts(QT.Q8_0, QT.Q8_0, 11)
    ids, w = _routing(rng)
    x = rng.standard_normal((ids.shape[0], H)).astype(np.float32)
    before, full_before = amx.load_kernels.cache_info(), dict(amx._FULL)
    ex = MoEExperts(*mats, hidden=H, inter=I, pool=pool)
    y = ex.forward(x, ids, w)
    assert amx.load_kernels.cache_info() == before and amx._FULL == full_before  # not called, not even to fail
    if OK:
        assert ex.amx == "bf16" and "prefill: amx tdpbf16ps tiles" in ex.kernel_path
    else:
        assert ex.amx is None and ex.kernel_path.endswith(f"prefill: {ex.path} (amx unavailable: {WHY})")
    ref = reference(x, ids, w, Ws, quantize_acts=True, blocks=act_blocks(ids, QT.Q8_0, QT.Q8_0, None, H, I))
    assert np.abs(y - ref).max() <= 2e-4 * np.abs(ref).max()


def test_moe_experts_shows_and_guards_the_amx_path(pool):
    from ktx.kernels_cpu import MoEExperts

    mats, _, _ = _experts(QT.Q8_0, QT.Q8_0, 3)
    if OK:
        ex = MoEExperts(*mats, hidden=H, inter=I, pool=pool, path="amx")
        assert "prefill: amx tdpbf16ps" in ex.kernel_path
        ex = MoEExperts(*mats, hidden=H, inter=I, pool=pool, path="amx", amx_kernel="native")
        assert "prefill: amx tdpbsud" in ex.kernel_path
    else:
        with pytest.raises(KtxError, match="'amx' cannot run on this machine: CPU lacks AMX-TILE"):
            MoEExperts(*mats, hidden=H, inter=I, pool=pool, path="amx")
    ex = MoEExperts(*mats, hidden=H, inter=I, pool=pool, path="vnni" if "vnni" in PATHS else "portable")
    assert ex.amx is None and "(amx off: path=" in ex.kernel_path


def test_submit_rejects_ids_below_minus_one(pool):
    from ktx.kernels_cpu import MoEExperts

    mats, _, rng = _experts(QT.Q8_0, QT.Q8_0, 5)
    ex = MoEExperts(*mats, hidden=H, inter=I, pool=pool)
    x = rng.standard_normal((2, H)).astype(np.float32)
    with pytest.raises(KtxError, match="expert id -2 out of range .*-1 = no expert"):
        ex.submit(x, np.array([[0, -2], [1, -1]], np.int32), np.ones((2, 2), np.float32))
    y = ex.forward(x, np.array([[0, -1], [-1, -1]], np.int32), np.ones((2, 2), np.float32))  # -1 is fine
    assert np.all(y[1] == 0) and np.any(y[0] != 0)
