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

Absorbing W_UK into the query and W_UV after the weighted sum avoids expanding K/V per head: the right
form for decode (one query against S cached tokens). For a long prefill it is the wrong one, since every
score then costs 2 kv_lora + rope MACs; expanding per-head keys and values from the latent cache once,

  k = [kv_c W_UK | k_pe]   [n_h, S, nope + rope]        v = kv_c W_UV^T   [n_h, S, v]

makes a score cost nope + rope and a weighted sum v (3.4x fewer MACs for DeepSeek-V3's 128/64/512), for
S * kv_lora * (nope + v) per head up front (`mla_expanded`, `expanded_is_cheaper` picks). Both are exact in
float32; over the int8 linears each form applies W_UK and W_UV as an int8 GEMM (the absorbed form on the
queries and outputs, the expanded one on the cached kv_c), with the error of every other linear.
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


def expanded_is_cheaper(T: int, S: int, kv_lora: int, nope: int, rope: int, v: int) -> bool:
    """MACs per head of the expanded form (K/V from the cache, causal blocks ~halve the scores) vs the absorbed one."""
    expanded = S * kv_lora * (nope + v) + T * S * (nope + rope + v) // 2
    absorbed = T * kv_lora * (nope + v) + T * S * (2 * kv_lora + rope)
    return expanded < absorbed


def float_kv_heads(kv_c: torch.Tensor, W_UK: torch.Tensor, W_UV: torch.Tensor):
    """kv_heads for `mla_expanded` from float weights: heads h0:h1's k_nope = kv_c W_UK [h, S, nope] and
    v = kv_c W_UV^T [h, S, v]."""
    return lambda h0, h1: (torch.einsum("sc,hcn->hsn", kv_c, W_UK[h0:h1]), torch.einsum("sc,hvc->hsv", kv_c, W_UV[h0:h1]))


def mla_expanded(q_nope: torch.Tensor, q_pe: torch.Tensor, k_pe: torch.Tensor, kv_heads, dv: int, scale: float,
                 start: int, block: int = 128, budget: int = 1 << 28, unit: int = 1) -> torch.Tensor:
    """Prefill attention with per-head K/V expanded from the latent cache: q_nope [T, n_h, nope], q_pe [T, n_h, rope],
    k_pe [S, rope] (S = start + T); kv_heads(h0, h1) -> (k_nope [h1 - h0, S, nope], v [h1 - h0, S, dv]) expands
    heads h0:h1 from the cached kv_c (`float_kv_heads`, or the int8 expansion of the model's linears; strided views
    are fine) -> [T, n_h, dv].

    Heads go in chunks (a multiple of `unit` heads) whose K/V and score block stay under `budget` bytes; queries go
    in blocks of `block`, each scoring only the keys up to its last position (causal), so a fresh prefill does
    ~half the work. The rope part of the keys is one [S, rope] shared by all heads: its scores are one matmul,
    added to the nope part's, so no per-head [S, nope + rope] key is ever built."""
    T, n_h, nope = q_nope.shape
    S = k_pe.shape[0]
    out = q_nope.new_empty(T, n_h, dv)
    per_head = 4 * S * (nope + dv + block)
    hc = max(unit, min(n_h, budget // per_head) // unit * unit)
    qn, qp = q_nope.transpose(0, 1).contiguous(), q_pe.transpose(0, 1).contiguous()  # [n_h, T, nope | rope]
    for h0 in range(0, n_h, hc):
        h1 = min(n_h, h0 + hc)
        k_nope, v = kv_heads(h0, h1)  # [hc, S, nope], [hc, S, dv]
        for t0 in range(0, T, block):
            t1 = min(T, t0 + block)
            s1 = start + t1  # keys this block may see
            scores = torch.matmul(qp[h0:h1, t0:t1], k_pe[:s1].T)  # [hc, tb, s1]
            scores = torch.baddbmm(scores, qn[h0:h1, t0:t1], k_nope[:, :s1].transpose(1, 2), beta=scale, alpha=scale)
            causal = torch.arange(s1)[None, :] > (start + torch.arange(t0, t1))[:, None]  # [tb, s1]
            probs = scores.masked_fill_(causal, float("-inf")).softmax(-1)
            out[t0:t1, h0:h1] = torch.matmul(probs, v[:, :s1]).transpose(0, 1)  # [tb, hc, v]
    return out
