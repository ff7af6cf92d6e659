"""RMSNorm, YaRN RoPE and the MoE router kernels against transformers' DeepSeek modules and torch."""

import math
import os

import torch

if not torch.cuda.is_available():  # must precede the first import of triton
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
from hypothesis import given, settings, strategies as st
from transformers import DeepseekV2Config, DeepseekV3Config
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2TopkRouter
from transformers.models.deepseek_v3.modeling_deepseek_v3 import (DeepseekV3RMSNorm, DeepseekV3TopkRouter,
                                                                  yarn_apply_mscale)

from ktx.errors import KtxError
from ktx.kernels_gpu.rmsnorm import rmsnorm, rmsnorm_reference
from ktx.kernels_gpu.rope import rope, rope_reference, yarn
from ktx.kernels_gpu.router import route, route_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("d", [48, 96])
def test_rmsnorm_matches_transformers(d):
    g = torch.Generator().manual_seed(d)
    x = torch.randn(5, d + 4, generator=g)[:, 4:] * 3  # strided rows
    norm = DeepseekV3RMSNorm(d, eps=1e-6)
    norm.weight.data = torch.randn(d, generator=g)
    want = norm(x).detach()
    torch.testing.assert_close(rmsnorm(x.to(DEVICE), norm.weight.data.to(DEVICE), 1e-6).cpu(), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rmsnorm_reference(x, norm.weight.data, 1e-6), want, rtol=1e-5, atol=1e-6)
    got16 = rmsnorm(x.half().to(DEVICE), norm.weight.data.to(DEVICE), 1e-6)
    assert got16.dtype == torch.float16
    torch.testing.assert_close(got16.float().cpu(), want, rtol=2e-3, atol=2e-3)


def yarn_config(factor: float, mscale: float, mscale_all_dim: float) -> DeepseekV3Config:
    return DeepseekV3Config(hidden_size=64, num_attention_heads=2, qk_rope_head_dim=64, qk_nope_head_dim=128,
                            max_position_embeddings=4096 * int(factor), rope_theta=10000.0,
                            rope_scaling={"type": "yarn", "rope_type": "yarn", "factor": factor,
                                          "original_max_position_embeddings": 4096, "beta_fast": 32, "beta_slow": 1,
                                          "mscale": mscale, "mscale_all_dim": mscale_all_dim})


@pytest.mark.parametrize("factor,mscale,mscale_all_dim", [(40.0, 1.0, 1.0), (40.0, 0.707, 1.0), (4.0, 1.0, 0.5)])
def test_yarn_matches_transformers(factor, mscale, mscale_all_dim):
    cfg = yarn_config(factor, mscale, mscale_all_dim)
    want_freq, want_mscale = ROPE_INIT_FUNCTIONS["yarn"](cfg, "cpu")
    got = yarn(64, 10000.0, factor, 4096, q_head_dim=192, mscale=mscale, mscale_all_dim=mscale_all_dim)
    torch.testing.assert_close(got.inv_freq, want_freq, rtol=0, atol=0)
    assert got.mscale == pytest.approx(want_mscale, rel=1e-12)
    assert got.softmax_scale == pytest.approx(yarn_apply_mscale(cfg.rope_parameters, 192 ** -0.5), rel=1e-12)
    assert got.softmax_scale == pytest.approx(192 ** -0.5 * (0.1 * mscale_all_dim * math.log(factor) + 1) ** 2)


def test_plain_rope_frequencies_without_scaling():
    got = yarn(8, 10000.0, 1.0, 4096, q_head_dim=16)
    torch.testing.assert_close(got.inv_freq, torch.tensor([1.0, 0.1, 0.01, 0.001]), rtol=1e-6, atol=0)
    assert got.mscale == 1.0 and got.softmax_scale == 0.25


def rope_complex(x, positions, inv_freq, mscale):
    """DeepSeek's reference form: consecutive pairs as complex numbers times e^(i theta)."""
    theta = (positions.float()[:, None] * inv_freq[None, :]).double()  # the angle in fp32, as every implementation
    cis = torch.polar(torch.full_like(theta, mscale), theta)  # [T, D/2]
    z = torch.view_as_complex(x.double().reshape(*x.shape[:-1], -1, 2).contiguous())  # [T, H, D/2]
    return torch.view_as_real(z * cis[:, None, :]).flatten(-2)


