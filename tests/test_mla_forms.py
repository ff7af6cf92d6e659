"""MLA attention forms (ktx.layers.mla) against a plain multi-head attention written out in float64 here:
per-head keys k = [W_UK^T kv_c | k_pe], values W_UV kv_c, causal softmax at positions start.."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ktx.layers.mla import expanded_is_cheaper, float_kv_heads, mla_expanded, mla_latent


def plain_mha(q_nope, q_pe, kv_c, k_pe, W_UK, W_UV, scale, start):
    q_nope, q_pe, kv_c, k_pe, W_UK, W_UV = (t.double() for t in (q_nope, q_pe, kv_c, k_pe, W_UK, W_UV))
    T, n_h, _ = q_nope.shape
    S = kv_c.shape[0]
    out = torch.zeros(T, n_h, W_UV.shape[1], dtype=torch.float64)
    for h in range(n_h):
        k = torch.cat([kv_c @ W_UK[h], k_pe], dim=1)  # [S, nope + rope]
        v = kv_c @ W_UV[h].T  # [S, v]
        for t in range(T):
            q = torch.cat([q_nope[t, h], q_pe[t, h]])
            s = (k[: start + t + 1] @ q) * scale
            out[t, h] = torch.softmax(s, 0) @ v[: start + t + 1]
    return out


@settings(max_examples=25, deadline=None)
@given(T=st.integers(1, 40), start=st.integers(0, 30), n_h=st.integers(1, 5), block=st.sampled_from([1, 4, 16, 128]),
       budget=st.sampled_from([1 << 10, 1 << 28]), unit=st.sampled_from([1, 2]), seed=st.integers(0, 2**31 - 1))
def test_expanded_and_absorbed_forms_match_plain_attention(T, start, n_h, block, budget, unit, seed):
    g = torch.Generator().manual_seed(seed)
    L, nope, rope, dv = 32, 8, 4, 6
    S = start + T
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    q_nope, q_pe, kv_c, k_pe = r(T, n_h, nope), r(T, n_h, rope), r(S, L), r(S, rope)
    W_UK, W_UV = r(n_h, L, nope) / 4, r(n_h, dv, L) / 4
    want = plain_mha(q_nope, q_pe, kv_c, k_pe, W_UK, W_UV, 0.3, start)
    got = mla_expanded(q_nope, q_pe, k_pe, float_kv_heads(kv_c, W_UK, W_UV), dv, 0.3, start, block=block,
                       budget=budget, unit=unit)
    assert torch.allclose(got.double(), want, atol=1e-4), (got.double() - want).abs().max()
    o_lat = mla_latent(torch.einsum("thn,hcn->thc", q_nope, W_UK), q_pe, kv_c, k_pe, 0.3, start)
    absorbed = torch.einsum("thc,hvc->thv", o_lat, W_UV)
    assert torch.allclose(absorbed.double(), want, atol=1e-4), (absorbed.double() - want).abs().max()


def test_form_choice_decode_absorbed_prefill_expanded():
    v3 = dict(kv_lora=512, nope=128, rope=64, v=128)
    assert not expanded_is_cheaper(1, 4096, **v3)  # decode: one query, long cache
    assert expanded_is_cheaper(512, 512, **v3)  # a fresh prompt
    assert not expanded_is_cheaper(8, 8192, **v3)  # a short chat turn after a long context


@pytest.mark.parametrize("budget", [1 << 28, 1])  # all heads in one GEMM; one head at a time (row ranges past 0)
def test_int8_kv_expansion_of_a_quantized_model_tracks_the_float_model(tmp_path, monkeypatch, budget):
    """A prompt through a DeepSeek-V3-shaped model on the int8 linears expands each layer's K/V with one derived
    Q8_0 weight (Deepseek2._kv_heads: W_UK^T and W_UV rows per head, heads h0:h1 as a row range of it): its logits
    at every position against the float model's (float32 linears, einsum expansion). The int8 activations of
    every linear put ~3-5% of the largest logit between the two at most positions (a near-tied expert choice
    that flips at some position gives that position 20-70%, with the float expansion too); a head's keys or
    values from the wrong rows, or keys and values swapped, give tens of percent at every position."""
    import functools

    import numpy as np

    import ktx
    import ktx.models.deepseek2 as deepseek2
    from ktx.synthetic import PRESETS, write_synthetic

    path = write_synthetic(PRESETS["dsv3-tiny"], tmp_path / "dsv3-tiny.gguf")
    monkeypatch.setattr(deepseek2, "mla_expanded", functools.partial(mla_expanded, budget=budget))
    ref = ktx.load(path, cache_len=64, experts="reference")
    m = ktx.load(path, cache_len=64, threads=2)
    prompt = list(range(5, 45))
    a, b = ref.logits(prompt), m.logits(prompt)  # [T, vocab]
    ops = m.net.lin.derived_ops
    assert sorted(ops) == [f"blk.{i}.attn_kv_b.expand" for i in range(3)] and all(ops.values())
    assert "3 derived Q8_0 weights (attn_kv_b.expand)" in m.net.lin.describe()  # what `ktx bench` prints
    err = np.abs(a - b).max(-1) / np.abs(a).max(-1)
    assert np.median(err) < 0.05 and np.mean(err < 0.07) >= 0.85 and np.mean(a.argmax(-1) == b.argmax(-1)) >= 0.8, err
