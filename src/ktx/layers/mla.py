"""Multi-head Latent Attention (DeepSeek-V2/V3) over a latent KV cache, absorbed form.

Per token the cache holds only kv_c (kv_lora_rank, e.g. 512, after its RMSNorm) and k_pe (rope dims,
e.g. 64, after RoPE): 576 floats per layer instead of 2 * n_heads * 128 for plain attention.

  q        = W_q_b(norm(W_q_a x))                     [T, n_h, nope + rope]   (or W_q x without q-LoRA)
  kv_c|k_pe= W_kv_a x                                 [T, kv_lora | rope]
  q_lat    = q_nope @ W_UK        per head             [T, n_h, kv_lora]      (attn_k_b: [n_h, kv_lora, nope])
  score    = (q_lat . kv_c + q_pe . k_pe) * scale      [n_h, T, S]
  o_lat    = softmax(score) @ kv_c                     [T, n_h, kv_lora]
  o        = o_lat @ W_UV^T       per head             [T, n_h, v]            (attn_v_b: [n_h, v, kv_lora])
  out      = W_o o                                     [T, hidden]

Absorbing W_UK into the query and W_UV after the weighted sum avoids expanding K/V per head; it is
exact algebra, so prefill and decode share this one path here.
"""

from __future__ import annotations

import torch


class LatentCache:
    """Per-layer latent KV, filled up to `length`: one row per token, [kv_c (kv_lora) | k_pe (rope)].

        rows  [L, pages * PAGE, kv_lora + rope]   (capacity rounded up to whole pages)
        kv_c  [L, cap, kv_lora], k_pe [L, cap, rope]: views of the two parts of each row

    Layer i's rows are also the paged cache that the Triton `mla_decode` reads, [pages, PAGE, D], with the
    identity block table (page p holds tokens p*PAGE ..): one sequence, allocated up front.
    """

    PAGE = 64

    def __init__(self, n_layers: int, capacity: int, kv_lora: int, rope: int, dtype=torch.float32, device="cpu"):
        self.capacity = capacity
        pages = -(-capacity // self.PAGE)
        self.rows = torch.zeros(n_layers, pages * self.PAGE, kv_lora + rope, dtype=dtype, device=device)
        self.kv_c, self.k_pe = self.rows[..., :kv_lora], self.rows[..., kv_lora:]
        self.block_table = torch.arange(pages, dtype=torch.int32, device=device)[None]  # [1, pages]
        self.length = 0  # tokens committed (advanced by the model after the last layer)

    @property
    def n_bytes(self) -> int:
        return self.rows.numel() * self.rows.element_size()

    def paged(self, i: int) -> torch.Tensor:
        """Layer i as [pages, PAGE, kv_lora + rope] (a view)."""
        return self.rows[i].view(-1, self.PAGE, self.rows.shape[-1])

    def reset(self, length: int = 0) -> None:
        self.length = length


def mla_latent(q_lat: torch.Tensor, q_pe: torch.Tensor, kv_c: torch.Tensor, k_pe: torch.Tensor, scale: float,
               start: int) -> torch.Tensor:
    """The attention itself, in latent space: q_lat [T, n_h, kv_lora] (W_UK already applied) -> o_lat [T, n_h, kv_lora]."""
    T, S = q_lat.shape[0], kv_c.shape[0]
    scores = torch.einsum("thc,sc->hts", q_lat, kv_c) + torch.einsum("thr,sr->hts", q_pe, k_pe)  # [n_h, T, S]
    scores = scores * scale
    if T > 1:
        causal = torch.arange(S)[None, :] > (start + torch.arange(T))[:, None]  # [T, S]
        scores = scores.masked_fill(causal, float("-inf"))
    probs = scores.softmax(-1)
    return torch.einsum("hts,sc->thc", probs, kv_c)  # [T, n_h, kv_lora]
