"""Fused dequant-GEMV (decode) and dequant-GEMM (prefill) on raw GGUF blocks, against gguf-py + float64 matmul."""

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
from ktx.kernels_gpu.device import interpreting
from ktx.kernels_gpu.gemv import gemm, gemv, quant_linear, quant_linear_reference
from random_gguf_blocks import FORMATS, random_raw

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
GEMV_TYPES = ["Q4_K", "Q6_K", "Q8_0", "Q5_0", "BF16", "F16"]


def weight(name: str, n: int, k: int, seed: int):
    fmt = FORMATS[name]
    raw = random_raw(name, n, k // fmt.block_elems, seed, wide=False)  # [N, row_bytes]
    w = gguf_dequantize(raw, QT[name]).astype(np.float64)  # [N, K]
    return torch.from_numpy(raw).to(DEVICE), w


def check_close(y: torch.Tensor, x: torch.Tensor, w: np.ndarray, rel: float):
    x64 = x.double().cpu().numpy()
    want = x64 @ w.T  # [T, N]
    scale = np.abs(x64) @ np.abs(w).T + 1e-30  # the size of the terms summed: bounds the rounding error
    err = np.abs(y.double().cpu().numpy() - want) / scale
    assert err.max() < rel, f"max error {err.max():.3g} of the |x|@|W| scale"


@pytest.mark.parametrize("name", GEMV_TYPES)
@pytest.mark.parametrize("t", [1, 3, 8])
def test_gemv_matches_dequantized_matmul(name, t):
    k = 512
    raw, w = weight(name, 37, k, seed=t)
    x = torch.randn(t, k, generator=torch.Generator().manual_seed(t)).to(DEVICE)  # [T, K]
    y = gemv(x, raw, name)  # [T, N]
    assert y.shape == (t, 37) and y.dtype == torch.float32
    check_close(y, x, w, rel=1e-5)
    check_close(quant_linear_reference(x, raw, name), x, w, rel=1e-5)


@settings(max_examples=8, deadline=None)
@given(name=st.sampled_from(GEMV_TYPES), n=st.integers(1, 40), blocks=st.integers(1, 3), t=st.integers(1, 8),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
def test_gemv_shapes_property(name, n, blocks, t, dtype):
    k = blocks * 256
    raw, w = weight(name, n, k, seed=n * 7 + blocks)
    x = torch.randn(t, k, generator=torch.Generator().manual_seed(n)).to(dtype).to(DEVICE)
    y = gemv(x, raw, name)
    assert y.dtype == dtype
    check_close(y, x, w, rel=1e-5 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("name", ["Q4_K", "Q5_K", "Q6_K", "Q8_0", "Q4_0", "BF16"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gemm_matches_dequantized_matmul(name, dtype):
    k, t = 512, 20
    raw, w = weight(name, 37, k, seed=3)
    x = torch.randn(t, k, generator=torch.Generator().manual_seed(5)).to(dtype).to(DEVICE)
    y = quant_linear(x, raw, name)  # T > 8: the GEMM
    assert y.shape == (t, 37) and y.dtype == dtype
    check_close(y, x, w, rel=1e-5 if dtype == torch.float32 else 2e-3)


def test_gemv_and_gemm_reject_bad_input():
    raw, _ = weight("Q8_0", 4, 64, seed=0)
    with pytest.raises(KtxError, match="do not match"):
        gemv(torch.zeros(1, 32, device=DEVICE), raw, "Q8_0")
    with pytest.raises(KtxError, match="1..8"):
        gemv(torch.zeros(9, 64, device=DEVICE), raw, "Q8_0")
    with pytest.raises(KtxError, match="fp32, fp16 or bf16"):
        gemm(torch.zeros(2, 64, dtype=torch.float64, device=DEVICE), raw, "Q8_0")


@pytest.mark.skipif(not torch.cuda.is_available() or interpreting(),
                    reason="bf16 tl.dot needs a real GPU (wrong under the interpreter)")
def test_gemm_bf16_dot_on_gpu():
    raw, w = weight("Q4_K", 256, 1024, seed=9)
    x = torch.randn(64, 1024, device="cuda").bfloat16()
    check_close(gemm(x, raw, "Q4_K"), x, w, rel=1e-2)
