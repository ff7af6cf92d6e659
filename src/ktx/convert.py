"""Hugging Face checkpoint folder -> GGUF file, with llama.cpp's tensor names and metadata keys.

Input: a folder with `config.json`, `*.safetensors` (optionally `model.safetensors.index.json`),
`tokenizer.json` and `tokenizer_config.json`. Output: one GGUF file that llama.cpp (and ktx's loader)
reads as if llama.cpp's own `convert_hf_to_gguf.py` had written it.

How it runs (memory stays bounded by the largest single tensor, plus one expert at a time):

    1. plan:  walk the safetensors names in file order (metadata only, nothing loaded) and turn each
              into output tensors `_Out(name, shape, qtype, produce)`; `produce` loads lazily.
    2. header: metadata keys (per-architecture function + tokenizer), then all tensor infos, whose byte
              sizes are known from shapes alone.
    3. data:  for each output tensor, load (safe_open, tensor by tensor) -> float32 -> gguf.quants.quantize
              -> write; stacked expert tensors stream one expert at a time.

Layout conventions (numpy shapes below; GGUF/ggml `ne` is the reverse):
    Linear weight        HF [out, in]                -> GGUF same bytes, ne = [in, out]
    experts (stacked)    HF E x [I, H] (or fused)    -> blk.N.ffn_{gate,up}_exps [E, I, H], ffn_down_exps [E, H, I]
    MLA kv_b_proj        HF [n_head*(nope+v), kv_lora], rows per head = [k_nope rows | v rows]
                         -> attn_k_b [n_head, kv_lora, nope]  (per head, k part TRANSPOSED)
                         -> attn_v_b [n_head, v, kv_lora]     (per head, as is)
    e_score_correction_bias -> blk.N.exp_probs_b.bias (F32)

Tensor types follow llama.cpp: 1-D tensors, `*_norm.weight`, the router `ffn_gate_inp.weight` and any
non-`.weight` tensor (biases) stay F32; everything else gets `outtype`. For q8_0 a tensor whose rows
are not a multiple of 32 falls back to F16, as llama.cpp does.

RoPE: DeepSeek checkpoints store q_pe / k_pe with interleaved pairs (x0,x1),(x2,x3).. (HF
`rope_interleave=True`), which is exactly ggml's normal (non-NeoX) RoPE mode that llama.cpp uses for
deepseek2, so the rope rows of q_b_proj and kv_a_proj_with_mqa are copied unchanged. Llama and Mixtral
checkpoints rotate halves (x_i, x_{i+d/2}); llama.cpp runs `llama` files in normal mode, so its converter
permutes the rows of q_proj / k_proj per head, and so does this one:
    head rows [r0 .. r_{d/2-1} | r_{d/2} .. r_{d-1}]  ->  [r0, r_{d/2}, r1, r_{d/2+1}, ...]
Qwen and Gemma files keep the half layout (llama.cpp runs them in NeoX mode): nothing is permuted.
Gemma's RMSNorm scales by (1 + w); llama.cpp stores 1 + w for every norm, and so does this converter.

New architectures are a table entry: `_Arch(gguf_arch, layer_names, expert_names, metadata, splits)`.
"""

from __future__ import annotations

import json
import re
import sys
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ktx.errors import KtxError

OUTTYPES = ("f32", "f16", "bf16", "q8_0")


# --------------------------------------------------------------------------------------------------
# architecture tables


@dataclass(frozen=True)
class _Arch:
    gguf_arch: str
    layer_names: dict[str, str]  # HF name inside `model.layers.N.` -> GGUF name inside `blk.N.`
    expert_names: dict[str, str]  # per-expert HF name with `{x}` -> stacked GGUF name
    metadata: Callable[[dict, "object"], None]  # (config, GGUFWriter) -> None
    splits: dict[str, Callable] = field(default_factory=dict)  # HF layer name -> splitter
    fused_experts: dict[str, tuple[str, ...]] = field(default_factory=dict)  # HF fused name -> GGUF names
    transform: Callable[[str, np.ndarray], np.ndarray] | None = None  # (GGUF name, float32 data) -> data


