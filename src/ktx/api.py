"""The notebook API.

    import ktx
    model = ktx.load("DeepSeek-V3-Q4_K_M-00001-of-00009.gguf", cache_len=8192)
    print(model.generate("The capital of France is", max_new_tokens=16))
    for piece in model.generate("Once upon a time", stream=True): print(piece, end="")
    model.chat([{"role": "user", "content": "Hi!"}])
    model.logits(model.tokenizer.encode("Hello"))   # numpy float32 [T, vocab]
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Iterator

import numpy as np

from ktx.engine import Engine
from ktx.errors import KtxError
from ktx.gguf_file import GGUFModel
from ktx.layers.linear import FloatLinears, QuantLinears, dense_names
from ktx.layers.weights import WeightStore
from ktx.sampling import SamplingParams

EXPERT_PATHS = ("auto", "reference", "vnni", "avx2", "portable", "amx")


def _available_ram() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30


def warn(msg: str) -> None:
    print(f"ktx: {msg}", file=sys.stderr)


def _kernels_available(experts: str) -> bool:
    """Whether the quantized CPU kernels will run: not asked for the reference, and importable (Numba/llvmlite)."""
    if experts not in EXPERT_PATHS:
        raise KtxError(f"--experts {experts!r}: choose one of {', '.join(EXPERT_PATHS)}")
    if experts == "reference":
        return False
    try:
        import ktx.kernels_cpu  # noqa: F401
    except ImportError as e:
        if experts != "auto":
            raise KtxError(f"CPU kernels are unavailable ({e}); use --experts reference") from None
        warn(f"CPU kernels unavailable ({e}): torch float32 reference for experts and dense weights -- expect a large slowdown")
        return False
    return True


def _worker_pools(threads: int | None, numa_shards: int | None) -> tuple[list, int]:
    """One pool of pinned kernel workers per NUMA node (or per forced shard); the thread total."""
    from ktx.numa import numa_nodes, pinned_pool

    nodes = numa_nodes()
    if numa_shards:  # forced (tests, or to split one node's work): distribute the CPUs round-robin
        cpus = sorted(c for node in nodes for c in node)
        nodes = [cpus[i::numa_shards] or cpus for i in range(numa_shards)]
    total = threads or sum(len(n) for n in nodes)
    return [pinned_pool(node, max(1, round(total * len(node) / sum(len(n) for n in nodes)))) for node in nodes], total


def _make_experts_factory(gguf: GGUFModel, cfg, experts: str, pools: list | None, total: int, cache_dir, log):
    """Routed-experts backend per MoE layer: the quantized CPU kernels (sharded per NUMA node), or the torch reference."""
    from ktx.layers.moe import ShardedExperts, kernel_experts, shard_bounds, slice_inter

    if not pools or not getattr(cfg, "n_expert", 0):
        if getattr(cfg, "n_expert", 0):
            log("routed experts: torch reference path (dequantize + float32 matmul)")
        return None
    from ktx.kernels_cpu import MoEExperts
    from ktx.kernels_cpu.moe import ROW_BLOCK

    said = []

    def factory(prefix: str):
        if experts in ("auto", "amx") and (cfg.hidden % ROW_BLOCK or cfg.moe_ffn % ROW_BLOCK):
            if not said:
                said.append("reference")
                warn(f"routed experts: torch reference path, since the CPU kernels need hidden and expert sizes in multiples of {ROW_BLOCK} (this model: {cfg.hidden}, {cfg.moe_ffn})")
            return None
        if len(pools) == 1:
            ex = kernel_experts(gguf, prefix, cfg.hidden, cfg.moe_ffn, pools[0], path=experts, cache_dir=cache_dir)
        else:
            g, u, d = (gguf.tensor(f"{prefix}ffn_{k}_exps.weight") for k in ("gate", "up", "down"))
            shards = []
            import gguf as gguf_py

            align = gguf_py.GGML_QUANT_SIZES[gguf_py.GGMLQuantizationType(d.qtype)][0]  # down's rows are blocks along I
            for lo, hi in shard_bounds(cfg.moe_ffn, len(pools), max(align, ROW_BLOCK)):
                gs, us, ds = slice_inter(g.data, u.data, d.data, d.qtype, lo, hi)
                shards.append(MoEExperts(gate=(gs, g.qtype), up=(us, u.qtype), down=(ds, d.qtype), hidden=cfg.hidden,
                                         inter=hi - lo, pool=pools[len(shards)], path=experts))
            ex = ShardedExperts(shards)
        if not said:
            said.append(ex.kernel_path)
            path, _, prefill = ex.kernel_path.partition("; prefill: ")
            print(f"ktx: routed experts: {path}; {len(pools)} NUMA shard(s), {total} threads", file=sys.stderr)
            log(f"routed experts, prefill: {prefill}")
        return ex

    return factory


def _choose_device(device: str | None, cls, gguf: GGUFModel) -> str:
    """None -> "cuda" when torch sees a GPU, else "cpu"; a model family without a device path runs on the CPU."""
    import torch

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        kind = torch.device(device).type
    except (RuntimeError, TypeError):
        raise KtxError(f"device {device!r}: not a device name; use 'cpu', 'cuda' or 'cuda:N'") from None
    if kind == "cpu":
        return "cpu"
    if kind != "cuda" or not torch.cuda.is_available():
        raise KtxError(f"device {device!r}: torch sees no CUDA GPU here; use device='cpu' (or leave it out)")
    if not hasattr(cls, "use_device"):
        warn(f"{gguf.architecture}: the GPU model path covers deepseek2 (DeepSeek-V2/V3/R1) only so far; this model runs on the CPU")
        return "cpu"
    return device


def _path_line(device: str) -> str:
    if device == "cpu":
        return "model path: cpu (torch ops, CPU matmuls and expert kernels)"
    import torch

    return (f"model path: {device} ({torch.cuda.get_device_name(torch.device(device))}): attention, latent KV cache, norms, "
            "RoPE, router, dense and shared experts through Triton kernels; routed experts on the CPU")


def _plan(gguf, cls, cache_len, override_tensor, placement_file, cpu_moe, gpu_experts, device="cpu"):
    import torch

    from ktx import placement

    cfg = cls.config_class.from_gguf(gguf.metadata, str(gguf.path))
    has_gpu = device != "cpu"
    rules = [placement.parse_override(o) for o in override_tensor or []]
    rules += placement.load_rules(placement_file) if placement_file else []
    rules += placement.default_rules(has_gpu, cpu_moe)
    plan = placement.make_plan(gguf, rules, placement.kv_bytes_per_token(cfg) * cache_len, has_gpu, gpu_experts, getattr(cfg, "n_expert", 0))
    vram = torch.cuda.mem_get_info()[0] if has_gpu else None
    placement.check_fits(plan, _total_ram(), vram)
    return plan


def _total_ram() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 1 << 40


def _repack_cache_dir(gguf: GGUFModel):
    """Where repacked expert weights go: RAM for small models; for a model whose experts take over a quarter of
    RAM, memory-mapped files under $KTX_CACHE/repacked (~/.cache/ktx), so the repacked copy never needs RAM twice."""
    expert_bytes = sum(t.n_bytes for n, t in gguf.tensors.items() if "_exps." in n)
    if expert_bytes <= _total_ram() // 4:
        return None
    return Path(os.environ.get("KTX_CACHE", Path.home() / ".cache" / "ktx")) / "repacked"


def _configure_scheduler(net, experts_per_token, gpu_experts, routing_profile, log) -> None:
    from ktx.placement import hot_expert_masks

    cfg = net.cfg
    if experts_per_token is not None:
        k = getattr(cfg, "n_expert_used", 0)
        if not 1 <= experts_per_token <= k:
            raise KtxError(f"--experts-per-token {experts_per_token}: this model routes {k} experts per token; choose 1..{k}")
        net.scheduler.experts_per_token = experts_per_token if experts_per_token < k else None
        log(f"selective experts: {experts_per_token} of {k} per token (highest router weights, not renormalised)")
    if gpu_experts:
        net.scheduler.gpu_mask = hot_expert_masks(routing_profile, net, gpu_experts)
        log(f"hot experts: {gpu_experts} per layer on the GPU side (profile {routing_profile or 'none: lowest ids'})")


def _torch_threads(threads: int | None, pools) -> None:
    """torch's own threads (attention, norms): as many as the kernels use, unless torch came in before ktx set
    passive OpenMP waiting; then one, since spinning OpenMP threads would starve the kernel workers."""
    import torch

    import ktx

    if pools and not ktx.OMP_PASSIVE:
        warn("torch was imported before ktx: torch ops run on one thread (import ktx first, or set OMP_WAIT_POLICY=PASSIVE, "
             "to let them use more without starving the CPU kernels)")
        torch.set_num_threads(1)
    elif threads:
        torch.set_num_threads(threads)


# prefills of one token repeated: each chosen expert gets them all, below and past the tiles' wide threshold (16
# tokens per expert), so both prefill variants a prompt may need are compiled here and not inside a first prompt
WARM_UP_TOKENS = (8, 32)


def _warm_up(net) -> None:
    """Run prefills (WARM_UP_TOKENS) and a decode step on a scratch cache. The kernels are compiled for exactly the variants this model uses (or loaded from Numba's and
    Triton's caches), here, under a spinner, instead of stalling the first prompt (~15 s on a cold cache)."""
    import time

    import torch
    from rich.console import Console

    t = time.perf_counter()
    with Console(stderr=True).status("preparing kernels (compiled on the first run, then cached)"):
        cache = net.new_cache(max(WARM_UP_TOKENS) + 1)
        for n in WARM_UP_TOKENS:
            cache.reset(0)
            net.forward(torch.full((n,), 1, dtype=torch.int64), cache, last_only=True)
        net.forward(torch.tensor([1]), cache, last_only=True)
        net.programs().clear()  # built for the scratch cache's capacity: the engine's cache gets its own
        net.scheduler.new_step()  # the warm-up is not part of any timeline
    if time.perf_counter() - t > 2:
        print(f"ktx: kernels ready in {time.perf_counter() - t:.0f} s (cached for the next runs)", file=sys.stderr)


class Model:
    device_path = "model path: cpu"  # which path runs (set by load)

    def __init__(self, gguf: GGUFModel, net, tokenizer, cache_len: int):
        self.gguf, self.net, self.tokenizer = gguf, net, tokenizer
        self.config = net.cfg
        self.engine = Engine(net, cache_len)

    @property
    def stats(self):
        """Timing of the last generate/chat call (prefill and decode tok/s)."""
        return self.engine.stats

    def logits(self, token_ids) -> np.ndarray:
        """One prefill of token_ids from an empty cache -> numpy float32 [T, vocab]."""
        ids = [int(t) for t in token_ids]
        if not ids:
            raise KtxError("logits: token_ids is empty")
        if len(ids) > self.engine.capacity:
            raise KtxError(f"logits: {len(ids)} tokens exceed the KV cache of {self.engine.capacity}; load with a larger cache_len")
        return self.engine.logits(ids)

    def _stream(self, ids: list[int], max_new_tokens: int, params: SamplingParams, stop: list[str]) -> Iterator[str]:
        from ktx.tokenizer import StreamDecoder

        dec = StreamDecoder(self.tokenizer)
        text, emitted = "", 0
        hold = max((len(s) for s in stop), default=1) - 1  # chars held back: a stop string may be forming
        for tok in self.engine.generate(ids, max_new_tokens, params, self.tokenizer.eos_ids):
            text += dec.push(tok)
            cut = min((text.find(s) for s in stop if s in text), default=-1)
            if cut >= 0:
                if cut > emitted:
                    yield text[emitted:cut]
                self.engine.stats.finish_reason = "stop"
                return
            if len(text) - hold > emitted:
                yield text[emitted: len(text) - hold]
                emitted = len(text) - hold
        text += dec.flush()
        if len(text) > emitted:
            yield text[emitted:]

    def generate(self, prompt: str | list[int], max_new_tokens: int = 128, *, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, min_p: float = 0.0, repeat_penalty: float = 1.0, seed: int | None = None,
                 stop: list[str] | None = None, stream: bool = False):
        """Continue `prompt` (text, or token ids). Returns the text, or an iterator of text pieces if stream=True."""
        ids = list(prompt) if not isinstance(prompt, str) else self.tokenizer.encode(prompt)
        params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                                repeat_penalty=repeat_penalty, seed=seed)
        pieces = self._stream(ids, max_new_tokens, params, list(stop or []))
        return pieces if stream else "".join(pieces)

    def chat(self, messages: list[dict], max_new_tokens: int = 512, *, think: bool = False, stream: bool = False, **kw):
        """Reply to a conversation ([{"role": "user", "content": ...}, ...]) using the model's chat template."""
        prompt = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        if think:
            prompt += "<think>\n"
        ids = self.tokenizer.encode(prompt, add_bos=False) if self._template_has_bos(prompt) else self.tokenizer.encode(prompt)
        pieces = self.reply(ids, max_new_tokens, **kw)
        return pieces if stream else "".join(pieces)

    def reply(self, ids: list[int], max_new_tokens: int, *, stop: list[str] | None = None, **sampling) -> Iterator[str]:
        """Stream the reply to a rendered conversation (token ids): generate(), ending also at the chat format's
        stop strings; a base model's transcript reply loses the space that follows its "Answer:"."""
        pieces = self.generate(ids, max_new_tokens, stop=list(stop or []) + list(self.tokenizer.chat_stop), stream=True,
                               **sampling)
        return _lstrip_first(pieces) if self.tokenizer.chat_format == "transcript" else pieces

    def _template_has_bos(self, prompt: str) -> bool:
        bos = self.tokenizer.bos_id
        return bos is not None and prompt.startswith(self.tokenizer.decode([bos]))


