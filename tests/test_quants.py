"""ktx.quants against gguf-py (the reference, bit-exact with ggml) and against llama.cpp's own files."""

import functools
import os
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from ktx import KtxError, quants

FIXTURES = Path(os.environ.get("KTX_FIXTURES", Path(__file__).resolve().parents[1].parent / "shared" / "fixtures"))
TINY = FIXTURES / "tiny-dsv3"

BLOCK_TYPES = [T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q4_K, T.Q5_K, T.Q6_K]
FLOAT_TYPES = [T.F32, T.F16, T.BF16]
GGUF_PY_QUANTIZES = [T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1]
K_QUANTS = [T.Q4_K, T.Q5_K, T.Q6_K]

# Byte offsets of the f16 scale fields in each block type (from ggml-common.h); every other byte of
# a block is a code, a 6-bit-packed or int8 sub-block scale: any value is valid there.
F16_FIELDS = {T.Q8_0: [0], T.Q4_0: [0], T.Q4_1: [0, 2], T.Q5_0: [0], T.Q5_1: [0, 2],
              T.Q4_K: [0, 2], T.Q5_K: [0, 2], T.Q6_K: [208]}  # fmt: skip

SETTINGS = settings(max_examples=40, deadline=None)


def bits(a):
    """float32 array -> its bit patterns, so that -0.0 != 0.0 and equal NaNs compare equal."""
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


def gguf_dequantize(raw, qtype):
    return np.asarray(gguf.quants.dequantize(raw, qtype), dtype=np.float32)


# ---------------------------------------------------------------------------------------------------
# dequantize: bit-exact with gguf-py


@st.composite
def valid_blocks(draw, qtype):
    """uint8 [rows, bytes_per_row]: random code bytes, finite f16 scales (incl. -0.0, subnormals, 65504)."""
    n_per_block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    rows, blocks_per_row = draw(st.integers(1, 3)), draw(st.integers(1, 4))
    n_blocks = rows * blocks_per_row
    # Code bytes from a drawn seed (hypothesis' own byte buffer is too small for K-quant blocks),
    # or all-zero / all-one bits for the extreme codes.
    fill = draw(st.sampled_from(["random", 0x00, 0xFF]))
    if fill == "random":
        raw = np.random.default_rng(draw(st.integers(0, 2**32 - 1))).integers(0, 256, (n_blocks, type_size), dtype=np.uint8)
    else:
        raw = np.full((n_blocks, type_size), fill, np.uint8)
    # Finite f16 bit patterns: 0x0000..0x7BFF are +0 .. 65504, mapped again past 0x8000 for the negatives.
    f16_bits = st.integers(0, 2 * 0x7C00 - 1).map(lambda v: v if v < 0x7C00 else v - 0x7C00 + 0x8000)
    for off in F16_FIELDS[qtype]:
        values = draw(st.lists(f16_bits, min_size=n_blocks, max_size=n_blocks))
        raw[:, off : off + 2] = np.array(values, np.uint16).reshape(-1, 1).view(np.uint8)
    return raw.reshape(rows, blocks_per_row * type_size)


@pytest.mark.parametrize("qtype", BLOCK_TYPES, ids=lambda t: t.name)
@SETTINGS
@given(data=st.data())
def test_dequantize_block_types_bit_exact(qtype, data):
    raw = data.draw(valid_blocks(qtype))
    out = quants.dequantize(raw, qtype)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(bits(out), bits(gguf_dequantize(raw, qtype)))


@pytest.mark.parametrize("qtype", FLOAT_TYPES, ids=lambda t: t.name)
@SETTINGS
@given(data=st.data())
def test_dequantize_float_types_bit_exact(qtype, data):
    # Any bit pattern, NaN and inf included: these conversions are exact bit manipulations.
    itemsize = gguf.GGML_QUANT_SIZES[qtype][1]
    n = data.draw(st.integers(1, 40))
    raw = np.frombuffer(data.draw(st.binary(min_size=2 * n * itemsize, max_size=2 * n * itemsize)), np.uint8)
    raw = raw.reshape(2, n * itemsize)
    typed = raw.view({T.F32: np.float32, T.F16: np.float16, T.BF16: np.uint16}[qtype])  # what GGUFReader gives
    ref = bits(gguf_dequantize(raw, qtype))
    np.testing.assert_array_equal(bits(quants.dequantize(raw, qtype)), ref)
    np.testing.assert_array_equal(bits(quants.dequantize(typed, qtype)), ref)


