"""CPU kernels for routed experts: Numba blocked int8/int4 loops around SIMD tile kernels emitted as LLVM IR.

    cpu_features()   what the CPU runs (CPUID through an llvmlite-JIT'd function)
    WorkerPool(n)    long-lived worker threads running GIL-free kernels
    MoEExperts(...)  one layer's routed experts: forward(x, ids, w) / submit(...).wait()
    QuantLinear(...) one dense GGUF weight: y = op(x), int8 activations, same tiles
"""
from .cpu_features import CpuFeatures, cpu_features
from .linear import QuantLinear
from .moe import MoEExperts, best_isa
from .pool import WorkerPool

__all__ = ["CpuFeatures", "cpu_features", "MoEExperts", "QuantLinear", "WorkerPool", "best_isa"]
