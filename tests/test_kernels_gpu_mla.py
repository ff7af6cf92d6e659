"""MLA decode (paged, split-KV) and MLA prefill (causal flash attention) against torch SDPA."""

import os

import torch

if not torch.cuda.is_available():  # must precede the first import of triton
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from ktx.errors import KtxError
from ktx.kernels_gpu.mla_decode import mla_decode, mla_decode_reference
from ktx.kernels_gpu.mla_prefill import mla_prefill, mla_prefill_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def paged_cache(latents: list[torch.Tensor], page: int, seed: int):
    """Scatter each sequence's latent rows [n, D] into shuffled pages -> cache, block table, lengths."""
    g = torch.Generator().manual_seed(seed)
    need = [-(-len(x) // page) for x in latents]
    max_pages = max(need) + 1  # a spare column: the table is wider than any sequence needs
    n_pages = sum(need) + 3
    cache = torch.randn(n_pages, page, latents[0].shape[1], generator=g) * 100  # garbage in unused slots
    order = torch.randperm(n_pages, generator=g).tolist()
    table = torch.full((len(latents), max_pages), 10**6, dtype=torch.int32)  # out of range where unused
    for b, x in enumerate(latents):
        for i in range(need[b]):
            p = order.pop()
            table[b, i] = p
            rows = x[i * page : (i + 1) * page]
            cache[p, : len(rows)] = rows
    lens = torch.tensor([len(x) for x in latents], dtype=torch.int32)
    return cache, table, lens


def sdpa_decode(q: torch.Tensor, latents: list[torch.Tensor], kv_lora: int, scale: float) -> torch.Tensor:
    out = []
    for b, lat in enumerate(latents):
        k = lat[None].expand(q.shape[1], -1, -1)  # [H, n, D]: every head reads the same latent rows
        v = k[..., :kv_lora]
        out.append(F.scaled_dot_product_attention(q[b][:, None].float(), k.float(), v.float(), scale=scale)[:, 0])
    return torch.stack(out)  # [B, H, DV]


def run_decode(lens, heads, kv_lora, rope, page, dtype, splits, seed=0):
    g = torch.Generator().manual_seed(seed)
    d = kv_lora + rope
    latents = [torch.randn(n, d, generator=g) for n in lens]
    q = torch.randn(len(lens), heads, d, generator=g)  # [B, H, D]
    cache, table, seq_lens = paged_cache(latents, page, seed)
    scale = d ** -0.5
    want = sdpa_decode(q, [x.to(dtype).float() for x in latents], kv_lora, scale)
    dev = lambda t: t.to(DEVICE)
    got = mla_decode(dev(q.to(dtype)), dev(cache.to(dtype)), dev(table), dev(seq_lens), kv_lora, scale, splits)
    assert got.shape == (len(lens), heads, kv_lora) and got.dtype == dtype
    ref = mla_decode_reference(q.to(dtype), cache.to(dtype), table, seq_lens, kv_lora, scale)
    return got.float().cpu(), ref.float(), want, q


@pytest.mark.parametrize("splits", [1, 3, None])
def test_mla_decode_matches_sdpa(splits):
    got, ref, want, _ = run_decode([37, 70, 1], heads=20, kv_lora=64, rope=16, page=16,
                                   dtype=torch.float32, splits=splits)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ref, want, rtol=1e-4, atol=1e-5)


def test_mla_decode_bf16_cache():
    got, _, want, _ = run_decode([50, 9], heads=16, kv_lora=32, rope=16, page=8, dtype=torch.bfloat16, splits=2)
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)


@settings(max_examples=6, deadline=None)
@given(lens=st.lists(st.integers(1, 80), min_size=1, max_size=3), heads=st.integers(1, 33),
       page=st.sampled_from([8, 16, 64]), splits=st.integers(1, 5))
def test_mla_decode_property(lens, heads, page, splits):
    got, _, want, _ = run_decode(lens, heads, kv_lora=32, rope=16, page=page, dtype=torch.float32, splits=splits,
                                 seed=sum(lens))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_mla_decode_rejects_bad_input():
    q = torch.zeros(1, 4, 48, device=DEVICE)
    cache = torch.zeros(2, 16, 48, device=DEVICE)
    lens = torch.tensor([40], dtype=torch.int32, device=DEVICE)
    with pytest.raises(KtxError, match="int32"):
        mla_decode(q, cache, torch.zeros(1, 2, dtype=torch.int64, device=DEVICE), lens, 32, 1.0)
    with pytest.raises(KtxError, match="more than the block table"):
        mla_decode(q, cache, torch.zeros(1, 2, dtype=torch.int32, device=DEVICE), lens, 32, 1.0)
    with pytest.raises(KtxError, match="same D"):
        mla_decode(q[..., :40], cache, torch.zeros(1, 3, dtype=torch.int32, device=DEVICE), lens, 32, 1.0)


def sdpa_causal(q, k, v, scale):
    """Reference: torch SDPA with an explicit mask, key j visible to query i when j <= i + Tk - Tq."""
    tq, tk = q.shape[0], k.shape[0]
    mask = torch.arange(tk)[None, :] <= torch.arange(tq)[:, None] + (tk - tq)  # [Tq, Tk]
    out = F.scaled_dot_product_attention(q.float().transpose(0, 1), k.float().transpose(0, 1),
                                         v.float().transpose(0, 1), attn_mask=mask, scale=scale)
    return out.transpose(0, 1)  # [Tq, H, Dv]


@pytest.mark.parametrize("tq,tk,dqk,dv", [(21, 21, 48, 32), (5, 40, 24, 16), (33, 33, 32, 20), (1, 7, 48, 32)])
def test_mla_prefill_matches_sdpa(tq, tk, dqk, dv):
    g = torch.Generator().manual_seed(tq + tk)
    q = torch.randn(tq, 3, dqk + 8, generator=g)[..., 8:]  # a strided view, as q_pe/q_nope slices would be
    k = torch.randn(tk, 3, dqk, generator=g)
    v = torch.randn(tk, 3, dv, generator=g)
    want = sdpa_causal(q, k, v, dqk ** -0.5)
    got = mla_prefill(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), dqk ** -0.5)
    assert got.shape == (tq, 3, dv)
    torch.testing.assert_close(got.cpu(), want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(mla_prefill_reference(q, k, v, dqk ** -0.5), want, rtol=1e-4, atol=1e-5)


def test_mla_prefill_bf16():
    g = torch.Generator().manual_seed(1)
    q, k = (torch.randn(19, 2, 48, generator=g).bfloat16() for _ in range(2))
    v = torch.randn(19, 2, 32, generator=g).bfloat16()
    got = mla_prefill(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), 0.2)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float().cpu(), sdpa_causal(q, k, v, 0.2), rtol=2e-2, atol=2e-2)


def test_mla_prefill_rejects_bad_input():
    x = torch.zeros(4, 2, 48, device=DEVICE)
    with pytest.raises(KtxError, match="keys must include"):
        mla_prefill(x, x[:2], x[:2, :, :32], 1.0)
    with pytest.raises(KtxError, match="share one of"):
        mla_prefill(x, x.half(), x[..., :32], 1.0)
