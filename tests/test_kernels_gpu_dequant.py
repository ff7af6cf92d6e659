"""Triton dequant (interpreter on the CPU) and its torch reference against gguf.quants.dequantize, bit for bit."""

import os

import torch

if not torch.cuda.is_available():  # must precede the first import of triton
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
from gguf.quants import dequantize as gguf_dequantize
from hypothesis import given, settings, strategies as st

from ktx.errors import KtxError
from ktx.kernels_gpu.dequant import dequantize, dequantize_reference
from random_gguf_blocks import FORMATS, random_raw

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

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
