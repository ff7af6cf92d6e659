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
    for kind, ks in amx.DEFAULT_KERNELS:
        assert f"ktx_amx_{kind}_k{ks}:" in asm
    obj = amx.compile_object()
    assert obj[:4] == b"\x7fELF"


def test_forcing_amx_without_amx_is_a_clear_error():
    if OK:
        pytest.skip("this CPU runs AMX")
    with pytest.raises(KtxError, match="amx"):
        amx.prefill_isa("vnni", 64, "amx")
    with pytest.raises(KtxError, match="AMX kernels cannot run"):
        amx.load_kernels()


def test_dispatch_thresholds():
    assert amx.prefill_isa("vnni", 1) == ("vnni", "vnni")  # decode never asks for tiles
    isa, label = amx.prefill_isa("vnni", 32)
    if OK:
        assert isa == "amx"
    else:
        assert isa == "vnni" and label == f"amx (unavailable: {WHY}) -> vnni"


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


def test_moe_experts_shows_and_guards_the_amx_path():
    from ktx.kernels_cpu import MoEExperts, WorkerPool

    rng = np.random.default_rng(3)
    bs, ts = GGML_QUANT_SIZES[QT.Q8_0]
    raw = [rng.integers(0, 256, (2, 256, 256 // bs * ts), dtype=np.uint8) for _ in range(3)]
    for r in raw:
        r.reshape(-1, ts)[:, 0:2] = np.full((r.size // ts, 1), 1e-3, np.float16).view(np.uint8)
    mats = [(r, QT.Q8_0) for r in raw]
    with WorkerPool(1) as pool:
        if OK:
            ex = MoEExperts(*mats, hidden=256, inter=256, pool=pool, path="amx")
            assert "prefill: amx" in ex.kernel_path
            return
        with pytest.raises(KtxError, match="'amx' cannot run on this machine: CPU lacks AMX-TILE"):
            MoEExperts(*mats, hidden=256, inter=256, pool=pool, path="amx")
        ex = MoEExperts(*mats, hidden=256, inter=256, pool=pool)
        assert f"prefill: amx (unavailable: {WHY}) -> " in ex.kernel_path