_GLOBAL_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}

_DEEPSEEK2_LAYER = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.q_a_proj.weight": "attn_q_a.weight",
    "self_attn.q_a_layernorm.weight": "attn_q_a_norm.weight",
    "self_attn.q_b_proj.weight": "attn_q_b.weight",
    "self_attn.kv_a_proj_with_mqa.weight": "attn_kv_a_mqa.weight",
    "self_attn.kv_a_layernorm.weight": "attn_kv_a_norm.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    "mlp.gate.weight": "ffn_gate_inp.weight",
    "mlp.gate.e_score_correction_bias": "exp_probs_b.bias",
    "mlp.shared_experts.gate_proj.weight": "ffn_gate_shexp.weight",
    "mlp.shared_experts.up_proj.weight": "ffn_up_shexp.weight",
    "mlp.shared_experts.down_proj.weight": "ffn_down_shexp.weight",
}

_DEEPSEEK2_EXPERTS = {
    "mlp.experts.{x}.gate_proj.weight": "ffn_gate_exps.weight",
    "mlp.experts.{x}.up_proj.weight": "ffn_up_exps.weight",
    "mlp.experts.{x}.down_proj.weight": "ffn_down_exps.weight",
}

# transformers >= 5 can also hold experts fused: gate_up_proj [E, 2I, H] (gate rows first), down_proj [E, H, I]
_FUSED_EXPERTS = {
    "mlp.experts.gate_up_proj": ("ffn_gate_exps.weight", "ffn_up_exps.weight"),
    "mlp.experts.down_proj": ("ffn_down_exps.weight",),
}


