"""Random raw GGUF blocks for the GPU kernel tests (every bit pattern, finite fp16 scales)."""

import numpy as np

from ktx.kernels_gpu.dequant import FORMATS

# byte offsets of the fp16 fields (d, dmin) inside one block
FP16_FIELDS = {"Q8_0": [0], "Q4_0": [0], "Q5_0": [0], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208]}


def random_raw(name: str, rows: int, blocks: int, seed: int, wide: bool = True) -> np.ndarray:
    """Random blocks: every quant bit pattern, finite fp16 scales (normal, subnormal, negative, zero).

    wide=False keeps scales near 0.01 (weights of a plausible size) for matmul tolerances.
    """
    fmt = FORMATS[name]
    rng = np.random.default_rng(seed)
    if name in ("F16", "BF16"):
        x = (rng.standard_normal((rows, blocks)) * 10.0 ** (rng.integers(-6, 4, (rows, blocks)) if wide else -1)).astype(np.float32)
        if name == "F16":
            return x.astype(np.float16).view(np.uint8)
        return (x.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)
    raw = rng.integers(0, 256, (rows * blocks, fmt.block_bytes), dtype=np.uint8)
    for off in FP16_FIELDS[name]:
        d = (rng.standard_normal(rows * blocks) * 10.0 ** (rng.integers(-7, 2, rows * blocks) if wide else -2)).astype(np.float16)
        d[:: max(1, len(d) // 3)] = 0
        raw[:, off : off + 2] = d.view(np.uint8).reshape(-1, 2)
    return raw.reshape(rows, blocks * fmt.block_bytes)
