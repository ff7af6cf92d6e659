"""The small ops a model runs besides its matmuls, behind one interface, so that one forward pass serves
both the CPU and a device: RMSNorm, RoPE, the MoE router, and attention over the latent cache.

- `TorchOps`: plain torch (ktx.layers.norm / rope / router / mla). The CPU path, and the reference.
- `TritonOps`: ktx.kernels_gpu on the tensors' own device: CUDA, or the CPU under TRITON_INTERPRET=1
  (how the tests run it). Triton is imported only when a TritonOps is made, so the CPU path never
  imports it.

Latent attention (`mla`) reads the cache `LatentCache` (ktx.layers.mla): one row per token and layer,
[kv_c | k_pe], whose layer i is also a paged cache [pages, PAGE, kv_lora + rope] with the identity block
table. Decode (T = 1) runs `mla_decode` (split-KV flash decoding over those pages); prefill runs
`mla_prefill` in the absorbed form: q = [q_lat | q_pe] per head, and every head's key and value are the
same cache row (k = [kv_c | k_pe], v = kv_c, broadcast over heads with a zero stride), so no per-head
K/V is ever expanded.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from ktx.errors import KtxError
from ktx.layers.mla import LatentCache, mla_latent
from ktx.layers.norm import rms_norm
from ktx.layers.router import route


SMALL_TOKENS = 32  # forward passes of fewer tokens run torch on one thread


@contextmanager
def torch_threads_for(tokens: int):
    """One torch thread for decode-sized passes. Waking a sleeping OpenMP thread (passive waiting, which ktx needs so
    that idle torch threads do not starve the kernel workers) costs ~100 us per parallel op: a [16, 512] x [512, S]
    matmul took 103 us on 2 threads against 9 us on one, and a decode step runs hundreds of such ops."""
    n = torch.get_num_threads()
    if tokens >= SMALL_TOKENS or n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


class TorchOps:
    name = "torch"

    @staticmethod
    def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
        return rms_norm(x, w, eps)

    @staticmethod
    def rope(rope, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        return rope(x, pos)

    @staticmethod
    def route(logits: torch.Tensor, k: int, **kw) -> tuple[torch.Tensor, torch.Tensor]:
        return route(logits, k, **kw)

    @staticmethod
    def mla(q_lat: torch.Tensor, q_pe: torch.Tensor, cache: LatentCache, i: int, start: int, end: int,
            scale: float) -> torch.Tensor:
        """q_lat [T, n_h, kv_lora], q_pe [T, n_h, rope] at positions start..end-1 -> o_lat [T, n_h, kv_lora]."""
        return mla_latent(q_lat, q_pe, cache.kv_c[i, :end].float(), cache.k_pe[i, :end].float(), scale, start)


class TritonOps:
    name = "triton"

    def __init__(self):
        from ktx.kernels_gpu import mla_decode, mla_prefill, rmsnorm, rope, router

        self.k = {"rmsnorm": rmsnorm.rmsnorm, "rope": rope.rope, "route": router.route,
                  "mla_decode": mla_decode.mla_decode, "mla_prefill": mla_prefill.mla_prefill}
        self._lens = (None, None)  # (end, seq_lens tensor): one small upload per decode step, not per layer

    def rms_norm(self, x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
        return self.k["rmsnorm"](x.float(), w, eps)

    def rope(self, rope, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """x [T, H, D] or [T, D] (GPT-J interleaved pairs, llama.cpp's deepseek2 convention)."""
        if rope.neox:
            raise KtxError("the Triton RoPE kernel rotates interleaved pairs only; NeoX-style models run on the CPU path")
        y = self.k["rope"](x if x.dim() == 3 else x[:, None], pos, rope.inv_freq, rope.scale)  # [T, H, D]
        return y.view(x.shape)

    def route(self, logits: torch.Tensor, k: int, *, gating: str, bias=None, n_group: int = 1, topk_group: int = 1,
              norm: bool = False, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        ids, w = self.k["route"](logits.float().contiguous(), k, scoring=gating, bias=bias if gating == "sigmoid" else None,
                                 n_group=max(n_group, 1), topk_group=max(min(topk_group, n_group), 1),
                                 norm_topk_prob=norm, routed_scaling_factor=scale)  # [T, k] int32, [T, k]
        return ids.long(), w

    def _seq_lens(self, end: int, device) -> torch.Tensor:
        if self._lens[0] != end or self._lens[1].device != device:
            self._lens = (end, torch.tensor([end], dtype=torch.int32, device=device))
        return self._lens[1]

    def mla(self, q_lat: torch.Tensor, q_pe: torch.Tensor, cache: LatentCache, i: int, start: int, end: int,
            scale: float) -> torch.Tensor:
        T, n_h, kv_lora = q_lat.shape
        rows = cache.rows[i]  # [cap, kv_lora + rope]
        q = torch.cat([q_lat, q_pe], dim=-1).to(rows.dtype)  # [T, n_h, kv_lora + rope]
        if T == 1:
            o = self.k["mla_decode"](q, cache.paged(i), cache.block_table, self._seq_lens(end, q.device), kv_lora, scale,
                                     max_seq_len=end)  # [1, n_h, kv_lora]
        else:
            k = rows[:end, None, :].expand(end, n_h, rows.shape[1])  # [S, n_h, D], zero head stride
            v = rows[:end, None, :kv_lora].expand(end, n_h, kv_lora)  # [S, n_h, kv_lora]
            o = self.k["mla_prefill"](q, k, v, scale)  # [T, n_h, kv_lora]
        return o.float()
