"""The independent reference for model tests: a transformers model holding a GGUF's weights.

`hf_model_from_gguf(hf_dir, gguf_path)` loads the transformers model of `hf_dir` in float32 and
overwrites every weight with the dequantized GGUF tensor (gguf-py's dequantizer, llama.cpp's layout
undone here, independently of ktx.convert). For a quantized file this isolates ktx's numerics from the
quantization error: both sides then compute with exactly the same weights.

`assert_matches_hf(m, model, ids)` is the shared check of the architecture tests: ktx's prefill logits and its
token-by-token cached decode against transformers' at every position away from a routing near-tie.
"""

from __future__ import annotations

import gguf
import numpy as np
import torch


def _deq(reader_tensors: dict, name: str) -> torch.Tensor:
    t = reader_tensors[name]
    w = gguf.quants.dequantize(t.data, t.tensor_type)
    shape = tuple(int(d) for d in reversed(list(t.shape)))
    return torch.from_numpy(np.asarray(w, dtype=np.float32).reshape(shape).copy())


def deepseek_state_dict(path, n_heads: int, qk_nope: int, v_head: int) -> dict[str, torch.Tensor]:
    r = gguf.GGUFReader(path)
    T = {t.name: t for t in r.tensors}
    sd = {"model.embed_tokens.weight": _deq(T, "token_embd.weight"), "model.norm.weight": _deq(T, "output_norm.weight")}
    if "output.weight" in T:
        sd["lm_head.weight"] = _deq(T, "output.weight")
    n_layers = 1 + max(int(n.split(".")[1]) for n in T if n.startswith("blk."))
    attn = {"attn_q_a": "q_a_proj", "attn_q_a_norm": "q_a_layernorm", "attn_q_b": "q_b_proj", "attn_q": "q_proj",
            "attn_kv_a_mqa": "kv_a_proj_with_mqa", "attn_kv_a_norm": "kv_a_layernorm", "attn_output": "o_proj"}
    for i in range(n_layers):
        b, h = f"blk.{i}.", f"model.layers.{i}."
        for g, name in attn.items():
            if b + g + ".weight" in T:
                sd[h + "self_attn." + name + ".weight"] = _deq(T, b + g + ".weight")
        if b + "attn_kv_b.weight" in T:
            sd[h + "self_attn.kv_b_proj.weight"] = _deq(T, b + "attn_kv_b.weight")
        else:
            k_b = _deq(T, b + "attn_k_b.weight")  # [n_h, kv_lora, nope]
            v_b = _deq(T, b + "attn_v_b.weight")  # [n_h, v, kv_lora]
            kv_b = torch.cat([k_b.transpose(1, 2), v_b], dim=1)  # [n_h, nope + v, kv_lora]
            sd[h + "self_attn.kv_b_proj.weight"] = kv_b.reshape(n_heads * (qk_nope + v_head), -1)
        sd[h + "input_layernorm.weight"] = _deq(T, b + "attn_norm.weight")
        sd[h + "post_attention_layernorm.weight"] = _deq(T, b + "ffn_norm.weight")
        if b + "ffn_gate_exps.weight" in T:
            gate, up = _deq(T, b + "ffn_gate_exps.weight"), _deq(T, b + "ffn_up_exps.weight")  # [E, I, H]
            sd[h + "mlp.experts.gate_up_proj"] = torch.cat([gate, up], dim=1)
            sd[h + "mlp.experts.down_proj"] = _deq(T, b + "ffn_down_exps.weight")
            sd[h + "mlp.gate.weight"] = _deq(T, b + "ffn_gate_inp.weight")
            if b + "exp_probs_b.bias" in T:
                sd[h + "mlp.gate.e_score_correction_bias"] = _deq(T, b + "exp_probs_b.bias")
            for k in ("gate", "up", "down"):
                if b + f"ffn_{k}_shexp.weight" in T:
                    sd[h + f"mlp.shared_experts.{k}_proj.weight"] = _deq(T, b + f"ffn_{k}_shexp.weight")
        else:
            for k in ("gate", "up", "down"):
                sd[h + f"mlp.{k}_proj.weight"] = _deq(T, b + f"ffn_{k}.weight")
    return sd


def hf_model_from_gguf(hf_dir, gguf_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(hf_dir)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    sd = deepseek_state_dict(gguf_path, cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.v_head_dim)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [m for m in missing if not m.endswith("e_score_correction_bias") and m != "lm_head.weight"]
    assert not missing and not unexpected, (missing, unexpected)
    if "lm_head.weight" not in sd:
        model.lm_head.weight.data.copy_(sd["model.embed_tokens.weight"])
    return model


@torch.inference_mode()
def hf_logits(model, ids) -> np.ndarray:
    return model(torch.tensor([list(ids)]), use_cache=False).logits[0].float().numpy()


def prompt_ids(n: int, vocab: int, seed: int) -> list[int]:
    return np.random.default_rng(seed).integers(4, vocab, size=n).tolist()


def assert_matches_hf(m, model, ids, name: str, tol: float = 2e-3, margin: float = 1e-3) -> None:
    """ktx model `m` vs transformers `model`: prefill logits, then decode one token at a time through the cache,
    both within `tol` at positions whose smallest routing margin exceeds `margin`."""
    from tiny_models import router_margins

    ref = hf_logits(model, ids)
    ok = router_margins(model, ids) > margin
    assert ok.mean() > 0.5, "test prompt has too many routing near-ties to be meaningful"
    got = m.logits(ids)
    assert np.abs(got - ref).max(-1)[ok].max() <= tol, name
    m.engine.reset()
    steps = np.stack([m.net.forward(torch.tensor([t]), m.engine.cache).numpy()[0] for t in ids])
    assert np.abs(steps - ref).max(-1)[ok].max() <= tol, name