def _common_metadata(cfg: dict, w) -> None:
    """Keys every decoder-only architecture writes (llama.cpp's TextModel.set_gguf_parameters)."""
    import gguf

    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg.get("num_key_value_heads", cfg["num_attention_heads"]))
    rope = _rope_parameters(cfg)
    rope_type = rope.get("rope_type", rope.get("type"))
    if rope_type == "linear" and rope.get("factor") is not None:
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(rope["factor"])
    elif rope_type == "yarn" and rope.get("factor") is not None:
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(rope["factor"])
        w.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
        optional = {
            "extrapolation_factor": w.add_rope_scaling_yarn_ext_factor,
            "attention_factor": w.add_rope_scaling_yarn_attn_factor,
            "beta_fast": w.add_rope_scaling_yarn_beta_fast,
            "beta_slow": w.add_rope_scaling_yarn_beta_slow,
        }
        for key, add in optional.items():
            if rope.get(key) is not None:
                add(rope[key])
    elif rope_type not in (None, "default"):
        raise KtxError(f"config.json: rope type {rope_type!r} is not supported by ktx convert; "
                       "supported: default, linear, yarn")
    w.add_rope_freq_base(rope["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.get("rms_norm_eps", 1e-6))
    n_experts = next((cfg[k] for k in ("num_local_experts", "num_experts", "n_routed_experts") if k in cfg), None)
    if n_experts is not None:
        w.add_expert_count(n_experts)
    if cfg.get("num_experts_per_tok") is not None:
        w.add_expert_used_count(cfg["num_experts_per_tok"])
    if cfg.get("n_group") is not None:
        w.add_expert_group_count(cfg["n_group"])
    if cfg.get("topk_group") is not None:
        w.add_expert_group_used_count(cfg["topk_group"])


def _rope_parameters(cfg: dict) -> dict:
    """RoPE settings from either the transformers-5 `rope_parameters` or the older `rope_scaling` +
    top-level `rope_theta` (the default theta is transformers' default, 10000)."""
    rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    rope.setdefault("rope_theta", cfg.get("rope_theta", 10000.0))
    return rope


def _deepseek2_metadata(cfg: dict, w) -> None:
    """llama.cpp's DeepseekV2Model.set_gguf_parameters: MLA is written as MQA (one KV head) whose key is
    the latent plus the rope part (kv_lora + rope) and whose value is the latent; the real per-head
    sizes go to key_length_mla / value_length_mla."""
    import gguf

    if cfg.get("rope_interleave", True) is False:
        raise KtxError("config.json: rope_interleave=false is not supported (llama.cpp's deepseek2 layout "
                       "assumes interleaved rope pairs); convert a checkpoint with interleaved rope")
    _common_metadata({**cfg, "num_key_value_heads": 1}, w)
    n_experts = cfg.get("n_routed_experts")
    # transformers' DeepseekV3 routes with sigmoid, V2 with softmax; config.json says so on real checkpoints
    default_gating = "sigmoid" if cfg["architectures"][0] == "DeepseekV3ForCausalLM" else "softmax"
    scoring = cfg.get("scoring_func", default_gating)
    gating = {"sigmoid": gguf.ExpertGatingFuncType.SIGMOID, "softmax": gguf.ExpertGatingFuncType.SOFTMAX}
    if scoring not in gating:
        raise KtxError(f"config.json: scoring_func {scoring!r} is not supported; expected sigmoid or softmax")
    w.add_expert_gating_func(gating[scoring])
    kv_lora, rope_dim = cfg["kv_lora_rank"], cfg["qk_rope_head_dim"]
    w.add_key_length(kv_lora + rope_dim)
    w.add_value_length(kv_lora)
    first_dense = cfg.get("first_k_dense_replace")
    if first_dense is None:
        first_dense = cfg["num_hidden_layers"] if n_experts is None else 0
    w.add_leading_dense_block_count(first_dense)
    w.add_vocab_size(cfg["vocab_size"])
    if cfg.get("q_lora_rank") is not None:
        w.add_q_lora_rank(cfg["q_lora_rank"])
    w.add_kv_lora_rank(kv_lora)
    w.add_key_length_mla(cfg["qk_nope_head_dim"] + rope_dim)
    w.add_value_length_mla(cfg["v_head_dim"])
    w.add_expert_feed_forward_length(cfg.get("moe_intermediate_size", cfg["intermediate_size"]))
    w.add_expert_shared_count(cfg.get("n_shared_experts") or 0)
    if cfg.get("routed_scaling_factor") is not None:
        w.add_expert_weights_scale(cfg["routed_scaling_factor"])
    if cfg.get("norm_topk_prob"):
        w.add_expert_weights_norm(True)
    w.add_rope_dimension_count(rope_dim)
    mscale_all_dim = _rope_parameters(cfg).get("mscale_all_dim")
    if mscale_all_dim is not None:
        # llama.cpp stores 0.1 * mscale_all_dim for deepseek2 (its legacy convention)
        w.add_rope_scaling_yarn_log_mul(0.1 * mscale_all_dim)


def _split_kv_b(cfg: dict, shape: tuple, load: Callable[[], np.ndarray]) -> list[tuple[str, tuple, Callable]]:
    """kv_b_proj [n_head*(nope+v), kv_lora] -> attn_k_b [n_head, kv_lora, nope], attn_v_b [n_head, v, kv_lora]."""
    n_head, nope, v = cfg["num_attention_heads"], cfg["qk_nope_head_dim"], cfg["v_head_dim"]
    rank = shape[1]
    if shape[0] != n_head * (nope + v):
        raise KtxError(f"kv_b_proj has {shape[0]} rows, expected num_attention_heads*(qk_nope_head_dim+v_head_dim)"
                       f" = {n_head * (nope + v)}; config.json does not match the weights")

    def k_b() -> np.ndarray:
        kv_b = load().reshape(n_head, nope + v, rank)  # [n_head, nope+v, kv_lora]
        return np.ascontiguousarray(kv_b[:, :nope].transpose(0, 2, 1))  # [n_head, kv_lora, nope]

    def v_b() -> np.ndarray:
        kv_b = load().reshape(n_head, nope + v, rank)
        return np.ascontiguousarray(kv_b[:, nope:])  # [n_head, v, kv_lora]

    return [("attn_k_b.weight", (n_head, rank, nope), k_b), ("attn_v_b.weight", (n_head, v, rank), v_b)]


_DEEPSEEK2 = _Arch(
    gguf_arch="deepseek2",
    layer_names=_DEEPSEEK2_LAYER,
    expert_names=_DEEPSEEK2_EXPERTS,
    metadata=_deepseek2_metadata,
    splits={"self_attn.kv_b_proj.weight": _split_kv_b},
    fused_experts=_FUSED_EXPERTS,
)

# Llama, Mixtral, Qwen2/3-MoE and Gemma-3 name their layer tensors alike; one table holds them all.
_GQA_LAYER = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    **{f"self_attn.{hf}_proj.{kind}": f"attn_{g}.{kind}" for hf, g in (("q", "q"), ("k", "k"), ("v", "v"))
       for kind in ("weight", "bias")},
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    "mlp.gate.weight": "ffn_gate_inp.weight",
    "block_sparse_moe.gate.weight": "ffn_gate_inp.weight",  # Mixtral's older names
    "mlp.shared_expert.gate_proj.weight": "ffn_gate_shexp.weight",
    "mlp.shared_expert.up_proj.weight": "ffn_up_shexp.weight",
    "mlp.shared_expert.down_proj.weight": "ffn_down_shexp.weight",
    "mlp.shared_expert_gate.weight": "ffn_gate_inp_shexp.weight",
}

_GQA_EXPERTS = {
    **_DEEPSEEK2_EXPERTS,
    "block_sparse_moe.experts.{x}.w1.weight": "ffn_gate_exps.weight",
    "block_sparse_moe.experts.{x}.w2.weight": "ffn_down_exps.weight",
    "block_sparse_moe.experts.{x}.w3.weight": "ffn_up_exps.weight",
}

_GEMMA3_LAYER = {
    **_GQA_LAYER,
    "post_attention_layernorm.weight": "post_attention_norm.weight",
    "pre_feedforward_layernorm.weight": "ffn_norm.weight",
    "post_feedforward_layernorm.weight": "post_ffw_norm.weight",
}


def _head_dim(cfg: dict) -> int:
    return cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]


