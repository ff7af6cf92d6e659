"""Synthetic DeepSeek-V3- and Qwen3-MoE-shaped GGUF files: measure speed without downloading a model.

`synthetic_model(name)` returns the path of a GGUF with the shape of preset `name`, writing it on first
use under `$KTX_CACHE/synthetic/` (default `~/.cache/ktx/synthetic/`) and reusing it afterwards.

The file is what llama.cpp's converter + llama-quantize would write for such a model: architecture
`deepseek2` (presets dsv3-*) or `qwen3moe` (presets qwen3-*) with the same metadata keys and value types,
llama.cpp's tensor names and numpy-order shapes. deepseek2:

    token_embd [V, H]   output [V, H]   output_norm [H]
    blk.N.attn_q_a [q_lora, H]  attn_q_b [heads*(nope+rope), q_lora]  attn_kv_a_mqa [kv_lora+rope, H]
    blk.N.attn_k_b [heads, kv_lora, nope]  attn_v_b [heads, v, kv_lora]  attn_output [H, heads*v]
    dense: ffn_gate/up [ffn, H], ffn_down [H, ffn]
    MoE:   ffn_gate_inp [E, H] (F32), exp_probs_b.bias [E] (F32), ffn_{gate,up}_exps [E, I, H],
           ffn_down_exps [E, H, I], ffn_{gate,up}_shexp [I*shared, H], ffn_down_shexp [H, I*shared]

qwen3moe (every layer MoE, no shared expert, no biases; q/k RMSNorm per head of head_dim d):

    token_embd [V, H]   output [V, H]   output_norm [H]
    blk.N.attn_q [n_h*d, H]  attn_k [n_kv*d, H]  attn_v [n_kv*d, H]  attn_output [H, n_h*d]
          attn_q_norm [d]  attn_k_norm [d]  attn_norm [H]  ffn_norm [H]
          ffn_gate_inp [E, H] (F32), ffn_{gate,up}_exps [E, I, H], ffn_down_exps [E, H, I]

Tensor types are what llama.cpp's Q4_K_M recipe (llama-quant.cpp) picks: Q4_K for most matrices
(token_embd included), Q6_K for `output`, F32 for norms, router and bias (llama-quantize leaves 1-D
tensors and ffn_gate_inp alone). The recipe gives more bits to the layers i with
`use_more_bits(i, n) = i < n/8 or i >= 7n/8 or (i - n/8) % 3 == 2` (integer division): there every
ffn_down tensor becomes Q6_K (deepseek2: the dense ffn_down, ffn_down_exps and ffn_down_shexp;
qwen3moe: ffn_down_exps, the layer read from the tensor name since the model has experts), and for
qwen3moe the attn_v tensor too (deepseek2 has no attn_v). The recipe's bumps for n_expert == 8
(Mixtral: attn_v, attn_k to Q8_0, attn_output to Q5_K) apply to neither family. A row whose length is not a multiple of 256 falls back like
llama.cpp does (Q4_K -> Q5_0, Q6_K -> Q8_0), which is why attn_k_b (rows of `nope` = 128) is Q5_0;
the qwen3 presets keep every row a multiple of 256, so nothing falls back there.

Weights are random valid blocks (`ktx.quants.random_blocks`: random codes, f16 scales chosen so the
values look like weights), written tensor by tensor so memory stays at one tensor. The vocabulary is a
small byte-level BPE trained on a built-in word list (so text round-trips and looks like English),
the model family's special tokens (DeepSeek's, or Qwen's <|endoftext|>, <|im_start|>, ...), then
`[PADn]` tokens of type UNUSED up to the vocab size, as llama.cpp's converter pads a vocabulary.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
from gguf import GGMLQuantizationType as T

from ktx.errors import KtxError
from ktx.quants import random_blocks

FORMAT_VERSION = 2  # part of the cached file name: bump when the written file changes
CONTROL, USER_DEFINED, UNUSED = 3, 4, 5
FALLBACK = {T.Q4_K: T.Q5_0, T.Q5_K: T.Q5_1, T.Q6_K: T.Q8_0}  # llama.cpp's types for rows not a multiple of 256


def use_more_bits(i: int, n: int) -> bool:
    """llama-quant.cpp's layers that Q4_K_M gives Q6_K: the first and last eighth, every third in between."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


