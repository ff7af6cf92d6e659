"""Placement rules, the memory plan and its checks, against direct computation from gguf-py."""

import gguf
import pytest

from ktx.errors import KtxError
from ktx.gguf_file import GGUFModel
from ktx.placement import Rule, assign, check_fits, default_rules, load_rules, make_plan, parse_override


def test_first_matching_rule_wins():
    rules = [parse_override(r"blk\.0\.ffn_.*_exps=gpu"), *default_rules(has_gpu=True)]
    got = assign(["blk.0.ffn_up_exps.weight", "blk.1.ffn_up_exps.weight", "blk.1.attn_q_a.weight"], rules)
    assert got == {"blk.0.ffn_up_exps.weight": "gpu", "blk.1.ffn_up_exps.weight": "cpu", "blk.1.attn_q_a.weight": "gpu"}
    assert set(assign(["a", "blk.3.ffn_down_exps.weight"], default_rules(has_gpu=False)).values()) == {"cpu"}


def test_bad_rules_are_clear_errors(tmp_path):
    for text in ["nodevice", "x=tpu", "([=cpu"]:
        with pytest.raises(KtxError):
            parse_override(text)
    f = tmp_path / "rules.toml"
    f.write_text('[[rule]]\npattern = "exps"\ndevice = "cpu"\n[[rule]]\npattern = ".*"\ndevice = "gpu"\n')
    assert load_rules(f) == [Rule("exps", "cpu"), Rule(".*", "gpu")]
    f.write_text("[[rule]]\npattern = 3\n")
    with pytest.raises(KtxError, match="rules.toml"):
        load_rules(f)


def test_plan_bytes_match_the_file(tiny_dsv3):
    path = tiny_dsv3 / "tiny-dsv3-Q4_K_M.gguf"
    r = gguf.GGUFReader(path)
    experts = sum(int(t.n_bytes) for t in r.tensors if "_exps." in t.name)
    total = sum(int(t.n_bytes) for t in r.tensors)
    plan = make_plan(GGUFModel(path), default_rules(has_gpu=True), kv_bytes=1000, has_gpu=True)
    assert plan.bytes["cpu"] == experts and plan.bytes["gpu"] == total - experts + 1000
    with pytest.raises(KtxError, match="VRAM"):
        check_fits(plan, ram_total=1 << 40, vram_free=total // 2)
    with pytest.raises(KtxError, match="RAM"):
        check_fits(make_plan(GGUFModel(path), default_rules(False), 0, False), ram_total=experts // 2, vram_free=None)
