"""Model definitions, one module per architecture family, keyed by GGUF `general.architecture`."""

from __future__ import annotations

import importlib

from ktx.errors import KtxError

ARCHITECTURES = {
    "deepseek2": "ktx.models.deepseek2:Deepseek2",
    "llama": "ktx.models.gqa:GQATransformer",  # also Mixtral: llama.cpp writes it as llama with experts
    "qwen2moe": "ktx.models.gqa:GQATransformer",
    "qwen3moe": "ktx.models.gqa:GQATransformer",
    "gemma3": "ktx.models.gqa:GQATransformer",
}


def model_class(arch: str, source: str = "model"):
    if arch not in ARCHITECTURES:
        raise KtxError(f"{source}: architecture {arch!r} is not supported; ktx runs {', '.join(sorted(ARCHITECTURES))}.")
    module, name = ARCHITECTURES[arch].split(":")
    return getattr(importlib.import_module(module), name)


def build_model(gguf, store, experts_factory_for, linears=None):
    """Instantiate the model for `gguf`; experts_factory_for(cfg) -> per-layer experts factory or None;
    linears: the dense-matmul backend (ktx.layers.linear; float32 reference when None)."""
    cls = model_class(gguf.architecture, str(gguf.path))
    cfg = cls.config_class.from_gguf(gguf.metadata, str(gguf.path))
    return cls(gguf, store, cfg, experts_factory_for(cfg), linears)
