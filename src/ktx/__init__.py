"""ktx: giant Mixture-of-Experts models from GGUF on one machine (experts on the CPU, the rest on the GPU)."""

import os
import sys

# torch's OpenMP threads spin after every parallel region; on a small machine they then take the cores from the
# expert and dense kernels' worker threads, which made decode 5-8x slower (measured: 404 vs 50 ms per token on
# dsv3-bench, 2 cores). Passive waiting must be chosen before torch loads OpenMP.
OMP_PASSIVE = "torch" not in sys.modules or os.environ.get("OMP_WAIT_POLICY", "").upper() == "PASSIVE"
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _numba_cache_dir() -> str:
    """Numba's on-disk cache keyed by the CPU kernels' sources. Numba checks only the timestamp of the file that
    defines a cached function, but the kernels inline code generated in other modules (simd.py's tiles inside
    moe_loops.py's loops): after an upgrade that changes only simd.py, the old machine code would be loaded.
    One folder per hash of all kernels_cpu sources makes any change start a fresh cache."""
    import hashlib
    from importlib.util import find_spec
    from pathlib import Path

    spec = find_spec("ktx.kernels_cpu")
    digest = hashlib.sha256()
    for f in sorted(Path(spec.origin).parent.glob("*.py")) if spec and spec.origin else []:
        digest.update(f.name.encode() + f.read_bytes())
    root = Path(os.environ.get("KTX_CACHE") or Path.home() / ".cache" / "ktx").expanduser()
    return str(root / "numba" / digest.hexdigest()[:16])


if "NUMBA_CACHE_DIR" not in os.environ:
    if "numba" in sys.modules:  # imported before ktx: its config is read already; the kernels are not cached yet
        sys.modules["numba"].config.CACHE_DIR = _numba_cache_dir()
    else:
        os.environ["NUMBA_CACHE_DIR"] = _numba_cache_dir()

from ktx.errors import KtxError  # noqa: E402

__version__ = "0.1.0"


def load(path, **kwargs):
    """Load a GGUF model for generation: `model = ktx.load("model.gguf")`. See `ktx.api.Model`."""
    from ktx.api import load as _load

    return _load(path, **kwargs)


__all__ = ["KtxError", "load", "__version__"]
