"""Hostile GGUF files: every damaged file loads (and then agrees with gguf-py) or raises one KtxError line.

The base file is written by gguf-py's GGUFWriter; tests/gguf_mutants.py damages it field by field or
byte by byte. Each load runs under a 5 s timer and a 16 MiB cap on traced allocations (numpy reports
its buffers to tracemalloc), and the named worst cases run again in a child process whose address
space is capped. The long run (10,000 examples) is bench/fuzz_gguf.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tracemalloc
from pathlib import Path

import gguf
import numpy as np
import pytest
from hypothesis import example, given, settings, strategies as st

import gguf_mutants as gm
from ktx.errors import KtxError
from ktx.gguf_file import GGUFModel

MAX_TRACED_BYTES = 16 << 20
LOAD_SECONDS = 5.0
KTX = Path(sys.executable).with_name("ktx")

# tensor indices in gm.TENSORS: t0 f32 [3, 8], t1 f16, t2 bf16, t3 q8_0 [2, 64], t4 q4_k, t5 i8, t6 experts
# kv indices: kv0 general.architecture, kv1 general.alignment, kv2 general.name, ..., kv14 tokens, kv15 scores


class LoadTimeout(Exception):
    pass


def _on_alarm(signum, frame):
    raise LoadTimeout(f"GGUF load ran over {LOAD_SECONDS} s")


@pytest.fixture(scope="module", autouse=True)
def _alarm():
    old = signal.signal(signal.SIGALRM, _on_alarm)
    yield
    signal.signal(signal.SIGALRM, old)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("gguf_fuzz")


@pytest.fixture(scope="module")
def base(work) -> bytes:
    return gm.write_base_gguf(work / "base.gguf").read_bytes()


def _load(path: Path):
    """GGUFModel(path) under the timer and allocation cap -> (model, None) or (None, KtxError message)."""
    tracemalloc.start()
    signal.setitimer(signal.ITIMER_REAL, LOAD_SECONDS)
    try:
        return GGUFModel(path), None
    except KtxError as e:
        return None, str(e)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak < MAX_TRACED_BYTES, f"loading {path} allocated {peak} bytes"


def _check(path: Path, data: bytes):
    """Write `data`, load it: a load must agree with gguf-py; an error must be one line naming the file."""
    path.write_bytes(data)
    model, msg = _load(path)
    if model is not None:
        why = gm.check_against_reference(path, model)
        assert why is None, why
    else:
        assert str(path) in msg and "\n" not in msg, msg
    return model, msg


def test_hand_layout_matches_gguf_writer(base):
    assert gm.pack(gm.base_segments()) == base


def test_base_file_agrees_with_gguf_py(work, base):
    model, msg = _check(work / "ok.gguf", base)
    assert model is not None, msg
    assert model.architecture == "fuzz" and model.metadata["tokenizer.ggml.tokens"][3] == "\u00e9t\u00e9"
    assert set(model.tensors) == {name for name, _, _ in gm.TENSORS}


@settings(max_examples=300, deadline=None)
@given(rng=st.randoms(use_true_random=False))
def test_structured_field_corruption(work, rng):
    segs = gm.base_segments()
    for _ in range(rng.randrange(1, 4)):
        segs = gm.corrupt_field(segs, rng)
    _check(work / "field.gguf", gm.pack(segs))


@settings(max_examples=200, deadline=None)
@given(flips=st.lists(st.tuples(st.integers(0, 1631), st.integers(1, 255)), min_size=1, max_size=8))
def test_byte_flips(work, base, flips):
    b = bytearray(base)
    for pos, xor in flips:
        b[pos % len(b)] ^= xor
    _check(work / "flip.gguf", bytes(b))


@settings(max_examples=200, deadline=None)
@given(pos=st.integers(0, 1631), width=st.sampled_from([4, 8]),
       value=st.sampled_from([2**31, 2**32 - 1, 2**60, 2**62, 2**63, 2**64 - 1]) | st.integers(0, 2**64 - 1))
@example(pos=768, width=4, value=64)  # found by a full-suite run: a BF16 tensor [0, 2**62 + 16]: 0 bytes, yet a 2**63-byte row
def test_huge_count_anywhere(work, base, pos, width, value):
    pos = min(pos, len(base) - width)
    _check(work / "huge.gguf", base[:pos] + (value % 2 ** (8 * width)).to_bytes(width, "little") + base[pos + width:])


@settings(max_examples=200, deadline=None)
@given(rng=st.randoms(use_true_random=False))
def test_stacked_mutations(work, rng):
    _check(work / "stacked.gguf", gm.mutate(gm.base_segments(), rng))


def test_truncated_at_every_byte(work, base):
    ref = gguf.GGUFReader(work / "base.gguf")
    data_end = max(t.data_offset + t.n_bytes for t in ref.tensors)  # after it, only padding
    for n in range(len(base)):
        model, msg = _check(work / "cut.gguf", base[:n])
        assert (model is not None) == (n >= data_end), (n, msg)


def _set(**fields):
    """A mutation of the base layout: label=value for each field; bytes values also fix the length field."""
    def build(segs):
        for label, value in fields.items():
            label = label.replace("__", ".")
            gm.seg(segs, label)[2] = value
            if isinstance(value, bytes) and any(s[0] == label + ".len" for s in segs):
                gm.seg(segs, label + ".len")[2] = len(value)
        return gm.pack(segs)
    return build


def _data_size(segs) -> int:
    return sum(len(v) for label, _, v in segs if label.startswith("t") and label.endswith((".data", ".pad")))


def _alignment_as_u64(segs):
    gm.seg(segs, "kv1.type")[2] = gm.U64
    gm.seg(segs, "kv1.value")[1] = "<Q"
    return gm.pack(segs)


def _zeros_after_infos(segs):
    """Claim 2**20 tensors, then 25 MB of zeros: each 24 zero bytes read as a tensor named ''."""
    gm.seg(segs, "n_tensors")[2] = 2**20
    head = segs[: segs.index(gm.seg(segs, "infos.pad"))]
    return gm.pack(head) + bytes(25 << 20)


# name -> (mutation of the base layout, a fragment the error message must hold)
HOSTILE = {
    "zero_length": (lambda segs: b"", "empty file"),
    "wrong_magic": (_set(magic=b"GGML"), "not a GGUF file"),
    "magic_only": (lambda segs: b"GGUF", "shorter than the 24-byte header"),
    "version_1": (_set(version=1), "version 1 is not supported"),
    "version_4": (_set(version=4), "version 4 is not supported"),
    "version_max": (_set(version=2**32 - 1), "not supported"),
    "big_endian": (_set(version=3 << 24), "big-endian"),
    "kv_count_2^62": (_set(n_kv=2**62), "key/value count is 4611686018427387904"),
    "kv_count_2^64-1": (_set(n_kv=2**64 - 1), "key/value count"),
    "tensor_count_2^62": (_set(n_tensors=2**62), "tensor count is 4611686018427387904"),
    "tensor_count_plus_one": (_set(n_tensors=len(gm.TENSORS) + 1), "overlaps"),  # tensor #7 is read from the padding
    "tensor_count_over_limit": (lambda segs: _set(n_tensors=2**20 + 1)(segs) + bytes(25 << 20), "above ktx's limit of 1048576"),
    "zeros_as_tensor_infos": (_zeros_after_infos, "tensor '' appears twice"),
    "string_array_over_limit": (lambda segs: _set(kv14__count=2**22 + 1)(segs) + bytes(33 << 20), "above ktx's limit of 4194304"),
    "key_length_2^60": (_set(kv3__key__len=2**60), "length of key #3 is 1152921504606846976"),
    "string_length_2^60": (_set(kv2__value__len=2**60), "length of value of 'general.name'"),
    "string_array_count_2^62": (_set(kv14__count=2**62), "'tokenizer.ggml.tokens' length is 4611686018427387904"),
    "f32_array_count_2^62": (_set(kv15__count=2**62), "'tokenizer.ggml.scores' length is"),
    "token_length_2^60": (_set(kv14__item1__len=2**60), "'tokenizer.ggml.tokens'[1]"),
    "unknown_value_type": (_set(kv2__type=13), "unknown value type 13"),
    "value_type_max": (_set(kv2__type=2**32 - 1), "unknown value type"),
    "unknown_array_item_type": (_set(kv15__item_type=13), "unsupported item type 13"),
    "nested_array": (_set(kv15__item_type=gm.ARRAY), "unsupported item type 9"),
    "non_utf8_key": (_set(kv2__key=b"general.n\xffme"), "key #2 at byte"),
    "non_utf8_value": (_set(kv2__value=b"fuzz \xc3("), "'general.name' at byte"),
    "non_utf8_token": (_set(kv14__item2=b"\xed\xa0\x80"), "'tokenizer.ggml.tokens'[2] at byte"),
    "non_utf8_tensor_name": (_set(t1__name=b"f\x80"), "name of tensor #1"),
    "n_dims_1000": (_set(t0__n_dims=1000), "1000 dimensions"),
    "n_dims_5": (_set(t0__n_dims=5), "5 dimensions"),
    "dims_product_overflows": (_set(t0__dim0=2**32, t0__dim1=2**32), "overflows 64 bits"),
    "dim_2^63": (_set(t6__dim2=2**63), "overflows 64 bits"),
    "dims_past_the_file": (_set(t0__dim0=2**30, t0__dim1=2**30), "runs past the end of the file"),
    "tensor_type_99": (_set(t0__type=99), "unknown type id 99"),
    "tensor_type_removed_q4_2": (_set(t0__type=4), "unknown type id 4"),
    "tensor_type_max": (_set(t0__type=2**32 - 1), "unknown type id 4294967295"),
    "row_not_multiple_of_block": (_set(t3__dim0=48), "not a multiple of Q8_0's block size 32"),
    "offset_past_end": (lambda segs: _set(t0__offset=_data_size(segs))(segs), "runs past the end of the file"),
    "offset_2^64-32": (_set(t0__offset=2**64 - 32), "runs past the end of the file"),
    "misaligned_offset": (lambda segs: _set(t1__offset=gm.seg(segs, "t1.offset")[2] + 1)(segs), "not a multiple of the alignment 32"),
    "overlapping_tensors": (_set(t1__offset=0), "overlaps the data of tensor"),
    "alignment_0": (_set(kv1__value=0), "general.alignment must be"),
    "alignment_3": (_set(kv1__value=3), "general.alignment must be"),
    "alignment_u64": (_alignment_as_u64, "general.alignment must be"),
    "duplicate_key": (_set(kv3__key=b"general.name"), "'general.name' appears twice"),
    "duplicate_tensor": (_set(t1__name=b"f32"), "tensor 'f32' appears twice"),
    "truncated_in_tensor_data": (lambda segs: gm.pack(segs)[:-300], "the file is truncated"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_file_names_file_and_problem(work, case):
    build, fragment = HOSTILE[case]
    path = work / f"{case}.gguf"
    model, msg = _check(path, build(gm.base_segments()))
    assert model is None, f"{case} loaded"
    assert fragment in msg, msg


CHILD = """
import json, resource, sys
from ktx.errors import KtxError
from ktx.gguf_file import GGUFModel
vm = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmSize:"))
resource.setrlimit(resource.RLIMIT_AS, (vm + (256 << 20), resource.RLIM_INFINITY))
out = []
for p in sys.argv[1:]:
    try:
        GGUFModel(p)
        out.append("loaded")
    except KtxError:
        out.append("KtxError")
    except BaseException as e:
        out.append(type(e).__name__)
