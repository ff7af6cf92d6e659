"""ktx: giant Mixture-of-Experts models from GGUF on one machine (experts on the CPU, the rest on the GPU)."""

from ktx.errors import KtxError

__version__ = "0.1.0"


def load(path, **kwargs):
    """Load a GGUF model for generation: `model = ktx.load("model.gguf")`. See `ktx.api.Model`."""
    from ktx.api import load as _load

    return _load(path, **kwargs)


__all__ = ["KtxError", "load", "__version__"]
