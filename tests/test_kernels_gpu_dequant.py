"""Triton dequant (interpreter on the CPU) and its torch reference against gguf.quants.dequantize, bit for bit."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT
from gguf.quants import dequantize as gguf_dequantize
from hypothesis import given, settings, strategies as st

from ktx.errors import KtxError
from ktx.kernels_gpu.dequant import FORMATS, dequantize, dequantize_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# byte offsets of the fp16 fields (d, dmin) inside one block
FP16_FIELDS = {"Q8_0": [0], "Q4_0": [0], "Q5_0": [0], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208]}


def random_raw(name: str, rows: int, blocks: int, seed: int) -> np.ndarray:
    """Random blocks: every quant bit pattern, finite fp16 scales (normal, subnormal, negative, zero)."""
    fmt = FORMATS[name]
    rng = np.random.default_rng(seed)
    if name in ("F16", "BF16"):
        x = (rng.standard_normal((rows, blocks)) * 10.0 ** rng.integers(-6, 4, (rows, blocks))).astype(np.float32)
        if name == "F16":
            return x.astype(np.float16).view(np.uint8)
        return (x.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)
    raw = rng.integers(0, 256, (rows * blocks, fmt.block_bytes), dtype=np.uint8)
    for off in FP16_FIELDS[name]:
        d = (rng.standard_normal(rows * blocks) * 10.0 ** rng.integers(-7, 2, rows * blocks)).astype(np.float16)
        d[:: max(1, len(d) // 3)] = 0
        raw[:, off : off + 2] = d.view(np.uint8).reshape(-1, 2)
    return raw.reshape(rows, blocks * fmt.block_bytes)


def bits(t: torch.Tensor) -> np.ndarray:
    t = t.cpu()
    return t.view(torch.int32 if t.dtype == torch.float32 else torch.int16).numpy()


@pytest.mark.parametrize("name", list(FORMATS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dequant_bit_exact(name, dtype):
    blocks = {"F16": 300, "BF16": 300, "Q8_0": 9, "Q4_0": 9, "Q5_0": 9}.get(name, 2)
    raw = random_raw(name, rows=5, blocks=blocks, seed=len(name) + 7)
    want = torch.from_numpy(gguf_dequantize(raw, QT[name])).to(dtype)  # [rows, n_cols]
    got = dequantize(torch.from_numpy(raw).to(DEVICE), name, dtype)
    assert got.shape == want.shape and got.dtype == dtype
    np.testing.assert_array_equal(bits(got), bits(want))
    np.testing.assert_array_equal(bits(dequantize_reference(torch.from_numpy(raw), name, dtype)), bits(want))


@settings(max_examples=12, deadline=None)
@given(name=st.sampled_from(["Q4_0", "Q5_0", "Q8_0", "Q4_K", "Q6_K"]), rows=st.integers(1, 11),
       blocks=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_dequant_shapes_property(name, rows, blocks, seed):
    raw = random_raw(name, rows, blocks, seed)
    want = gguf_dequantize(raw, QT[name])
    got = dequantize(torch.from_numpy(raw).to(DEVICE), QT[name])  # the gguf enum is accepted too
    np.testing.assert_array_equal(bits(got), want.view(np.int32))


def test_dequant_rejects_bad_input():
    with pytest.raises(KtxError, match="not supported"):
        dequantize(torch.zeros(1, 110, dtype=torch.uint8), "Q2_K")
    with pytest.raises(KtxError, match="whole number"):
        dequantize(torch.zeros(1, 145, dtype=torch.uint8), "Q4_K")
    with pytest.raises(KtxError, match="uint8"):
        dequantize(torch.zeros(1, 144), "Q4_K")