def _gqa_metadata(cfg: dict, w) -> None:
    """Sizes shared by llama / qwen2moe / qwen3moe / gemma3 (llama.cpp's set_gguf_parameters of each)."""
    _common_metadata(cfg, w)
    w.add_vocab_size(cfg["vocab_size"])
    w.add_rope_dimension_count(_head_dim(cfg))
    w.add_key_length(_head_dim(cfg))
    w.add_value_length(_head_dim(cfg))
    if cfg.get("moe_intermediate_size") is not None:
        w.add_expert_feed_forward_length(cfg["moe_intermediate_size"])
    if cfg.get("shared_expert_intermediate_size"):
        w.add_expert_shared_feed_forward_length(cfg["shared_expert_intermediate_size"])
    if cfg.get("norm_topk_prob") is not None:
        w.add_expert_weights_norm(bool(cfg["norm_topk_prob"]))


def _gemma3_metadata(cfg: dict, w) -> None:
    """Gemma-3 text model. llama.cpp fixes what the file does not say: every 6th layer global, the others
    sliding with rope base 10000 (written here too, as rope.freq_base_swa), query scale head_dim^-0.5."""
    rope = cfg.get("rope_parameters") or {}
    full, local = rope.get("full_attention", rope), rope.get("sliding_attention", {})
    n = cfg["num_hidden_layers"]
    pattern = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(n)]
    problems = [
        (cfg.get("layer_types") not in (None, pattern), "layer_types must be sliding except every 6th layer"),
        (cfg.get("query_pre_attn_scalar", _head_dim(cfg)) != _head_dim(cfg), "query_pre_attn_scalar must equal head_dim"),
        (cfg.get("final_logit_softcapping") or cfg.get("attn_logit_softcapping"), "logit soft-capping is not supported"),
        (cfg.get("hidden_activation", "gelu_pytorch_tanh") != "gelu_pytorch_tanh", "hidden_activation must be gelu_pytorch_tanh"),
    ]
    for bad, why in problems:
        if bad:
            raise KtxError(f"config.json: {why} for a gemma3 GGUF (llama.cpp's layout); this checkpoint cannot convert")
    _gqa_metadata({**cfg, "rope_parameters": {"rope_theta": 10000.0, **full}}, w)
    w.add_sliding_window(cfg["sliding_window"])
    w.add_float32("gemma3.rope.freq_base_swa", float(local.get("rope_theta", cfg.get("rope_local_base_freq", 10000.0))))


