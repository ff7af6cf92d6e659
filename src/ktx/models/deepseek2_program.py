"""The DeepSeek-V2/V3 decode step written as a compiled program (ktx.layers.program), for the CPU path.

The same arithmetic as Deepseek2.forward for one token, with the same kernels (repacked GGUF codes, int8
activations per 32), in one pass over an op table instead of ~40 Python-level calls per layer:

    x = embedding (written by the caller)
    per layer:  xn = norm(x); [q_a | kv] = W (q_a+kv_a) xn; q_a = norm(q_a); q = W_q_b q_a
                kv_c = norm(kv_c); k_pe = rope(k_pe); cache[layer, pos] = [kv_c | k_pe]
                q_full[h] = [W_UK[h] q_nope[h] | rope(q_pe[h])]; o_lat = MLA(q_full, cache); o[h] = W_UV[h] o_lat[h]
                x += W_o o;  xn = norm(x)
                MoE: logits = W_r xn; ids, w = route(logits); x += sum_j w_j expert_j(xn) + shared(xn)
                dense: x += mlp(xn)
    logits = W_head norm(x)

`build` returns (program, "") or (None, why not) for a model it cannot take (float or GPU dense weights, the
torch experts reference, NUMA shards, hot experts on a GPU, routing profiles being recorded, older files
with a combined attn_kv_b); those decode through Deepseek2.forward as before.
"""

from __future__ import annotations

from ktx.layers.program import (DecodeProgram, Unsupported, build_with, linear_group, mlp_parts, model_pools,
                                quant_linear)
from ktx.models.deepseek2_config import GATING_SIGMOID


def build(net, capacity: int) -> tuple[DecodeProgram | None, str]:
    """The program for caches of `capacity` rows, or (None, why not)."""
    old = "" if net.gguf.has("blk.0.attn_k_b.weight") else "old-style attn_kv_b tensors"
    return build_with(_build, net, capacity, old)


def _build(net, capacity: int) -> DecodeProgram:
    cfg, w = net.cfg, net._w
    P = DecodeProgram(model_pools(net))
    H, n_h, lat, rope, nope = cfg.hidden, cfg.n_heads, cfg.kv_lora_rank, cfg.qk_rope, cfg.qk_nope
    D, eps = lat + rope, cfg.rms_eps
    for name, size in (("hidden", H), ("kv_lora_rank", lat), ("qk_nope", nope)):
        if size % 32:
            raise Unsupported(f"{name} {size} is not a multiple of 32")
    x, cos_sin = P.f32(H), P.rope_table(net.rope.inv_freq.cpu().numpy(), net.rope.scale)
    xn, qx = P.f32(H), P.qbuf(1, H)
    q_lora = cfg.q_lora_rank
    first = P.f32(q_lora + n_h * cfg.qk_head + D)  # [q_a | kv] or [q | kv]
    q = P.f32(n_h * cfg.qk_head) if q_lora else first
    kv = first + (q_lora if q_lora else n_h * cfg.qk_head)
    qqa = P.qbuf(1, q_lora) if q_lora else None
    q_full, q_nope = P.f32(n_h * D), P.qbuf(n_h, nope)
    o_lat, q_lat = P.f32(n_h * lat), P.qbuf(n_h, lat)
    o, q_o = P.f32(n_h * cfg.v_head), P.qbuf(1, n_h * cfg.v_head)
    scores = P.f32(n_h * capacity)
    E, k = cfg.n_expert, cfg.n_expert_used
    k_sel = net.scheduler.experts_per_token or k
    router_logits, ids, wts = P.f32(max(E, 1)), P.ids(max(k, 1)), P.f32(max(k, 1))
    for i in range(cfg.n_layers):
        p = f"blk.{i}."
        P.section = "attention"
        P.norm(x, w(p + "attn_norm.weight"), xn, H, eps)
        P.quant(xn, H, qx)
        if q_lora:
            linear_group(net, P, [p + "attn_q_a.weight", p + "attn_kv_a_mqa.weight"], qx, first)
            P.norm(first, w(p + "attn_q_a_norm.weight"), first, q_lora, eps)
            P.quant(first, q_lora, qqa)
            P.gemv(quant_linear(net, p + "attn_q_b.weight"), qqa, q)
        else:
            linear_group(net, P, [p + "attn_q.weight", p + "attn_kv_a_mqa.weight"], qx, first)
        P.norm(kv, w(p + "attn_kv_a_norm.weight"), kv, lat, eps)
        P.rope(kv + lat, 0, kv + lat, 0, 1, rope, cos_sin)
        P.cache(kv, D, i)
        P.rope(q + nope, cfg.qk_head, q_full + lat, D, n_h, rope, cos_sin)
        P.quant(q, nope, q_nope, rows=n_h, stride=cfg.qk_head)
        P.gemv(quant_linear(net, p + "attn_k_b.weight"), q_nope, q_full, bstride=D)  # q_lat into each head's row
        P.mla(i, q_full, n_h, lat, o_lat, scores, cfg.softmax_scale)
        P.quant(o_lat, lat, q_lat, rows=n_h)
        P.gemv(quant_linear(net, p + "attn_v_b.weight"), q_lat, o, bstride=cfg.v_head)
        P.quant(o, n_h * cfg.v_head, q_o)
        P.gemv(quant_linear(net, p + "attn_output.weight"), q_o, x, acc=True)
        P.section = "moe" if net.is_moe(i) else "dense mlp"
        P.norm(x, w(p + "ffn_norm.weight"), xn, H, eps)
        P.quant(xn, H, qx)
        if net.is_moe(i):
            P.router(w(p + "ffn_gate_inp.weight"), E, H, xn, router_logits)
            bias = w(p + "exp_probs_b.bias") if net.gguf.has(p + "exp_probs_b.bias") else None
            P.topk(router_logits, E, k, cfg.gating == GATING_SIGMOID, bias, cfg.n_group, cfg.topk_group,
                   cfg.expert_weights_norm, k_sel, ids, wts, cfg.expert_weights_scale)
            shared = mlp_parts(net, p, "_shexp") if cfg.n_shared else None
            P.moe(net.experts[i], k_sel, ids, wts, qx, x, H, shared)
        else:
            P.moe(None, 0, ids, wts, qx, x, H, mlp_parts(net, p, ""))
    P.section = "lm_head"
    P.norm(x, w("output_norm.weight"), xn, H, eps)
    P.quant(xn, H, qx)
    head = "output.weight" if net.gguf.has("output.weight") else "token_embd.weight"
    logits = P.f32(cfg.vocab_size)
    P.gemv(quant_linear(net, head), qx, logits)
    P.io(x, logits, cfg.vocab_size)
    return P.finish()