def _lstrip_first(pieces: Iterator[str]) -> Iterator[str]:
    """The text pieces with the leading whitespace of the whole text dropped (closing it closes `pieces`)."""
    started = False
    try:
        for piece in pieces:
            if not started:
                piece = piece.lstrip()
                started = bool(piece)
            if piece:
                yield piece
    finally:
        pieces.close()


def load(path: str | Path, *, cache_len: int = 4096, threads: int | None = None, experts: str = "auto",
         weight_cache_bytes: int | None = None, cache_dir: str | Path | None = None, verbose: bool = False,
         numa_shards: int | None = None, experts_per_token: int | None = None, gpu_experts: int = 0,
         routing_profile: str | Path | None = None, override_tensor: list[str] | None = None,
         placement_file: str | Path | None = None, cpu_moe: bool = True, show_plan: bool = False,
         device: str | None = None, decode_program: bool = True) -> Model:
    """Open a GGUF model (a file, any part of a split set, or its folder) for generation.

    cache_len: KV cache capacity in tokens. threads: CPU threads for the expert kernels.
    experts: routed-experts path, 'auto' (fastest the CPU supports), 'reference' (torch float), or a kernel
    path name. weight_cache_bytes: RAM for dequantized non-expert weights (default: a quarter of free RAM).
    device: where attention, the KV cache and the dense layers run: None = "cuda" when torch sees a GPU, else
    "cpu" (the routed experts run on the CPU either way).
    decode_program: decode each token through one compiled program (on the CPU kernels; the load
    prints whether it runs and why not); False keeps the per-op path (for comparisons).
    """
    log = (lambda msg: print(f"ktx: {msg}", file=sys.stderr)) if verbose else (lambda msg: None)
    if cache_len < 1:
        raise KtxError(f"cache_len must be >= 1, got {cache_len}")
    gguf = GGUFModel(path)
    from ktx.models import build_model, model_class
    from ktx.tokenizer import Tokenizer

    cls = model_class(gguf.architecture, str(gguf.path))  # unknown architecture: fail before the tokenizer
    device = _choose_device(device, cls, gguf)
    path_line = _path_line(device)
    print(f"ktx: {path_line}", file=sys.stderr)
    plan = _plan(gguf, cls, cache_len, override_tensor, placement_file, cpu_moe, gpu_experts, device)
    if show_plan or verbose:
        print(f"ktx: {plan.line()}", file=sys.stderr)
    tokenizer = Tokenizer.from_metadata(gguf.metadata)
    if cache_dir is None:
        cache_dir = _repack_cache_dir(gguf)
    budget = weight_cache_bytes if weight_cache_bytes is not None else _available_ram() // 4
    store = WeightStore(gguf, budget)
    pools, total = _worker_pools(threads, numa_shards) if _kernels_available(experts) else (None, 0)
    if device != "cpu":
        from ktx.layers.gpu import GpuLinears

        linears = GpuLinears(store, device)
    else:
        dense_path = "auto" if experts == "amx" else experts  # AMX tiles serve the experts' prefill only
        linears = QuantLinears(store, pools[0], path=dense_path) if pools else FloatLinears(store)
    linears.prepare(dense_names(gguf))
    print(f"ktx: {linears.describe()}", file=sys.stderr)
    net = build_model(gguf, store, lambda cfg: _make_experts_factory(gguf, cfg, experts, pools, total, cache_dir, log), linears)
    if device != "cpu":
        net.use_device(device)
    _configure_scheduler(net, experts_per_token, gpu_experts, routing_profile, log)
    _torch_threads(threads, pools)
    net.decode_program = decode_program and device == "cpu"
    if pools or device != "cpu":
        _warm_up(net)
    model = Model(gguf, net, tokenizer, cache_len)
    if net.decode_program:  # built now for the engine's cache, not inside the first token
        net.program_for(model.engine.cache)
        print(f"ktx: {net.program_note}", file=sys.stderr)
    model.device_path = path_line
    return model
