"""A small valid GGUF and ways to damage it: the inputs of tests/test_gguf_fuzz.py and bench/fuzz_gguf.py.

`write_base_gguf(path)` writes the file with gguf-py's GGUFWriter (the reference writer). `base_segments()`
lays out the same bytes by hand as a list of fields, so that a structured mutation can change one field
(a count, a type id, a dim, an offset, a string's bytes) and keep everything else intact:

    [label, fmt, value]   fmt = a struct format ("<I", "<Q", "<f", ...) or RAW for a bytes value
    e.g. ["n_kv", "<Q", 17], ["kv3.key.len", "<Q", 12], ["kv3.key", RAW, b"general.name"],
         ["t0.dim0", "<Q", 8], ["t0.type", "<I", 0], ["t0.offset", "<Q", 0], ["t0.data", RAW, ...]

The tests check `pack(base_segments()) == bytes written by GGUFWriter`, so the hand layout cannot drift.
Every mutator takes a `random.Random` (hypothesis hands one in through `st.randoms()`; the bench seeds one).
"""

from __future__ import annotations

import random
import struct
from pathlib import Path

import numpy as np

RAW = "raw"
ALIGN = 32

# GGUFValueType ids and the struct format of each scalar
U8, I8, U16, I16, U32, I32, F32, BOOL, STRING, ARRAY, U64, I64, F64 = range(13)
FMT = {U8: "<B", I8: "<b", U16: "<H", I16: "<h", U32: "<I", I32: "<i", F32: "<f", BOOL: "<B",
       U64: "<Q", I64: "<q", F64: "<d"}

# (key, value type, value); arrays as (ARRAY, item type, list)
KVS = [
    ("general.alignment", U32, ALIGN),
    ("general.name", STRING, "fuzz model \u00fc"),
    ("fuzz.u8", U8, 200), ("fuzz.i8", I8, -3), ("fuzz.u16", U16, 60000), ("fuzz.i16", I16, -300),
    ("fuzz.u32", U32, 4_000_000_000), ("fuzz.i32", I32, -70000), ("fuzz.f32", F32, 1.5), ("fuzz.bool", BOOL, True),
    ("fuzz.u64", U64, 2**40), ("fuzz.i64", I64, -(2**40)), ("fuzz.f64", F64, 0.25),
    ("tokenizer.ggml.tokens", (ARRAY, STRING), ["<s>", "a", "bc", "\u00e9t\u00e9"]),
    ("tokenizer.ggml.scores", (ARRAY, F32), [0.0, -1.0, -2.0, -3.5]),
    ("tokenizer.ggml.token_type", (ARRAY, I32), [3, 1, 1, 1]),
    ("fuzz.flags", (ARRAY, BOOL), [True, False, True]),
]

# (name, ggml type id, numpy-order shape of the logical tensor)
TENSORS = [
    ("f32", 0, (3, 8)),
    ("f16", 1, (2, 16)),
    ("bf16", 30, (2, 16)),
    ("q8_0", 8, (2, 64)),
    ("q4_k", 12, (1, 256)),
    ("i8", 24, (5,)),
    ("experts", 0, (2, 2, 4)),
]


