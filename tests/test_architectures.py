"""ktx against transformers on tiny random models of the GQA family (llama, mixtral, qwen2moe, qwen3moe, gemma3).

Each case: build a seeded transformers model, convert it with `ktx convert` (BF16, the weights are
bf16-representable), and compare ktx's fp32 logits with transformers' for a full prefill and for
token-by-token decode through the KV cache, at positions whose routing is not a near-tie; greedy
continuations must be identical. The prompt (40 tokens) is longer than gemma3's sliding window (8), and
llama/mixtral exercise the converter's q/k row permutation against llama.cpp's adjacent-pair rope.
"""

import pytest
import torch

import ktx
from hf_reference import assert_matches_hf, prompt_ids
from ktx.convert import convert_hf_to_gguf
from tiny_models import make_gemma3, make_llama, make_mixtral, make_qwen2_moe, make_qwen3_moe

TOL = 2e-3
MARGIN = 1e-3
CASES = {
    "qwen3moe": (make_qwen3_moe, "qwen3moe"),
    "llama": (make_llama, "llama"),
    "mixtral": (make_mixtral, "llama"),
    "qwen2moe": (make_qwen2_moe, "qwen2moe"),
    "gemma3": (make_gemma3, "gemma3"),
}


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(request.param)
    make, arch = CASES[request.param]
    hf_dir, model = make(d / "hf", seed=7)
    gguf_path = convert_hf_to_gguf(hf_dir, d / "model-bf16.gguf", "bf16")
    m = ktx.load(gguf_path, cache_len=64, experts="reference")
    assert m.config.arch == arch
    return request.param, model, m


def test_prefill_and_decode_match_transformers(case):
    name, model, m = case
    assert_matches_hf(m, model, prompt_ids(40, model.config.vocab_size, 1), name, TOL, MARGIN)


def test_greedy_continuation_matches_transformers(case):
    name, model, m = case
    ids = prompt_ids(8, model.config.vocab_size, 2)
    with torch.inference_mode():
        want = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, eos_token_id=None,
                              pad_token_id=0)[0, len(ids):].tolist()
    assert list(m.engine.generate(ids, 12)) == want, name


def test_gemma3_norms_hold_one_plus_w(tmp_path):
    """llama.cpp's gemma3 layout: the converter stores 1 + w for every RMSNorm weight."""
    hf_dir, model = make_gemma3(tmp_path / "hf", seed=1, n_layers=1)
    m = ktx.load(convert_hf_to_gguf(hf_dir, tmp_path / "g.gguf", "f32"), cache_len=8, experts="reference")
    want = model.model.layers[0].post_feedforward_layernorm.weight.detach() + 1
    assert torch.equal(m.net.store.get("blk.0.post_ffw_norm.weight"), want)