@settings(max_examples=6, deadline=None)
@given(t=st.integers(1, 6), h=st.integers(1, 20), half=st.sampled_from([4, 8, 32]), mscale=st.sampled_from([1.0, 1.3]))
def test_rope_matches_complex_rotation(t, h, half, mscale):
    g = torch.Generator().manual_seed(t * 100 + h)
    x = torch.randn(t, h, 2 * half + 6, generator=g)[..., 6:]  # the rope slice of a wider q
    positions = torch.randint(0, 5000, (t,), generator=g)
    inv_freq = yarn(2 * half, 10000.0, 40.0, 4096, q_head_dim=192).inv_freq
    want = rope_complex(x, positions, inv_freq, mscale).float()
    got = rope(x.to(DEVICE), positions.to(DEVICE), inv_freq.to(DEVICE), mscale).cpu()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=2e-4)
    torch.testing.assert_close(rope_reference(x, positions, inv_freq, mscale), want, rtol=1e-4, atol=2e-4)


def sorted_by_id(ids, w):
    order = ids.long().argsort(-1)
    return ids.long().gather(1, order), w.gather(1, order)


@pytest.mark.parametrize("n_group,topk_group,top_k,norm", [(8, 4, 8, True), (4, 2, 6, False), (1, 1, 8, True)])
def test_router_sigmoid_matches_transformers_v3(n_group, topk_group, top_k, norm):
    n_expert, hidden = 64, 32
    cfg = DeepseekV3Config(hidden_size=hidden, n_routed_experts=n_expert, num_experts_per_tok=top_k, n_group=n_group,
                           topk_group=topk_group, norm_topk_prob=norm, routed_scaling_factor=2.5)
    router = DeepseekV3TopkRouter(cfg)
    g = torch.Generator().manual_seed(top_k)
    router.weight.data = torch.randn(n_expert, hidden, generator=g)
    router.e_score_correction_bias.data = torch.randn(n_expert, generator=g) * 0.5
    x = torch.randn(7, hidden, generator=g)
    logits, want_w, want_ids = (t.detach() for t in router(x))
    kw = dict(scoring="sigmoid", bias=router.e_score_correction_bias.data, n_group=n_group, topk_group=topk_group,
              norm_topk_prob=norm, routed_scaling_factor=2.5)
    ids, w = route(logits.to(DEVICE), top_k, **{**kw, "bias": kw["bias"].to(DEVICE)})
    for got_ids, got_w in [(ids.cpu(), w.cpu()), route_reference(logits, top_k, **kw)]:
        got_ids, got_w = sorted_by_id(got_ids, got_w)
        exp_ids, exp_w = sorted_by_id(want_ids, want_w)
        assert torch.equal(got_ids, exp_ids)
        torch.testing.assert_close(got_w, exp_w, rtol=1e-6, atol=1e-7)
    assert bool((w[:, :-1] >= 0).all())  # weights are sigmoid scores, never biased


@pytest.mark.parametrize("method,n_group,topk_group", [("greedy", 1, 1), ("group_limited_greedy", 4, 2)])
def test_router_softmax_matches_transformers_v2(method, n_group, topk_group):
    n_expert, hidden, top_k = 32, 16, 6
    cfg = DeepseekV2Config(hidden_size=hidden, num_attention_heads=2, n_routed_experts=n_expert, num_experts_per_tok=top_k,
                           topk_method=method, n_group=n_group, topk_group=topk_group, routed_scaling_factor=1.5)
    router = DeepseekV2TopkRouter(cfg)
    router.weight.data = torch.randn(n_expert, hidden, generator=torch.Generator().manual_seed(3))
    logits, want_w, want_ids = (t.detach() for t in router(torch.randn(5, hidden)))
    ids, w = route(logits.to(DEVICE), top_k, scoring="softmax", n_group=n_group, topk_group=topk_group,
                   norm_topk_prob=False, routed_scaling_factor=1.5)
    got_ids, got_w = sorted_by_id(ids.cpu(), w.cpu())
    exp_ids, exp_w = sorted_by_id(want_ids, want_w)
    assert torch.equal(got_ids, exp_ids)
    torch.testing.assert_close(got_w, exp_w, rtol=1e-6, atol=1e-7)


def test_router_rejects_bad_config():
    logits = torch.zeros(2, 12, device=DEVICE)
    with pytest.raises(KtxError, match="groups"):
        route(logits, 2, n_group=5)
    with pytest.raises(KtxError, match="kept groups"):
        route(logits, 7, n_group=4, topk_group=2)
    with pytest.raises(KtxError, match="fp32"):
        route(logits.half(), 2)
