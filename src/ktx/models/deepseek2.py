"""DeepSeek-V2 / V3 / R1 (GGUF architecture `deepseek2`) forward pass.

  tokens -> token_embd -> for each layer:
     x += MLA(attn_norm(x))                                  (ktx.layers.mla, latent KV cache)
     h  = ffn_norm(x)
     x += dense MLP(h)                      for the first `n_dense_lead` layers
     x += routed experts(h) + shared experts(h)             for MoE layers: routed ones are submitted
                                                            to the experts backend first, the shared
                                                            MLP runs meanwhile, then wait
  -> output_norm -> output (lm_head)

Tensor names are llama.cpp's (`blk.N.attn_q_a.weight`, `blk.N.ffn_gate_exps.weight`, ...). Dense matmuls
go through a `Linears` backend (quantized CPU kernels, or float32 weights dequantized by the `WeightStore`);
norms, biases and the router are small float32 tensors from the store; the routed experts go through an
experts backend (`TorchExperts` reference or the quantized CPU kernels).

Where it runs: by default everything is CPU torch (`TorchOps`). `use_device(device)` moves the residual
stream, norms, RoPE, router, latent KV cache and MLA attention to `device` through the Triton kernels
(`TritonOps`; the dense matmuls then come from a device `Linears`, ktx.layers.gpu.GpuLinears); the routed
experts still go to the CPU scheduler (`moe_step` copies x to the host and the result back), with the shared
experts running on the device meanwhile. Token ids come in and logits go out on the host either way.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ktx.errors import KtxError
from ktx.gguf_file import GGUFModel
from ktx.layers.linear import FloatLinears
from ktx.layers.mla import LatentCache, expanded_is_cheaper, float_kv_heads, mla_expanded
from ktx.layers.moe import TorchExperts, moe_step
from ktx.layers.ops import TorchOps, TritonOps
from ktx.layers.program import ProgramDecoding
from ktx.layers.rope import Rope
from ktx.layers.weights import WeightStore
from ktx.models.deepseek2_config import GATING_SIGMOID, Deepseek2Config
from ktx.scheduler import Scheduler


class Deepseek2(ProgramDecoding):
    arch = "deepseek2"
    config_class = Deepseek2Config
    _program_builder = "ktx.models.deepseek2_program"  # decode steps on the CPU kernels (ktx.layers.program)

    def __init__(self, gguf: GGUFModel, store: WeightStore, cfg: Deepseek2Config | None = None, experts_factory=None,
                 linears=None):
        self.gguf, self.store = gguf, store
        self.lin = linears or FloatLinears(store)
        self.cfg = cfg = cfg or Deepseek2Config.from_gguf(gguf.metadata, str(gguf.path))
        self._check_tensors()
        yarn = cfg.rope_factor if cfg.rope_scaling == "yarn" else 1.0
        self.rope = Rope(cfg.qk_rope, cfg.rope_base, yarn_factor=yarn, orig_ctx=cfg.rope_orig_ctx,
                         beta_fast=cfg.yarn_beta_fast, beta_slow=cfg.yarn_beta_slow)
        make = experts_factory or (lambda prefix: None)
        self.experts = {i: make(f"blk.{i}.") or TorchExperts(store, f"blk.{i}.") for i in range(cfg.n_layers) if self.is_moe(i)}
        self.scheduler = Scheduler(self.experts)
        self.routing_counts: dict[int, np.ndarray] | None = None  # set to {} to record a routing profile
        self.ops, self.device, self.kv_dtype = TorchOps(), torch.device("cpu"), torch.float32
        self._on_device: dict[str, torch.Tensor] = {}  # small float32 weights (norms, router) copied to the device

    def use_device(self, device: str | torch.device, triton: bool = True, kv_dtype: torch.dtype = torch.float32) -> None:
        """Run on `device` (call before `new_cache`; the Linears given at construction must live there too).
        triton: the Triton kernels (on a CPU device only under TRITON_INTERPRET=1, for tests); else torch ops."""
        self.device, self.kv_dtype = torch.device(device), kv_dtype
        self.ops = TritonOps() if triton else TorchOps()
        self.rope.inv_freq = self.rope.inv_freq.to(self.device)
        self._on_device.clear()

    # -- structure -------------------------------------------------------------------------------
    def is_moe(self, i: int) -> bool:
        return self.cfg.n_expert > 0 and i >= self.cfg.n_dense_lead

    def _check_tensors(self) -> None:
        cfg, g = self.cfg, self.gguf
        need = ["token_embd.weight", "output_norm.weight"]
        for i in range(cfg.n_layers):
            p = f"blk.{i}."
            need += [p + n for n in ("attn_norm.weight", "attn_kv_a_mqa.weight", "attn_kv_a_norm.weight", "attn_output.weight", "ffn_norm.weight")]
            need += [p + "attn_q_a.weight", p + "attn_q_b.weight", p + "attn_q_a_norm.weight"] if cfg.q_lora_rank else [p + "attn_q.weight"]
            if not g.has(p + "attn_kv_b.weight"):
                need += [p + "attn_k_b.weight", p + "attn_v_b.weight"]
            kinds = ("gate_exps", "up_exps", "down_exps", "gate_inp") if self.is_moe(i) else ("gate", "up", "down")
            need += [f"{p}ffn_{k}.weight" for k in kinds]
        missing = [n for n in need if not g.has(n)]
        if missing:
            raise KtxError(f"{g.path}: {len(missing)} tensors missing for a deepseek2 model (first: {missing[0]}); the file is incomplete or from an unsupported converter.")

    def _cache_arrays(self, cache: LatentCache):
        rows = cache.rows.numpy()  # [L, capacity rounded up to whole pages, kv_lora + rope]
        return rows, rows  # MLA has no separate value cache

    def new_cache(self, capacity: int) -> LatentCache:
        return LatentCache(self.cfg.n_layers, capacity, self.cfg.kv_lora_rank, self.cfg.qk_rope, self.kv_dtype, self.device)

    # -- pieces ----------------------------------------------------------------------------------
    def _w(self, name: str) -> torch.Tensor:
        if self.device.type == "cpu":
            return self.store.get(name)
        w = self._on_device.get(name)
        if w is None:
            w = self._on_device[name] = self.store.get(name).to(self.device)
        return w

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self._embed_np(tokens.numpy())).to(self.device)  # [T, H]

    def _uk_uv(self, p: str) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 W_UK [n_h, kv_lora, nope] and W_UV [n_h, v, kv_lora]: from attn_k_b/attn_v_b, or from older files'
        combined attn_kv_b [n_h * (nope + v), kv_lora]."""
        if self.gguf.has(p + "attn_k_b.weight"):
            return self._w(p + "attn_k_b.weight"), self._w(p + "attn_v_b.weight")
        cfg = self.cfg
        kv_b = self._w(p + "attn_kv_b.weight").view(cfg.n_heads, cfg.qk_nope + cfg.v_head, cfg.kv_lora_rank)
        return kv_b[:, : cfg.qk_nope].transpose(1, 2), kv_b[:, cfg.qk_nope:]

    def _kv_heads(self, p: str, kv_c: torch.Tensor):
        """(kv_heads, unit) for `mla_expanded`: per-head keys and values from the latent cache kv_c [S, kv_lora].
        With the int8 linears, one derived weight [n_h * (nope + v), kv_lora] (each head's W_UK^T rows, then its
        W_UV rows; Q8_0) expands heads h0:h1 in one GEMM (3-4x the float32 einsums' speed here); chunks of heads
        start on whole row blocks of it (unit heads). It is built in the load's warm-up prefill and kept: 1.06 bytes
        per weight, 2.2 MB a layer for dsv3-bench, ~18 MB for DeepSeek-V3's 128 heads (~1.1 GB over 61 layers)."""
        cfg = self.cfg
        w = cfg.qk_nope + cfg.v_head

        def weight() -> torch.Tensor:
            W_UK, W_UV = self._uk_uv(p)  # [n_h, kv_lora, nope], [n_h, v, kv_lora]
            return torch.cat([W_UK.transpose(1, 2), W_UV], dim=1).reshape(cfg.n_heads * w, cfg.kv_lora_rank)

        op = self.lin.derived(p + "attn_kv_b.expand", weight)
        if op is None:
            return float_kv_heads(kv_c, *self._uk_uv(p)), 1
        x = np.ascontiguousarray(kv_c.numpy())  # a view of the cache's rows: copied once, not per chunk of heads

        def kv_heads(h0: int, h1: int):
            y = torch.from_numpy(op.row_range(h0 * w, h1 * w)(x)).view(-1, h1 - h0, w)  # [S, hc, nope + v]
            return y[..., : cfg.qk_nope].transpose(0, 1), y[..., cfg.qk_nope:].transpose(0, 1)

        return kv_heads, op.ROW_ALIGN // math.gcd(op.ROW_ALIGN, w)

    def _absorb_k(self, p: str, q_nope: torch.Tensor) -> torch.Tensor:
        """q_nope [T, n_h, nope] -> q_lat [T, n_h, kv_lora]: each head's W_UK (attn_k_b [n_h, kv_lora, nope])."""
        if self.gguf.has(p + "attn_k_b.weight"):
            return self.lin.heads(q_nope.transpose(0, 1).contiguous(), p + "attn_k_b.weight").transpose(0, 1)
        return torch.einsum("thn,hcn->thc", q_nope, self._uk_uv(p)[0])

    def _absorb_v(self, p: str, o_lat: torch.Tensor) -> torch.Tensor:
        """o_lat [T, n_h, kv_lora] -> [T, n_h, v]: each head's W_UV (attn_v_b [n_h, v, kv_lora])."""
        if self.gguf.has(p + "attn_v_b.weight"):
            return self.lin.heads(o_lat.transpose(0, 1).contiguous(), p + "attn_v_b.weight").transpose(0, 1)
        return torch.einsum("thc,hvc->thv", o_lat, self._uk_uv(p)[1])

    def attention(self, i: int, x: torch.Tensor, pos: torch.Tensor, cache: LatentCache) -> torch.Tensor:
        cfg, p, T = self.cfg, f"blk.{i}.", x.shape[0]
        lin, ops = self.lin, self.ops
        if cfg.q_lora_rank:
            q_a, kv = lin.many(x, [p + "attn_q_a.weight", p + "attn_kv_a_mqa.weight"])  # [T, q_lora], [T, kv_lora + rope]
            q = lin(ops.rms_norm(q_a, self._w(p + "attn_q_a_norm.weight"), cfg.rms_eps), p + "attn_q_b.weight")
        else:
            q, kv = lin.many(x, [p + "attn_q.weight", p + "attn_kv_a_mqa.weight"])
        q = q.view(T, cfg.n_heads, cfg.qk_head)  # [T, n_h, nope + rope]
        q_nope, q_pe = q[..., : cfg.qk_nope], ops.rope(self.rope, q[..., cfg.qk_nope:], pos)
        kv_c = ops.rms_norm(kv[:, : cfg.kv_lora_rank], self._w(p + "attn_kv_a_norm.weight"), cfg.rms_eps)
        k_pe = ops.rope(self.rope, kv[:, cfg.kv_lora_rank:], pos)
        start, end = cache.length, cache.length + T
        cache.kv_c[i, start:end], cache.k_pe[i, start:end] = kv_c, k_pe
        if ops.name == "torch" and expanded_is_cheaper(T, end, cfg.kv_lora_rank, cfg.qk_nope, cfg.qk_rope, cfg.v_head):
            kv_heads, unit = self._kv_heads(p, cache.kv_c[i, :end])
            o = mla_expanded(q_nope, q_pe, cache.k_pe[i, :end], kv_heads, cfg.v_head, cfg.softmax_scale, start, unit=unit)
        else:
            o_lat = ops.mla(self._absorb_k(p, q_nope), q_pe, cache, i, start, end, cfg.softmax_scale)  # [T, n_h, kv_lora]
            o = self._absorb_v(p, o_lat)  # [T, n_h, v]
        return lin(o.reshape(T, -1), p + "attn_output.weight")  # [T, H]

    def _mlp(self, x: torch.Tensor, p: str, kind: str = "") -> torch.Tensor:
        """SwiGLU: down(silu(gate x) * up x), the dense layers' (kind "") or the shared experts' ("_shexp")."""
        lin = self.lin
        g, u = lin.many(x, [f"{p}ffn_gate{kind}.weight", f"{p}ffn_up{kind}.weight"])  # [T, I] each
        h = torch.nn.functional.silu(g) * u
        return lin(h, f"{p}ffn_down{kind}.weight")

    def ffn(self, i: int, x: torch.Tensor) -> torch.Tensor:
        cfg, p = self.cfg, f"blk.{i}."
        if not self.is_moe(i):
            return self._mlp(x, p)
        logits = x @ self._w(p + "ffn_gate_inp.weight").T  # [T, E]
        bias = self._w(p + "exp_probs_b.bias") if self.gguf.has(p + "exp_probs_b.bias") else None
        ids, weights = self.ops.route(logits, cfg.n_expert_used, gating="sigmoid" if cfg.gating == GATING_SIGMOID else "softmax",
                             bias=bias, n_group=cfg.n_group, topk_group=cfg.topk_group, norm=cfg.expert_weights_norm,
                             scale=cfg.expert_weights_scale)  # [T, k], [T, k]
        shared = (lambda: self._mlp(x, p, "_shexp")) if cfg.n_shared else None
        return moe_step(self, i, x, ids, weights, shared)

    # -- the whole model -------------------------------------------------------------------------
    def _forward(self, tokens: torch.Tensor, cache: LatentCache, last_only: bool) -> torch.Tensor:
        """The per-op pass (forward, ProgramDecoding, decides): every layer from Python, any number of tokens."""
        cfg, T = self.cfg, tokens.shape[0]
        pos = torch.arange(cache.length, cache.length + T, device=self.device)
        norm = self.ops.rms_norm
        x = self.embed(tokens)  # [T, H]
        for i in range(cfg.n_layers):
            p = f"blk.{i}."
            x = x + self.attention(i, norm(x, self._w(p + "attn_norm.weight"), cfg.rms_eps), pos, cache)
            x = x + self.ffn(i, norm(x, self._w(p + "ffn_norm.weight"), cfg.rms_eps))
        cache.length += T
        if last_only:
            x = x[-1:]
        head = "output.weight" if self.gguf.has("output.weight") else "token_embd.weight"
        return self.lin(norm(x, self._w("output_norm.weight"), cfg.rms_eps), head).cpu()  # [T, vocab]
