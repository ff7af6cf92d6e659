"""ktx on llama.cpp-made GGUFs of a tiny DeepSeek-V3, against transformers (the fixture's fp32 logits, or
transformers loaded with the GGUF's dequantized weights for the quantized files)."""

import json

import numpy as np
import pytest

import ktx
from hf_reference import hf_logits, hf_model_from_gguf

TOL = 2e-3  # max |logit difference| at positions whose routing is not a near-tie (llama.cpp: 2.2e-3)
MARGIN = 1e-3


def _load(path, **kw):
    return ktx.load(path, cache_len=128, experts="reference", **kw)


def test_bf16_prefill_and_decode_match_transformers(tiny_dsv3):
    ids = np.load(tiny_dsv3 / "tokens.npy").tolist()
    ref = np.load(tiny_dsv3 / "hf_logits_f32.npy")
    ok = np.load(tiny_dsv3 / "router_margins.npy") > MARGIN
    m = _load(tiny_dsv3 / "tiny-dsv3-BF16.gguf")
    prefill = m.logits(ids)
    assert prefill.shape == ref.shape and prefill.dtype == np.float32
    assert np.abs(prefill - ref).max(-1)[ok].max() <= TOL
    # token-by-token through the latent cache
    m.engine.reset()
    steps = [m.net.forward(__import__("torch").tensor([t]), m.engine.cache).numpy()[0] for t in ids]
    assert np.abs(np.stack(steps) - ref).max(-1)[ok].max() <= TOL


def test_bf16_greedy_matches_transformers(tiny_dsv3):
    want = json.loads((tiny_dsv3 / "hf_greedy.json").read_text())
    m = _load(tiny_dsv3 / "tiny-dsv3-BF16.gguf")
    got = []
    for tok in m.engine.generate(want["prompt_ids"], len(want["greedy_ids"])):
        got.append(tok)
    assert got == want["greedy_ids"]


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_K_M"])
def test_quantized_files_match_transformers_with_same_weights(tiny_dsv3, qtype):
    path = tiny_dsv3 / f"tiny-dsv3-{qtype}.gguf"
    ids = np.load(tiny_dsv3 / "tokens.npy").tolist()
    ref = hf_logits(hf_model_from_gguf(tiny_dsv3 / "hf", path), ids)
    ok = np.load(tiny_dsv3 / f"router_margins_{qtype}.npy") > MARGIN
    got = _load(path).logits(ids)
    assert np.abs(got - ref).max(-1)[ok].max() <= TOL
    # and llama.cpp on the same file agrees on the top token almost everywhere (it rounds activations to int8)
    cpp = np.load(tiny_dsv3 / f"llamacpp_logits_{qtype}.npy")
    assert (got.argmax(-1) == cpp.argmax(-1))[ok].mean() >= 0.85
