"""The Qwen3-MoE synthetic presets (ktx.synthetic) and ktx bench's bytes-per-token count on them.

References are independent of the writer: the expected tensor list of a llama.cpp Q4_K_M `qwen3moe` file is
written out below by hand (names, numpy shapes, the recipe's Q6_K layers listed literally), the file is read
back with gguf-py's GGUFReader, and the bytes one decode step reads are summed here from the reader's tensors.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import gguf
import numpy as np
import pytest

from ktx.synthetic import PRESETS, tensor_plan, write_synthetic

Q4, Q6, F32 = "Q4_K", "Q6_K", "F32"


def qwen3moe_tensors(V, H, L, n_h, n_kv, d, E, I, q6_layers):
    """name -> (numpy shape, type) of a qwen3moe Q4_K_M file as llama.cpp writes it."""
    want = {"token_embd.weight": ((V, H), Q4), "output_norm.weight": ((H,), F32), "output.weight": ((V, H), Q6)}
    for i in range(L):
        more = Q6 if i in q6_layers else Q4
        want.update({
            f"blk.{i}.attn_norm.weight": ((H,), F32), f"blk.{i}.ffn_norm.weight": ((H,), F32),
            f"blk.{i}.attn_q.weight": ((n_h * d, H), Q4), f"blk.{i}.attn_k.weight": ((n_kv * d, H), Q4),
            f"blk.{i}.attn_v.weight": ((n_kv * d, H), more), f"blk.{i}.attn_output.weight": ((H, n_h * d), Q4),
            f"blk.{i}.attn_q_norm.weight": ((d,), F32), f"blk.{i}.attn_k_norm.weight": ((d,), F32),
            f"blk.{i}.ffn_gate_inp.weight": ((E, H), F32),
            f"blk.{i}.ffn_gate_exps.weight": ((E, I, H), Q4), f"blk.{i}.ffn_up_exps.weight": ((E, I, H), Q4),
            f"blk.{i}.ffn_down_exps.weight": ((E, H, I), more),
        })
    return want


def reader_touched_bytes(r: gguf.GGUFReader) -> float:
    """One decode step: every tensor once, one row of token_embd (untied), n_used / n_expert of each *_exps."""
    md = {k: f.contents() for k, f in r.fields.items()}
    arch = md["general.architecture"]
    frac = md[f"{arch}.expert_used_count"] / md[f"{arch}.expert_count"]
    tied = not any(t.name == "output.weight" for t in r.tensors)
    total = 0.0
    for t in r.tensors:
        if t.name == "token_embd.weight" and not tied:
            total += int(t.n_bytes) / int(t.shape[1])  # ggml shape: [H, V]
        else:
            total += int(t.n_bytes) * (frac if "_exps." in t.name else 1)
    return total


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("ktx-cache")


@pytest.fixture(scope="module")
def tiny(cache):
    return write_synthetic(PRESETS["qwen3-tiny"], cache / "synthetic" / "qwen3-tiny-Q4_K_M-v2.gguf", "qwen3-tiny")


def test_tiny_file_is_a_llama_cpp_qwen3moe_q4_k_m(tiny):
    r = gguf.GGUFReader(tiny)
    got = {t.name: (tuple(int(n) for n in t.shape[::-1]), t.tensor_type.name) for t in r.tensors}
    # 3 layers: use_more_bits picks layer 2 only (i >= 7*3/8 = 2)
    assert got == qwen3moe_tensors(2048, 256, 3, 4, 2, 64, 16, 256, q6_layers={2})
    md = {k: f.contents() for k, f in r.fields.items()}
    assert md["general.architecture"] == "qwen3moe" and md["general.file_type"] == 15
    expect = {"block_count": 3, "embedding_length": 256, "attention.head_count": 4, "attention.head_count_kv": 2,
              "attention.key_length": 64, "attention.value_length": 64, "expert_count": 16, "expert_used_count": 4,
              "expert_feed_forward_length": 256, "rope.freq_base": 1e6}
    assert {k: md[f"qwen3moe.{k}"] for k in expect} == expect
    tokens = md["tokenizer.ggml.tokens"]
    assert len(tokens) == 2048 and md["tokenizer.ggml.pre"] == "qwen2" and md["tokenizer.ggml.add_bos_token"] is False
    assert tokens[md["tokenizer.ggml.eos_token_id"]] == "<|im_end|>"
    assert tokens[md["tokenizer.ggml.bos_token_id"]] == tokens[md["tokenizer.ggml.padding_token_id"]] == "<|endoftext|>"
    for t in r.tensors:  # random blocks, but valid ones: they dequantize to finite weights of modest size
        if t.tensor_type.name != F32 and t.name.endswith(("attn_v.weight", "ffn_down_exps.weight")):
            w = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
            assert np.isfinite(w).all() and 0 < np.abs(w).max() < 10, t.name


def test_bench_preset_is_qwen3_30b_a3b_layers():
    from ktx.quants import row_bytes

    p = PRESETS["qwen3-bench"]
    plan = {n: (s, q.name) for n, s, q in tensor_plan(p)}
    # 7 layers: more bits for i >= 49/8 = 6 and every third from 0 (i % 3 == 2)
    assert plan == qwen3moe_tensors(151936, 2048, 7, 32, 4, 128, 128, 768, q6_layers={2, 5, 6})
    size = sum(int(np.prod(s[:-1])) * row_bytes(gguf.GGMLQuantizationType[q], s[-1]) for s, q in plan.values())
    assert 2.5 * 2**30 < size < 3.0 * 2**30


def test_tiny_loads_and_decodes_through_the_compiled_program(tiny):
    import torch

    import ktx

    m = ktx.load(tiny, cache_len=32, threads=2)
    cfg = m.net.cfg
    assert (cfg.arch, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.n_expert, cfg.n_expert_used, cfg.moe_ffn) == \
        ("qwen3moe", 4, 2, 64, 16, 4, 256)
    assert cfg.neox and cfg.routing_norm and cfg.rope_base == 1e6 and m.net.gguf.has("blk.0.attn_q_norm.weight")
    text = "the model will think that memory"
    ids = m.tokenizer.encode(text, add_bos=False)
    assert m.tokenizer.decode(ids) == text
    m.engine.reset()
    m.net.forward(torch.tensor(ids), m.engine.cache)
    for t in ids[:3]:
        logits = m.net.forward(torch.tensor([t]), m.engine.cache)  # [1, vocab]
        assert logits.shape == (1, 2048) and torch.isfinite(logits).all()
    assert m.net.program_note.startswith("decode: one compiled program"), m.net.program_note


def test_touched_bytes_per_token_matches_reader(tiny, tmp_path):
    from ktx.bench import touched_bytes_per_token
    from ktx.gguf_file import GGUFModel

    assert touched_bytes_per_token(GGUFModel(tiny)) == pytest.approx(reader_touched_bytes(gguf.GGUFReader(tiny)), abs=16)
    # tied head (no output.weight), llama-named experts: the whole token_embd is read, as the lm_head
    path = tmp_path / "tied.gguf"
    w = gguf.GGUFWriter(path, "llama")
    w.add_uint32("llama.expert_count", 8)
    w.add_uint32("llama.expert_used_count", 2)
    rng = np.random.default_rng(0)
    for name, shape in (("token_embd.weight", (64, 32)), ("blk.0.attn_q.weight", (32, 32)),
                        ("blk.0.ffn_gate_exps.weight", (8, 16, 32)), ("blk.0.ffn_down_exps.weight", (8, 32, 16)),
                        ("output_norm.weight", (32,))):
        w.add_tensor(name, rng.standard_normal(shape).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert touched_bytes_per_token(GGUFModel(path)) == reader_touched_bytes(gguf.GGUFReader(path)) == \
        4 * (64 * 32 + 32 * 32 + 2 * (16 * 32 + 32 * 16) + 32)
    # --experts-per-token 1: one expert's gate and down per token
    assert touched_bytes_per_token(GGUFModel(path), 1) == 4 * (64 * 32 + 32 * 32 + 1 * (16 * 32 + 32 * 16) + 32)


def test_bench_cli_json(tiny, cache):
    env = {**os.environ, "KTX_CACHE": str(cache)}  # the fixture wrote the file where synthetic_model looks
    res = subprocess.run([sys.executable, "-c", "from ktx.cli import main; main()", "bench", "--synthetic", "qwen3-tiny",
                          "-p", "16", "-n", "4", "-r", "1", "--output", "json"], capture_output=True, text=True, env=env,
                         timeout=300)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["bytes_per_token"] == pytest.approx(reader_touched_bytes(gguf.GGUFReader(tiny)), abs=16)
    assert any(p.startswith("decode: one compiled program") for p in out["kernel_paths"]), out["kernel_paths"]
    pp, tg = out["results"]
    assert (pp["test"], tg["test"]) == ("pp16", "tg4") and pp["tps"] > 0 and tg["tps"] > 0
    assert tg["gbps"] == pytest.approx(out["bytes_per_token"] * tg["tps"] / 1e9)
