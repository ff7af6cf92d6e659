"""Tiny random Hugging Face models, built on the fly: THE test models of the ktx test suite.

Every builder writes an HF folder (config.json, model.safetensors in bf16, tokenizer.json,
tokenizer_config.json) that `ktx.convert.convert_hf_to_gguf` accepts, and returns the transformers
model in fp32 eval mode as the reference. Weights are bf16-representable, so the bf16 safetensors,
a BF16 GGUF and the fp32 reference hold exactly the same numbers.

    tok_dir = make_tokenizer_files(dir)                    # byte-level BPE, ~400 ids, bos/eos, chat template
    d, model = make_deepseek_v3(dir, q_lora=True, gating="sigmoid", first_dense=1, yarn=False, n_layers=3, seed=0)
    margins = router_margins(model, input_ids)             # [T] smallest routing margin per position
    d, model = make_qwen3_moe(dir) / make_qwen2_moe / make_mixtral / make_llama / make_gemma3   (GQA family)

gating="sigmoid" builds transformers' DeepseekV3ForCausalLM (sigmoid + e_score_correction_bias,
group-limited top-k, noaux_tc); gating="softmax" builds DeepseekV2ForCausalLM (softmax router,
greedy top-k, no renormalisation), since transformers' V3 only routes with sigmoid.

Weight init (the scheme of the shared fixtures): every parameter re-drawn from
torch.Generator().manual_seed(seed) in named_parameters() order: norms 1 + 0.1 N(0,1); embeddings N(0,1);
lm_head 3/sqrt(H) N; Linear/router [out, in] N/sqrt(in); experts gate_up [E, 2I, H] N/sqrt(H), down
[E, H, I] N/sqrt(I); o_proj and every down projection additionally / sqrt(2L); then
e_score_correction_bias 0.1 N; everything rounded to bf16.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

BOS, EOS = "<\uff5cbegin\u2581of\u2581sentence\uff5c>", "<\uff5cend\u2581of\u2581sentence\uff5c>"
USER, ASSISTANT = "<\uff5cUser\uff5c>", "<\uff5cAssistant\uff5c>"

# DeepSeek-V3-like chat template (bos, then alternating user/assistant turns, eos after each answer)
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] }}"
    "{% elif m['role'] == 'user' %}" + USER + "{{ m['content'] }}"
    "{% elif m['role'] == 'assistant' %}" + ASSISTANT + "{{ m['content'] }}{{ eos_token }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}" + ASSISTANT + "{% endif %}"
)

# Split regexes exactly as the real tokenizer.json files hold them
_PRE_REGEXES = {
    "deepseek-v3": [
        "\\p{N}{1,3}",
        "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+",
        "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+"
        "| ?[\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+",
    ],
    "llama-bpe": [
        "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
        "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+",
    ],
}

_TRAIN_TEXT = """\
The quick brown fox jumps over the lazy dog. A tiny model is still a model: it has weights, a
tokenizer and a configuration. def fibonacci(n):
    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)
