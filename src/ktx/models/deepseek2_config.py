"""Configuration of the `deepseek2` GGUF architecture: DeepSeek-V2, V2-Lite, V3, R1 (and Kimi-K2 class).

Filled from GGUF metadata with llama.cpp's keys and defaults:
- V2 / V2-Lite: softmax gating (`expert_gating_func` absent or 1), V2-Lite has no q-LoRA (`q_lora_rank` 0).
- V3 / R1: sigmoid gating (`expert_gating_func` 2) with `exp_probs_b` bias, group-limited top-k
  (`expert_group_count`, `expert_group_used_count`), `expert_weights_norm`, `expert_weights_scale`, YaRN.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ktx.errors import KtxError

GATING_SOFTMAX, GATING_SIGMOID = 1, 2


@dataclass
class Deepseek2Config:
    vocab_size: int
    hidden: int  # embedding_length
    n_layers: int
    n_heads: int
    q_lora_rank: int  # 0 = no q-LoRA (V2-Lite): q = W_q x
    kv_lora_rank: int
    qk_nope: int
    qk_rope: int
    v_head: int
    ffn: int  # dense MLP intermediate size
    moe_ffn: int  # per-expert intermediate size
    n_expert: int
    n_expert_used: int
    n_shared: int
    n_dense_lead: int  # leading dense layers
    gating: int = GATING_SOFTMAX
    n_group: int = 1
    topk_group: int = 1
    expert_weights_norm: bool = False
    expert_weights_scale: float = 1.0
    rms_eps: float = 1e-6
    rope_base: float = 10000.0
    rope_scaling: str = "none"  # none | yarn
    rope_factor: float = 1.0
    rope_orig_ctx: int = 4096
    yarn_log_mul: float = 0.0  # 0.1 * mscale_all_dim
    yarn_beta_fast: float = 32.0
    yarn_beta_slow: float = 1.0
    context_length: int = 4096

    def __post_init__(self):
        if self.n_heads <= 0 or self.hidden <= 0 or self.n_layers <= 0:
            raise KtxError(f"deepseek2 config: bad sizes (hidden {self.hidden}, heads {self.n_heads}, layers {self.n_layers}).")
        if self.n_expert and not (0 < self.n_expert_used <= self.n_expert):
            raise KtxError(f"deepseek2 config: expert_used_count {self.n_expert_used} must be in 1..{self.n_expert}.")
        if self.n_group > 1 and (self.n_expert % self.n_group or not 0 < self.topk_group <= self.n_group):
            raise KtxError(f"deepseek2 config: {self.n_expert} experts do not split into {self.n_group} groups with {self.topk_group} used.")
        if self.gating not in (GATING_SOFTMAX, GATING_SIGMOID):
            raise KtxError(f"deepseek2 config: expert_gating_func {self.gating} is not softmax (1) or sigmoid (2).")
        if self.qk_rope % 2:
            raise KtxError(f"deepseek2 config: rope dimension {self.qk_rope} must be even.")

    @property
    def qk_head(self) -> int:
        return self.qk_nope + self.qk_rope

    @property
    def mscale(self) -> float:
        """YaRN attention-temperature factor: softmax scale gets mscale^2 (as DeepSeek's reference does)."""
        if self.rope_scaling != "yarn" or self.rope_factor <= 1 or not self.yarn_log_mul:
            return 1.0
        return 1.0 + self.yarn_log_mul * math.log(self.rope_factor)

    @property
    def softmax_scale(self) -> float:
        return self.qk_head**-0.5 * self.mscale**2

    @classmethod
    def from_gguf(cls, md: dict, source: str = "model") -> "Deepseek2Config":
        a = "deepseek2"

        def need(key):
            v = md.get(f"{a}.{key}")
            if v is None:
                raise KtxError(f"{source}: metadata key {a}.{key} is missing; the GGUF was made by an incompatible converter.")
            return v

        n_heads = int(need("attention.head_count"))
        kv_lora = int(need("attention.kv_lora_rank"))
        rope = int(need("rope.dimension_count"))
        # MLA files from newer llama.cpp store key_length = kv_lora + rope (absorbed MQA view) and the
        # per-head sizes under *_mla; older files store the per-head sizes directly.
        k_len = int(md.get(f"{a}.attention.key_length_mla", md.get(f"{a}.attention.key_length", 192)))
        v_len = int(md.get(f"{a}.attention.value_length_mla", md.get(f"{a}.attention.value_length", 128)))
        scaling = str(md.get(f"{a}.rope.scaling.type", "none")).lower()
        tokens = md.get("tokenizer.ggml.tokens")
        vocab = int(md.get(f"{a}.vocab_size", len(tokens) if tokens is not None else 0))
        n_expert = int(md.get(f"{a}.expert_count", 0))
        return cls(
            vocab_size=vocab,
            hidden=int(need("embedding_length")),
            # files that keep the multi-token-prediction (NextN) layers count them in block_count, after the
            # model's own layers: those layers draft tokens and are not part of the forward pass
            n_layers=int(need("block_count")) - int(md.get(f"{a}.nextn_predict_layers", 0) or 0),
            n_heads=n_heads,
            q_lora_rank=int(md.get(f"{a}.attention.q_lora_rank", 0)),
            kv_lora_rank=kv_lora,
            qk_nope=k_len - rope,
            qk_rope=rope,
            v_head=v_len,
            ffn=int(need("feed_forward_length")),
            moe_ffn=int(md.get(f"{a}.expert_feed_forward_length", 0)),
            n_expert=n_expert,
            n_expert_used=int(md.get(f"{a}.expert_used_count", 0)),
            n_shared=int(md.get(f"{a}.expert_shared_count", 0)),
            n_dense_lead=int(md.get(f"{a}.leading_dense_block_count", 0 if n_expert else 10**9)),
            gating=int(md.get(f"{a}.expert_gating_func", GATING_SOFTMAX)),
            n_group=int(md.get(f"{a}.expert_group_count", 1) or 1),
            topk_group=int(md.get(f"{a}.expert_group_used_count", 1) or 1),
            expert_weights_norm=bool(md.get(f"{a}.expert_weights_norm", False)),
            expert_weights_scale=float(md.get(f"{a}.expert_weights_scale", 1.0) or 1.0),
            rms_eps=float(md.get(f"{a}.attention.layer_norm_rms_epsilon", 1e-6)),
            rope_base=float(md.get(f"{a}.rope.freq_base", 10000.0)),
            rope_scaling=scaling if scaling in ("yarn", "none") else scaling,
            rope_factor=float(md.get(f"{a}.rope.scaling.factor", 1.0) or 1.0),
            rope_orig_ctx=int(md.get(f"{a}.rope.scaling.original_context_length", md.get(f"{a}.context_length", 4096))),
            yarn_log_mul=float(md.get(f"{a}.rope.scaling.yarn_log_multiplier", 0.0)),
            yarn_beta_fast=float(md.get(f"{a}.rope.scaling.yarn_beta_fast", 32.0)),
            yarn_beta_slow=float(md.get(f"{a}.rope.scaling.yarn_beta_slow", 1.0)),
            context_length=int(md.get(f"{a}.context_length", 4096)),
        )
