"""`ktx inspect`: every number checked against a direct computation from gguf-py's GGUFReader."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import gguf
import pytest

from ktx.inspect import inspect_model

FIXTURES = Path(os.environ.get("KTX_FIXTURES", Path(__file__).resolve().parents[1].parent / "shared" / "fixtures"))


@pytest.fixture(scope="module")
def synthetic_path(tmp_path_factory):
    from ktx.synthetic import PRESETS, write_synthetic

    return write_synthetic(PRESETS["dsv3-tiny"], tmp_path_factory.mktemp("synthetic") / "dsv3-tiny.gguf")


def _paths(synthetic_path):
    paths = [synthetic_path]
    fixture = FIXTURES / "tiny-dsv3" / "tiny-dsv3-Q4_K_M.gguf"
    if fixture.exists():
        paths.append(fixture)
    return paths


def _reference(path: Path, cache_len: int) -> dict:
    r = gguf.GGUFReader(path)
    md = {k: f.contents() for k, f in r.fields.items() if not k.startswith("tokenizer.")}
    by_type_n, by_type_bytes, by_type_params = Counter(), Counter(), Counter()
    expert_bytes = expert_params = 0
    for t in r.tensors:
        name = t.tensor_type.name
        by_type_n[name] += 1
        by_type_bytes[name] += int(t.n_bytes)
        by_type_params[name] += int(t.n_elements)
        if "_exps." in t.name:
            expert_bytes += int(t.n_bytes)
            expert_params += int(t.n_elements)
    total_params = sum(by_type_params.values())
    E, k = md["deepseek2.expert_count"], md["deepseek2.expert_used_count"]
    kv_tok = md["deepseek2.block_count"] * (md["deepseek2.attention.kv_lora_rank"] + md["deepseek2.rope.dimension_count"]) * 4
    return dict(n=by_type_n, bytes=by_type_bytes, params=by_type_params, expert_bytes=expert_bytes,
                expert_params=expert_params, total_params=total_params, total_bytes=sum(by_type_bytes.values()),
                active=total_params - expert_params + expert_params * k // E, kv_tok=kv_tok, kv=kv_tok * cache_len)


@pytest.mark.parametrize("has_gpu", [False, True])
def test_numbers_match_gguf_reader(synthetic_path, has_gpu):
    for path in _paths(synthetic_path):
        ref = _reference(path, 1000)
        info = inspect_model(path, cache_len=1000, has_gpu=has_gpu)
        assert info.architecture == "deepseek2"
        assert {r.type: r.tensors for r in info.types} == dict(ref["n"])
        assert {r.type: r.bytes for r in info.types} == dict(ref["bytes"])
        assert {r.type: r.params for r in info.types} == dict(ref["params"])
        assert (info.params, info.bytes) == (ref["total_params"], ref["total_bytes"])
        assert (info.expert_params, info.expert_bytes) == (ref["expert_params"], ref["expert_bytes"])
        assert info.active_params == ref["active"]
        assert (info.kv_bytes_per_token, info.kv_bytes) == (ref["kv_tok"], ref["kv"])
        if has_gpu:  # experts in RAM; the rest and the KV cache in VRAM
            assert info.plan == {"ram": ref["expert_bytes"], "vram": ref["total_bytes"] - ref["expert_bytes"] + ref["kv"],
                                 "kv_device": "gpu"}
        else:
            assert info.plan == {"ram": ref["total_bytes"] + ref["kv"], "vram": 0, "kv_device": "cpu"}


def test_cli_table_and_json(synthetic_path):
    from typer.testing import CliRunner

    from ktx.cli import app

    runner = CliRunner()
    res = runner.invoke(app, ["inspect", str(synthetic_path), "--cache-len", "512", "--output", "json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    ref = _reference(synthetic_path, 512)
    assert data["kv_bytes"] == ref["kv"] and data["params"] == ref["total_params"]
    res = runner.invoke(app, ["inspect", str(synthetic_path)], env={"COLUMNS": "160"})
    assert res.exit_code == 0, res.output
    for needle in ("deepseek2", "Q4_K", "Q6_K", "Q5_0", "F32", "memory plan", "KV cache"):
        assert needle in res.output


def test_missing_file_is_a_clear_error(tmp_path):
    from ktx.errors import KtxError

    with pytest.raises(KtxError, match="no such file"):
        inspect_model(tmp_path / "nope.gguf")