Mixture-of-experts layers route every token to a few experts; the router picks the top-k scores.
for i in range(10): print(i * i, "squares", [x ** 2 for x in range(i)])
Numbers 0123456789 and 3.14159, 2.71828; dates 2024-01-31; prices $12.50 or 7 euros.
Hello, world! How are you? I'm fine, thanks. We'll see; they've gone; it's done.
class Attention: q_nope, q_pe, kv_c, k_pe = split(x)  # latent cache, rotary embedding
日本語のテキストと中文文本也在这里。 Ünïcödé àccents, emoji 🚀 and tabs\tand\nnewlines.
"""


def make_tokenizer_files(dir: str | Path, *, pre: str = "deepseek-v3", vocab_size: int = 400) -> Path:
    """Train a byte-level BPE on a fixed text and save tokenizer.json + tokenizer_config.json in `dir`.

    Ids: 0 = bos, 1 = eos, 2/3 = user/assistant markers (all special), then the 256 byte symbols and merges.
    `pre` picks the pre-tokenizer regexes of a tokenizer llama.cpp knows: "deepseek-v3" or "llama-bpe".
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    dir = Path(dir)
    dir.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    splits = [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in _PRE_REGEXES[pre]]
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [*splits, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BOS, EOS, USER, ASSISTANT],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([_TRAIN_TEXT] * 4, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B:1", special_tokens=[(BOS, tok.token_to_id(BOS))])
    tok.save(str(dir / "tokenizer.json"))
    (dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS, "eos_token": EOS, "pad_token": EOS,
        "add_bos_token": True, "add_eos_token": False,
        "model_max_length": 4096, "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }, indent=1, ensure_ascii=False), encoding="utf-8")
    return dir


def _bf16(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.bfloat16).to(torch.float32)


@torch.no_grad()
def _init_weights(model: torch.nn.Module, seed: int, n_layers: int) -> None:
    g = torch.Generator().manual_seed(seed)
    deep = 1.0 / math.sqrt(2 * n_layers)
    for name, p in model.named_parameters():
        z = torch.randn(p.shape, generator=g, dtype=torch.float32)
        if "norm" in name:
            w = 1 + 0.1 * z
        elif "embed_tokens" in name:
            w = z
        elif name.startswith("lm_head"):
            w = 3 / math.sqrt(p.shape[-1]) * z
        else:
            w = z / math.sqrt(p.shape[-1])  # [out, in] or [E, out, in]: scale by fan-in
            if name.endswith(("o_proj.weight", "down_proj.weight", "down_proj")):
                w = w * deep
        p.copy_(_bf16(w))
    for name, b in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            b.copy_(_bf16(0.1 * torch.randn(b.shape, generator=g, dtype=torch.float32)))


def make_deepseek_v3(dir: str | Path, *, q_lora: bool = True, gating: str = "sigmoid", first_dense: int = 1,
                     yarn: bool = False, n_layers: int = 3, seed: int = 0, **overrides):
    """Build, save and return a tiny DeepSeek-V3 (or, for softmax gating, DeepSeek-V2) model.

    Sizes: hidden 64, 4 heads, q_lora 64 (None when q_lora=False), kv_lora 32, nope 32, rope 16, v 32,
    dense FFN 128, 8 experts of 32 with top-2 (sigmoid: 4 groups, top-2 groups), 1 shared expert,
    vocab = the tokenizer's. `overrides` go straight into the transformers config. Returns (dir, model).
    """
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM, DeepseekV3Config, DeepseekV3ForCausalLM

    if gating not in ("sigmoid", "softmax"):
        raise ValueError(f"gating must be 'sigmoid' or 'softmax', got {gating!r}")
    dir = Path(dir)
    make_tokenizer_files(dir)
    tok = json.loads((dir / "tokenizer.json").read_text(encoding="utf-8"))
    n_vocab = len(tok["model"]["vocab"]) + sum(a["id"] not in tok["model"]["vocab"].values()
                                                for a in tok["added_tokens"])
    rope = {"rope_type": "default", "rope_theta": 10000.0}
    if yarn:
        rope = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 128,
                "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0}
    cfg = dict(
        vocab_size=n_vocab, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
        num_hidden_layers=n_layers, first_k_dense_replace=first_dense,
        num_attention_heads=4, num_key_value_heads=4,
        q_lora_rank=64 if q_lora else None, kv_lora_rank=32,
        qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
        n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
        max_position_embeddings=512 if yarn else 256, rms_norm_eps=1e-6,
        rope_parameters=rope, tie_word_embeddings=False,
        bos_token_id=tok["added_tokens"][0]["id"], eos_token_id=tok["added_tokens"][1]["id"],
    )
    if gating == "sigmoid":
        cfg.update(n_group=4, topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.5,
                   scoring_func="sigmoid", topk_method="noaux_tc", rope_interleave=True, num_nextn_predict_layers=0)
        cfg.update(overrides)
        config, model_cls = DeepseekV3Config(**cfg), DeepseekV3ForCausalLM
    else:
        cfg.update(topk_method="greedy", n_group=None, topk_group=None, norm_topk_prob=False,
                   routed_scaling_factor=1.0, scoring_func="softmax")
        cfg.update(overrides)
        config, model_cls = DeepseekV2Config(**cfg), DeepseekV2ForCausalLM
    config._attn_implementation = "eager"
    model = model_cls(config)
    _init_weights(model, seed, n_layers)
    model.to(torch.bfloat16).save_pretrained(dir)
    # The reference is what was saved, reloaded in fp32: casting the bf16 model back would leave its
    # rotary inv_freq buffers rounded to bf16 (a 4e-3 logit error that no GGUF reader would reproduce).
    from transformers import AutoModelForCausalLM

    return dir, AutoModelForCausalLM.from_pretrained(dir, dtype=torch.float32, attn_implementation="eager").eval()


# The GQA family: hidden 64, 4 query heads sharing 2 KV heads of 16, FFN 128, experts of 32 (8, top-2).
_GQA_SIZES = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                  max_position_embeddings=256, rms_norm_eps=1e-6, tie_word_embeddings=False)


def _make_gqa(dir: str | Path, config_cls: str, model_cls: str, seed: int, n_layers: int, pre: str = "llama-bpe", **cfg):
    """Save a seeded tiny transformers model of class `model_cls` and return (dir, fp32 eager reload)."""
    import transformers
    from transformers import AutoModelForCausalLM

    dir = Path(dir)
    make_tokenizer_files(dir, pre=pre)
    tok = json.loads((dir / "tokenizer.json").read_text(encoding="utf-8"))
    n_vocab = len(tok["model"]["vocab"]) + sum(a["id"] not in tok["model"]["vocab"].values() for a in tok["added_tokens"])
    config = getattr(transformers, config_cls)(**{**_GQA_SIZES, "vocab_size": n_vocab, "num_hidden_layers": n_layers,
                                                   "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1, **cfg})
    config._attn_implementation = "eager"
    model = getattr(transformers, model_cls)(config)
    _init_weights(model, seed, n_layers)
    model.to(torch.bfloat16).save_pretrained(dir)
    return dir, AutoModelForCausalLM.from_pretrained(dir, dtype=torch.float32, attn_implementation="eager").eval()


def make_llama(dir, *, seed: int = 0, n_layers: int = 2, **overrides):
    """Dense Llama (rotate-half rope in HF; the converter permutes q/k for llama.cpp's adjacent pairs)."""
    return _make_gqa(dir, "LlamaConfig", "LlamaForCausalLM", seed, n_layers, **{"rope_theta": 10000.0, **overrides})


def make_mixtral(dir, *, seed: int = 0, n_layers: int = 2, **overrides):
    """Mixtral: every layer MoE, 8 experts of 128, top-2 softmax renormalised."""
    return _make_gqa(dir, "MixtralConfig", "MixtralForCausalLM", seed, n_layers,
                     **{"num_local_experts": 8, "num_experts_per_tok": 2, "rope_theta": 10000.0, **overrides})


def make_qwen3_moe(dir, *, seed: int = 0, n_layers: int = 2, **overrides):
    """Qwen3-MoE: q/k RMSNorm per head, NeoX rope, 8 experts of 32, top-2, norm_topk_prob."""
    return _make_gqa(dir, "Qwen3MoeConfig", "Qwen3MoeForCausalLM", seed, n_layers, **{
        "num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "norm_topk_prob": True, **overrides})


def make_qwen2_moe(dir, *, seed: int = 0, n_layers: int = 2, **overrides):
    """Qwen2-MoE: q/k/v biases, 8 experts of 32 top-2 (not renormalised), shared expert of 48 with sigmoid gate."""
    return _make_gqa(dir, "Qwen2MoeConfig", "Qwen2MoeForCausalLM", seed, n_layers, **{
        "num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "shared_expert_intermediate_size": 48,
        "norm_topk_prob": False, **overrides})


def make_gemma3(dir, *, seed: int = 0, n_layers: int = 6, sliding_window: int = 8, **overrides):
    """Gemma-3 text: layers 0-4 slide over `sliding_window` tokens (rope base 10000), layer 5 is global
    (rope base 1e6); q/k norms, post-norms, GELU(tanh), tied embeddings scaled by sqrt(64)."""
    types = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(n_layers)]
    rope = {"full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}
    return _make_gqa(dir, "Gemma3TextConfig", "Gemma3ForCausalLM", seed, n_layers, sliding_window=sliding_window, **{
        "layer_types": types, "rope_parameters": rope, "query_pre_attn_scalar": 16, "tie_word_embeddings": True, **overrides})


def _row_margins(x: torch.Tensor, gate: torch.nn.Module) -> torch.Tensor:
    """x [N, H] -> [N] routing margins of one router (definition in the fixture README)."""
    logits = x.float() @ gate.weight.float().T  # [N, E]
    bias = getattr(gate, "e_score_correction_bias", None)
    if bias is not None:  # DeepSeek-V3: sigmoid + correction bias, group score = sum of the top-2
        s = logits.sigmoid() + bias
        group_of = lambda v: v.topk(2, dim=-1).values.sum(-1)  # noqa: E731
    else:  # DeepSeek-V2: softmax, group score = max
        s = logits.softmax(-1)
        group_of = lambda v: v.max(-1).values  # noqa: E731
    n, e = s.shape
    k = gate.top_k
    n_group, topk_group = getattr(gate, "num_group", None) or 1, getattr(gate, "topk_group", None) or 1
    margin = torch.full((n,), float("inf"))
    if n_group > 1 and topk_group < n_group and getattr(gate, "topk_method", "noaux_tc") != "greedy":
        groups = group_of(s.view(n, n_group, e // n_group))  # [N, G]
        gs = groups.sort(-1, descending=True).values
        margin = gs[:, topk_group - 1] - gs[:, topk_group]
        keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(1, groups.topk(topk_group, -1).indices, True)
        s = s.masked_fill(~keep.repeat_interleave(e // n_group, dim=1), float("-inf"))
    ss = s.sort(-1, descending=True).values
    return torch.minimum(margin, ss[:, k - 1] - ss[:, k])


@torch.no_grad()
def router_margins(model: torch.nn.Module, input_ids) -> np.ndarray:
    """Per position, the smallest routing margin over all MoE layers of one fp32 forward: [T]."""
    ids = torch.as_tensor(np.asarray(input_ids), dtype=torch.long).reshape(1, -1)
    per_layer: list[torch.Tensor] = []
    gates = [m for name, m in model.named_modules() if name.endswith("mlp.gate") and hasattr(m, "top_k")]
    hooks = [g.register_forward_hook(lambda mod, args, out: per_layer.append(
        _row_margins(args[0].reshape(-1, args[0].shape[-1]), mod))) for g in gates]
    try:
        model(ids)
    finally:
        for h in hooks:
            h.remove()
    if not per_layer:
        return np.full(ids.shape[1], np.inf, dtype=np.float32)
    return torch.stack(per_layer).min(0).values.numpy().astype(np.float32)