ROW_TYPES = [T.Q8_0, T.Q4_K, T.Q6_K, T.Q5_K]  # Q5_K: the numpy fallback of dequantize_rows


@pytest.mark.parametrize("qtype", ROW_TYPES + FLOAT_TYPES, ids=lambda t: t.name)
@SETTINGS
@given(data=st.data())
def test_dequantize_rows_bit_exact_with_gguf_py(qtype, data):
    """kernels_cpu.rows (the token embedding's compiled lookup) against gguf-py, rows picked in any order."""
    from ktx.kernels_cpu.rows import dequantize_rows

    if qtype in FLOAT_TYPES:
        itemsize = gguf.GGML_QUANT_SIZES[qtype][1]
        n = data.draw(st.integers(1, 40))
        raw = np.frombuffer(data.draw(st.binary(min_size=3 * n * itemsize, max_size=3 * n * itemsize)), np.uint8)
        raw = raw.reshape(3, n * itemsize)
        given_ = raw.view({T.F32: np.float32, T.F16: np.float16, T.BF16: np.uint16}[qtype])  # as GGUFReader gives
    else:
        raw = given_ = data.draw(valid_blocks(qtype))
    ids = np.array(data.draw(st.lists(st.integers(0, raw.shape[0] - 1), min_size=1, max_size=5)))
    want = gguf_dequantize(raw[ids], qtype).reshape(len(ids), -1)
    np.testing.assert_array_equal(bits(dequantize_rows(given_, qtype, ids)), bits(want))


def test_dequantize_keeps_leading_dims_and_chunks():
    # Several chunks of blocks (the module works in cache-sized pieces) and a 3-d tensor.
    rng = np.random.default_rng(1)
    raw = quants.random_blocks(T.Q4_K, (3, 40, 2048), rng)  # 960 blocks
    out = quants.dequantize(raw, int(T.Q4_K))
    assert out.shape == (3, 40, 2048)
    np.testing.assert_array_equal(bits(out), bits(gguf_dequantize(raw, T.Q4_K)))


# ---------------------------------------------------------------------------------------------------
# quantize


def float_rows(max_abs):
    # Rows of 64 (two legacy blocks; the float types don't care), with repeated values for ties.
    elems = st.floats(-max_abs, max_abs, width=32) | st.sampled_from([0.0, -0.0, 0.5, -0.5, 1.0])
    return hnp.arrays(np.float32, st.tuples(st.integers(1, 3), st.just(64)), elements=elems)


@pytest.mark.parametrize("qtype", GGUF_PY_QUANTIZES, ids=lambda t: t.name)
@SETTINGS
@given(x=float_rows(1e4), exponent=st.integers(-40, 4))
def test_quantize_bit_exact_with_gguf_py(qtype, x, exponent):
    x = x * np.float32(2.0**exponent)  # down to f16-subnormal and zero block scales
    with np.errstate(all="ignore"):  # f16 overflow of large values is part of what is compared
        ref = np.ascontiguousarray(gguf.quants.quantize(x, qtype)).view(np.uint8)
        ours = quants.quantize(x, qtype)
    assert ours.dtype == np.uint8 and ours.shape == (x.shape[0], quants.row_bytes(qtype, 64))
    np.testing.assert_array_equal(ours, ref)


def test_q8_0_rounds_like_c_roundf():
    # amax 127 makes d = 1: the codes are roundf(x). 0.49999997 + 0.5 rounds up to 1.0 in float32,
    # so a `trunc(x + 0.5)` shortcut would differ from C's roundf here; exact halves go away from zero.
    x = np.zeros((1, 32), np.float32)
    x[0, :8] = [127.0, 0.49999997, -0.49999997, 2.5, -2.5, 1.4999999, 0.5, -0.5]
    ref = np.ascontiguousarray(gguf.quants.quantize(x, T.Q8_0)).view(np.uint8)
    ours = quants.quantize(x, T.Q8_0)
    np.testing.assert_array_equal(ours, ref)
    np.testing.assert_array_equal(ours[0, 2:10].view(np.int8), [127, 0, 0, 3, -3, 1, 1, -1])


