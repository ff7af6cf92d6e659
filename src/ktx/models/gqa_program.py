"""The grouped-query-attention family's decode step (Llama, Mixtral, Qwen2/3-MoE, Gemma-3) as a compiled
program (ktx.layers.program), for the CPU path: GQATransformer.forward for one token, same kernels, one pass.

    x = embedding (gemma3: times sqrt(H), by the caller's embed)
    per layer:  xn = norm(x); [q | k | v] = W_qkv xn (+ biases); q, k = per-head norms (qwen3moe, gemma3)
                q, k = rope (the layer's table: gemma3's local layers have their own base, global ones a
                linear factor); cache[layer, pos] = k, v; o = GQA(q, cache, sliding window)
                a = W_o o;  x += a (gemma3: x += norm(a))
                xn = norm(x); f = MoE(xn) (softmax top-k, shared expert, qwen2moe's sigmoid gate) or MLP(xn)
                x += f (gemma3: x += norm(f))
    logits = W_head norm(x)
"""

from __future__ import annotations

from ktx.layers.program import (DecodeProgram, Unsupported, build_with, linear_group, mlp_parts, model_pools,
                                quant_linear)


def build(net, rows: int) -> tuple[DecodeProgram | None, str]:
    """The program for caches of `rows` rows, or (None, why not)."""
    return build_with(_build, net, rows)


def _build(net, cap: int) -> DecodeProgram:
    cfg, w, has = net.cfg, net._w, net.gguf.has
    P = DecodeProgram(model_pools(net))
    H, n_h, n_kv, d, dv, eps = cfg.hidden, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.v_head_dim, cfg.rms_eps
    for name, size in (("hidden", H), ("heads x value dim", n_h * dv)):
        if size % 32:
            raise Unsupported(f"{name} {size} is not a multiple of 32")
    x, xn, qx, a = P.f32(H), P.f32(H), P.qbuf(1, H), P.f32(H)
    rope_g = P.rope_table(net.rope_global.inv_freq.numpy(), net.rope_global.scale, cfg.rope_linear_factor)
    rope_l = P.rope_table(net.rope_local.inv_freq.numpy(), net.rope_local.scale)
    qkv = P.f32(n_h * d + n_kv * (d + dv))
    q, k, v = qkv, qkv + n_h * d, qkv + (n_h + n_kv) * d
    o, q_o, scores = P.f32(n_h * dv), P.qbuf(1, n_h * dv), P.f32(n_h * cap)
    E, kk = cfg.n_expert, cfg.n_expert_used
    k_sel = net.scheduler.experts_per_token or kk
    router, ids, wts, gate_s = P.f32(max(E, 1)), P.ids(max(kk, 1)), P.f32(max(kk, 1)), P.f32(1)
    gelu = cfg.act == "gelu_tanh"
    for i in range(cfg.n_layers):
        p = f"blk.{i}."
        P.section = "attention"
        P.norm(x, w(p + "attn_norm.weight"), xn, H, eps)
        P.quant(xn, H, qx)
        linear_group(net, P, [p + "attn_q.weight", p + "attn_k.weight", p + "attn_v.weight"], qx, qkv)
        for off, n, name in ((q, n_h * d, "attn_q"), (k, n_kv * d, "attn_k"), (v, n_kv * dv, "attn_v")):
            if has(p + name + ".bias"):
                P.add(None, off, n, weight=w(p + name + ".bias"))
        if has(p + "attn_q_norm.weight"):
            P.norm(q, w(p + "attn_q_norm.weight"), q, d, eps, rows=n_h, stride=d)
            P.norm(k, w(p + "attn_k_norm.weight"), k, d, eps, rows=n_kv, stride=d)
        sliding = cfg.is_sliding(i)
        table = rope_l if sliding else rope_g
        P.rope(q, d, q, d, n_h, cfg.rope_dim, table, cfg.neox)
        P.rope(k, d, k, d, n_kv, cfg.rope_dim, table, cfg.neox)
        P.cache(k, n_kv * d, i)
        P.cache(v, n_kv * dv, i, values=True)
        P.gqa(i, q, n_h, n_kv, d, dv, o, scores, cfg.sliding_window if sliding else 0, cfg.softmax_scale)
        P.quant(o, n_h * dv, q_o)
        out = quant_linear(net, p + "attn_output.weight")
        if cfg.post_norms:
            P.gemv(out, q_o, a)
            P.norm(a, w(p + "post_attention_norm.weight"), a, H, eps)
            P.add(a, x, H)
        else:
            P.gemv(out, q_o, x, acc=True)
        P.section = "moe" if net.is_moe(i) else "dense mlp"
        P.norm(x, w(p + "ffn_norm.weight"), xn, H, eps)
        P.quant(xn, H, qx)
        dst = a if cfg.post_norms else x
        if net.is_moe(i):
            P.router(w(p + "ffn_gate_inp.weight"), E, H, xn, router)
            P.topk(router, E, kk, False, None, 1, 1, cfg.routing_norm, k_sel, ids, wts, 1.0)
            shared, sw = None, -1
            if has(p + "ffn_gate_shexp.weight"):
                shared = mlp_parts(net, p, "_shexp")
                if has(p + "ffn_gate_inp_shexp.weight"):  # qwen2moe: the shared expert times sigmoid(w . xn)
                    P.router(w(p + "ffn_gate_inp_shexp.weight").reshape(1, H), 1, H, xn, gate_s)
                    P.sigmoid(gate_s, 1)
                    sw = gate_s
            P.moe(net.experts[i], k_sel, ids, wts, qx, dst, H, shared, gelu=gelu, shared_w=sw, acc=not cfg.post_norms)
        else:
            P.moe(None, 0, ids, wts, qx, dst, H, mlp_parts(net, p, ""), gelu=gelu, acc=not cfg.post_norms)
        if cfg.post_norms:
            P.norm(a, w(p + "post_ffw_norm.weight"), a, H, eps)
            P.add(a, x, H)
    P.section = "lm_head"
    P.norm(x, w("output_norm.weight"), xn, H, eps)
    P.quant(xn, H, qx)
    logits = P.f32(cfg.vocab_size)
    P.gemv(quant_linear(net, "output.weight" if has("output.weight") else "token_embd.weight"), qx, logits)
    P.io(x, logits, cfg.vocab_size)
    return P.finish()
