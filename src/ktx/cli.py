"""The `ktx` command line: chat, convert, inspect (and more as they land).

Every user error ends as one line `ktx: error: ...` on stderr and exit status 1, never a traceback
(set KTX_DEBUG=1 to see the traceback).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import typer

from ktx.errors import KtxError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode="rich",
    help="ktx runs giant Mixture-of-Experts models (DeepSeek-V3/R1, Qwen3-MoE, Mixtral) from GGUF files on one machine: "
         "routed experts on the CPU with int8/int4 kernels, attention and dense layers on the GPU when there is one.",
)

ModelOpt = typer.Option(None, "--model", "-m", help="GGUF file, any part of a split model, or a folder holding one.")
ThreadsOpt = typer.Option(None, "--cpu-threads", "-t", help="CPU threads for the expert kernels (default: all cores).")
ExpertsOpt = typer.Option("auto", "--experts", help="CPU kernel path for the routed experts and the dense weights on the CPU: auto (fastest this CPU supports), "
                          "reference (torch float32 on dequantized weights, slow), vnni, avx2, portable, "
                          "amx (Intel AMX bf16 tiles for prefill experts with > 48 tokens, vnni elsewhere; auto "
                          "does the same wherever the CPU has AMX, and says so in the kernel path).")
CacheLenOpt = typer.Option(4096, "--cache-len", "-c", help="KV cache capacity in tokens (prompt + reply + history).")
CpuMoeOpt = typer.Option(True, "--cpu-moe/--no-cpu-moe", help="With a GPU: keep the routed experts in RAM on the CPU (default) and the rest on the GPU.")
GpuExpertsOpt = typer.Option(0, "--gpu-experts", help="Keep the N most used experts of each MoE layer on the GPU side (needs --routing-profile).")
ProfileOpt = typer.Option(None, "--routing-profile", help="Expert routing counts recorded by `ktx profile`, used by --gpu-experts.")
OverrideOpt = typer.Option(None, "--override-tensor", "-ot", help="REGEX=DEVICE (cpu or gpu) placement rule; first match wins; repeatable.")
DeviceOpt = typer.Option(None, "--device", help="Where attention, the KV cache and the dense layers run: cpu, cuda or cuda:N "
                         "(default: cuda when torch sees a GPU). Routed experts stay on the CPU either way.")
PlacementOpt = typer.Option(None, "--placement", help="Placement rules file: TOML [[rule]] tables (pattern, device) or a YAML list.")
ExpertsPerTokenOpt = typer.Option(None, "--experts-per-token", help="Run only the K highest-weight of the model's routed experts per token "
                                  "(KTransformers' '6 of 8'); the kept weights are NOT renormalised, so the output is the model's minus its smallest expert terms.")
NumaOpt = typer.Option(None, "--numa-shards", help="Split each expert's intermediate dimension into N shards with pinned workers (default: one per NUMA node).")


def _load_kwargs(cpu_moe, gpu_experts, routing_profile, override_tensor, placement, experts_per_token, numa_shards,
                 device) -> dict:
    return dict(cpu_moe=cpu_moe, gpu_experts=gpu_experts, routing_profile=routing_profile, override_tensor=override_tensor,
                placement_file=placement, experts_per_token=experts_per_token, numa_shards=numa_shards, device=device)


def _default_model() -> Path:
    try:
        from ktx.default_model import default_model_path
    except ImportError:
        raise KtxError("no --model given and no default model is installed; pass --model PATH.gguf") from None
    return default_model_path()


def _eprint(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@app.command()
def chat(
    model: Optional[Path] = ModelOpt,
    prompt: Optional[str] = typer.Option(None, "--prompt", "-p", help="One-shot: answer this prompt and exit."),
    prompt_file: Optional[Path] = typer.Option(None, "--prompt-file", "-f", help="One-shot prompt read from a file."),
    system: Optional[str] = typer.Option(None, "--system", "-s", help="System message for the conversation."),
    max_new_tokens: int = typer.Option(512, "--max-new-tokens", "-n", help="Most tokens per reply."),
    temperature: float = typer.Option(0.0, "--temperature", help="0 = greedy; higher = more random."),
    top_k: int = typer.Option(0, "--top-k", help="Keep only the k most likely tokens (0 = off)."),
    top_p: float = typer.Option(1.0, "--top-p", help="Nucleus sampling: smallest set with this total probability."),
    min_p: float = typer.Option(0.0, "--min-p", help="Drop tokens less likely than min_p times the best one."),
    repeat_penalty: float = typer.Option(1.0, "--repeat-penalty", help="Penalise tokens seen in the last 64 (1 = off)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Random seed, for reproducible sampling."),
    think: bool = typer.Option(False, "--think", help="Start the reply with '<think>\\n' (DeepSeek-R1-style reasoning models)."),
    raw: bool = typer.Option(False, "--raw", help="No chat template: continue the prompt text as is."),
    cache_len: int = CacheLenOpt,
    cpu_threads: Optional[int] = ThreadsOpt,
    experts: str = ExpertsOpt,
    cpu_moe: bool = CpuMoeOpt,
    gpu_experts: int = GpuExpertsOpt,
    routing_profile: Optional[Path] = ProfileOpt,
    override_tensor: Optional[list[str]] = OverrideOpt,
    placement: Optional[Path] = PlacementOpt,
    experts_per_token: Optional[int] = ExpertsPerTokenOpt,
    numa_shards: Optional[int] = NumaOpt,
    device: Optional[str] = DeviceOpt,
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Print load details and the kernel paths chosen."),
):
    """Chat with a model: interactive (type /reset to forget the conversation, /exit to quit), one-shot with
    --prompt, or one turn per line of piped stdin. Replies stream; a line with prefill and decode speed follows each."""
    import ktx

    if prompt_file is not None:
        try:
            prompt = prompt_file.read_text(encoding="utf-8")
        except OSError as e:
            raise KtxError(f"{prompt_file}: cannot read prompt file ({e.strerror})") from None
    path = model or _default_model()
    m = ktx.load(path, cache_len=cache_len, threads=cpu_threads, experts=experts, verbose=verbose, show_plan=True,
                 **_load_kwargs(cpu_moe, gpu_experts, routing_profile, override_tensor, placement, experts_per_token, numa_shards, device))
    gen = dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, repeat_penalty=repeat_penalty, seed=seed)
    if not raw and m.tokenizer.chat_format == "transcript":
        name = m.gguf.metadata.get("general.name", Path(m.gguf.path).name)
        _eprint(f"ktx: {name!s} has no chat template and its name does not say instruction-tuned, so it is taken "
                "for a pretrained base model: the conversation goes to it as a plain 'Question: ... Answer:' "
                "transcript. --raw continues your text as is; an instruction-tuned GGUF (-it, Instruct) chats properly.")
    history: list[dict] = [{"role": "system", "content": system}] if system else []

    def reply(user_text: str) -> None:
        if raw:
            pieces = m.generate(user_text, max_new_tokens, stream=True, **gen)
        else:
            history.append({"role": "user", "content": user_text})
            pieces = m.chat(history, max_new_tokens, think=think, stream=True, **gen)
        out = []
        try:
            for piece in pieces:
                out.append(piece)
                sys.stdout.write(piece)
                sys.stdout.flush()
        except KeyboardInterrupt:
            _eprint("\n[stopped]")
        sys.stdout.write("\n")
        if not raw:
            history.append({"role": "assistant", "content": "".join(out)})
        _eprint(f"[{m.stats.line()}]")

    if prompt is not None:
        reply(prompt)
        return
    interactive = sys.stdin.isatty()
    if interactive:
        _eprint("ktx chat: type a message; /reset forgets the conversation, /exit quits. Ctrl-C stops a reply.")
    while True:
        try:
            line = input("> " if interactive else "")
        except (EOFError, KeyboardInterrupt):
            break
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            history[:] = history[:1] if system else []
            _eprint("[conversation reset]")
            continue
        reply(text)


@app.command()
def profile(
    model: Optional[Path] = ModelOpt,
    out: Path = typer.Option(..., "--out", "-o", help="Where to write the routing profile (JSON)."),
    prompt_file: Optional[Path] = typer.Option(None, "--prompt-file", "-f", help="Text to route (default: a built-in mixed text)."),
    cache_len: int = CacheLenOpt,
):
    """Record how often each expert of each MoE layer is chosen on a text, for --gpu-experts N."""
    import ktx
    from ktx.placement import save_profile

    text = prompt_file.read_text(encoding="utf-8") if prompt_file else PROFILE_TEXT
    m = ktx.load(model or _default_model(), cache_len=cache_len, experts="reference")
    if not hasattr(m.net, "routing_counts"):
        raise KtxError(f"{m.gguf.path}: this architecture has no routed experts to profile")
    ids = m.tokenizer.encode(text)[: cache_len]
    m.net.routing_counts = {}
    m.logits(ids)
    save_profile(out, m.net.routing_counts, m.gguf.path)
    _eprint(f"wrote {out}: expert counts of {len(m.net.routing_counts)} MoE layers over {len(ids)} tokens")


PROFILE_TEXT = """The history of science is the study of the development of science and scientific knowledge.
def quicksort(xs):\n    return xs if len(xs) < 2 else quicksort([x for x in xs[1:] if x < xs[0]]) + [xs[0]]
Bonjour, comment allez-vous? Das Wetter ist heute schön. 今天天气很好。 2 + 2 = 4; e^(i*pi) + 1 = 0.
"""


@app.command()
def convert(
    hf_dir: Path = typer.Argument(..., help="Hugging Face checkpoint folder (config.json, *.safetensors, tokenizer files)."),
    out: Path = typer.Argument(..., help="Output .gguf path."),
    outtype: str = typer.Option("bf16", "--outtype", help="Tensor type: f32, f16, bf16 or q8_0 (norms and routers stay f32)."),
):
    """Convert a Hugging Face checkpoint to GGUF with llama.cpp's tensor names and metadata."""
    from ktx.convert import convert_hf_to_gguf

    path = convert_hf_to_gguf(hf_dir, out, outtype, progress=True)
    _eprint(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")


def _counts(opt: str, text: str) -> list[int]:
    """'128,512' -> [128, 512] (llama-bench's comma sweeps)."""
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise KtxError(f"{opt} {text!r}: give token counts separated by commas, like 128,512") from None


@app.command()
def bench(
    model: Optional[Path] = ModelOpt,
    synthetic: Optional[str] = typer.Option(None, "--synthetic", help="Benchmark a synthetic Q4_K_M model with random weights: "
                                            "DeepSeek-V3-shaped (dsv3-tiny, dsv3-bench) or Qwen3-MoE-shaped (qwen3-tiny, qwen3-bench); "
                                            "written once and cached under ~/.cache/ktx (KTX_CACHE)."),
    n_prompt: str = typer.Option("512", "-p", "--n-prompt", help="Prompt lengths to prefill, comma-separated (0 = no prefill test)."),
    n_gen: str = typer.Option("128", "-n", "--n-gen", help="Tokens to decode, comma-separated (0 = no decode test)."),
    depth: str = typer.Option("0", "-d", "--depth", help="Context depths: tokens already in the KV cache before each test, comma-separated."),
    reps: int = typer.Option(5, "-r", "--repetitions", help="Repetitions of each test (after one warm-up)."),
    cpu_threads: Optional[int] = ThreadsOpt,
    experts: str = ExpertsOpt,
    cpu_moe: bool = CpuMoeOpt,
    gpu_experts: int = GpuExpertsOpt,
    routing_profile: Optional[Path] = ProfileOpt,
    override_tensor: Optional[list[str]] = OverrideOpt,
    placement: Optional[Path] = PlacementOpt,
    experts_per_token: Optional[int] = ExpertsPerTokenOpt,
    numa_shards: Optional[int] = NumaOpt,
    device: Optional[str] = DeviceOpt,
    decode_program: bool = typer.Option(True, "--decode-program/--per-op-decode",
                                        help="Decode each token as one compiled program (the default on the CPU), or "
                                             "op by op from Python (to compare the two)."),
    output: str = typer.Option("md", "--output", "-o", help="md (markdown table) or json."),
):
    """Measure prefill (pp) and decode (tg) speed like llama-bench, with the GB/s of weights decode reads and the
    DRAM read bandwidth measured in the same run (the roofline)."""
    from ktx.bench import run_bench

    if output not in ("md", "json"):
        raise KtxError(f"--output {output!r}: choose md or json")
    if (model is None) == (synthetic is None):
        raise KtxError("give exactly one of --model PATH.gguf or --synthetic NAME (dsv3-tiny, dsv3-bench, qwen3-tiny, qwen3-bench)")
    name = None
    if synthetic is not None:
        from ktx.synthetic import synthetic_model

        model, name = synthetic_model(synthetic, progress=sys.stderr.isatty()), f"synthetic {synthetic}"
    report = run_bench(model, n_prompt=_counts("-p", n_prompt), n_gen=_counts("-n", n_gen), depths=_counts("-d", depth) or [0],
                       reps=reps, threads=cpu_threads, experts=experts, model_name=name,
                       log=lambda msg: _eprint(f"ktx bench: {msg}") if sys.stderr.isatty() else None,
                       decode_program=decode_program,
                       **_load_kwargs(cpu_moe, gpu_experts, routing_profile, override_tensor, placement, experts_per_token, numa_shards, device))
    print(report.to_json() if output == "json" else report.to_markdown())


@app.command()
def serve(
    model: Optional[Path] = ModelOpt,
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind; 0.0.0.0 exposes the server to the network."),
    port: int = typer.Option(8080, "--port", help="TCP port."),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="KTX_API_KEY", help="Require 'Authorization: Bearer KEY' on /v1 requests."),
    model_id: Optional[str] = typer.Option(None, "--model-id", help="Model name clients send (default: the file name without .gguf)."),
    cache_len: int = CacheLenOpt,
    cpu_threads: Optional[int] = ThreadsOpt,
    experts: str = ExpertsOpt,
    cpu_moe: bool = CpuMoeOpt,
    gpu_experts: int = GpuExpertsOpt,
    routing_profile: Optional[Path] = ProfileOpt,
    override_tensor: Optional[list[str]] = OverrideOpt,
    placement: Optional[Path] = PlacementOpt,
    experts_per_token: Optional[int] = ExpertsPerTokenOpt,
    numa_shards: Optional[int] = NumaOpt,
    device: Optional[str] = DeviceOpt,
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Print load details and each request."),
):
    """Serve the model over an OpenAI-compatible HTTP API: /v1/chat/completions, /v1/completions (SSE streaming too),
    /v1/models, /health. Requests run one at a time, in arrival order."""
    try:
        from ktx.server import serve as run_server
    except ImportError as e:
        raise KtxError(f"ktx serve needs FastAPI and uvicorn ({e}); install them with: pip install 'ktx[serve]'") from None
    run_server(model or _default_model(), host=host, port=port, api_key=api_key, model_id=model_id, cache_len=cache_len,
               threads=cpu_threads, experts=experts, verbose=verbose,
               **_load_kwargs(cpu_moe, gpu_experts, routing_profile, override_tensor, placement, experts_per_token, numa_shards, device))


