"""Triton GPU kernels: dequant, fused dequant-GEMV, MLA attention, norms, rope, router."""