def test_bf16_quantize_nan_and_inf_like_ggml():
    x = np.array([[np.nan, -np.inf, np.inf, 3.0e38, -1.0e-45, 0.0]], np.float32)
    ref = np.ascontiguousarray(gguf.quants.quantize(x, T.BF16)).view(np.uint8)
    np.testing.assert_array_equal(quants.quantize(x, T.BF16), ref)


# Round-trip bounds for Gaussian rows (relative RMS error, dequantized by gguf-py). Uniform rounding
# noise has rms step/sqrt(12). Q4_K/Q5_K: the 32 samples of a sub-block span about 4.1 sigma (expected
# range of 32 normals), cut into 15 / 31 steps: 4.1/15/3.46 = 0.079, 4.1/31/3.46 = 0.038. Q6_K: the
# largest of 16 samples (about 2.0 sigma) maps to -32, step 2.0/32: 0.018. The least-squares fit gets
# a little under these (measured 0.072 / 0.036 / 0.017); the bounds add ~10% over the estimate for the
# 6-bit / int8 sub-block scales and sampling, so a broken packing or scale search fails clearly.
# Sigma stays >= 0.02: below that the f16 super-block scale d (about 1e-3 sigma for Q6_K) turns
# subnormal and loses precision, a limit of the format that llama-quantize shares.
K_BOUNDS = {T.Q4_K: 0.087, T.Q5_K: 0.042, T.Q6_K: 0.020}


@pytest.mark.parametrize("qtype", K_QUANTS, ids=lambda t: t.name)
@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), sigma=st.sampled_from([0.02, 1.0, 30.0]), mean=st.sampled_from([0.0, 0.5]))
def test_k_quant_round_trip(qtype, seed, sigma, mean):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((8, 1024)) + mean).astype(np.float32) * np.float32(sigma)  # [8, 1024]
    raw = quants.quantize(x, qtype)
    assert raw.shape == (8, quants.row_bytes(qtype, 1024))
    y = gguf_dequantize(raw, qtype)
    assert np.isfinite(y).all()
    centred = x - x.mean(axis=1, keepdims=True) if mean else x  # an offset is free for Q4_K/Q5_K mins
    bound = K_BOUNDS[qtype] * (1 + 2 * mean if qtype == T.Q6_K else 1)  # Q6_K has no min: the offset widens its range
    assert np.linalg.norm(y - x) / np.linalg.norm(centred) < bound


@pytest.mark.parametrize("qtype", K_QUANTS, ids=lambda t: t.name)
def test_k_quant_special_rows(qtype):
    x = np.zeros((4, 256), np.float32)
    x[1] = 0.25  # constant positive
    x[2] = -3.0  # constant negative
    x[3, 7] = 1.0  # a lone spike
    y = gguf_dequantize(quants.quantize(x, qtype), qtype)
    np.testing.assert_array_equal(y[0], 0.0)
    np.testing.assert_allclose(y[1:], x[1:], rtol=2e-3, atol=1e-6)  # f16 d times a 6-/8-bit scale


# ---------------------------------------------------------------------------------------------------
# random_blocks


@pytest.mark.parametrize("qtype", FLOAT_TYPES + BLOCK_TYPES, ids=lambda t: t.name)
def test_random_blocks_look_like_weights(qtype):
    raw = quants.random_blocks(qtype, (32, 2048), np.random.default_rng(7))
    assert raw.dtype == np.uint8 and raw.shape == (32, quants.row_bytes(qtype, 2048))
    w = gguf_dequantize(raw, qtype)  # [32, 2048]
    assert np.isfinite(w).all()
    assert 0.02 < w.std() < 0.1
    assert abs(w.mean()) < 0.01
    rows_std = w.std(axis=1)
    assert (rows_std > 0.01).all() and (rows_std < 0.2).all()


