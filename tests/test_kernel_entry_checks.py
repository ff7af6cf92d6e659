"""Every public entry point of kernels_gpu/ rejects a bad call with a KtxError before any Triton launch.

One bad call per check: shape, stride/contiguity/alignment, dtype, device, index range, scalar. Every
Triton kernel object is replaced by a tripwire for these calls, so a check that lets a call through to
the launch fails the test instead of reading out of bounds. A few edge calls that are legal (empty
shapes, garbage in unused block-table entries, NaN router logits) must run and stay in range.
Kernels run on CPU tensors under TRITON_INTERPRET=1 when there is no GPU, as in test_kernels_gpu_*.py.
"""

import os

import torch

if not torch.cuda.is_available():  # must precede the first import of triton
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

from ktx.errors import KtxError
from ktx.kernels_gpu import dequant, gemv, mla_decode, mla_prefill, rmsnorm, rope, router

DEV = "cuda" if torch.cuda.is_available() else "cpu"
META = "meta"  # a second device every machine has: mixing it with DEV must be refused
KERNELS = {dequant: ["_dequant_kernel"], gemv: ["_gemv_kernel", "_gemm_kernel"],
           mla_decode: ["_mla_split_kernel", "_mla_merge_kernel"], mla_prefill: ["_prefill_kernel"],
           rmsnorm: ["_rmsnorm_kernel"], rope: ["_rope_kernel"], router: ["_router_kernel"]}


class Tripwire:
    def __getitem__(self, grid):
        raise AssertionError(f"a Triton kernel was launched (grid {grid}) for a call that should have been refused")


@pytest.fixture()
def no_launch(monkeypatch):
    for module, names in KERNELS.items():
        for name in names:
            monkeypatch.setattr(module, name, Tripwire())


def z(*shape, dtype=torch.float32, device=DEV):
    return torch.zeros(*shape, dtype=dtype, device=device)


def i32(*values, device=DEV):
    return torch.tensor(values, dtype=torch.int32, device=device)


Q8 = "Q8_0"


def raw(rows=4, blocks=2, device=DEV):
    return z(rows, 34 * blocks, dtype=torch.uint8, device=device)  # Q8_0 rows of 64 elements


# ---- dequant --------------------------------------------------------------------------------------

DEQUANT = {
    "raw not uint8": (lambda: dequant.dequantize(z(4, 68, dtype=torch.int8), Q8), "uint8"),
    "raw not 2-D": (lambda: dequant.dequantize(z(68, dtype=torch.uint8), Q8), "uint8"),
    "raw not a tensor": (lambda: dequant.dequantize(raw().numpy(), Q8), "uint8"),
    "partial block": (lambda: dequant.dequantize(z(4, 67, dtype=torch.uint8), Q8), "whole number"),
    "column-strided": (lambda: dequant.dequantize(z(68, 8, dtype=torch.uint8).t(), Q8), "contiguous"),
    "odd row stride": (lambda: dequant.dequantize(z(4, 69, dtype=torch.uint8)[:, :68], Q8), "even row stride"),
    "misaligned start": (lambda: dequant.dequantize(z(4, 70, dtype=torch.uint8)[:, 1:69], Q8), "aligned"),
    "unknown type name": (lambda: dequant.dequantize(raw(), "Q3_K"), "not supported"),
    "unknown type id": (lambda: dequant.dequantize(raw(), 999), "not supported"),
    "type not name/id": (lambda: dequant.dequantize(raw(), 8.0), "type id"),
    "out dtype": (lambda: dequant.dequantize(raw(), Q8, torch.int32), "output dtype"),
}

# ---- gemv / gemm / quant_linear -------------------------------------------------------------------

