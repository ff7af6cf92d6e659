"""Rotary position embedding, GPT-J interleaved pairs (llama.cpp's convention for deepseek2), with YaRN.

Pair i of a head is (x[2i], x[2i+1]); it turns by theta_i = pos * inv_freq[i]:

    y[2i]   = (x[2i] cos - x[2i+1] sin) * mscale
    y[2i+1] = (x[2i] sin + x[2i+1] cos) * mscale

    x [T, H, D] (D = rope dims, e.g. 64; strided views such as q[..., nope:] are fine)
    positions [T] integer, inv_freq [D/2] fp32  ->  y [T, H, D] contiguous, x's dtype

YaRN (DeepSeek's formulas; `yarn`): with the training context L0 = original_max_position_embeddings,
dimension pair i completes L0 * inv_freq_i / (2 pi) turns over L0 tokens. Pairs that turn often
(more than beta_fast = 32 times) keep their frequency (extrapolation); pairs that turn less than
beta_slow = 1 time are interpolated (frequency / factor); a linear ramp in i blends the two between
the correction range [low, high] (find_correction_range, floor/ceil, clamped to [0, D-1]).
get_mscale(s, m) = 0.1 * m * ln(s) + 1 (1 when s <= 1). cos/sin are multiplied by
get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim), and DeepSeek multiplies the
attention softmax scale by get_mscale(factor, mscale_all_dim)^2.
"""

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ktx.errors import KtxError
from ktx.kernels_gpu.device import check_device, check_float, check_scalar


@dataclass(frozen=True)
class YarnRope:
    inv_freq: torch.Tensor  # [rope_dim / 2] fp32
    mscale: float  # multiplies cos and sin
    softmax_scale: float  # q_head_dim^-0.5 * get_mscale(factor, mscale_all_dim)^2


def get_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def find_correction_range(beta_fast: float, beta_slow: float, dim: int, base: float, max_pos: int) -> tuple[int, int]:
    """Pair indices where the frequency ramp starts and ends (pairs turning beta_fast .. beta_slow times)."""
    def pair_for(turns: float) -> float:  # the pair index i at which L0 * inv_freq_i = turns * 2 pi
        return dim * math.log(max_pos / (turns * 2 * math.pi)) / (2 * math.log(base))
    return max(math.floor(pair_for(beta_fast)), 0), min(math.ceil(pair_for(beta_slow)), dim - 1)


def yarn(rope_dim: int, base: float, factor: float, original_max_pos: int, q_head_dim: int,
         beta_fast: float = 32.0, beta_slow: float = 1.0, mscale: float = 1.0, mscale_all_dim: float = 0.0,
         device: torch.device | str = "cpu") -> YarnRope:
    """inv_freq, cos/sin scale and attention softmax scale of DeepSeek's YaRN (factor <= 1: plain RoPE)."""
    if rope_dim < 2 or rope_dim % 2 or q_head_dim < 1:
        raise KtxError(f"yarn: rope_dim must be even and >= 2 and q_head_dim >= 1, got {rope_dim}, {q_head_dim}")
    for name, v, lo in (("base", base, 1.0), ("factor", factor, 0.0), ("original_max_pos", original_max_pos, 1)):
        check_scalar("yarn", name, v, lo)
    if base == 1.0 or factor == 0:
        raise KtxError(f"yarn: base must be > 1 and factor > 0, got {base}, {factor}")
    pos_freqs = base ** (torch.arange(0, rope_dim, 2, dtype=torch.float32) / rope_dim)  # [D/2]
    extrapolated, interpolated = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    softmax_scale = q_head_dim ** -0.5
    if factor <= 1:
        return YarnRope(extrapolated.to(device), 1.0, softmax_scale)
    low, high = find_correction_range(beta_fast, beta_slow, rope_dim, base, original_max_pos)
    ramp = ((torch.arange(rope_dim // 2, dtype=torch.float32) - low) / max(high - low, 0.001)).clamp(0, 1)
    keep = 1.0 - ramp  # 1: keep the trained frequency, 0: interpolate
    inv_freq = interpolated * (1 - keep) + extrapolated * keep
    if mscale_all_dim:
        softmax_scale *= get_mscale(factor, mscale_all_dim) ** 2
    return YarnRope(inv_freq.to(device), get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim), softmax_scale)


@triton.jit
def _rope_kernel(x_ptr, pos_ptr, f_ptr, y_ptr, H, sx_t, sx_h, mscale, HALF: tl.constexpr, BH: tl.constexpr,
                 BP: tl.constexpr):
    t = tl.program_id(0)
    h = tl.program_id(1) * BH + tl.arange(0, BH)[:, None]  # [BH, 1]
    i = tl.arange(0, BP)[None, :]  # [1, BP] pair index
    m = (h < H) & (i < HALF)
    theta = tl.load(pos_ptr + t).to(tl.float32) * tl.load(f_ptr + i, mask=i < HALF, other=0.0)  # [1, BP]
    cos = tl.cos(theta) * mscale
    sin = tl.sin(theta) * mscale
    src = x_ptr + t.to(tl.int64) * sx_t + h * sx_h + 2 * i
    x0 = tl.load(src, mask=m, other=0.0).to(tl.float32)  # [BH, BP]
    x1 = tl.load(src + 1, mask=m, other=0.0).to(tl.float32)
    dst = y_ptr + (t.to(tl.int64) * H + h) * (2 * HALF) + 2 * i
    tl.store(dst, (x0 * cos - x1 * sin).to(y_ptr.dtype.element_ty), mask=m)
    tl.store(dst + 1, (x0 * sin + x1 * cos).to(y_ptr.dtype.element_ty), mask=m)


def rope(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, mscale: float = 1.0) -> torch.Tensor:
    """x [T, H, D], positions [T], inv_freq [D/2] -> rotated [T, H, D] (GPT-J interleaved pairs)."""
    check_device("rope", x, positions, inv_freq)
    if x.dim() != 3 or x.shape[2] % 2 or positions.shape != (x.shape[0],) or inv_freq.shape != (x.shape[2] // 2,):
        raise KtxError(f"rope: expected x [T, H, D] (D even), positions [T], inv_freq [D/2]; got "
                       f"{tuple(x.shape)}, {tuple(positions.shape)}, {tuple(inv_freq.shape)}")
    if x.stride(2) != 1 or positions.dtype not in (torch.int32, torch.int64) or inv_freq.dtype != torch.float32:
        raise KtxError("rope: x's last dim must be contiguous, positions integer and inv_freq fp32")
    check_float("rope", "x", x)
    check_scalar("rope", "mscale", mscale)
    positions, inv_freq = positions.contiguous(), inv_freq.contiguous()  # read as flat arrays
    t, h, d = x.shape
    y = torch.empty(t, h, d, dtype=x.dtype, device=x.device)
    if t and h:
        bh = min(16, triton.next_power_of_2(h))
        _rope_kernel[(t, triton.cdiv(h, bh))](x, positions, inv_freq, y, h, x.stride(0), x.stride(1), mscale,
                                              HALF=d // 2, BH=bh, BP=triton.next_power_of_2(d // 2))
    return y


def rope_reference(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, mscale: float = 1.0) -> torch.Tensor:
    theta = positions.float()[:, None] * inv_freq[None, :]  # [T, D/2]
    cos, sin = (theta.cos() * mscale)[:, None], (theta.sin() * mscale)[:, None]  # [T, 1, D/2]
    x0, x1 = x.float()[..., 0::2], x.float()[..., 1::2]  # [T, H, D/2]
    return torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1).flatten(-2).to(x.dtype)
