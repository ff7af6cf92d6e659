"""Configuration of the grouped-query-attention family: `llama` (also Mixtral, which llama.cpp writes as
`llama` with experts), `qwen2moe`, `qwen3moe` and `gemma3`.

One dataclass for all of them: the sizes come from GGUF metadata (`{arch}.block_count`, ...), and the
switches that tell the architectures apart come from ARCH_FEATURES, because llama.cpp hard-codes them
per architecture instead of writing them to the file:

    arch       rope          qk-norm  extra                                                   routing norm
    llama      interleaved   no       (q/k rows permuted by the converter)                    yes (Mixtral)
    qwen2moe   NeoX          no       q/k/v biases, shared expert with a sigmoid gate          no
    qwen3moe   NeoX          yes                                                               yes
    gemma3     NeoX          yes      x*sqrt(H) embedding, post-attention/post-FFN norms,      -
                                      GELU(tanh) MLP, sliding window on 5 of every 6 layers
                                      with rope base 10000 there, (1 + w) norms baked in weights

`expert_weights_norm` in the file, when present, overrides the routing-norm default.
"""

from __future__ import annotations

from dataclasses import dataclass

from ktx.errors import KtxError

ARCH_FEATURES = {
    "llama": dict(neox=False, routing_norm=True),
    "qwen2moe": dict(neox=True, routing_norm=False),
    "qwen3moe": dict(neox=True, routing_norm=True),
    "gemma3": dict(neox=True, embed_scale=True, post_norms=True, act="gelu_tanh", swa_pattern=6, rope_base_swa=10000.0),
}


@dataclass
class GQAConfig:
    arch: str
    vocab_size: int
    hidden: int  # embedding_length
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int  # attention.key_length
    v_head_dim: int  # attention.value_length
    ffn: int  # dense MLP intermediate size
    rope_dim: int  # rotated dims of each head (the first rope_dim; all of them usually)
    rms_eps: float = 1e-6
    rope_base: float = 10000.0
    rope_linear_factor: float = 1.0  # positions / factor ("linear" rope scaling; gemma3: global layers only)
    neox: bool = True  # rotate (x[i], x[i + d/2]) pairs; False: adjacent pairs (x[2i], x[2i+1])
    context_length: int = 4096
    # MoE (n_expert = 0: dense)
    n_expert: int = 0
    n_expert_used: int = 0
    moe_ffn: int = 0  # per-expert intermediate size
    shared_ffn: int = 0  # qwen2moe shared expert intermediate size (0 = none)
    routing_norm: bool = True  # renormalise the top-k softmax weights to sum 1
    # gemma3
    embed_scale: bool = False
    post_norms: bool = False
    act: str = "silu"  # silu | gelu_tanh
    sliding_window: int = 0  # 0 = full attention everywhere
    swa_pattern: int = 0  # every swa_pattern-th layer is global, the rest slide (0: all slide if a window is set)
    rope_base_swa: float = 0.0  # rope base on sliding layers (0: rope_base)

    def __post_init__(self):
        if min(self.hidden, self.n_layers, self.n_heads, self.n_kv_heads, self.head_dim) <= 0:
            raise KtxError(f"{self.arch} config: bad sizes (hidden {self.hidden}, layers {self.n_layers}, heads {self.n_heads}, "
                           f"kv heads {self.n_kv_heads}, head_dim {self.head_dim}).")
        if self.n_heads % self.n_kv_heads:
            raise KtxError(f"{self.arch} config: {self.n_heads} query heads do not split into {self.n_kv_heads} KV groups.")
        if self.rope_dim % 2 or not 0 < self.rope_dim <= self.head_dim:
            raise KtxError(f"{self.arch} config: rope dimension {self.rope_dim} must be even and at most head_dim {self.head_dim}.")
        if self.n_expert and not (0 < self.n_expert_used <= self.n_expert) or self.n_expert and self.moe_ffn <= 0:
            raise KtxError(f"{self.arch} config: {self.n_expert} experts with {self.n_expert_used} used and expert FFN "
                           f"{self.moe_ffn}; expert_used_count must be in 1..expert_count and expert_feed_forward_length > 0.")
        if self.act not in ("silu", "gelu_tanh"):
            raise KtxError(f"{self.arch} config: activation {self.act!r} is not silu or gelu_tanh.")

    def is_sliding(self, i: int) -> bool:
        """llama.cpp's swa pattern: with pattern n, layers n-1, 2n-1, ... attend globally."""
        if not self.sliding_window:
            return False
        return not self.swa_pattern or (i + 1) % self.swa_pattern != 0

    @property
    def softmax_scale(self) -> float:
        return self.head_dim**-0.5

    @classmethod
    def from_gguf(cls, md: dict, source: str = "model") -> "GQAConfig":
        a = str(md.get("general.architecture"))
        if a not in ARCH_FEATURES:
            raise KtxError(f"{source}: architecture {a!r} is not one of {', '.join(ARCH_FEATURES)}.")
        feats = dict(ARCH_FEATURES[a])

        def need(key):
            v = md.get(f"{a}.{key}")
            if v is None:
                raise KtxError(f"{source}: metadata key {a}.{key} is missing; the GGUF was made by an incompatible converter.")
            return v

        def get(key, default):
            v = md.get(f"{a}.{key}")
            return default if v is None else v

        hidden, n_heads = int(need("embedding_length")), int(need("attention.head_count"))
        head_dim = int(get("attention.key_length", hidden // n_heads))
        tokens = md.get("tokenizer.ggml.tokens")
        scaling = str(get("rope.scaling.type", "none")).lower()
        if scaling not in ("none", "linear"):
            raise KtxError(f"{source}: rope scaling {scaling!r} is not supported for {a} (ktx reads none and linear).")
        if md.get(f"{a}.expert_weights_norm") is not None:
            feats["routing_norm"] = bool(md[f"{a}.expert_weights_norm"])
        if md.get(f"{a}.attention.sliding_window_pattern") is not None:
            feats["swa_pattern"] = int(md[f"{a}.attention.sliding_window_pattern"])
        if md.get(f"{a}.rope.freq_base_swa") is not None:
            feats["rope_base_swa"] = float(md[f"{a}.rope.freq_base_swa"])
        return cls(
            arch=a,
            vocab_size=int(get("vocab_size", len(tokens) if tokens is not None else 0)),
            hidden=hidden,
            n_layers=int(need("block_count")),
            n_heads=n_heads,
            n_kv_heads=int(get("attention.head_count_kv", n_heads)),
            head_dim=head_dim,
            v_head_dim=int(get("attention.value_length", head_dim)),
            ffn=int(get("feed_forward_length", 0)),
            rope_dim=int(get("rope.dimension_count", head_dim)),
            rms_eps=float(get("attention.layer_norm_rms_epsilon", 1e-6)),
            rope_base=float(get("rope.freq_base", 10000.0)),
            rope_linear_factor=float(get("rope.scaling.factor", 1.0) or 1.0) if scaling == "linear" else 1.0,
            context_length=int(get("context_length", 4096)),
            n_expert=int(get("expert_count", 0)),
            n_expert_used=int(get("expert_used_count", 0)),
            moe_ffn=int(get("expert_feed_forward_length", get("feed_forward_length", 0))),
            shared_ffn=int(get("expert_shared_feed_forward_length", 0)),
            sliding_window=int(get("attention.sliding_window", 0)),
            **feats,
        )