def _permuted(name: str, n_heads: int, shape: tuple, load: Callable[[], np.ndarray]) -> list[tuple[str, tuple, Callable]]:
    """q/k_proj [n_heads*d, in], halves per head -> adjacent pairs (llama.cpp's LlamaModel.permute)."""

    def produce() -> np.ndarray:
        x = load()  # [n_heads * d, in]
        return np.ascontiguousarray(x.reshape(n_heads, 2, x.shape[0] // n_heads // 2, -1).swapaxes(1, 2).reshape(x.shape))

    return [(name, shape, produce)]


_LLAMA_SPLITS = {
    "self_attn.q_proj.weight": lambda cfg, shape, load: _permuted("attn_q.weight", cfg["num_attention_heads"], shape, load),
    "self_attn.k_proj.weight": lambda cfg, shape, load: _permuted(
        "attn_k.weight", cfg.get("num_key_value_heads") or cfg["num_attention_heads"], shape, load),
}


def _gemma_norm(name: str, x: np.ndarray) -> np.ndarray:
    return x + 1 if name.endswith("norm.weight") else x


_LLAMA = _Arch("llama", {k: v for k, v in _GQA_LAYER.items() if k not in _LLAMA_SPLITS}, _GQA_EXPERTS, _gqa_metadata,
               splits=_LLAMA_SPLITS, fused_experts=_FUSED_EXPERTS)

ARCHITECTURES: dict[str, _Arch] = {
    "DeepseekV3ForCausalLM": _DEEPSEEK2,
    "DeepseekV2ForCausalLM": _DEEPSEEK2,
    "LlamaForCausalLM": _LLAMA,
    "MixtralForCausalLM": _LLAMA,  # llama.cpp writes Mixtral as `llama` with experts
    "Qwen2MoeForCausalLM": _Arch("qwen2moe", _GQA_LAYER, _GQA_EXPERTS, _gqa_metadata, fused_experts=_FUSED_EXPERTS),
    "Qwen3MoeForCausalLM": _Arch("qwen3moe", _GQA_LAYER, _GQA_EXPERTS, _gqa_metadata, fused_experts=_FUSED_EXPERTS),
    "Gemma3ForCausalLM": _Arch("gemma3", _GEMMA3_LAYER, {}, _gemma3_metadata, transform=_gemma_norm),
}


# --------------------------------------------------------------------------------------------------
# tokenizer: gpt2-style byte-level BPE from tokenizer.json

# Split regexes of the pre-tokenizers llama.cpp knows, as tokenizer.json writes them (after
# _normalise_regex). A `Digits` pre-tokenizer counts as \p{N} (individual) or \p{N}+.
_LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_KNOWN_PRE = {
    "deepseek-coder": (r"[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", "[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+", r"\p{N}"),
    "deepseek-v3": (
        r"\p{N}{1,3}",
        "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+",
        r"""[!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"""
        r"""| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""",
    ),
    "llama-bpe": (_LLAMA3_REGEX,),
    "qwen2": (_LLAMA3_REGEX.replace(r"\p{N}{1,3}", r"\p{N}"),),
    "gpt-2": (r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)",),
}


def _normalise_regex(pattern: str) -> str:
    # some tokenizer.json files hold raw CR/LF characters where others hold the escapes \r \n
    return pattern.replace("\r", r"\r").replace("\n", r"\n")


def _pre_tokenizer_regexes(pre: dict | None) -> tuple[str, ...]:
    if not pre:
        return ()
    kind = pre.get("type")
    if kind == "Sequence":
        return tuple(r for p in pre["pretokenizers"] for r in _pre_tokenizer_regexes(p))
    if kind == "Split":
        pattern = pre["pattern"]
        return (_normalise_regex(pattern.get("Regex", re.escape(pattern.get("String", "")))),)
    if kind == "Digits":
        return (r"\p{N}" if pre.get("individual_digits") else r"\p{N}+",)
    if kind == "ByteLevel" and pre.get("use_regex", True):
        return _KNOWN_PRE["gpt-2"]
    return ()


def detect_pre_tokenizer(tokenizer_json: dict) -> str:
    """llama.cpp's `tokenizer.ggml.pre` name whose split regexes equal this tokenizer's, else 'default'."""
    regexes = _pre_tokenizer_regexes(tokenizer_json.get("pre_tokenizer"))
    for name, known in _KNOWN_PRE.items():
        if regexes == known:
            return name
    return "default"


def _looks_special(token: str) -> bool:
    return (token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
            or (token.startswith("<|") and token.endswith("|>"))
            or (token.startswith("<\uff5c") and token.endswith("\uff5c>"))
            or (token.startswith("<unused") and token.endswith(">")))


def _add_tokenizer(hf_dir: Path, cfg: dict, w) -> None:
    """tokens / token types / merges / special ids / chat template, as llama.cpp's _set_vocab_gpt2."""
    import gguf

    path = hf_dir / "tokenizer.json"
    if not path.is_file():
        raise KtxError(f"{path}: missing; ktx convert needs a byte-level BPE tokenizer.json")
    tok = json.loads(path.read_text(encoding="utf-8"))
    if tok.get("model", {}).get("type") != "BPE":
        raise KtxError(f"{path}: tokenizer model {tok.get('model', {}).get('type')!r} is not supported; "
                       "only byte-level BPE (gpt2-style) tokenizers convert")
    vocab: dict[str, int] = dict(tok["model"]["vocab"])
    added = {a["id"]: a for a in tok.get("added_tokens", [])}
    for a in added.values():
        vocab[a["content"]] = a["id"]
    n_vocab = cfg.get("vocab_size", len(vocab))
    if max(vocab.values()) >= n_vocab:
        raise KtxError(f"{path}: token id {max(vocab.values())} >= vocab_size {n_vocab} in config.json")
    by_id = {i: t for t, i in vocab.items()}
    tokens, types = [], []
    for i in range(n_vocab):
        token = by_id.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            if added[i].get("special") or _looks_special(token):
                types.append(gguf.TokenType.CONTROL)
            else:
                token = token.replace("\u2581", " ")
                types.append(gguf.TokenType.USER_DEFINED)
            tokens.append(token)
        else:
            tokens.append(token)
            types.append(gguf.TokenType.NORMAL)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(detect_pre_tokenizer(tok))
    w.add_token_list(tokens)
    w.add_token_types(types)
    # merges, bos/eos/pad ids, add_bos/add_eos, chat_template: gguf-py reads them the way llama.cpp does
    gguf.SpecialVocab(hf_dir, load_merges=True).add_to_gguf(w, quiet=True)


# --------------------------------------------------------------------------------------------------
# tensors


@dataclass
class _Out:
    name: str
    shape: tuple  # numpy order
    qtype: "object"  # gguf.GGMLQuantizationType
    produce: Callable[[], "np.ndarray | _Streamed"]


class _Streamed:
    """A stacked expert tensor written expert by expert: GGUFWriter.write_tensor_data only needs
    `.nbytes` and `.tofile(f)`, so the [E, rows, cols] stack never exists in memory at once."""

    def __init__(self, parts: list[Callable[[], np.ndarray]], qtype, nbytes: int):
        self.parts, self.qtype, self.nbytes = parts, qtype, nbytes

    def tofile(self, f) -> None:
        import gguf

        for load in self.parts:
            gguf.quants.quantize(load(), self.qtype).tofile(f)


def _pick_type(name: str, shape: tuple, outtype: str):
    """llama.cpp's choice: 1-D, norms, router and non-.weight tensors stay F32; q8_0 needs rows % 32 == 0."""
    import gguf

    T = gguf.GGMLQuantizationType
    if len(shape) <= 1 or name.endswith("_norm.weight") or name.endswith("ffn_gate_inp.weight") \
            or not name.endswith(".weight"):
        return T.F32
    qtype = {"f32": T.F32, "f16": T.F16, "bf16": T.BF16, "q8_0": T.Q8_0}[outtype]
    if qtype == T.Q8_0 and shape[-1] % 32 != 0:
        return T.F16
    return qtype


def _nbytes(shape: tuple, qtype) -> int:
    import gguf

    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    return int(np.prod(shape[:-1], dtype=np.int64)) * (shape[-1] // block) * type_size


def _plan(arch: _Arch, cfg: dict, names: list[str], shapes: dict[str, tuple],
          loader: Callable[..., Callable[[], np.ndarray]], outtype: str) -> list[_Out]:
    """HF tensor names (file order) -> output tensors; experts are emitted once a layer's set is complete."""
    n_layers = cfg["num_hidden_layers"]
    n_experts = cfg.get("n_routed_experts") or cfg.get("num_experts") or cfg.get("num_local_experts") or 0
    expert_res = {re.compile(re.escape(k).replace(r"\{x\}", r"(\d+)") + "$"): v for k, v in arch.expert_names.items()}
    pending: dict[tuple[int, str], dict[int, str]] = {}
    outs: list[_Out] = []

    def emit(name: str, shape: tuple, produce: Callable) -> None:
        if arch.transform is not None:
            produce = (lambda load, name: lambda: arch.transform(name, load()))(produce, name)
        outs.append(_Out(name, shape, _pick_type(name, shape, outtype), produce))

    def emit_stacked(name: str, parts: list[Callable], row_shape: tuple) -> None:
        shape = (len(parts), *row_shape)
        qtype = _pick_type(name, shape, outtype)
        outs.append(_Out(name, shape, qtype, lambda: _Streamed(parts, qtype, _nbytes(shape, qtype))))

    for hf_name in names:
        if hf_name.endswith("rotary_emb.inv_freq"):
            continue
        if hf_name in _GLOBAL_NAMES:
            if hf_name == "lm_head.weight" and cfg.get("tie_word_embeddings"):
                continue
            emit(_GLOBAL_NAMES[hf_name], shapes[hf_name], loader(hf_name))
            continue
        m = re.match(r"model\.layers\.(\d+)\.(.+)$", hf_name)
        if m is None:
            raise KtxError(f"tensor {hf_name!r}: no GGUF name for it in architecture {arch.gguf_arch}")
        bid, rel = int(m.group(1)), m.group(2)
        if bid >= n_layers:  # multi-token-prediction layers: llama.cpp skips them too
            continue
        prefix = f"blk.{bid}."
        if rel in arch.layer_names:
            emit(prefix + arch.layer_names[rel], shapes[hf_name], loader(hf_name))
        elif rel in arch.splits:
            for name, shape, produce in arch.splits[rel](cfg, shapes[hf_name], loader(hf_name)):
                emit(prefix + name, shape, produce)
        elif rel in arch.fused_experts:
            targets = arch.fused_experts[rel]
            e, rows, cols = shapes[hf_name]
            chunk = rows // len(targets)
            for j, name in enumerate(targets):
                parts = [loader(hf_name, (x, slice(j * chunk, (j + 1) * chunk))) for x in range(e)]
                emit_stacked(prefix + name, parts, (chunk, cols))
        else:
            for pattern, name in expert_res.items():
                if (em := pattern.match(rel)) is not None:
                    group = pending.setdefault((bid, name), {})
                    group[int(em.group(1))] = hf_name
                    if len(group) == n_experts:
                        ordered = [group[x] for x in range(n_experts)]
                        emit_stacked(prefix + name, [loader(n) for n in ordered], shapes[ordered[0]])
                        del pending[(bid, name)]
                    break
            else:
                raise KtxError(f"tensor {hf_name!r}: no GGUF name for it in architecture {arch.gguf_arch}")
    if pending:
        (bid, name), group = next(iter(pending.items()))
        raise KtxError(f"layer {bid}: only {len(group)} of {n_experts} experts found for {name}; "
                       "the checkpoint is incomplete (missing safetensors part?)")
    return outs


# --------------------------------------------------------------------------------------------------
# entry point


def _read_config(hf_dir: Path) -> tuple[dict, _Arch]:
    if not hf_dir.is_dir():
        raise KtxError(f"{hf_dir}: not a folder; pass a Hugging Face checkpoint folder "
                       "(config.json + *.safetensors + tokenizer.json)")
    path = hf_dir / "config.json"
    if not path.is_file():
        raise KtxError(f"{path}: missing; a Hugging Face checkpoint folder needs its config.json")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise KtxError(f"{path}: not valid JSON ({e})") from None
    cfg = {**cfg, **cfg.get("text_config", {})}
    archs = cfg.get("architectures") or []
    if not archs or archs[0] not in ARCHITECTURES:
        raise KtxError(f"{path}: architecture {archs[0] if archs else None!r} is not supported by ktx convert; "
                       f"supported: {', '.join(sorted(ARCHITECTURES))}")
    return cfg, ARCHITECTURES[archs[0]]


def convert_hf_to_gguf(hf_dir: str | Path, out_path: str | Path, outtype: str = "bf16",
                       progress: bool = False) -> Path:
    """Convert a Hugging Face checkpoint folder to one GGUF file; returns the output path."""
    import gguf
    from safetensors import safe_open

    hf_dir, out_path = Path(hf_dir), Path(out_path)
    outtype = outtype.lower()
    if outtype not in OUTTYPES:
        raise KtxError(f"outtype {outtype!r} is not supported; choose one of {', '.join(OUTTYPES)}")
    cfg, arch = _read_config(hf_dir)
    parts = sorted(hf_dir.glob("*.safetensors"))
    if not parts:
        raise KtxError(f"{hf_dir}: no *.safetensors files; ktx convert reads safetensors checkpoints only")

    with ExitStack() as stack:
        files = {p: stack.enter_context(safe_open(str(p), framework="pt")) for p in parts}
        where, shapes, names = {}, {}, []
        for f in files.values():
            for name in f.keys():
                where[name] = f
                shapes[name] = tuple(f.get_slice(name).get_shape())
                names.append(name)

        def loader(name: str, index: tuple | None = None) -> Callable[[], np.ndarray]:
            """A lazy float32 load of one tensor, or of `index` of it (one expert of a fused stack)."""
            if index is None:
                return lambda: where[name].get_tensor(name).float().numpy()
            return lambda: np.ascontiguousarray(where[name].get_slice(name)[index].float().numpy())

        outs = _plan(arch, cfg, names, shapes, loader, outtype)

        ftype = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[outtype]
        w = gguf.GGUFWriter(path=None, arch=arch.gguf_arch)
        w.add_type(gguf.GGUFType.MODEL)
        w.add_name(hf_dir.resolve().name)
        arch.metadata(cfg, w)
        w.add_file_type(ftype)
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        _add_tokenizer(hf_dir, cfg, w)
        for o in outs:
            w.add_tensor_info(o.name, o.shape, np.dtype(np.float32), _nbytes(o.shape, o.qtype), raw_dtype=o.qtype)

        out_path.parent.mkdir(parents=True, exist_ok=True)
        w.write_header_to_file(path=out_path)
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for i, o in enumerate(outs):
            data = o.produce()
            if isinstance(data, np.ndarray):
                data = gguf.quants.quantize(data.astype(np.float32, copy=False), o.qtype)
            w.write_tensor_data(data)
            if progress:
                print(f"[{i + 1}/{len(outs)}] {o.name:<32} {o.qtype.name:<5} {list(reversed(o.shape))}",
                      file=sys.stderr)
        w.close()
    return out_path
