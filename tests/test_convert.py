"""ktx convert: HF checkpoint folder -> GGUF.

References, none of them the converter: llama.cpp's own GGUFs of the shared fixture (bit-level), gguf-py's
TensorNameMap for tensor names, the transformers model's state_dict (fused experts, un-split kv_b) for
weights, the transformers config and tokenizer for metadata.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from ktx.convert import convert_hf_to_gguf, detect_pre_tokenizer
from ktx.errors import KtxError
from tiny_models import make_deepseek_v3, make_tokenizer_files

FIXTURES = Path(os.environ.get("KTX_FIXTURES", Path(__file__).resolve().parents[1].parent / "shared" / "fixtures"))
TINY_DSV3 = FIXTURES / "tiny-dsv3"
needs_fixture = pytest.mark.skipif(not (TINY_DSV3 / "hf" / "config.json").is_file(),
                                   reason=f"fixture {TINY_DSV3} absent")
T = gguf.GGMLQuantizationType
# naming keys llama.cpp derives from the folder / model card; not part of the model
NAMING_KEYS = {"general.name", "general.size_label", "general.type", "general.basename", "general.finetune"}


def _fields(reader: gguf.GGUFReader) -> dict:
    return {k: (tuple(f.types), f.contents()) for k, f in reader.fields.items()
            if not k.startswith("GGUF.") and k not in NAMING_KEYS}


def _assert_same_gguf(mine: Path, ref: Path) -> None:
    a, b = gguf.GGUFReader(mine), gguf.GGUFReader(ref)
    fa, fb = _fields(a), _fields(b)
    assert sorted(fa) == sorted(fb)
    for key in fb:
        assert fa[key] == fb[key], key
    ta, tb = {t.name: t for t in a.tensors}, {t.name: t for t in b.tensors}
    assert sorted(ta) == sorted(tb)
    for name, ref_t in tb.items():
        t = ta[name]
        assert t.tensor_type == ref_t.tensor_type, name
        assert list(t.shape) == list(ref_t.shape), name
        assert t.data.tobytes() == ref_t.data.tobytes(), name


# ---------------------------------------------------------------------------------------------
# against llama.cpp's own conversion of the shared fixture


@needs_fixture
def test_bf16_is_bit_identical_to_llamacpp_convert(tmp_path):
    out = convert_hf_to_gguf(TINY_DSV3 / "hf", tmp_path / "m.gguf", "bf16")
    _assert_same_gguf(out, TINY_DSV3 / "tiny-dsv3-BF16.gguf")


@needs_fixture
def test_q8_0_is_bit_identical_to_llama_quantize(tmp_path):
    # llama-quantize made the fixture from the BF16 GGUF; the weights are bf16-exact, so quantizing the
    # same numbers with gguf-py must give the same blocks
    out = convert_hf_to_gguf(TINY_DSV3 / "hf", tmp_path / "m.gguf", "q8_0")
    a, b = gguf.GGUFReader(out), gguf.GGUFReader(TINY_DSV3 / "tiny-dsv3-Q8_0.gguf")
    assert a.fields["general.file_type"].contents() == b.fields["general.file_type"].contents() == 7
    tb = {t.name: t for t in b.tensors}
    assert sorted(t.name for t in a.tensors) == sorted(tb)
    for t in a.tensors:
        assert t.tensor_type == tb[t.name].tensor_type, t.name
        assert t.data.tobytes() == tb[t.name].data.tobytes(), t.name


# ---------------------------------------------------------------------------------------------
# tiny random models: every tensor back to the HF weights


def _expected_tensors(model, cfg) -> dict[str, np.ndarray]:
    """GGUF name -> float32 array (numpy order), from the transformers state_dict, named by gguf-py."""
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.DEEPSEEK2, cfg.num_hidden_layers)
    out = {}

    def put(hf_base: str, suffix: str, value: torch.Tensor) -> None:
        name = names.get_name(hf_base)
        assert name is not None, hf_base
        out[name + suffix] = value.detach().float().numpy()

    for key, value in model.state_dict().items():
        if key.endswith("rotary_emb.inv_freq") or key.endswith("original_inv_freq"):
            continue
        if key.endswith("e_score_correction_bias"):
            put(key.replace("e_score_correction_bias", "e_score_correction"), ".bias", value)
        elif key.endswith("experts.gate_up_proj"):  # [E, 2I, H]: gate rows, then up rows
            i = value.shape[1] // 2
            put(key.replace("gate_up_proj", "gate_proj"), ".weight", value[:, :i])
            put(key.replace("gate_up_proj", "up_proj"), ".weight", value[:, i:])
        elif key.endswith("experts.down_proj"):
            put(key, ".weight", value)
        elif key.endswith("kv_b_proj.weight"):  # rows per head: [k_nope | v]
            kv_b = value.view(cfg.num_attention_heads, cfg.qk_nope_head_dim + cfg.v_head_dim, cfg.kv_lora_rank)
            put(key.replace("kv_b_proj.weight", "k_b_proj"), ".weight",
                kv_b[:, : cfg.qk_nope_head_dim].transpose(1, 2))  # [n_head, kv_lora, nope]
            put(key.replace("kv_b_proj.weight", "v_b_proj"), ".weight", kv_b[:, cfg.qk_nope_head_dim:])
        else:
            put(key.removesuffix(".weight"), ".weight", value)
    return out


def _expected_type(name: str, ndim: int, outtype: str) -> T:
    if ndim == 1 or name.endswith(("norm.weight", "ffn_gate_inp.weight", ".bias")):
        return T.F32
    return {"f32": T.F32, "f16": T.F16, "bf16": T.BF16, "q8_0": T.Q8_0}[outtype]


MODELS = {
    "v3": {},
    "v3-no-qlora-yarn": dict(q_lora=False, yarn=True, first_dense=0),
    "v2-softmax": dict(gating="softmax", q_lora=False, n_layers=2),
}


@pytest.fixture(scope="module", params=list(MODELS))
def tiny(request, tmp_path_factory):
    d, model = make_deepseek_v3(tmp_path_factory.mktemp(request.param) / "hf", seed=7, **MODELS[request.param])
    return request.param, d, model


@pytest.mark.parametrize("outtype", ["f32", "f16", "bf16", "q8_0"])
def test_tensors_dequantize_to_hf_weights(tiny, outtype, tmp_path):
    _, d, model = tiny
    reader = gguf.GGUFReader(convert_hf_to_gguf(d, tmp_path / "m.gguf", outtype))
    want = _expected_tensors(model, model.config)
    assert sorted(t.name for t in reader.tensors) == sorted(want)
    for t in reader.tensors:
        w = want[t.name]
        assert tuple(int(n) for n in reversed(t.shape)) == w.shape, t.name
        assert t.tensor_type == _expected_type(t.name, w.ndim, outtype), t.name
        got = gguf.quants.dequantize(t.data, t.tensor_type).reshape(w.shape)
        if t.tensor_type in (T.F32, T.BF16):
            np.testing.assert_array_equal(got, w, err_msg=t.name)  # weights are bf16-exact
        elif t.tensor_type == T.F16:
            np.testing.assert_allclose(got, w, rtol=2**-11, atol=2**-24, err_msg=t.name)
        else:  # Q8_0: round-to-nearest of x/d, d = absmax/127 stored as f16
            blocks = w.reshape(-1, 32)
            d_blk = np.abs(blocks).max(1, keepdims=True) / 127
            err = np.abs(got.reshape(-1, 32) - blocks)
            assert (err <= 0.51 * d_blk * (1 + 127 * 2**-10) + 1e-12).all(), t.name


def test_metadata_matches_hf_config(tiny, tmp_path):
    kind, d, model = tiny
    c = model.config
    r = gguf.GGUFReader(convert_hf_to_gguf(d, tmp_path / "m.gguf", "bf16"))
    kv = {k: f.contents() for k, f in r.fields.items()}
    a = "deepseek2."
    assert kv["general.architecture"] == "deepseek2"
    assert kv["general.file_type"] == gguf.LlamaFileType.MOSTLY_BF16
    expect = {
        "block_count": c.num_hidden_layers, "context_length": c.max_position_embeddings,
        "embedding_length": c.hidden_size, "feed_forward_length": c.intermediate_size,
        "attention.head_count": c.num_attention_heads, "attention.head_count_kv": 1,
        "attention.key_length": c.kv_lora_rank + c.qk_rope_head_dim, "attention.value_length": c.kv_lora_rank,
        "attention.key_length_mla": c.qk_nope_head_dim + c.qk_rope_head_dim,
        "attention.value_length_mla": c.v_head_dim, "attention.kv_lora_rank": c.kv_lora_rank,
        "rope.dimension_count": c.qk_rope_head_dim, "vocab_size": c.vocab_size,
        "expert_count": c.n_routed_experts, "expert_used_count": c.num_experts_per_tok,
        "expert_shared_count": c.n_shared_experts, "expert_feed_forward_length": c.moe_intermediate_size,
        "leading_dense_block_count": c.first_k_dense_replace,
        "expert_gating_func": 1 if kind == "v2-softmax" else 2,
    }
    for key, value in expect.items():
        assert kv[a + key] == value, key
    assert kv[a + "rope.freq_base"] == pytest.approx(c.rope_parameters["rope_theta"])
    assert kv[a + "attention.layer_norm_rms_epsilon"] == pytest.approx(c.rms_norm_eps)
    assert kv[a + "expert_weights_scale"] == pytest.approx(c.routed_scaling_factor)
    assert (a + "attention.q_lora_rank" in kv) == (c.q_lora_rank is not None)
    if c.q_lora_rank is not None:
        assert kv[a + "attention.q_lora_rank"] == c.q_lora_rank
    assert kv.get(a + "expert_weights_norm", False) == bool(c.norm_topk_prob)
    if kind == "v2-softmax":
        assert a + "expert_group_count" not in kv
    else:
        assert kv[a + "expert_group_count"] == c.n_group
        assert kv[a + "expert_group_used_count"] == c.topk_group
    rope = c.rope_parameters
    if rope["rope_type"] == "yarn":
        assert kv[a + "rope.scaling.type"] == "yarn"
        assert kv[a + "rope.scaling.factor"] == pytest.approx(rope["factor"])
        assert kv[a + "rope.scaling.original_context_length"] == rope["original_max_position_embeddings"]
        assert kv[a + "rope.scaling.yarn_log_multiplier"] == pytest.approx(0.1 * rope["mscale_all_dim"])
        assert kv[a + "rope.scaling.yarn_beta_fast"] == pytest.approx(rope["beta_fast"])
    else:
        assert a + "rope.scaling.type" not in kv


def test_tokenizer_metadata_matches_hf_tokenizer(tiny, tmp_path):
    from transformers import AutoTokenizer

    _, d, model = tiny
    hf = AutoTokenizer.from_pretrained(d)
    r = gguf.GGUFReader(convert_hf_to_gguf(d, tmp_path / "m.gguf", "bf16"))
    kv = {k: f.contents() for k, f in r.fields.items()}
    n = model.config.vocab_size
    assert kv["tokenizer.ggml.model"] == "gpt2"
    assert kv["tokenizer.ggml.pre"] == "deepseek-v3"
    assert kv["tokenizer.ggml.tokens"] == hf.convert_ids_to_tokens(list(range(n)))
    special = set(hf.all_special_ids) | {i for i, t in hf.added_tokens_decoder.items() if t.special}
    want_types = [gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL for i in range(n)]
    assert kv["tokenizer.ggml.token_type"] == want_types
    merges = json.loads((d / "tokenizer.json").read_text(encoding="utf-8"))["model"]["merges"]
    assert kv["tokenizer.ggml.merges"] == [m if isinstance(m, str) else " ".join(m) for m in merges]
    assert kv["tokenizer.ggml.bos_token_id"] == hf.bos_token_id
    assert kv["tokenizer.ggml.eos_token_id"] == hf.eos_token_id
    assert kv["tokenizer.ggml.add_bos_token"] is True
    assert hf("hi")["input_ids"][0] == hf.bos_token_id  # the HF side agrees that BOS is added
    assert kv["tokenizer.chat_template"] == hf.chat_template


def test_fused_expert_checkpoint_converts_like_per_expert(tiny, tmp_path, capsys):
    """transformers >= 5 state_dict keeps experts fused ([E, 2I, H] gate_up); both layouts give one GGUF."""
    from safetensors.torch import save_file

    _, d, model = tiny
    fused = tmp_path / "fused"
    shutil.copytree(d, fused)
    (fused / "model.safetensors").unlink()
    sd = {k: v.to(torch.bfloat16).contiguous() for k, v in model.state_dict().items() if "rotary_emb" not in k}
    save_file(sd, str(fused / "model.safetensors"), metadata={"format": "pt"})
    a = convert_hf_to_gguf(d, tmp_path / "a.gguf", "bf16")
    b = convert_hf_to_gguf(fused, tmp_path / "b.gguf", "bf16", progress=True)
    lines = capsys.readouterr().err.splitlines()
    n_moe_layers = model.config.num_hidden_layers - model.config.first_k_dense_replace
    assert sum("ffn_up_exps.weight" in line and "BF16" in line for line in lines) == n_moe_layers
    ta = {t.name: t.data.tobytes() for t in gguf.GGUFReader(a).tensors}
    tb = {t.name: t.data.tobytes() for t in gguf.GGUFReader(b).tensors}
    assert ta == tb


# ---------------------------------------------------------------------------------------------
# pre-tokenizer detection and errors


@pytest.mark.parametrize("pre", ["deepseek-v3", "llama-bpe"])
def test_pre_tokenizer_detected(pre, tmp_path):
    make_tokenizer_files(tmp_path, pre=pre)
    assert detect_pre_tokenizer(json.loads((tmp_path / "tokenizer.json").read_text(encoding="utf-8"))) == pre


def test_pre_tokenizer_qwen2_and_unknown():
    qwen2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
             r"|\s*[\r\n]+|\s+(?!\S)|\s+")

    def tok(regex):
        return {"pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}]}}

    assert detect_pre_tokenizer(tok(qwen2)) == "qwen2"
    assert detect_pre_tokenizer(tok(r"\p{L}+|\p{N}+")) == "default"
    assert detect_pre_tokenizer({"pre_tokenizer": None}) == "default"


def test_errors_are_ktx_errors(tmp_path):
    with pytest.raises(KtxError, match="not a folder"):
        convert_hf_to_gguf(tmp_path / "nope", tmp_path / "o.gguf")
    with pytest.raises(KtxError, match="config.json"):
        convert_hf_to_gguf(tmp_path, tmp_path / "o.gguf")
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["FooForCausalLM"]}))
    with pytest.raises(KtxError, match="FooForCausalLM.*not supported"):
        convert_hf_to_gguf(tmp_path, tmp_path / "o.gguf")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(KtxError, match="not valid JSON"):
        convert_hf_to_gguf(tmp_path, tmp_path / "o.gguf")
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["DeepseekV3ForCausalLM"]}))
    with pytest.raises(KtxError, match="no \\*.safetensors"):
        convert_hf_to_gguf(tmp_path, tmp_path / "o.gguf")
    with pytest.raises(KtxError, match="outtype"):
        convert_hf_to_gguf(tmp_path, tmp_path / "o.gguf", outtype="q4_k")


def test_missing_expert_is_reported(tmp_path):
    from safetensors.torch import load_file, save_file

    d, _ = make_deepseek_v3(tmp_path / "hf", n_layers=2)
    sd = load_file(str(d / "model.safetensors"))
    del sd["model.layers.1.mlp.experts.3.up_proj.weight"]
    save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(KtxError, match="layer 1: only 7 of 8 experts"):
        convert_hf_to_gguf(d, tmp_path / "o.gguf")
