"""The GPU model path of DeepSeek-V3 (Triton kernels for norms, RoPE, router, MLA decode/prefill over the
paged latent cache, and dense/shared-expert matmuls on raw GGUF blocks) against the CPU float path
(FloatLinears: float32 weights from gguf-py-exact dequantization, torch ops), which test_deepseek_fixtures
checks against transformers. Without a GPU the kernels run on CPU tensors under TRITON_INTERPRET=1.

Under the interpreter everything is float32, so the two paths differ only by summation order: logits agree
to ~1e-5 (TOL leaves room). On a real GPU fp32 dots may run as tf32, hence the looser TOL_CUDA.
"""

import os

import torch

if not torch.cuda.is_available():  # must precede the first import of triton
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np
import pytest

import ktx
from ktx.errors import KtxError
from ktx.gguf_file import GGUFModel
from ktx.kernels_gpu.device import interpreting
from ktx.layers.gpu import GpuLinears
from ktx.layers.linear import FloatLinears, dense_names
from ktx.layers.weights import WeightStore
from ktx.models import build_model

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = 1e-3 if interpreting() else 5e-2
TOL_CUDA = 0.25  # ktx.load on cuda: bf16 prefill activations and per-head weights


class InterpreterHead(GpuLinears):
    """Under the interpreter the lm_head (32256 rows) as a float matmul: its Q6_K GEMV alone would take ~25 s
    a token there. The synthetic test below runs the head through the kernel on a 2048-row vocabulary."""

    def __call__(self, x, name):
        if name == "output.weight" and interpreting():
            return x @ self.store.get(name).T.to(x.device)
        return super().__call__(x, name)


def _pair(path, linears_cls=GpuLinears):
    """(CPU float reference, Triton device path) models of one GGUF, routed experts on the torch reference."""
    gguf = GGUFModel(path)
    store = WeightStore(gguf, 1 << 30)
    ref = build_model(gguf, store, lambda cfg: None, FloatLinears(store))
    lin = linears_cls(store, DEVICE)
    lin.prefill_dtype = lin.heads_dtype = torch.float32  # compare the kernels, not bf16 rounding
    lin.prepare(dense_names(gguf))
    net = build_model(gguf, store, lambda cfg: None, lin)
    net.use_device(DEVICE)
    return ref, net


def _prefill_then_greedy(ref, net, prompt: list[int], steps: int, tol: float):
    """Prefill both, then `steps` cached decode steps feeding the reference's greedy token to both."""
    c_ref, c_dev = ref.new_cache(64), net.new_cache(64)
    a = ref.forward(torch.tensor(prompt), c_ref)  # [T, vocab]
    b = net.forward(torch.tensor(prompt), c_dev)
    assert b.device.type == "cpu" and b.dtype == torch.float32 and b.shape == a.shape
    assert c_dev.rows.device.type == torch.device(DEVICE).type
    errs = [(a - b).abs().max().item()]
    want, got = [int(a[-1].argmax())], [int(b[-1].argmax())]
    for _ in range(steps):
        a = ref.forward(torch.tensor([want[-1]]), c_ref)[0]
        b = net.forward(torch.tensor([want[-1]]), c_dev)[0]
        errs.append((a - b).abs().max().item())
        want.append(int(a.argmax()))
        got.append(int(b.argmax()))
    assert c_dev.length == c_ref.length == len(prompt) + steps
    assert max(errs) <= tol, f"max |logit difference| per step: {errs}"
    assert got == want


def test_fixture_prefill_decode_and_greedy_match_cpu_float_path(tiny_dsv3):
    """Q4_K_M file: Q4_K, Q5_0 (attn_k_b) and Q6_K blocks; 1 dense + 2 MoE layers with shared experts."""
    ref, net = _pair(tiny_dsv3 / "tiny-dsv3-Q4_K_M.gguf", InterpreterHead)
    prompt = np.load(tiny_dsv3 / "tokens.npy")[:6].tolist()
    _prefill_then_greedy(ref, net, prompt, steps=2, tol=TOL)


def test_synthetic_model_with_lm_head_kernel(tmp_path):
    """The whole path including the Q6_K lm_head GEMV, on the synthetic dsv3-tiny (2048-token vocabulary)."""
    from ktx.synthetic import PRESETS, write_synthetic

    path = write_synthetic(PRESETS["dsv3-tiny"], tmp_path / "dsv3-tiny.gguf", "dsv3-tiny")
    ref, net = _pair(path)
    assert net.lin.weights["output.weight"][1] == "Q6_K"  # raw blocks: the head goes through the kernel
    _prefill_then_greedy(ref, net, [300], steps=1, tol=TOL)


def test_latent_cache_pages_are_views_of_its_rows():
    from ktx.layers.mla import LatentCache

    c = LatentCache(2, 100, 8, 4)  # 100 tokens -> 2 pages of 64
    c.kv_c[1, 70], c.k_pe[1, 70] = torch.arange(8.0), -torch.arange(4.0)
    page = c.paged(1)  # [2, 64, 12]
    assert page.shape == (2, 64, 12) and c.block_table.tolist() == [[0, 1]]
    assert page[1, 6].tolist() == list(range(8)) + [0.0, -1.0, -2.0, -3.0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without a GPU")
def test_load_on_cuda_without_a_gpu_is_a_clear_error(tiny_dsv3):
    with pytest.raises(KtxError, match="no CUDA GPU"):
        ktx.load(tiny_dsv3 / "tiny-dsv3-Q8_0.gguf", cache_len=16, device="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_load_on_cuda_matches_cpu(tiny_dsv3):
    """ktx.load's default choice on a GPU machine is the device path; its logits track the CPU path's."""
    path = tiny_dsv3 / "tiny-dsv3-Q8_0.gguf"
    ids = np.load(tiny_dsv3 / "tokens.npy").tolist()
    ok = np.load(tiny_dsv3 / "router_margins_Q8_0.npy") > 1e-2  # bf16 activations can flip near-ties
    gpu = ktx.load(path, cache_len=128, experts="reference")
    cpu = ktx.load(path, cache_len=128, experts="reference", device="cpu")
    assert gpu.net.device.type == "cuda" and gpu.device_path.startswith("model path: cuda")
    a, b = cpu.logits(ids), gpu.logits(ids)
    assert np.abs(a - b).max(-1)[ok].max() <= TOL_CUDA
    gpu.engine.reset()
    steps = [gpu.net.forward(torch.tensor([t]), gpu.engine.cache)[0].numpy() for t in ids]
    assert np.abs(np.stack(steps) - a).max(-1)[ok].max() <= TOL_CUDA
