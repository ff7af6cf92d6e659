"""`ktx bench` and the synthetic models it writes.

The synthetic GGUF is checked against the llama.cpp-made tiny-dsv3 fixture (same metadata keys and
value types, same per-layer tensor names and ranks) and against the issue's dsv3-bench recipe; the bench
numbers against an independent count of the bytes from gguf-py's GGUFReader.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest

from ktx.synthetic import PRESETS, tensor_plan

FIXTURES = Path(os.environ.get("KTX_FIXTURES", Path(__file__).resolve().parents[1].parent / "shared" / "fixtures"))
FIXTURE = FIXTURES / "tiny-dsv3" / "tiny-dsv3-Q4_K_M.gguf"


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("ktx-cache")


@pytest.fixture(scope="module")
def tiny(cache):
    from ktx.synthetic import synthetic_model

    old = os.environ.get("KTX_CACHE")
    os.environ["KTX_CACHE"] = str(cache)
    try:
        return synthetic_model("dsv3-tiny")
    finally:
        os.environ.pop("KTX_CACHE") if old is None else os.environ.__setitem__("KTX_CACHE", old)


def _fields(path):
    r = gguf.GGUFReader(path)
    return r, {k: (tuple(f.types), f.contents()) for k, f in r.fields.items() if not k.startswith("GGUF.")}


@pytest.mark.skipif(not FIXTURE.exists(), reason="tiny-dsv3 fixture absent")
def test_synthetic_metadata_and_tensors_like_llama_cpp(tiny):
    ref_r, ref = _fields(FIXTURE)
    syn_r, syn = _fields(tiny)
    assert set(syn) == set(ref)
    assert {k: ref[k][0] for k in ref} == {k: syn[k][0] for k in syn}  # value types (UINT32, FLOAT32, BOOL, arrays)
    for key in ("general.architecture", "deepseek2.attention.head_count_kv", "deepseek2.expert_gating_func",
                "deepseek2.expert_weights_norm", "tokenizer.ggml.model", "general.file_type"):
        assert syn[key][1] == ref[key][1], key

    def per_layer(r):  # tensor name with the layer number stripped -> rank
        return {re.sub(r"^blk\.\d+\.", "blk.N.", t.name): len(t.shape) for t in r.tensors}

    assert per_layer(syn_r) == per_layer(ref_r)
    ref_types = {t.name: t.tensor_type.name for t in ref_r.tensors}
    syn_types = {t.name: t.tensor_type.name for t in syn_r.tensors}
    assert syn_types == ref_types  # same Q4_K_M choices (tiny's more-bits layers match the fixture's)


def test_synthetic_loads_and_text_round_trips(tiny):
    import ktx

    m = ktx.load(tiny, cache_len=32, experts="reference")
    text = "the model will think that memory"
    ids = m.tokenizer.encode(text, add_bos=False)
    assert m.tokenizer.decode(ids) == text and len(ids) < len(text.split()) + 2  # whole words are tokens
    assert np.isfinite(m.logits(m.tokenizer.encode(text))).all()


def test_bench_preset_follows_the_issue_recipe():
    from ktx.quants import row_bytes

    plan = {n: (s, q.name) for n, s, q in tensor_plan(PRESETS["dsv3-bench"])}
    total = sum(int(np.prod(s[:-1])) * row_bytes(q, s[-1]) for s, q in ((s, gguf.GGMLQuantizationType[q]) for s, q in plan.values()))
    assert 2.8 * 2**30 < total < 3.0 * 2**30
    assert plan["output.weight"] == ((129280, 2048), "Q6_K") and plan["token_embd.weight"][1] == "Q4_K"
    assert plan["blk.0.ffn_gate.weight"] == ((10752, 2048), "Q4_K")
    assert {i for i in range(8) if plan[f"blk.{i}." + ("ffn_down.weight" if i == 0 else "ffn_down_exps.weight")][1] == "Q6_K"} == {0, 3, 6, 7}
    assert plan["blk.1.ffn_gate_exps.weight"] == ((64, 1536, 2048), "Q4_K")
    assert plan["blk.1.attn_k_b.weight"] == ((16, 512, 128), "Q5_0")
    assert plan["blk.1.ffn_gate_inp.weight"][1] == plan["blk.1.exp_probs_b.bias"][1] == plan["blk.1.attn_norm.weight"][1] == "F32"


def _ktx(*args, cache):
    env = {**os.environ, "KTX_CACHE": str(cache)}
    return subprocess.run([sys.executable, "-c", "from ktx.cli import main; main()", *args], capture_output=True,
                          text=True, env=env, timeout=300)


def test_bench_json(tiny, cache):
    res = _ktx("bench", "--synthetic", "dsv3-tiny", "-p", "16", "-n", "4", "-r", "1", "--output", "json", cache=cache)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    r = gguf.GGUFReader(tiny)
    md = {k: f.contents() for k, f in r.fields.items() if k.startswith("deepseek2.expert")}
    frac = md["deepseek2.expert_used_count"] / md["deepseek2.expert_count"]
    touched = sum(int(t.n_bytes) * (frac if "_exps." in t.name else 1) for t in r.tensors if t.name != "token_embd.weight")
    emb = next(t for t in r.tensors if t.name == "token_embd.weight")
    touched += int(emb.n_bytes) / int(emb.shape[1])  # one row
    assert out["bytes_per_token"] == pytest.approx(touched, abs=16)
    assert out["size_bytes"] == sum(int(t.n_bytes) for t in r.tensors)
    assert out["kernel_paths"] and out["dram_gbps"] > 0
    pp, tg = out["results"]
    assert (pp["test"], pp["n_prompt"], tg["test"], tg["n_gen"]) == ("pp16", 16, "tg4", 4)
    assert pp["tps"] > 0 and len(tg["samples_tps"]) == 1
    assert tg["gbps"] == pytest.approx(out["bytes_per_token"] * tg["tps"] / 1e9)
    assert tg["roofline"] == pytest.approx(tg["gbps"] / out["dram_gbps"])
    # decode ran as the compiled program: where its time went, in shares of the step
    assert any(p.startswith("decode: one compiled program") for p in out["kernel_paths"])
    assert sum(tg["profile"].values()) == pytest.approx(1.0) and "lm_head gemv" in tg["profile"]
    res = _ktx("bench", "--synthetic", "dsv3-tiny", "-p", "0", "-n", "2", "-r", "1", "-o", "json", "--per-op-decode",
               cache=cache)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["results"][0]["profile"] is None


def test_bench_usage_errors(cache):
    res = _ktx("bench", "-p", "16", cache=cache)
    assert res.returncode == 1 and res.stderr.startswith("ktx: error:") and "Traceback" not in res.stderr
    res = _ktx("bench", "--synthetic", "dsv3-huge", cache=cache)
    assert res.returncode == 1 and "dsv3-tiny" in res.stderr
    res = _ktx("bench", "--synthetic", "dsv3-tiny", "-p", "1x", cache=cache)
    assert res.returncode == 1 and "-p" in res.stderr


def test_expert_paths_listed_once_with_their_type_triples():
    from types import SimpleNamespace as E

    from ktx.bench import _expert_paths

    tail = "; prefill: vnni (amx unavailable: CPU lacks AMX-TILE)"
    layers = [E(kernel_path=f"vnni gemv 1x64 tiles ({t}, repacked){tail}") for t in ("Q4_K/Q4_K/Q6_K", "Q4_K/Q4_K/Q4_K")] * 3
    assert _expert_paths(layers) == [f"vnni gemv 1x64 tiles (Q4_K/Q4_K/Q4_K | Q4_K/Q4_K/Q6_K, repacked){tail}"]
    ref = E(kernel_path="reference numpy dequant + float matmul (F16/F16/F16)")
    assert _expert_paths([ref, ref]) == [ref.kernel_path]