@dataclass(frozen=True)
class Preset:
    """A DeepSeek-V3 shape (`deepseek2`): MLA attention, leading dense layers, routed + shared experts."""

    arch: ClassVar[str] = "deepseek2"
    vocab: int
    hidden: int
    n_layers: int
    n_dense_lead: int
    ffn: int  # dense MLP intermediate size
    n_heads: int
    q_lora: int
    kv_lora: int
    nope: int
    rope: int
    v_head: int
    n_expert: int
    n_expert_used: int
    n_shared: int
    moe_ffn: int
    n_group: int
    topk_group: int
    bpe_vocab: int  # size of the trained byte-level BPE part of the vocabulary
    routed_scale: float = 2.5
    context_length: int = 4096


@dataclass(frozen=True)
class Qwen3Preset:
    """A Qwen3-MoE shape (`qwen3moe`): GQA with per-head q/k norms, NeoX RoPE, every layer MoE with softmax
    top-k routing renormalised over the chosen experts, no shared expert, untied output."""

    arch: ClassVar[str] = "qwen3moe"
    vocab: int
    hidden: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn: int  # feed_forward_length: the converter writes config's intermediate_size; no layer here is dense
    n_expert: int
    n_expert_used: int
    moe_ffn: int
    bpe_vocab: int
    rope_base: float = 1e6
    context_length: int = 40960


PRESETS = {
    # for tests: a few MB, loads and runs in well under a second per token on the reference path
    "dsv3-tiny": Preset(vocab=2048, hidden=256, n_layers=3, n_dense_lead=1, ffn=512, n_heads=4, q_lora=256,
                        kv_lora=256, nope=64, rope=32, v_head=64, n_expert=16, n_expert_used=4, n_shared=1,
                        moe_ffn=256, n_group=4, topk_group=2, bpe_vocab=1200),
    # the hybrid-engine issue's benchmark shape: DeepSeek-V3's layer design at 1/3.5 width, ~2.9 GiB Q4_K_M
    "dsv3-bench": Preset(vocab=129280, hidden=2048, n_layers=8, n_dense_lead=1, ffn=10752, n_heads=16, q_lora=768,
                         kv_lora=512, nope=128, rope=64, v_head=128, n_expert=64, n_expert_used=6, n_shared=2,
                         moe_ffn=1536, n_group=8, topk_group=4, bpe_vocab=1200),
    # for tests: ~4 MB; hidden and expert FFN multiples of 256 so the CPU expert kernels and the program run
    "qwen3-tiny": Qwen3Preset(vocab=2048, hidden=256, n_layers=3, n_heads=4, n_kv_heads=2, head_dim=64, ffn=512,
                              n_expert=16, n_expert_used=4, moe_ffn=256, bpe_vocab=1200, context_length=4096),
    # Qwen3-30B-A3B's layers and vocabulary at full size, 7 of its 48 layers: 2.84 GiB Q4_K_M (8 would be 3.2)
    "qwen3-bench": Qwen3Preset(vocab=151936, hidden=2048, n_layers=7, n_heads=32, n_kv_heads=4, head_dim=128, ffn=6144,
                               n_expert=128, n_expert_used=8, moe_ffn=768, bpe_vocab=1200),
}

# Per architecture: the special tokens (text, type) that follow the BPE part, then tokenizer.ggml.pre,
# the texts of the BOS / EOS / padding tokens and add_bos_token, as llama.cpp's converter writes them.
SPECIAL_TOKENS = {
    "deepseek2": [  # DeepSeek-V3's BOS/EOS and chat-turn markers
        ("<｜begin▁of▁sentence｜>", CONTROL), ("<｜end▁of▁sentence｜>", CONTROL), ("<｜User｜>", USER_DEFINED),
        ("<｜Assistant｜>", USER_DEFINED), ("<think>", USER_DEFINED), ("</think>", USER_DEFINED),
    ],
    "qwen3moe": [  # Qwen3's document end, ChatML turn markers and reasoning tags
        ("<|endoftext|>", CONTROL), ("<|im_start|>", CONTROL), ("<|im_end|>", CONTROL),
        ("<think>", USER_DEFINED), ("</think>", USER_DEFINED),
    ],
}
TOKENIZER = {
    "deepseek2": ("deepseek-v3", "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜end▁of▁sentence｜>", True),
    "qwen3moe": ("qwen2", "<|endoftext|>", "<|im_end|>", "<|endoftext|>", False),
}

_WORDS = """
the of and to in is that it for was on are as with be by this from at or have an they which one you
were all we her she there been their has would will what if can when who more no so said up out some
could them into time only new than then its two these first may like other over any after also made
way many most where before through back years much work should because each people between down just
good well here how our such long very great old even same while last might us see right still
system model token layer expert weight memory cache speed test data file value number order part point
small large light water world house place think know take give find tell ask seem feel leave call keep
def return class import self print range list dict none true false while yield lambda async await with
""".split()