GEMV = {
    "gemv K mismatch": (lambda: gemv.gemv(z(1, 63), raw(), Q8), r"\[T, 64\]"),
    "gemv x 1-D": (lambda: gemv.gemv(z(64), raw(), Q8), r"\[T, 64\]"),
    "gemv x int": (lambda: gemv.gemv(z(1, 64, dtype=torch.int32), raw(), Q8), "fp32, fp16 or bf16"),
    "gemv too many tokens": (lambda: gemv.gemv(z(9, 64), raw(), Q8), "1..8"),
    "gemv weight not uint8": (lambda: gemv.gemv(z(1, 64), z(4, 68), Q8), "uint8"),
    "gemv devices": (lambda: gemv.gemv(z(1, 64, device=META), raw(), Q8), "different devices"),
    "gemm K mismatch": (lambda: gemv.gemm(z(16, 65), raw(), Q8), r"\[T, 64\]"),
    "gemm x 3-D": (lambda: gemv.gemm(z(2, 16, 64), raw(), Q8), r"\[T, 64\]"),
    "gemm weight type": (lambda: gemv.gemm(z(16, 64), raw(), "IQ2_XS"), "not supported"),
    "quant_linear x 0-D": (lambda: gemv.quant_linear(torch.tensor(1.0), raw(), Q8), r"\[T, 64\]"),
    "quant_linear x f64": (lambda: gemv.quant_linear(z(2, 64, dtype=torch.float64), raw(), Q8), "fp32, fp16 or bf16"),
}

# ---- MLA decode -----------------------------------------------------------------------------------
# q [B=1, H=4, D=48] (kv_lora 32 + rope 16), cache 2 pages of 16 tokens, table [1, 2]


def decode(q=None, cache=None, table=None, lens=None, kv_lora=32, scale=0.1, **kw):
    q = z(1, 4, 48) if q is None else q
    cache = z(2, 16, 48) if cache is None else cache
    table = i32(0, 1).view(1, 2) if table is None else table
    lens = i32(20) if lens is None else lens
    return mla_decode.mla_decode(q, cache, table, lens, kv_lora, scale, **kw)


MLA_DECODE = {
    "q 2-D": (lambda: decode(q=z(4, 48)), r"\[B, H, D\]"),
    "D mismatch": (lambda: decode(q=z(1, 4, 40)), "same D"),
    "kv_lora 0": (lambda: decode(kv_lora=0), "kv_lora=0"),
    "kv_lora = D": (lambda: decode(kv_lora=48), "kv_lora=48"),
    "q/cache dtypes": (lambda: decode(cache=z(2, 16, 48, dtype=torch.float16)), "share one of"),
    "int q": (lambda: decode(q=z(1, 4, 48, dtype=torch.int32), cache=z(2, 16, 48, dtype=torch.int32)), "share one of"),
    "table int64": (lambda: decode(table=torch.zeros(1, 2, dtype=torch.int64, device=DEV)), "int32"),
    "table batch": (lambda: decode(table=i32(0, 1, 0, 1).view(2, 2)), r"B=1"),
    "lens int64": (lambda: decode(lens=torch.tensor([20], device=DEV)), "seq_lens must be int32"),
    "lens shape": (lambda: decode(lens=i32(20, 20)), "seq_lens must be int32"),
    "cache strided": (lambda: decode(cache=z(2, 48, 16).transpose(1, 2)), "contiguous"),
    "page size 0": (lambda: decode(cache=z(2, 0, 48)), "page size"),
    "negative length": (lambda: decode(lens=i32(-1)), r"seq_lens\[0\] = -1"),
    "length past the table": (lambda: decode(lens=i32(33)), "more than the block table"),
    "page past the cache": (lambda: decode(table=i32(0, 2).view(1, 2)), r"block_table\[0, 1\] = 2"),
    "negative page": (lambda: decode(table=i32(-1, 0).view(1, 2)), r"block_table\[0, 0\] = -1"),
    "page of the 2nd sequence": (lambda: decode(q=z(2, 4, 48), table=i32(0, 1, 1, 7).view(2, 2), lens=i32(32, 17)),
                                 r"block_table\[1, 1\] = 7"),
    "scale NaN": (lambda: decode(scale=float("nan")), "softmax_scale"),
    "num_splits 0": (lambda: decode(num_splits=0), "num_splits"),
    "devices": (lambda: decode(lens=i32(20, device=META)), "different devices"),
    "not a tensor": (lambda: decode(table=[[0, 1]]), "torch tensors"),
}

# ---- MLA prefill ----------------------------------------------------------------------------------


def prefill(tq=8, tk=8, h=2, dqk=24, dv=16, dtypes=(torch.float32,) * 3, scale=0.1, strided=False):
    q, k, v = z(tq, h, dqk, dtype=dtypes[0]), z(tk, h, dqk, dtype=dtypes[1]), z(tk, h, dv, dtype=dtypes[2])
    if strided:
        q = z(tq, h, 2 * dqk)[..., ::2]
    return mla_prefill.mla_prefill(q, k, v, scale)


