"""RMSNorm: y = x / sqrt(mean(x^2) + eps) * weight, one program per row, all arithmetic in fp32.

    x [T, D] (rows may be strided, e.g. a slice of a wider projection; the last dim contiguous)
    weight [D]
    y [T, D] in x's dtype, rounded once at the end

D up to a few thousand fits one block (7168 -> 8192 lanes), so a row is read once and written once.
"""

import torch
import triton
import triton.language as tl

from ktx.errors import KtxError
from ktx.kernels_gpu.device import check_device, check_float, check_scalar

MAX_D = 65536  # one row is one block of registers


@triton.jit
def _rmsnorm_kernel(x_ptr, w_ptr, y_ptr, D, x_stride, eps, BD: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    d = tl.arange(0, BD)
    dm = d < D
    x = tl.load(x_ptr + row * x_stride + d, mask=dm, other=0.0).to(tl.float32)  # [BD]
    w = tl.load(w_ptr + d, mask=dm, other=0.0).to(tl.float32)
    inv_rms = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / D + eps)
    tl.store(y_ptr + row * D + d, (x * inv_rms * w).to(y_ptr.dtype.element_ty), mask=dm)


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [T, D], weight [D] -> [T, D] in x's dtype."""
    check_device("rmsnorm", x, weight)
    if x.dim() != 2 or weight.shape != (x.shape[1],):
        raise KtxError(f"rmsnorm: expected x [T, D] and weight [D]; got {tuple(x.shape)} and {tuple(weight.shape)}")
    check_float("rmsnorm", "x", x)
    check_float("rmsnorm", "weight", weight)
    check_scalar("rmsnorm", "eps", eps, 0.0)
    if x.stride(1) != 1:
        raise KtxError("rmsnorm: the last dimension of x must be contiguous")
    if x.shape[1] > MAX_D:
        raise KtxError(f"rmsnorm: rows of {x.shape[1]} exceed the one-block limit of {MAX_D}")
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if x.numel():
        _rmsnorm_kernel[(x.shape[0],)](x, weight.contiguous(), y, x.shape[1], x.stride(0), eps,
                                       BD=triton.next_power_of_2(x.shape[1]))
    return y


def rmsnorm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()).to(x.dtype)