def cache_dir() -> Path:
    root = os.environ.get("KTX_CACHE")
    return (Path(root).expanduser() if root else Path.home() / ".cache" / "ktx") / "synthetic"


def synthetic_model(name: str, progress: bool = False) -> Path:
    """Path of the synthetic GGUF for preset `name`, written on first use and cached."""
    preset = PRESETS.get(name)
    if preset is None:
        raise KtxError(f"--synthetic {name!r}: no such preset; choose one of {', '.join(PRESETS)}")
    path = cache_dir() / f"{name}-Q4_K_M-v{FORMAT_VERSION}.gguf"
    if not path.exists():
        write_synthetic(preset, path, name, progress=progress)
    return path


# ---- vocabulary -----------------------------------------------------------------------------------


def _bpe_vocab(size: int) -> tuple[list[str], list[str]]:
    """(tokens, merges) of a byte-level BPE trained on `_WORDS`: 256 byte pieces first, merges after."""
    import tokenizers
    from tokenizers import models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False, special_tokens=[])
    # word i appears ~ 1/(i+1) as often as the first: merges of frequent words come first, as in a real vocab
    rng = np.random.default_rng(0)
    weights = 1.0 / np.arange(1, len(_WORDS) + 1)
    text = rng.choice(_WORDS, size=20000, p=weights / weights.sum())
    lines = [" ".join(text[i : i + 20]) for i in range(0, len(text), 20)]
    tok.train_from_iterator(lines, trainer)
    vocab = tok.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    merges = json.loads(tok.to_str())["model"]["merges"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in merges]
    return tokens, merges


def _vocabulary(p: Preset | Qwen3Preset) -> tuple[list[str], list[int], list[str]]:
    tokens, merges = _bpe_vocab(p.bpe_vocab)
    types = [1] * len(tokens)
    for text, kind in SPECIAL_TOKENS[p.arch]:
        tokens.append(text)
        types.append(kind)
    if len(tokens) > p.vocab:
        raise KtxError(f"synthetic preset: vocab {p.vocab} is smaller than its {len(tokens)} real tokens")
    pad = p.vocab - len(tokens)
    tokens += [f"[PAD{len(tokens) + i}]" for i in range(pad)]
    types += [UNUSED] * pad
    return tokens, types, merges


# ---- tensors --------------------------------------------------------------------------------------


def _mat(name: str, shape: tuple[int, ...], qtype: T = T.Q4_K) -> tuple[str, tuple[int, ...], T]:
    return (name, shape, FALLBACK.get(qtype, qtype) if shape[-1] % 256 else qtype)


def tensor_plan(p: Preset | Qwen3Preset) -> list[tuple[str, tuple[int, ...], T]]:
    """(name, numpy-order shape, type) of every tensor, in file order."""
    H = p.hidden
    plan = [_mat("token_embd.weight", (p.vocab, H))]
    for i in range(p.n_layers):
        plan += _deepseek2_layer(p, i) if p.arch == "deepseek2" else _qwen3moe_layer(p, i)
    plan += [("output_norm.weight", (H,), T.F32), _mat("output.weight", (p.vocab, H), T.Q6_K)]
    return plan


def _deepseek2_layer(p: Preset, i: int) -> list[tuple[str, tuple[int, ...], T]]:
    H, I_sh, b = p.hidden, p.moe_ffn * p.n_shared, f"blk.{i}."
    down = T.Q6_K if use_more_bits(i, p.n_layers) else T.Q4_K  # dsv3-bench: layers 0, 3, 6, 7
    plan = [
        (b + "attn_norm.weight", (H,), T.F32),
        _mat(b + "attn_q_a.weight", (p.q_lora, H)),
        (b + "attn_q_a_norm.weight", (p.q_lora,), T.F32),
        _mat(b + "attn_q_b.weight", (p.n_heads * (p.nope + p.rope), p.q_lora)),
        _mat(b + "attn_kv_a_mqa.weight", (p.kv_lora + p.rope, H)),
        (b + "attn_kv_a_norm.weight", (p.kv_lora,), T.F32),
        _mat(b + "attn_k_b.weight", (p.n_heads, p.kv_lora, p.nope)),
        _mat(b + "attn_v_b.weight", (p.n_heads, p.v_head, p.kv_lora)),
        _mat(b + "attn_output.weight", (H, p.n_heads * p.v_head)),
        (b + "ffn_norm.weight", (H,), T.F32),
    ]
    if i < p.n_dense_lead:
        return plan + [_mat(b + "ffn_gate.weight", (p.ffn, H)), _mat(b + "ffn_up.weight", (p.ffn, H)),
                       _mat(b + "ffn_down.weight", (H, p.ffn), down)]
    return plan + [
        (b + "ffn_gate_inp.weight", (p.n_expert, H), T.F32),
        (b + "exp_probs_b.bias", (p.n_expert,), T.F32),
        _mat(b + "ffn_gate_exps.weight", (p.n_expert, p.moe_ffn, H)),
        _mat(b + "ffn_up_exps.weight", (p.n_expert, p.moe_ffn, H)),
        _mat(b + "ffn_down_exps.weight", (p.n_expert, H, p.moe_ffn), down),
        _mat(b + "ffn_gate_shexp.weight", (I_sh, H)),
        _mat(b + "ffn_up_shexp.weight", (I_sh, H)),
        _mat(b + "ffn_down_shexp.weight", (H, I_sh), down),
    ]


