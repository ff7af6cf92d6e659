"""`ktx inspect PATH`: what a GGUF model is and whether it fits, read from the file without loading weights.

Reports
- the architecture and its shape (from the metadata, through the architecture's config class),
- parameters: total, routed experts (`blk.N.ffn_{gate,up,down}_exps`), the rest, and active per token
  (the rest + n_expert_used / n_expert of the experts),
- tensor types: count, parameters and bytes per GGML type,
- the KV cache: bytes per token and for `--cache-len` tokens. ktx keeps DeepSeek's MLA cache in latent
  form, float32: per layer and token kv_c (kv_lora_rank) + k_pe (rope dims) values,
- the memory plan of the default placement (`ktx.placement`): routed experts in RAM, everything else
  and the KV cache in VRAM when torch sees a GPU; all in RAM otherwise.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ktx.errors import KtxError
from ktx.gguf_file import GGUFModel
from ktx.placement import kv_bytes_per_token



@dataclass
class TypeRow:
    type: str
    tensors: int
    params: int
    bytes: int


@dataclass
class Inspection:
    path: str
    files: list[str]
    architecture: str
    name: str
    shape: dict  # config fields: layers, hidden, heads, experts, ...
    params: int
    expert_params: int
    active_params: int  # per token
    bytes: int
    expert_bytes: int
    types: list[TypeRow]
    kv_bytes_per_token: int | None
    cache_len: int
    has_gpu: bool
    plan: dict = field(default_factory=dict)  # device -> bytes (weights + KV cache), "kv_device"

    @property
    def kv_bytes(self) -> int | None:
        return None if self.kv_bytes_per_token is None else self.kv_bytes_per_token * self.cache_len

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "kv_bytes": self.kv_bytes}, indent=2)


def _config(gguf: GGUFModel):
    from ktx.models import model_class

    try:
        cls = model_class(gguf.architecture, str(gguf.path))
        return cls.config_class.from_gguf(gguf.metadata, str(gguf.path))
    except KtxError:
        return None  # an architecture ktx cannot run: the tensor tables are still worth showing


def _has_gpu() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def inspect_model(path: str | Path, cache_len: int = 4096, has_gpu: bool | None = None) -> Inspection:
    from ktx import placement

    if cache_len < 1:
        raise KtxError(f"--cache-len must be >= 1, got {cache_len}")
    gguf = GGUFModel(path)
    cfg = _config(gguf)
    expert_re = re.compile(placement.EXPERT_RE)
    types: dict[str, TypeRow] = {}
    params = expert_params = n_bytes = expert_bytes = 0
    for t in gguf.tensors.values():
        row = types.setdefault(t.type_name, TypeRow(t.type_name, 0, 0, 0))
        row.tensors += 1
        row.params += t.n_elements
        row.bytes += t.n_bytes
        params += t.n_elements
        n_bytes += t.n_bytes
        if expert_re.search(t.name):
            expert_params += t.n_elements
            expert_bytes += t.n_bytes
    n_expert, n_used = getattr(cfg, "n_expert", 0), getattr(cfg, "n_expert_used", 0)
    active = params - expert_params + (expert_params * n_used // n_expert if n_expert else expert_params)
    has_gpu = _has_gpu() if has_gpu is None else has_gpu
    kv_tok = kv_bytes_per_token(cfg) if cfg is not None else None
    plan = placement.make_plan(gguf, placement.default_rules(has_gpu), (kv_tok or 0) * cache_len, has_gpu)
    shape = {k: v for k, v in vars(cfg).items() if isinstance(v, (int, float, str))} if cfg is not None else {}
    return Inspection(
        path=str(gguf.path), files=[str(p) for p in gguf.parts], architecture=gguf.architecture,
        name=str(gguf.get("general.name", Path(gguf.path).stem)), shape=shape, params=params,
        expert_params=expert_params, active_params=active, bytes=n_bytes, expert_bytes=expert_bytes,
        types=sorted(types.values(), key=lambda r: -r.bytes), kv_bytes_per_token=kv_tok, cache_len=cache_len,
        has_gpu=has_gpu, plan={"ram": plan.bytes["cpu"], "vram": plan.bytes["gpu"], "kv_device": plan.kv_device},
    )


def _size(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def _count(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return str(n)


def render(info: Inspection, console=None) -> None:
    """Print `info` as rich tables."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    model = Table(title=f"{info.name} ({info.architecture})", show_header=False, title_justify="left")
    model.add_column(style="bold")
    model.add_column()
    model.add_row("file", "\n".join(info.files))
    s = info.shape
    if s.get("n_layers"):
        model.add_row("layers", f"{s['n_layers']} ({s.get('n_dense_lead', 0)} dense)" if s.get("n_expert") else str(s["n_layers"]))
        model.add_row("hidden / heads", f"{s['hidden']} / {s['n_heads']}")
    if s.get("kv_lora_rank"):
        model.add_row("MLA", f"q_lora {s['q_lora_rank']}, kv_lora {s['kv_lora_rank']}, nope {s['qk_nope']}, "
                             f"rope {s['qk_rope']}, v {s['v_head']}")
    if s.get("n_expert"):
        model.add_row("experts", f"{s['n_expert']} routed ({s['n_expert_used']} per token) + {s['n_shared']} shared, "
                                 f"FFN {s['moe_ffn']}")
    if s.get("vocab_size"):
        model.add_row("vocab / context", f"{s['vocab_size']} / {s.get('context_length', '?')}")
    model.add_row("parameters", f"{_count(info.params)} total, {_count(info.active_params)} active per token")
    model.add_row("routed experts", f"{_count(info.expert_params)} params, {_size(info.expert_bytes)}")
    model.add_row("everything else", f"{_count(info.params - info.expert_params)} params, {_size(info.bytes - info.expert_bytes)}")
    console.print(model)

    types = Table(title="tensor types", title_justify="left")
    for col in ("type", "tensors", "parameters", "bytes", "share"):
        types.add_column(col, justify="left" if col == "type" else "right")
    for r in info.types:
        types.add_row(r.type, str(r.tensors), _count(r.params), _size(r.bytes), f"{100 * r.bytes / info.bytes:.1f}%")
    types.add_row("total", str(sum(r.tensors for r in info.types)), _count(info.params), _size(info.bytes), "100%", style="bold")
    console.print(types)

    plan = Table(title=f"memory plan: default placement, {'GPU found' if info.has_gpu else 'no GPU: all in RAM'}, "
                       f"--cache-len {info.cache_len}", title_justify="left")
    for col in ("", "RAM", "VRAM"):
        plan.add_column(col, justify="left" if not col else "right")
    kv = info.kv_bytes or 0
    on_gpu = info.plan["kv_device"] == "gpu"
    plan.add_row("weights", _size(info.plan["ram"] - (0 if on_gpu else kv)), _size(info.plan["vram"] - (kv if on_gpu else 0)))
    kv_note = "unknown" if info.kv_bytes is None else _size(kv)
    plan.add_row(f"KV cache ({_size(info.kv_bytes_per_token or 0)}/token)" if info.kv_bytes_per_token else "KV cache",
                 "" if on_gpu else kv_note, kv_note if on_gpu else "")
    plan.add_row("total", _size(info.plan["ram"]), _size(info.plan["vram"]), style="bold")
    console.print(plan)