# ---------------------------------------------------------------------------------------------------
# sizes and errors


@pytest.mark.parametrize("qtype", FLOAT_TYPES + BLOCK_TYPES, ids=lambda t: t.name)
def test_sizes_match_gguf(qtype):
    n_per_block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    assert quants.block_size(qtype) == (n_per_block, type_size)
    assert quants.block_size(int(qtype)) == (n_per_block, type_size)
    assert quants.row_bytes(qtype, 4096) == 4096 // n_per_block * type_size


def test_errors_are_ktx_errors():
    with pytest.raises(KtxError, match=r"Q2_K.*supported: .*Q4_K"):
        quants.dequantize(np.zeros((1, 84), np.uint8), T.Q2_K)
    with pytest.raises(KtxError, match="unknown"):
        quants.block_size(12345)
    with pytest.raises(KtxError, match=r"100 elements.*Q4_K"):
        quants.row_bytes(T.Q4_K, 100)
    with pytest.raises(KtxError, match="Q8_0"):
        quants.quantize(np.zeros((2, 48), np.float32), T.Q8_0)
    with pytest.raises(KtxError, match="144-byte"):
        quants.dequantize(np.zeros((2, 150), np.uint8), T.Q4_K)
    with pytest.raises(KtxError, match="float32"):
        quants.dequantize(np.zeros((2, 8), np.float32), T.Q8_0)


# ---------------------------------------------------------------------------------------------------
# real files written by llama.cpp


@functools.cache
def _open(path):
    return gguf.GGUFReader(path)  # parsing the tokenizer metadata takes seconds: once per file


def _reader(name):
    path = TINY / name
    if not path.exists():
        pytest.skip(f"fixture {path} not found (set KTX_FIXTURES)")
    return _open(path)


@pytest.mark.parametrize("name", ["tiny-dsv3-BF16.gguf", "tiny-dsv3-Q8_0.gguf", "tiny-dsv3-Q4_K_M.gguf"])
def test_fixture_tensors_bit_exact(name):
    seen = set()
    for t in _reader(name).tensors:
        out = quants.dequantize(t.data, t.tensor_type)
        assert out.shape == tuple(int(d) for d in reversed(t.shape))
        np.testing.assert_array_equal(bits(out), bits(gguf_dequantize(t.data, t.tensor_type)), err_msg=t.name)
        seen.add(t.tensor_type.name)
    assert seen == {"BF16.gguf": {"F32", "BF16"}, "Q8_0.gguf": {"F32", "Q8_0"},
                    "Q4_K_M.gguf": {"F32", "Q4_K", "Q5_0", "Q6_K"}}[name.split("-")[-1]]  # fmt: skip


@pytest.mark.parametrize("name", ["tiny-dsv3-Q8_0.gguf", "tiny-dsv3-Q4_K_M.gguf"])
def test_quantize_like_llama_quantize(name):
    # llama-quantize made these from the BF16 file. Q8_0 and Q5_0 (no imatrix) use ggml's reference
    # rounding: our bytes must be identical. For the K-quants our simpler search must come within 2%
    # of llama.cpp's RMS error on the same weights (measured: Q4_K +0.8%, Q6_K -2%).
    source = {t.name: t for t in _reader("tiny-dsv3-BF16.gguf").tensors}
    for t in _reader(name).tensors:
        if t.tensor_type == T.F32:
            continue
        first_rows = lambda a: a.reshape(-1, a.shape[-1])[:1024]  # noqa: E731  (a sample keeps this fast)
        x = quants.dequantize(first_rows(source[t.name].data), source[t.name].tensor_type)  # [rows, n]
        ours, theirs = quants.quantize(x, t.tensor_type), first_rows(t.data)
        if t.tensor_type in (T.Q8_0, T.Q5_0):
            np.testing.assert_array_equal(ours, theirs, err_msg=t.name)
        else:
            err_ours = np.linalg.norm(gguf_dequantize(ours, t.tensor_type) - x)
            err_llama = np.linalg.norm(gguf_dequantize(theirs, t.tensor_type) - x)
            assert err_ours < 1.02 * err_llama, t.name