MLA_PREFILL = {
    "q 2-D": (lambda: mla_prefill.mla_prefill(z(8, 24), z(8, 2, 24), z(8, 2, 16), 0.1), r"q \[Tq, H, Dqk\]"),
    "heads differ": (lambda: mla_prefill.mla_prefill(z(8, 2, 24), z(8, 3, 24), z(8, 3, 16), 0.1), r"q \[Tq, H, Dqk\]"),
    "v length": (lambda: mla_prefill.mla_prefill(z(8, 2, 24), z(8, 2, 24), z(7, 2, 16), 0.1), r"q \[Tq, H, Dqk\]"),
    "fewer keys": (lambda: prefill(tq=8, tk=4), "keys must include"),
    "dtypes differ": (lambda: prefill(dtypes=(torch.float32, torch.float16, torch.float32)), "share one of"),
    "int dtype": (lambda: prefill(dtypes=(torch.int32,) * 3), "share one of"),
    "last dim strided": (lambda: prefill(strided=True), "contiguous"),
    "Dqk < 16": (lambda: prefill(dqk=8), "Dqk=8"),
    "scale inf": (lambda: prefill(scale=float("inf")), "softmax_scale"),
    "devices": (lambda: mla_prefill.mla_prefill(z(8, 2, 24), z(8, 2, 24), z(8, 2, 16, device=META), 0.1), "different devices"),
}

# ---- RMSNorm, RoPE, router ------------------------------------------------------------------------

RMSNORM = {
    "x 3-D": (lambda: rmsnorm.rmsnorm(z(2, 3, 8), z(8), 1e-6), r"x \[T, D\]"),
    "weight shape": (lambda: rmsnorm.rmsnorm(z(3, 8), z(7), 1e-6), r"x \[T, D\]"),
    "x int": (lambda: rmsnorm.rmsnorm(z(3, 8, dtype=torch.int32), z(8), 1e-6), "x must be fp32"),
    "weight f64": (lambda: rmsnorm.rmsnorm(z(3, 8), z(8, dtype=torch.float64), 1e-6), "weight must be fp32"),
    "last dim strided": (lambda: rmsnorm.rmsnorm(z(8, 3).t(), z(8), 1e-6), "contiguous"),
    "eps negative": (lambda: rmsnorm.rmsnorm(z(3, 8), z(8), -1.0), "eps"),
    "eps NaN": (lambda: rmsnorm.rmsnorm(z(3, 8), z(8), float("nan")), "eps"),
    "row too wide": (lambda: rmsnorm.rmsnorm(z(1, rmsnorm.MAX_D + 1), z(rmsnorm.MAX_D + 1), 1e-6), "one-block limit"),
    "devices": (lambda: rmsnorm.rmsnorm(z(3, 8), z(8, device=META), 1e-6), "different devices"),
}


def rot(x=None, pos=None, f=None, mscale=1.0):
    x = z(3, 2, 8) if x is None else x
    pos = torch.arange(3, device=DEV) if pos is None else pos
    f = z(4) if f is None else f
    return rope.rope(x, pos, f, mscale)


ROPE = {
    "x 2-D": (lambda: rot(x=z(3, 8)), r"x \[T, H, D\]"),
    "odd D": (lambda: rot(x=z(3, 2, 7), f=z(3)), r"D even"),
    "positions length": (lambda: rot(pos=torch.arange(4, device=DEV)), r"positions \[T\]"),
    "inv_freq length": (lambda: rot(f=z(3)), r"inv_freq \[D/2\]"),
    "positions float": (lambda: rot(pos=z(3)), "positions integer"),
    "inv_freq f64": (lambda: rot(f=z(4, dtype=torch.float64)), "inv_freq fp32"),
    "x int": (lambda: rot(x=z(3, 2, 8, dtype=torch.int32)), "x must be fp32"),
    "last dim strided": (lambda: rot(x=z(3, 2, 16)[..., ::2]), "contiguous"),
    "mscale NaN": (lambda: rot(mscale=float("nan")), "mscale"),
    "devices": (lambda: rot(pos=torch.arange(3, device=META)), "different devices"),
    "yarn odd dims": (lambda: rope.yarn(63, 10000.0, 40.0, 4096, 192), "rope_dim"),
    "yarn base 1": (lambda: rope.yarn(64, 1.0, 40.0, 4096, 192), "base"),
    "yarn factor 0": (lambda: rope.yarn(64, 10000.0, 0.0, 4096, 192), "factor"),
    "yarn factor NaN": (lambda: rope.yarn(64, 10000.0, float("nan"), 4096, 192), "factor"),
    "yarn context 0": (lambda: rope.yarn(64, 10000.0, 40.0, 0, 192), "original_max_pos"),
}


