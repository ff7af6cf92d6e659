"""The grouped-query-attention family: Llama, Mixtral (GGUF arch `llama`), Qwen2-MoE, Qwen3-MoE, Gemma-3.

  tokens -> token_embd (gemma3: * sqrt(H)) -> for each layer:
     a  = GQA(attn_norm(x))       q = W_q h (+b), k = W_k h (+b), v = W_v h (+b)       [T, n_h|n_kv, d]
                                  q, k = rms_norm per head (qwen3moe, gemma3); rope; cache.append(k, v)
                                  softmax(q k^T * d^-0.5) v over the cache (sliding window on gemma3's
                                  local layers) -> attn_output
     x += post_attention_norm(a)                                          (post-norm: gemma3 only)
     h  = ffn_norm(x)
     f  = dense MLP(h): down(act(gate h) * up h), act = silu or gelu(tanh)
       | MoE(h): softmax top-k router -> routed experts submitted to the experts backend (CPU kernels via
                 the scheduler), meanwhile the shared expert (qwen2moe: times sigmoid(w_gate_shexp . h))
     x += post_ffw_norm(f)                                                (post-norm: gemma3 only)
  -> output_norm -> output (or the tied token_embd)

RoPE: llama.cpp permutes the q/k rows of `llama` models so that the file uses adjacent-pair rotation;
qwen and gemma files keep the NeoX (half-split) layout. `cfg.neox` follows the file.
Gemma's RMSNorm multiplies by (1 + w); llama.cpp's converter stores 1 + w, so all norms here are plain.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from ktx.errors import KtxError
from ktx.gguf_file import GGUFModel
from ktx.layers.attention import KVCache, gqa_attend
from ktx.layers.linear import FloatLinears
from ktx.layers.moe import TorchExperts, moe_step
from ktx.layers.norm import rms_norm
from ktx.layers.program import ProgramDecoding
from ktx.layers.rope import Rope
from ktx.layers.router import route
from ktx.layers.weights import WeightStore
from ktx.models.gqa_config import GQAConfig
from ktx.scheduler import Scheduler


class GQATransformer(ProgramDecoding):
    arch = "gqa"  # the instance's `arch` is the file's: llama, qwen2moe, qwen3moe or gemma3
    config_class = GQAConfig
    _program_builder = "ktx.models.gqa_program"  # decode steps on the CPU kernels (ktx.layers.program)

    def __init__(self, gguf: GGUFModel, store: WeightStore, cfg: GQAConfig | None = None, experts_factory=None,
                 linears=None):
        self.gguf, self.store = gguf, store
        self.lin = linears or FloatLinears(store)  # dense matmuls (ktx.layers.linear)
        self.cfg = cfg = cfg or GQAConfig.from_gguf(gguf.metadata, str(gguf.path))
        self.arch = cfg.arch
        self._check_tensors()
        self.rope_global = self._rope(cfg.rope_base)
        self.rope_local = self._rope(cfg.rope_base_swa or cfg.rope_base)
        make = experts_factory or (lambda prefix: None)  # None: the torch reference for that layer
        self.experts = {i: make(f"blk.{i}.") or TorchExperts(store, f"blk.{i}.") for i in range(cfg.n_layers) if self.is_moe(i)}
        self.scheduler = Scheduler(self.experts)
        self.routing_counts: dict | None = None  # set to {} to record a routing profile (ktx profile)

    def _rope(self, base: float) -> Rope:
        rope = Rope(self.cfg.rope_dim, base, neox=self.cfg.neox)
        if self.gguf.has("rope_freqs.weight"):  # Llama-3.1 long-context factors: frequency i divided by f[i]
            rope.inv_freq = rope.inv_freq / self.store.get("rope_freqs.weight")
        return rope

    # -- structure -------------------------------------------------------------------------------
    def is_moe(self, i: int) -> bool:
        return self.cfg.n_expert > 0 and self.gguf.has(f"blk.{i}.ffn_gate_inp.weight")

    def _check_tensors(self) -> None:
        cfg, g = self.cfg, self.gguf
        need = ["token_embd.weight", "output_norm.weight"]
        for i in range(cfg.n_layers):
            p = f"blk.{i}."
            need += [p + n + ".weight" for n in ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm")]
            if cfg.post_norms:
                need += [p + "post_attention_norm.weight", p + "post_ffw_norm.weight"]
            kinds = ("gate_exps", "up_exps", "down_exps") if self.is_moe(i) else ("gate", "up", "down")
            need += [f"{p}ffn_{k}.weight" for k in kinds]
        missing = [n for n in need if not g.has(n)]
        if missing:
            raise KtxError(f"{g.path}: {len(missing)} tensors missing for a {cfg.arch} model (first: {missing[0]}); "
                           "the file is incomplete or from an unsupported converter.")

    def _cache_arrays(self, cache: KVCache):
        L, cap = cache.k.shape[:2]
        return cache.k.numpy().reshape(L, cap, -1), cache.v.numpy().reshape(L, cap, -1)  # [L, cap, n_kv * d] views

    def new_cache(self, capacity: int) -> KVCache:
        cfg = self.cfg
        return KVCache(cfg.n_layers, capacity, cfg.n_kv_heads, cfg.head_dim, cfg.v_head_dim)

    # -- pieces ----------------------------------------------------------------------------------
    def _w(self, name: str) -> torch.Tensor:
        return self.store.get(name)

    def _bias(self, y: torch.Tensor, name: str) -> torch.Tensor:
        return y + self._w(name + ".bias") if self.gguf.has(name + ".bias") else y

    def _norm(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return rms_norm(x, self._w(name), self.cfg.rms_eps)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self._embed_np(tokens.numpy()))  # [T, H]

    def _embed_np(self, ids: np.ndarray) -> np.ndarray:
        x = self._embed_rows()(ids)
        return x * np.float32(math.sqrt(self.cfg.hidden)) if self.cfg.embed_scale else x

    def _rotate(self, x: torch.Tensor, pos: torch.Tensor, rope: Rope) -> torch.Tensor:
        """RoPE on the first rope_dim dims of each head (all of them unless the file says otherwise)."""
        n = self.cfg.rope_dim
        return torch.cat([rope(x[..., :n], pos), x[..., n:]], dim=-1) if n < x.shape[-1] else rope(x, pos)

    def attention(self, i: int, x: torch.Tensor, pos: torch.Tensor, cache: KVCache) -> torch.Tensor:
        cfg, p, T = self.cfg, f"blk.{i}.", x.shape[0]
        q, k, v = (self._bias(y, p + n) for y, n in zip(self.lin.many(x, [p + n + ".weight" for n in ("attn_q", "attn_k", "attn_v")]),
                                                       ("attn_q", "attn_k", "attn_v")))
        q = q.view(T, cfg.n_heads, cfg.head_dim)  # [T, n_h, d]
        k = k.view(T, cfg.n_kv_heads, cfg.head_dim)  # [T, n_kv, d]
        v = v.view(T, cfg.n_kv_heads, cfg.v_head_dim)  # [T, n_kv, dv]
        if self.gguf.has(p + "attn_q_norm.weight"):
            q, k = self._norm(q, p + "attn_q_norm.weight"), self._norm(k, p + "attn_k_norm.weight")
        sliding = cfg.is_sliding(i)
        # gemma3: local layers have their own rope base and no linear scaling (transformers and llama.cpp agree)
        rope, factor = (self.rope_local, 1.0) if sliding else (self.rope_global, cfg.rope_linear_factor)
        q, k = self._rotate(q, pos / factor, rope), self._rotate(k, pos / factor, rope)
        start, end = cache.length, cache.length + T
        cache.k[i, start:end], cache.v[i, start:end] = k, v
        o = gqa_attend(q, cache.k[i, :end], cache.v[i, :end], cfg.softmax_scale, start,
                       cfg.sliding_window if sliding else 0)  # [T, n_h, dv]
        return self.lin(o.reshape(T, -1), p + "attn_output.weight")  # [T, H]

    def _mlp(self, x: torch.Tensor, p: str, kind: str = "") -> torch.Tensor:
        g, u = self.lin.many(x, [f"{p}ffn_gate{kind}.weight", f"{p}ffn_up{kind}.weight"])  # [T, I] each
        h = F.silu(g) * u if self.cfg.act == "silu" else F.gelu(g, approximate="tanh") * u
        return self.lin(h, f"{p}ffn_down{kind}.weight")

    def ffn(self, i: int, x: torch.Tensor) -> torch.Tensor:
        cfg, p = self.cfg, f"blk.{i}."
        if not self.is_moe(i):
            return self._mlp(x, p)
        logits = x @ self._w(p + "ffn_gate_inp.weight").T  # [T, E]
        ids, weights = route(logits, cfg.n_expert_used, gating="softmax", norm=cfg.routing_norm)  # [T, k], [T, k]
        return moe_step(self, i, x, ids, weights, (lambda: self._shared_expert(x, p)) if self.gguf.has(p + "ffn_gate_shexp.weight") else None)

    def _shared_expert(self, x: torch.Tensor, p: str) -> torch.Tensor:
        y = self._mlp(x, p, "_shexp")
        if self.gguf.has(p + "ffn_gate_inp_shexp.weight"):  # qwen2moe: sigmoid-gated shared expert
            y = y * torch.sigmoid(x @ self._w(p + "ffn_gate_inp_shexp.weight").reshape(-1, 1))  # [T, 1] gate
        return y

    # -- the whole model -------------------------------------------------------------------------
    def _forward(self, tokens: torch.Tensor, cache: KVCache, last_only: bool) -> torch.Tensor:
        """The per-op pass (forward, ProgramDecoding, decides): every layer from Python, any number of tokens."""
        cfg, T = self.cfg, tokens.shape[0]
        pos = torch.arange(cache.length, cache.length + T)
        x = self.embed(tokens)  # [T, H]
        for i in range(cfg.n_layers):
            p = f"blk.{i}."
            a = self.attention(i, self._norm(x, p + "attn_norm.weight"), pos, cache)
            x = x + (self._norm(a, p + "post_attention_norm.weight") if cfg.post_norms else a)
            f = self.ffn(i, self._norm(x, p + "ffn_norm.weight"))
            x = x + (self._norm(f, p + "post_ffw_norm.weight") if cfg.post_norms else f)
        cache.length += T
        if last_only:
            x = x[-1:]
        head = "output.weight" if self.gguf.has("output.weight") else "token_embd.weight"
        return self.lin(self._norm(x, "output_norm.weight"), head)  # [T, vocab]
