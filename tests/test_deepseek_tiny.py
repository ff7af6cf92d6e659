"""ktx against transformers on tiny random DeepSeek models built here (no fixtures needed).

Each case: build a seeded transformers model, convert it with `ktx convert`, and compare ktx's fp32 logits
with transformers' for a full prefill and for token-by-token decode through the latent KV cache, at
positions whose routing is not a near-tie; greedy continuations must be identical.
"""

import numpy as np
import pytest
import torch

import ktx
from hf_reference import assert_matches_hf, hf_logits, hf_model_from_gguf, prompt_ids
from ktx.convert import convert_hf_to_gguf
from tiny_models import make_deepseek_v3, router_margins

TOL = 2e-3
MARGIN = 1e-3
CASES = {
    "v3": dict(q_lora=True, gating="sigmoid", first_dense=1),
    "v3-yarn": dict(q_lora=True, gating="sigmoid", first_dense=1, yarn=True),
    "v3-all-moe": dict(q_lora=True, gating="sigmoid", first_dense=0, n_layers=2),
    "v2-lite": dict(q_lora=False, gating="softmax", first_dense=1),
}


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(request.param)
    hf_dir, model = make_deepseek_v3(d / "hf", seed=7, **CASES[request.param])
    gguf_path = convert_hf_to_gguf(hf_dir, d / "model-bf16.gguf", "bf16")
    return request.param, hf_dir, model, gguf_path


def test_prefill_and_decode_match_transformers(case):
    name, hf_dir, model, gguf_path = case
    m = ktx.load(gguf_path, cache_len=64, experts="reference")
    assert_matches_hf(m, model, prompt_ids(40, model.config.vocab_size, 1), name, TOL, MARGIN)


def test_greedy_continuation_matches_transformers(case):
    name, hf_dir, model, gguf_path = case
    ids = prompt_ids(8, model.config.vocab_size, 2)
    with torch.inference_mode():
        want = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, eos_token_id=None,
                              pad_token_id=0)[0, len(ids):].tolist()
    m = ktx.load(gguf_path, cache_len=64, experts="reference")
    assert list(m.engine.generate(ids, 12)) == want, name


def test_q8_0_file_matches_transformers_with_its_weights(tmp_path):
    hf_dir, model = make_deepseek_v3(tmp_path / "hf", seed=3)
    path = convert_hf_to_gguf(hf_dir, tmp_path / "m-q8_0.gguf", "q8_0")
    ref_model = hf_model_from_gguf(hf_dir, path)
    ids = prompt_ids(24, model.config.vocab_size, 3)
    ok = router_margins(ref_model, ids) > MARGIN
    got = ktx.load(path, cache_len=32, experts="reference").logits(ids)
    assert np.abs(got - hf_logits(ref_model, ids)).max(-1)[ok].max() <= TOL