def route(logits=None, top_k=2, **kw):
    return router.route(z(3, 8) if logits is None else logits, top_k, **kw)


ROUTER = {
    "logits fp16": (lambda: route(z(3, 8, dtype=torch.float16)), "fp32"),
    "logits 1-D": (lambda: route(z(8)), r"\[T, E\]"),
    "scoring": (lambda: route(scoring="relu"), "scoring"),
    "bias shape": (lambda: route(bias=z(7)), r"must be \[8\]"),
    "bias int": (lambda: route(bias=z(8, dtype=torch.int32)), "floating-point"),
    "groups do not divide": (lambda: route(n_group=3, topk_group=1), "3 groups"),
    "topk_group > n_group": (lambda: route(n_group=2, topk_group=3), "keeping 3"),
    "top_k > E": (lambda: route(top_k=9), "top_k=9"),
    "top_k > kept groups": (lambda: route(top_k=5, n_group=4, topk_group=2), "top_k=5"),
    "top_k 0": (lambda: route(top_k=0), "top_k=0"),
    "top_k float": (lambda: route(top_k=2.0), "integers"),
    "one expert per group": (lambda: route(n_group=8, topk_group=2), "at least 2 experts"),
    "scaling NaN": (lambda: route(routed_scaling_factor=float("nan")), "routed_scaling_factor"),
    "devices": (lambda: route(bias=z(8, device=META)), "different devices"),
}

CASES = {f"{group}: {name}": case for group, cases in (("dequant", DEQUANT), ("gemv", GEMV), ("mla_decode", MLA_DECODE),
                                                       ("mla_prefill", MLA_PREFILL), ("rmsnorm", RMSNORM),
                                                       ("rope", ROPE), ("router", ROUTER))
         for name, case in cases.items()}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_call_is_refused_before_launch(no_launch, name):
    call, match = CASES[name]
    with pytest.raises(KtxError, match=match):
        call()


# ---- legal edge calls: they run, and stay in range ------------------------------------------------


def test_empty_shapes_need_no_launch(no_launch):
    assert gemv.gemv(z(2, 64), raw(rows=0), Q8).shape == (2, 0)
    assert gemv.gemm(z(0, 64), raw(), Q8).shape == (0, 4)
    assert torch.equal(gemv.gemm(z(16, 0), z(4, 0, dtype=torch.uint8), Q8), z(16, 4))
    assert dequant.dequantize(raw(rows=0), Q8).shape == (0, 64)
    assert decode(q=z(0, 4, 48), table=z(0, 2, dtype=torch.int32), lens=i32()).shape == (0, 4, 32)
    assert prefill(tq=0, tk=0).shape == (0, 2, 16)
    assert rmsnorm.rmsnorm(z(0, 8), z(8), 1e-6).shape == (0, 8)


def test_unused_block_table_entries_may_hold_anything():
    g = torch.Generator().manual_seed(0)
    q, cache = torch.randn(1, 4, 48, generator=g).to(DEV), torch.randn(3, 16, 48, generator=g).to(DEV)
    table = i32(2, 0, 10**6, -5).view(1, 4)  # the sequence uses pages 2 and 0 only
    lens = i32(20)
    got = mla_decode.mla_decode(q, cache, table, lens, 32, 0.1)
    want = mla_decode.mla_decode_reference(q.cpu(), cache.cpu(), table.cpu(), lens.cpu(), 32, 0.1)
    torch.testing.assert_close(got.cpu(), want, atol=1e-4, rtol=1e-4)


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # NaN arithmetic is the point here
@pytest.mark.parametrize("scoring, n_group", [("sigmoid", 1), ("sigmoid", 4), ("softmax", 1), ("softmax", 3)])
def test_nan_router_logits_give_ids_within_the_experts(scoring, n_group):
    logits = torch.randn(4, 6, generator=torch.Generator().manual_seed(1)).to(DEV)  # E = 6, padded to 8 lanes
    logits[0] = float("nan")
    logits[1, 2] = float("nan")
    ids, _ = router.route(logits, 2, scoring=scoring, n_group=2 if n_group == 4 else n_group, topk_group=1)
    assert ids.dtype == torch.int32 and ids.min() >= 0 and ids.max() < 6, ids