def _qwen3moe_layer(p: Qwen3Preset, i: int) -> list[tuple[str, tuple[int, ...], T]]:
    H, d, b = p.hidden, p.head_dim, f"blk.{i}."
    more = T.Q6_K if use_more_bits(i, p.n_layers) else T.Q4_K  # attn_v and ffn_down_exps of this layer
    return [
        (b + "attn_norm.weight", (H,), T.F32),
        _mat(b + "attn_q.weight", (p.n_heads * d, H)),
        _mat(b + "attn_k.weight", (p.n_kv_heads * d, H)),
        _mat(b + "attn_v.weight", (p.n_kv_heads * d, H), more),
        _mat(b + "attn_output.weight", (H, p.n_heads * d)),
        (b + "attn_q_norm.weight", (d,), T.F32),
        (b + "attn_k_norm.weight", (d,), T.F32),
        (b + "ffn_norm.weight", (H,), T.F32),
        (b + "ffn_gate_inp.weight", (p.n_expert, H), T.F32),
        _mat(b + "ffn_gate_exps.weight", (p.n_expert, p.moe_ffn, H)),
        _mat(b + "ffn_up_exps.weight", (p.n_expert, p.moe_ffn, H)),
        _mat(b + "ffn_down_exps.weight", (p.n_expert, H, p.moe_ffn), more),
    ]


def _random_f32(name: str, shape: tuple[int, ...], hidden: int, rng: np.random.Generator) -> np.ndarray:
    if name.endswith("norm.weight"):
        return (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)  # RMSNorm gains near 1
    if name.endswith("exp_probs_b.bias"):
        return (0.1 * rng.standard_normal(shape)).astype(np.float32)
    return (rng.standard_normal(shape) / np.sqrt(hidden)).astype(np.float32)  # router


def _tensor_data(name: str, shape: tuple[int, ...], qtype: T, hidden: int, rng: np.random.Generator) -> np.ndarray:
    if qtype == T.F32:
        return _random_f32(name, shape, hidden, rng)
    return random_blocks(qtype, shape, rng)  # uint8 [..., row_bytes]


def _deepseek2_sizes(w, p: Preset) -> None:
    a = "deepseek2"
    u32 = {
        "block_count": p.n_layers, "context_length": p.context_length, "embedding_length": p.hidden,
        "feed_forward_length": p.ffn, "attention.head_count": p.n_heads, "attention.head_count_kv": 1,
    }
    for k, v in u32.items():
        w.add_uint32(f"{a}.{k}", v)
    w.add_float32(f"{a}.rope.freq_base", 10000.0)
    w.add_float32(f"{a}.attention.layer_norm_rms_epsilon", 1e-6)
    u32 = {
        "expert_count": p.n_expert, "expert_used_count": p.n_expert_used, "expert_group_count": p.n_group,
        "expert_group_used_count": p.topk_group, "expert_gating_func": 2,
        # absorbed-MLA view (llama.cpp >= b5800): one KV head of kv_lora + rope, per-head sizes under *_mla
        "attention.key_length": p.kv_lora + p.rope, "attention.value_length": p.kv_lora,
        "leading_dense_block_count": p.n_dense_lead, "vocab_size": p.vocab,
        "attention.q_lora_rank": p.q_lora, "attention.kv_lora_rank": p.kv_lora,
        "attention.key_length_mla": p.nope + p.rope, "attention.value_length_mla": p.v_head,
        "expert_feed_forward_length": p.moe_ffn, "expert_shared_count": p.n_shared,
    }
    for k, v in u32.items():
        w.add_uint32(f"{a}.{k}", v)
    w.add_float32(f"{a}.expert_weights_scale", p.routed_scale)
    w.add_bool(f"{a}.expert_weights_norm", True)
    w.add_uint32(f"{a}.rope.dimension_count", p.rope)