@app.command("inspect")
def inspect_cmd(
    path: Path = typer.Argument(..., help="GGUF file, any part of a split model, or a folder holding one."),
    cache_len: int = typer.Option(4096, "--cache-len", "-c", help="KV cache capacity to plan for, in tokens."),
    output: str = typer.Option("table", "--output", "-o", help="table or json."),
):
    """Show a model's architecture, parameter count, tensor types and sizes, and its memory plan (RAM, VRAM,
    KV cache) for the default placement, without loading the weights."""
    from ktx.inspect import inspect_model, render

    if output not in ("table", "json"):
        raise KtxError(f"--output {output!r}: choose table or json")
    info = inspect_model(path, cache_len=cache_len)
    if output == "json":
        print(info.to_json())
    else:
        render(info)


def main() -> None:
    try:
        app(standalone_mode=False)
    except KtxError as e:
        _eprint(f"ktx: error: {e}")
        if os.environ.get("KTX_DEBUG"):
            raise
        sys.exit(1)
    except KeyboardInterrupt:
        _eprint("ktx: interrupted")
        sys.exit(130)
    except Exception as e:
        # usage errors from typer/click carry their own message and exit code
        if hasattr(e, "show") and hasattr(e, "exit_code"):
            e.show()
            sys.exit(e.exit_code)
        if type(e).__name__ in ("Exit", "Abort"):
            sys.exit(getattr(e, "exit_code", 1))
        if os.environ.get("KTX_DEBUG"):
            raise
        _eprint(f"ktx: internal error: {type(e).__name__}: {e} (set KTX_DEBUG=1 for a traceback, and please report it)")
        sys.exit(2)

if __name__ == "__main__":
    main()
