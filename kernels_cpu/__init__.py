"""CPU kernels for routed experts: Numba blocked int8/int4 loops and llvmlite-JIT SIMD microkernels."""