def _tensor_bytes(seed: int = 0) -> dict[str, np.ndarray]:
    """Deterministic contents: typed arrays for plain types, uint8 [..., row_bytes] for block types."""
    import gguf

    rng = np.random.default_rng(seed)
    out = {}
    for name, qtype, shape in TENSORS:
        t = gguf.GGMLQuantizationType(qtype)
        if t == gguf.GGMLQuantizationType.F32:
            out[name] = rng.standard_normal(shape).astype(np.float32)
        elif t == gguf.GGMLQuantizationType.F16:
            out[name] = rng.standard_normal(shape).astype(np.float16)
        elif t == gguf.GGMLQuantizationType.I8:
            out[name] = rng.integers(-128, 128, shape).astype(np.int8)
        else:
            block, type_bytes = gguf.GGML_QUANT_SIZES[t]
            byte_shape = shape[:-1] + (shape[-1] // block * type_bytes,)
            out[name] = rng.integers(0, 256, byte_shape).astype(np.uint8)
    return out


def write_base_gguf(path: Path, arch: str = "fuzz") -> Path:
    """The base file, written by gguf-py's GGUFWriter."""
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    for key, vtype, value in KVS:
        if isinstance(vtype, tuple):
            w.add_key_value(key, value, gguf.GGUFValueType.ARRAY, sub_type=gguf.GGUFValueType(vtype[1]))
        else:
            w.add_key_value(key, value, gguf.GGUFValueType(vtype))
    data = _tensor_bytes()
    for name, qtype, _ in TENSORS:
        arr = data[name]
        raw = None if arr.dtype != np.uint8 else gguf.GGMLQuantizationType(qtype)
        w.add_tensor(name, arr, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(path)


def _string(label: str, s: str | bytes) -> list:
    b = s.encode() if isinstance(s, str) else s
    return [[f"{label}.len", "<Q", len(b)], [label, RAW, b]]


def _pad(n: int) -> int:
    return -n % ALIGN


def base_segments(arch: str = "fuzz") -> list[list]:
    """The base file as a list of [label, fmt, value] fields (see the module docstring)."""
    kvs = [("general.architecture", STRING, arch)] + KVS
    segs = [["magic", RAW, b"GGUF"], ["version", "<I", 3], ["n_tensors", "<Q", len(TENSORS)], ["n_kv", "<Q", len(kvs)]]
    for i, (key, vtype, value) in enumerate(kvs):
        segs += _string(f"kv{i}.key", key)
        if isinstance(vtype, tuple):
            item = vtype[1]
            segs += [[f"kv{i}.type", "<I", ARRAY], [f"kv{i}.item_type", "<I", item], [f"kv{i}.count", "<Q", len(value)]]
            for j, v in enumerate(value):
                segs += _string(f"kv{i}.item{j}", v) if item == STRING else [[f"kv{i}.item{j}", FMT[item], v]]
        else:
            segs.append([f"kv{i}.type", "<I", vtype])
            segs += _string(f"kv{i}.value", value) if vtype == STRING else [[f"kv{i}.value", FMT[vtype], value]]
    data, offset = _tensor_bytes(), 0
    for i, (name, qtype, shape) in enumerate(TENSORS):
        segs += _string(f"t{i}.name", name)
        segs.append([f"t{i}.n_dims", "<I", len(shape)])
        segs += [[f"t{i}.dim{d}", "<Q", n] for d, n in enumerate(reversed(shape))]
        segs += [[f"t{i}.type", "<I", qtype], [f"t{i}.offset", "<Q", offset]]
        offset += data[TENSORS[i][0]].nbytes + _pad(data[TENSORS[i][0]].nbytes)
    segs.append(["infos.pad", RAW, b"\0" * _pad(len(pack(segs)))])
    for i, (name, _, _) in enumerate(TENSORS):
        b = data[name].tobytes()
        segs += [[f"t{i}.data", RAW, b], [f"t{i}.pad", RAW, b"\0" * _pad(len(b))]]
    return segs


def pack(segs: list[list]) -> bytes:
    return b"".join(v if fmt == RAW else struct.pack(fmt, v) for _, fmt, v in segs)


def seg(segs: list[list], label: str) -> list:
    """The field called `label` (mutable: set [2] to change its value)."""
    return next(s for s in segs if s[0] == label)


def interesting_ints(rng: random.Random, bits: int, file_size: int) -> int:
    """A value that stresses a count, length, dim, type id or offset field of `bits` width."""
    pool = [0, 1, 2, 3, 4, 5, 7, 8, 9, 12, 13, 31, 32, 33, 255, 256, 1000, 2**16 - 1, 2**31 - 1, 2**31,
            2**32 - 1, 2**32, 2**60, 2**62, 2**63 - 1, 2**63, 2**64 - 1, file_size, file_size - 1, file_size + 1,
            file_size * 2, rng.getrandbits(bits), rng.getrandbits(8)]
    return rng.choice(pool) & ((1 << bits) - 1)


BAD_BYTES = [b"\xff", b"\xc3", b"\xed\xa0\x80", b"a\x80b", b"\xf8\x88\x80\x80\x80", b"", b"\0" * 3]


def corrupt_field(segs: list[list], rng: random.Random) -> list[list]:
    """Change, drop or repeat one field of a copy of `segs`."""
    segs = [list(s) for s in segs]
    i = rng.randrange(len(segs))
    label, fmt, value = segs[i]
    action = rng.random()
    if action < 0.1:
        del segs[i]
    elif action < 0.2:
        segs.insert(i, list(segs[i]))
    elif fmt == RAW:
        if rng.random() < 0.5:
            segs[i][2] = rng.choice(BAD_BYTES)
        else:
            segs[i][2] = bytes(rng.getrandbits(8) for _ in range(rng.randrange(0, 2 * len(value) + 4)))
    elif fmt in ("<f", "<d"):
        segs[i][2] = rng.choice([float("nan"), float("inf"), -0.0, 1e38, rng.uniform(-1e6, 1e6)])
    else:
        bits = struct.calcsize(fmt) * 8
        v = interesting_ints(rng, bits, len(pack(segs)))
        if fmt.islower():  # signed field: reinterpret the bit pattern
            v = v - (1 << bits) if v >> (bits - 1) else v
        segs[i][2] = v
    return segs


def flip_bytes(data: bytes, rng: random.Random) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randrange(1, 9)):
        if b:
            b[rng.randrange(len(b))] ^= rng.randrange(1, 256)
    return bytes(b)


def truncate(data: bytes, rng: random.Random) -> bytes:
    return data[: rng.randrange(max(1, len(data)))]


def insert_huge(data: bytes, rng: random.Random) -> bytes:
    """Overwrite 8 (or 4) bytes somewhere with a huge count, as little-endian."""
    width = rng.choice([4, 8])
    v = interesting_ints(rng, width * 8, len(data))
    pos = rng.randrange(max(1, len(data) - width + 1))
    return data[:pos] + v.to_bytes(width, "little") + data[pos + width:]


def mutate(segs: list[list], rng: random.Random) -> bytes:
    """One to three stacked mutations of the base file: structured first, then byte-level."""
    n_fields = rng.randrange(0, 3)
    for _ in range(n_fields):
        segs = corrupt_field(segs, rng)
    data = pack(segs)
    for _ in range(rng.randrange(0 if n_fields else 1, 3)):
        data = rng.choice([flip_bytes, truncate, insert_huge])(data, rng)
    return data


def check_against_reference(path: Path, model) -> str | None:
    """None when gguf-py reads the same metadata and tensors (names, types, shapes, bytes, inside the file), else why not."""
    import gguf

    try:
        ref = gguf.GGUFReader(path)
    except Exception as e:
        return f"gguf-py rejects a file ktx loaded: {type(e).__name__}: {e}"
    for key, field in ref.fields.items():
        ours, theirs = model.metadata.get(key), field.contents()
        if isinstance(ours, np.ndarray):
            same = ours.shape == (len(theirs),) and np.array_equal(ours, np.asarray(theirs, ours.dtype), equal_nan=ours.dtype.kind == "f")
        else:
            same = ours == theirs or (ours != ours and theirs != theirs)  # NaN == NaN here
        if not same:
            return f"metadata {key!r}: {ours!r} but gguf-py reads {theirs!r}"[:300]
    size = path.stat().st_size
    if sorted(t.name for t in ref.tensors) != sorted(model.tensors):
        return "tensor names differ from gguf-py"
    for r in ref.tensors:
        t = model.tensors[r.name]
        if t.qtype != int(r.tensor_type) or t.shape != tuple(int(d) for d in reversed(r.shape)):
            return f"tensor {r.name}: type/shape differ from gguf-py"
        if r.data_offset + r.n_bytes > size or t.n_bytes != r.n_bytes:
            return f"tensor {r.name}: view outside the file"
        if not np.array_equal(t.data.reshape(-1).view(np.uint8), np.asarray(r.data).reshape(-1).view(np.uint8)):
            return f"tensor {r.name}: bytes differ from gguf-py"
    return None
