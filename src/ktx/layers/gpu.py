"""Dense matmuls on a device through the Triton kernels: the `Linears` backend of the GPU model path.

Same interface as `FloatLinears` (ktx.layers.linear): `lin(x, name)` x [T, K] -> [T, R] and
`lin.heads(x, name)` x [B, T, K] -> [B, T, R]. Each weight is uploaded once, the first time it is used
(or up front by `prepare`), as the GGUF stores it:

    block types the kernels read (Q4_K, Q6_K, Q8_0, Q5_0, Q4_0, Q5_K, F16, BF16):
        raw bytes, uint8 [R, row_bytes] on the device  ->  kernels_gpu.gemv.quant_linear
        (the fused dequant-GEMV for T <= 8, the dequant-tile GEMM for prefill). Nothing is re-quantized.
    F32 and types the kernels do not read: float32 [R, K] on the device (dequantized by the WeightStore)
        ->  torch matmul.
    per-head weights (MLA's attn_k_b [n_h, kv_lora, nope], attn_v_b [n_h, v, kv_lora]): dequantized once
        on the device by the Triton dequant kernel (bit-exact) to `heads_dtype` -> one batched matmul for
        all heads (a GEMV launch per head would cost more in launches than the bytes it saves).

On a real GPU prefill feeds the GEMM bf16 activations (tensor cores) and per-head weights are kept in
bf16; under the interpreter (tests) everything stays float32.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from ktx.layers.weights import WeightStore


class GpuLinears:
    def __init__(self, store: WeightStore, device: str | torch.device):
        from ktx.kernels_gpu.dequant import FORMATS
        from ktx.kernels_gpu.device import interpreting

        self.store, self.device = store, torch.device(device)
        self.formats = FORMATS
        on_gpu = self.device.type == "cuda" and not interpreting()
        self.prefill_dtype = torch.bfloat16 if on_gpu else torch.float32
        self.heads_dtype = torch.bfloat16 if on_gpu else torch.float32
        self.weights: dict[str, tuple[torch.Tensor, str | None]] = {}  # name -> (raw uint8, type) or (float, None)
        self.kernel_path = f"dense weights: Triton dequant-GEMV/GEMM on raw GGUF blocks ({self.device})"

    def _weight(self, name: str) -> tuple[torch.Tensor, str | None]:
        w = self.weights.get(name)
        if w is None:
            w = self.weights[name] = self._upload(name)
        return w

    def _upload(self, name: str) -> tuple[torch.Tensor, str | None]:
        from ktx.kernels_gpu.dequant import dequantize

        t = self.store.model.tensor(name)
        if t.type_name not in self.formats:
            return self.store.get(name).to(self.device), None  # [.., R, K] float32
        raw = np.ascontiguousarray(t.data).view(np.uint8)  # F16 arrives typed: take its bytes
        with warnings.catch_warnings():  # a read-only mmap view: only ever read (copied to a GPU, or read in place)
            warnings.simplefilter("ignore", UserWarning)
            raw = torch.from_numpy(raw.reshape(-1, raw.shape[-1])).to(self.device)  # [rows, row_bytes]
        if len(t.shape) == 3:  # per-head [B, R, K]
            w = dequantize(raw, t.type_name, self.heads_dtype)  # [B * R, K]
            return w.view(t.shape), None
        return raw, t.type_name

    def __call__(self, x: torch.Tensor, name: str) -> torch.Tensor:
        from ktx.kernels_gpu.gemv import MAX_GEMV_TOKENS, quant_linear

        w, qtype = self._weight(name)
        if qtype is None:
            return x @ w.T  # [T, K] @ [K, R]
        if x.shape[0] > MAX_GEMV_TOKENS:
            return quant_linear(x.to(self.prefill_dtype), w, qtype).float()  # [T, R]
        return quant_linear(x.float(), w, qtype)  # [T, R]

    def many(self, x: torch.Tensor, names: list[str]) -> list[torch.Tensor]:
        return [self(x, n) for n in names]

    def heads(self, x: torch.Tensor, name: str) -> torch.Tensor:
        w, _ = self._weight(name)  # [B, R, K]
        return torch.bmm(x.to(w.dtype), w.transpose(1, 2)).float()  # [B, T, K] @ [B, K, R]

    def derived(self, key: str, make):
        """No int8 derived weights on the device (see FloatLinears.derived): the model keeps its float path."""
        return None

    def prepare(self, names) -> None:
        """Upload every dense weight now, not inside the first token."""
        for n in names:
            self._weight(n)

    def describe(self) -> str:
        raw = sorted({q for _, q in self.weights.values() if q is not None})
        n_raw = sum(q is not None for _, q in self.weights.values())
        heads = sum(w.dim() == 3 for w, q in self.weights.values() if q is None)
        flt = len(self.weights) - n_raw - heads
        line = f"{self.kernel_path}: {n_raw} tensors ({'/'.join(raw) or '-'})"
        if heads:
            line += f"; {heads} per-head tensors dequantized to {str(self.heads_dtype).removeprefix('torch.')} (batched matmul)"
        if flt:
            line += f"; {flt} as float32 torch matmul"
        return line
