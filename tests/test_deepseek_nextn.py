"""A DeepSeek GGUF that keeps its multi-token-prediction (NextN) layer: newer llama.cpp converters count it in
block_count and say how many with `deepseek2.nextn_predict_layers`. It drafts tokens and is not part of the
forward pass, so the logits must equal those of the same file without it (the reference: that file)."""

import gguf
import numpy as np
import torch

import ktx
from ktx.synthetic import PRESETS, write_synthetic


def _with_nextn_layer(src, dst):
    """dst = src plus a copy of its last layer as an extra trailing block, declared as a NextN layer."""
    r = gguf.GGUFReader(src)
    n = int(r.fields["deepseek2.block_count"].contents())
    w = gguf.GGUFWriter(dst, "deepseek2")
    for name, field in r.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        value = n + 1 if name == "deepseek2.block_count" else field.contents()
        vtype = field.types[0]
        if vtype == gguf.GGUFValueType.ARRAY:
            w.add_key_value(name, value, vtype, sub_type=field.types[-1])
        else:
            w.add_key_value(name, value, vtype)
    w.add_uint32("deepseek2.nextn_predict_layers", 1)
    tensors = list(r.tensors) + [t for t in r.tensors if t.name.startswith(f"blk.{n - 1}.")]
    for i, t in enumerate(tensors):
        name = t.name if i < len(r.tensors) else t.name.replace(f"blk.{n - 1}.", f"blk.{n}.", 1)
        w.add_tensor(name, np.asarray(t.data), raw_shape=t.data.shape, raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


def test_nextn_layers_are_left_out_of_the_forward_pass(tmp_path):
    plain = write_synthetic(PRESETS["dsv3-tiny"], tmp_path / "plain.gguf")
    mtp = _with_nextn_layer(plain, tmp_path / "mtp.gguf")
    ids = torch.arange(6) + 3
    want = ktx.load(plain, cache_len=16, experts="reference").net
    got = ktx.load(mtp, cache_len=16, experts="reference").net
    assert got.cfg.n_layers == want.cfg.n_layers
    np.testing.assert_array_equal(got.forward(ids, got.new_cache(16)).numpy(), want.forward(ids, want.new_cache(16)).numpy())


def test_nextn_layers_are_not_counted_as_read_per_token(tmp_path):
    from ktx.bench import touched_bytes_per_token
    from ktx.gguf_file import GGUFModel

    plain = write_synthetic(PRESETS["dsv3-tiny"], tmp_path / "plain.gguf")
    mtp = _with_nextn_layer(plain, tmp_path / "mtp.gguf")
    assert touched_bytes_per_token(GGUFModel(mtp)) == touched_bytes_per_token(GGUFModel(plain))