def _qwen3moe_sizes(w, p: Qwen3Preset) -> None:
    """The keys llama.cpp's converter writes for Qwen3MoeForCausalLM (the routing renormalisation, the q/k
    norms and NeoX RoPE are implied by the architecture, so no key says them)."""
    a = "qwen3moe"
    u32 = {
        "block_count": p.n_layers, "context_length": p.context_length, "embedding_length": p.hidden,
        "feed_forward_length": p.ffn, "attention.head_count": p.n_heads, "attention.head_count_kv": p.n_kv_heads,
    }
    for k, v in u32.items():
        w.add_uint32(f"{a}.{k}", v)
    w.add_float32(f"{a}.rope.freq_base", p.rope_base)
    w.add_float32(f"{a}.attention.layer_norm_rms_epsilon", 1e-6)
    u32 = {
        "expert_used_count": p.n_expert_used, "attention.key_length": p.head_dim, "attention.value_length": p.head_dim,
        "expert_count": p.n_expert, "expert_feed_forward_length": p.moe_ffn,
    }
    for k, v in u32.items():
        w.add_uint32(f"{a}.{k}", v)


def _metadata(w, p: Preset | Qwen3Preset, name: str) -> None:
    n_params = sum(int(np.prod(s)) for _, s, _ in tensor_plan(p))
    w.add_string("general.type", "model")
    w.add_string("general.name", f"ktx synthetic {name}")
    w.add_string("general.size_label", f"{p.n_expert}x{n_params / p.n_expert / 1e6:.0f}M")
    _deepseek2_sizes(w, p) if p.arch == "deepseek2" else _qwen3moe_sizes(w, p)
    tokens, types, merges = _vocabulary(p)
    pre, bos, eos, pad, add_bos = TOKENIZER[p.arch]
    w.add_string("tokenizer.ggml.model", "gpt2")
    w.add_string("tokenizer.ggml.pre", pre)
    w.add_array("tokenizer.ggml.tokens", tokens)
    w.add_array("tokenizer.ggml.token_type", types)
    w.add_array("tokenizer.ggml.merges", merges)
    w.add_uint32("tokenizer.ggml.bos_token_id", tokens.index(bos))
    w.add_uint32("tokenizer.ggml.eos_token_id", tokens.index(eos))
    w.add_uint32("tokenizer.ggml.padding_token_id", tokens.index(pad))
    w.add_bool("tokenizer.ggml.add_bos_token", add_bos)
    w.add_bool("tokenizer.ggml.add_sep_token", False)
    w.add_bool("tokenizer.ggml.add_eos_token", False)
    w.add_uint32("general.quantization_version", 2)
    w.add_uint32("general.file_type", 15)  # LLAMA_FTYPE_MOSTLY_Q4_K_M


def write_synthetic(p: Preset | Qwen3Preset, path: Path, name: str = "synthetic", seed: int = 0, progress: bool = False) -> Path:
    """Write preset `p` to `path` (through a temporary file, renamed at the end)."""
    import gguf
    from rich.progress import DownloadColumn, Progress

    from ktx.progress import progress_bar

    from ktx.quants import row_bytes

    plan = tensor_plan(p)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    w = gguf.GGUFWriter(tmp, p.arch)
    _metadata(w, p, name)
    for tname, shape, qtype in plan:
        if qtype == T.F32:
            w.add_tensor_info(tname, shape, np.dtype(np.float32), int(np.prod(shape)) * 4)
        else:
            byte_shape = (*shape[:-1], row_bytes(qtype, shape[-1]))
            w.add_tensor_info(tname, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), raw_dtype=qtype)
    total = sum(int(np.prod(s[:-1])) * row_bytes(q, s[-1]) for _, s, q in plan)
    rng = np.random.default_rng(seed)
    try:
        w.write_header_to_file(tmp)
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        with progress_bar(*Progress.get_default_columns(), DownloadColumn(), disable=not progress) as bar:
            task = bar.add_task(f"writing synthetic {name}", total=total)
            for tname, shape, qtype in plan:
                data = _tensor_data(tname, shape, qtype, p.hidden, rng)
                w.write_tensor_data(data)
                bar.advance(task, data.nbytes)
        w.close()
        os.replace(tmp, path)
    except BaseException:
        w.close()
        tmp.unlink(missing_ok=True)
        raise
    return path
