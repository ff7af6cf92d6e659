"""Where each tensor lives: ordered rules `regex over the GGUF tensor name -> device`, first match wins.

The idea of KTransformers' YAML rules and llama.cpp's `-ot`. Devices are `cpu` (RAM) and `gpu` (VRAM).
Rules come, in priority order, from `--override-tensor REGEX=DEVICE` flags, then a rules file (TOML:
`[[rule]]` tables with `pattern` and `device`; YAML: a list of `{pattern, device}`), then the defaults:

    with a GPU (`--cpu-moe`, the default):  blk.N.ffn_{gate,up,down}_exps -> cpu,  everything else -> gpu
    without a GPU:                          everything -> cpu

`--gpu-experts N` additionally keeps the N most used experts of every MoE layer on the GPU, chosen from a
routing profile (per-layer expert counts that `ktx profile` records). The plan (bytes per device plus the
KV cache) is printed before loading and checked against the machine's memory.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ktx.errors import KtxError

DEVICES = ("cpu", "gpu")
EXPERT_RE = r"\.ffn_(gate|up|down)_exps\."


@dataclass(frozen=True)
class Rule:
    pattern: str
    device: str

    def __post_init__(self):
        if self.device not in DEVICES:
            raise KtxError(f"placement rule {self.pattern!r}: device {self.device!r} is not one of {', '.join(DEVICES)}")
        try:
            re.compile(self.pattern)
        except re.error as e:
            raise KtxError(f"placement rule {self.pattern!r}: bad regular expression ({e})") from None


def parse_override(text: str) -> Rule:
    """'REGEX=DEVICE' (as llama.cpp's -ot)."""
    pattern, sep, device = text.rpartition("=")
    if not sep or not pattern:
        raise KtxError(f"--override-tensor {text!r}: expected REGEX=DEVICE, e.g. 'blk\\.[0-3]\\.ffn_.*_exps=gpu'")
    return Rule(pattern, device.strip().lower().replace("cuda", "gpu"))


def load_rules(path: str | Path) -> list[Rule]:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise KtxError(f"{p}: cannot read placement rules ({e.strerror})") from None
    try:
        if p.suffix in (".yaml", ".yml"):
            import yaml

            items = yaml.safe_load(text) or []
        else:
            import tomllib

            items = tomllib.loads(text).get("rule", [])
        return [Rule(str(it["pattern"]), str(it["device"]).lower()) for it in items]
    except KtxError:
        raise
    except Exception as e:
        raise KtxError(f"{p}: bad placement rules ({type(e).__name__}: {e}); expected [[rule]] tables with pattern and device") from None


def default_rules(has_gpu: bool, cpu_moe: bool = True) -> list[Rule]:
    if not has_gpu:
        return [Rule(".*", "cpu")]
    return ([Rule(EXPERT_RE, "cpu")] if cpu_moe else []) + [Rule(".*", "gpu")]


def kv_bytes_per_token(cfg) -> int:
    """Bytes the float32 KV cache holds per token over all layers: MLA's latent (kv_lora + rope) or GQA's K and V."""
    if hasattr(cfg, "kv_lora_rank"):
        return cfg.n_layers * (cfg.kv_lora_rank + cfg.qk_rope) * 4
    return cfg.n_layers * cfg.n_kv_heads * (cfg.head_dim + cfg.v_head_dim) * 4


def assign(names, rules: list[Rule]) -> dict[str, str]:
    compiled = [(re.compile(r.pattern), r.device) for r in rules]
    out = {}
    for name in names:
        out[name] = next((dev for rx, dev in compiled if rx.search(name)), "cpu")
    return out


@dataclass
class Plan:
    bytes: dict = field(default_factory=lambda: {d: 0 for d in DEVICES})
    kv_bytes: int = 0
    kv_device: str = "cpu"
    hot_expert_bytes: int = 0
    devices: dict = field(default_factory=dict)  # tensor name -> device

    def line(self) -> str:
        gib = 1 << 30
        parts = [f"RAM {self.bytes['cpu'] / gib:.2f} GiB", f"VRAM {self.bytes['gpu'] / gib:.2f} GiB"]
        parts.append(f"KV cache {self.kv_bytes / gib:.3f} GiB on {self.kv_device}")
        if self.hot_expert_bytes:
            parts.append(f"hot experts {self.hot_expert_bytes / gib:.2f} GiB on gpu")
        return "placement: " + ", ".join(parts)


def make_plan(gguf, rules: list[Rule], kv_bytes: int, has_gpu: bool, hot_experts: int = 0, n_expert: int = 0) -> Plan:
    plan = Plan(kv_bytes=kv_bytes, kv_device="gpu" if has_gpu else "cpu")
    plan.devices = assign(gguf.tensors, rules)
    for name, dev in plan.devices.items():
        nbytes = gguf.tensors[name].n_bytes
        if hot_experts and n_expert and has_gpu and re.search(EXPERT_RE, name) and dev == "cpu":
            hot = nbytes * min(hot_experts, n_expert) // n_expert  # copies of the hottest experts on the GPU
            plan.hot_expert_bytes += hot
            plan.bytes["gpu"] += hot
        plan.bytes[dev] += nbytes
    plan.bytes[plan.kv_device] += kv_bytes
    return plan


def check_fits(plan: Plan, ram_total: int, vram_free: int | None) -> None:
    gib = 1 << 30
    if plan.bytes["gpu"] and vram_free is not None and plan.bytes["gpu"] > vram_free:
        raise KtxError(f"the plan needs {plan.bytes['gpu'] / gib:.1f} GiB of VRAM but {vram_free / gib:.1f} GiB is free: "
                       "keep experts on the CPU (--cpu-moe), lower --gpu-experts, or shrink --cache-len")
    if plan.bytes["gpu"] and vram_free is None:
        raise KtxError("the placement puts tensors on the GPU but no GPU is visible to torch; drop the gpu rules")
    if plan.bytes["cpu"] > ram_total:
        raise KtxError(f"the plan needs {plan.bytes['cpu'] / gib:.1f} GiB of RAM but this machine has {ram_total / gib:.1f} GiB: "
                       "use a smaller quantization (e.g. Q4_K_M), move tensors to the GPU with --override-tensor, or shrink --cache-len")


# -- hot experts from a routing profile ------------------------------------------------------------------
def save_profile(path: str | Path, counts: dict[int, np.ndarray], model_path: str) -> None:
    data = {"model": str(model_path), "layers": {str(i): c.astype(int).tolist() for i, c in sorted(counts.items())}}
    Path(path).write_text(json.dumps(data))


def hot_expert_masks(profile: str | Path | None, net, n: int) -> dict[int, np.ndarray]:
    """layer -> bool [E]: the n most-routed experts of each MoE layer according to the profile."""
    if profile is None:
        raise KtxError("--gpu-experts needs a routing profile: record one with `ktx profile -m MODEL -o profile.json`, then pass --routing-profile profile.json")
    try:
        layers = json.loads(Path(profile).read_text())["layers"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise KtxError(f"{profile}: not a ktx routing profile ({type(e).__name__}); record one with `ktx profile`") from None
    masks = {}
    for i in net.experts:
        counts = np.asarray(layers.get(str(i), []), dtype=np.int64)
        if counts.shape != (net.cfg.n_expert,):
            raise KtxError(f"{profile}: layer {i} has {counts.size} expert counts, the model has {net.cfg.n_expert}; record the profile on this model")
        mask = np.zeros(net.cfg.n_expert, bool)
        mask[np.argsort(-counts, kind="stable")[: min(n, net.cfg.n_expert)]] = True
        masks[i] = mask
    return masks
