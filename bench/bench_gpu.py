"""GPU kernel benchmark: achieved GB/s and TFLOP/s next to the card's limits, measured in the same run.

    python bench/bench_gpu.py                      (needs a CUDA device; without one it says so and exits 0)
    python bench/bench_gpu.py --e2e dsv3-bench     (also: the whole GPU model path on a synthetic model)
    python bench/bench_gpu.py --e2e dsv3-bench --kernels off

Limits printed first:
  - HBM peak from the memory clock and bus width (when torch reports them),
  - practical bandwidth: a 1 GiB device-to-device copy (bytes read + bytes written per second),
  - practical matmul peak: cuBLAS bf16 8192^3.
Then, each as bytes (or FLOPs) the kernel must touch divided by its median time:
  - MLA decode (absorbed, paged latent cache, bf16): batch 1, 128 heads, 512 + 64 dims, 8K..32K tokens;
    bytes = the cache rows of the context + q + out,
  - fused dequant-GEMV on raw Q4_K / Q6_K / Q8_0 blocks, W 18432 x 7168 (a DeepSeek dense FFN up projection),
    T = 1; bytes = the weight bytes,
  - dequant-GEMM (prefill) on Q4_K, T = 2048; FLOPs = 2 T N K.
End to end (`--e2e PRESET`, a synthetic DeepSeek-V3-shaped Q4_K_M GGUF from ktx.synthetic, written on first
use): `ktx bench` on the GPU model path (attention, latent cache, dense and shared experts on the device,
routed experts on the CPU kernels): prefill and decode tok/s, weights touched per token x tok/s, and the
scheduler's CPU/GPU overlap.
"""

import argparse
import sys

import numpy as np
import torch


def bench_ms(fn) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=200)


def random_blocks(name: str, rows: int, k: int) -> torch.Tensor:
    """Random quant bytes with plausible fp16 scales, as raw GGUF rows [rows, row_bytes]."""
    from ktx.kernels_gpu.dequant import block_format

    fmt = block_format(name)
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, (rows * k // fmt.block_elems, fmt.block_bytes), dtype=np.uint8)
    for off in {"Q4_K": (0, 2), "Q6_K": (208,), "Q8_0": (0,)}[name]:
        raw[:, off : off + 2] = (rng.standard_normal(len(raw)) * 1e-3).astype(np.float16).view(np.uint8).reshape(-1, 2)
    return torch.from_numpy(raw.reshape(rows, -1)).cuda()


def limits():
    props = torch.cuda.get_device_properties(0)
    print(f"device: {props.name}, {props.multi_processor_count} SMs, {props.total_memory / 2**30:.0f} GiB")
    clock_khz, bus_bits = getattr(props, "memory_clock_rate", 0), getattr(props, "memory_bus_width", 0)
    if clock_khz and bus_bits:
        print(f"HBM peak (2 x {clock_khz / 1e6:.2f} GHz x {bus_bits} bit): {2 * clock_khz * 1e3 * bus_bits / 8 / 1e9:.0f} GB/s")
    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    copy_gbs = 2 * src.numel() / (bench_ms(lambda: dst.copy_(src)) * 1e-3) / 1e9
    print(f"device-to-device copy (read + write): {copy_gbs:.0f} GB/s   <- practical bandwidth limit")
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    mm_tflops = 2 * 8192**3 / (bench_ms(lambda: a @ a) * 1e-3) / 1e12
    print(f"cuBLAS bf16 matmul 8192^3: {mm_tflops:.0f} TFLOP/s   <- practical compute limit")
    del src, dst, a
    return copy_gbs, mm_tflops


def bench_mla_decode(copy_gbs: float):
    from ktx.kernels_gpu.mla_decode import choose_num_splits, mla_decode

    heads, kv_lora, rope, page = 128, 512, 64, 64
    d = kv_lora + rope
    for ctx in (8192, 16384, 32768):
        n_pages = ctx // page
        cache = torch.randn(n_pages, page, d, device="cuda", dtype=torch.bfloat16)  # [pages, PAGE, D]
        table = torch.randperm(n_pages, device="cuda", dtype=torch.int32)[None]  # [1, pages], scattered pages
        lens = torch.tensor([ctx], device="cuda", dtype=torch.int32)
        q = torch.randn(1, heads, d, device="cuda", dtype=torch.bfloat16)
        ms = bench_ms(lambda: mla_decode(q, cache, table, lens, kv_lora, d**-0.5, max_seq_len=ctx))
        nbytes = ctx * d * 2 + q.numel() * 2 + heads * kv_lora * 2
        splits = choose_num_splits(ctx, 1, heads, q.device)
        print(f"MLA decode  B=1 H=128 ctx={ctx:6d} splits={splits:3d}: {ms * 1e3:8.1f} us  "
              f"{nbytes / ms / 1e6:7.0f} GB/s  ({nbytes / ms / 1e6 / copy_gbs:.0%} of copy)")


def bench_gemv_gemm(copy_gbs: float, mm_tflops: float):
    from ktx.kernels_gpu.gemv import gemm, gemv

    n, k = 18432, 7168
    for name in ("Q4_K", "Q6_K", "Q8_0"):
        w = random_blocks(name, n, k)
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        ms = bench_ms(lambda: gemv(x, w, name))
        print(f"GEMV {name} {n}x{k} T=1: {ms * 1e3:8.1f} us  {w.numel() / ms / 1e6:7.0f} GB/s of weights  "
              f"({w.numel() / ms / 1e6 / copy_gbs:.0%} of copy)")
    w = random_blocks("Q4_K", n, k)
    x = torch.randn(2048, k, device="cuda", dtype=torch.bfloat16)
    ms = bench_ms(lambda: gemm(x, w, "Q4_K"))
    tflops = 2 * x.shape[0] * n * k / (ms * 1e-3) / 1e12
    print(f"GEMM Q4_K {n}x{k} T=2048: {ms:8.2f} ms  {tflops:6.1f} TFLOP/s  ({tflops / mm_tflops:.0%} of cuBLAS bf16)")


def bench_e2e(preset: str, n_prompt: int, n_gen: int):
    from ktx.bench import run_bench
    from ktx.synthetic import synthetic_model

    path = synthetic_model(preset, progress=True)
    report = run_bench(path, n_prompt=[n_prompt], n_gen=[n_gen], depths=[0], reps=2, model_name=preset,
                       measure_bandwidth=False, device="cuda", log=lambda m: print(f"e2e: {m}", file=sys.stderr))
    print(report.to_markdown())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--e2e", metavar="PRESET", help="also run the GPU model path on this synthetic model (dsv3-tiny, dsv3-bench)")
    ap.add_argument("--kernels", choices=("on", "off"), default="on", help="the kernel benchmarks (default on)")
    ap.add_argument("-p", type=int, default=128, help="e2e prompt tokens")
    ap.add_argument("-n", type=int, default=32, help="e2e decoded tokens")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_gpu: no CUDA device visible; this benchmark needs a GPU. Nothing measured.")
        return 0
    if args.kernels == "on":
        copy_gbs, mm_tflops = limits()
        bench_mla_decode(copy_gbs)
        bench_gemv_gemm(copy_gbs, mm_tflops)
    if args.e2e:
        bench_e2e(args.e2e, args.p, args.n)
    return 0


if __name__ == "__main__":
    sys.exit(main())
