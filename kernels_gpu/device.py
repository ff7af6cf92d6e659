"""What the kernels' launch heuristics need to know about where they run.

Under `TRITON_INTERPRET=1` (tests on a machine without a GPU) kernels run on the CPU interpreter: there
is no SM count to query, so a small fixed one stands in (small enough that split-K and split-KV paths
are exercised on tiny test shapes), and `tl.dot` must be fed fp32 (bf16 dot is wrong there).
"""

import math
import os

import torch

from ktx.errors import KtxError

INTERPRETER_SM_COUNT = 4


def interpreting() -> bool:
    """True when Triton runs kernels on the CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; a fixed stand-in under the interpreter."""
    if device.type == "cuda" and not interpreting():
        return torch.cuda.get_device_properties(device).multi_processor_count
    return INTERPRETER_SM_COUNT


FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_float(what: str, name: str, t: torch.Tensor) -> None:
    """`t` holds fp32, fp16 or bf16 (the dtypes the kernels load and store)."""
    if t.dtype not in FLOAT_DTYPES:
        raise KtxError(f"{what}: {name} must be fp32, fp16 or bf16, got {t.dtype}")


def check_scalar(what: str, name: str, v: float, lo: float = float("-inf")) -> None:
    """A finite number >= lo (NaN or infinity in a scale poisons every output)."""
    if not isinstance(v, (int, float)) or not math.isfinite(v) or v < lo:
        raise KtxError(f"{what}: {name} must be a finite number >= {lo}, got {v!r}")


def check_device(what: str, *tensors: torch.Tensor) -> torch.device:
    """All tensors on one device that Triton can run on; return it."""
    if not all(isinstance(t, torch.Tensor) for t in tensors):
        raise KtxError(f"{what}: expected torch tensors, got {[type(t).__name__ for t in tensors]}")
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        raise KtxError(f"{what}: tensors are on different devices {sorted(map(str, devices))}; move them to one GPU")
    device = devices.pop()
    if device.type != "cuda" and not interpreting():
        raise KtxError(f"{what}: tensors are on {device}, Triton kernels need a CUDA device "
                       "(or TRITON_INTERPRET=1 for CPU testing)")
    return device
