"""ktx: giant Mixture-of-Experts models from GGUF on one machine (experts on the CPU, the rest on the GPU)."""

import os
import sys

# torch's OpenMP threads spin after every parallel region; on a small machine they then take the cores from the
# expert and dense kernels' worker threads, which made decode 5-8x slower (measured: 404 vs 50 ms per token on
# dsv3-bench, 2 cores). Passive waiting must be chosen before torch loads OpenMP.
OMP_PASSIVE = "torch" not in sys.modules or os.environ.get("OMP_WAIT_POLICY", "").upper() == "PASSIVE"
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from ktx.errors import KtxError  # noqa: E402

__version__ = "0.1.0"


def load(path, **kwargs):
    """Load a GGUF model for generation: `model = ktx.load("model.gguf")`. See `ktx.api.Model`."""
    from ktx.api import load as _load

    return _load(path, **kwargs)


__all__ = ["KtxError", "load", "__version__"]