print(json.dumps(out))
"""


def test_hostile_files_under_an_address_space_cap(work):
    """The same files in a child whose address space is capped 256 MiB above its start: no giant allocation."""
    paths = []
    for case, (build, _) in sorted(HOSTILE.items()):
        paths.append(work / f"capped-{case}.gguf")
        paths[-1].write_bytes(build(gm.base_segments()))
    res = subprocess.run([sys.executable, "-c", CHILD, *map(str, paths)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout) == ["KtxError"] * len(paths)


def test_cli_prints_one_error_line(work):
    segs = gm.base_segments()
    (work / "cli-not-gguf.gguf").write_text("hello, I am a text file\n")
    (work / "cli-truncated.gguf").write_bytes(gm.pack(segs)[:700])
    gm.write_base_gguf(work / "cli-foo.gguf", arch="foo")
    (work / "cli-type99.gguf").write_bytes(_set(t0__type=99)(gm.base_segments("deepseek2")))
    cases = {  # file -> a fragment of the error line
        work / "cli-missing.gguf": "no such file",
        work / "cli-not-gguf.gguf": "not a GGUF file",
        work / "cli-truncated.gguf": "truncated",
        work / "cli-foo.gguf": "architecture 'foo' is not supported",
        work / "cli-type99.gguf": "unknown type id 99",
    }
    env = {k: v for k, v in os.environ.items() if k != "KTX_DEBUG"}
    procs = {p: subprocess.Popen([str(KTX), "chat", "-m", str(p), "--prompt", "hi", "-n", "2"], env=env,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for p in cases}
    for path, proc in procs.items():
        _, err = proc.communicate(timeout=180)
        lines = err.strip().splitlines()
        assert proc.returncode == 1, (path.name, err)
        assert len(lines) == 1 and lines[0].startswith("ktx: error: "), (path.name, err)
        assert cases[path] in lines[0] and path.name in lines[0], lines[0]


def test_split_parts_join_and_refuse_a_tensor_twice(work, base):
    split = work / "split"
    split.mkdir()
    (split / "m-00001-of-00002.gguf").write_bytes(base)
    w = gguf.GGUFWriter(str(split / "m-00002-of-00002.gguf"), "fuzz")
    w.add_tensor("extra", np.arange(8, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    model = GGUFModel(split / "m-00002-of-00002.gguf")
    assert model.path.name == "m-00001-of-00002.gguf" and model.metadata["general.name"] == "fuzz model \u00fc"
    assert model.tensor("extra").data.tolist() == list(range(8)) and model.has("q4_k")
    (split / "m-00002-of-00002.gguf").write_bytes(base)
    with pytest.raises(KtxError, match="tensor 'f32' is also in m-00001-of-00002.gguf"):
        GGUFModel(split)
