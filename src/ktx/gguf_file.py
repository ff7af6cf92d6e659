"""Open GGUF files (single or split) as memory-mapped, zero-copy tensor views plus a metadata dict.

The header is parsed here, in pure Python, with a bounds check before every read, because a GGUF
file is untrusted input: a count of 2**62 or a string length of 2**60 must become a one-line
`KtxError` naming the file, never a giant allocation, a hang or a stray exception. Byte layout of
GGUF v2/v3 (little-endian; v3 only added big-endian files, which ktx does not read):

    offset  size      field
    0       4         magic  b"GGUF"
    4       4         version  u32 (2 or 3; v1 had u32 counts and is long gone)
    8       8         n_tensors  u64
    16      8         n_kv  u64
    24      ...       n_kv x key/value
                        key    string = len u64 | len bytes of UTF-8
                        vtype  u32 (GGUFValueType: u8 i8 u16 i16 u32 i32 f32 bool string array u64 i64 f64)
                        value  scalar (1, 2, 4 or 8 bytes) | string
                               | array = item vtype u32 | count u64 | count items (strings or scalars)
    ...     ...       n_tensors x tensor info
                        name    string
                        n_dims  u32 (<= 4)
                        dims    n_dims x u64, ggml order: ne0 (the contiguous row length) first
                        type    u32 (GGMLQuantizationType)
                        offset  u64, from the start of the data section, a multiple of the alignment
    ...     pad       zeros up to a multiple of general.alignment (u32 power of two, default 32)
    data    ...       tensor bytes: n_elements / block_size * type_size each, in any order, no overlap

Every count is checked against the bytes left in the file times the smallest size of one item
before a loop starts, so work and memory stay proportional to the file's real size; counts also
have fixed limits far above any real model (a million tensors or keys, 4M array items, 64 MiB
strings), so that a huge hostile file cannot keep the parser busy for minutes either.

Here we also
- accept a file, any part of a split set (`name-00002-of-00005.gguf`) or a folder holding one model,
- check every tensor's byte range against the file (a truncated download fails here, with a clear
  message, instead of deep inside a kernel), and that ranges are aligned and do not overlap,
- expose tensors in numpy order (`shape` = reversed ggml dims: `[rows, cols]`, experts `[E, rows, cols]`),
  with `data` the raw mmap view (`uint8 [..., row_bytes]` for block types, typed for F32/F16/F64/I*),
- return metadata as python values: str, int, float, bool, list[str], numpy arrays for numeric arrays,
  plus the pseudo-keys GGUF.version, GGUF.tensor_count, GGUF.kv_count (as gguf-py's reader has them).
"""

from __future__ import annotations

import mmap
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ktx.errors import KtxError

SPLIT_RE = re.compile(r"^(?P<stem>.*)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")
GGUF_MAGIC = b"GGUF"
HEADER_BYTES = 24
MAX_DIMS = 4  # GGML_MAX_DIMS
DEFAULT_ALIGNMENT = 32

# GGUFValueType id -> (struct format, numpy dtype) of a scalar; 8 = string, 9 = array. A bool is one
# byte read as uint8 and compared with 0 (numpy would keep a 2 in a bool array as is).
_SCALARS = {
    0: ("<B", np.uint8), 1: ("<b", np.int8), 2: ("<H", np.uint16), 3: ("<h", np.int16),
    4: ("<I", np.uint32), 5: ("<i", np.int32), 6: ("<f", np.float32), 7: ("<B", np.uint8),
    10: ("<Q", np.uint64), 11: ("<q", np.int64), 12: ("<d", np.float64),
}
UINT32, BOOL, STRING, ARRAY = 4, 7, 8, 9
MIN_KV_BYTES = 8 + 4 + 1  # empty key, type, a one-byte scalar
MIN_TENSOR_INFO_BYTES = 8 + 4 + 4 + 8  # empty name, n_dims 0, type, offset
# real files: ~1k tensors (DeepSeek-V3), ~50 keys, vocabularies of ~260k tokens, chat templates of ~50 KB
MAX_TENSORS = MAX_KV = 1 << 20
MAX_ARRAY_ITEMS = 1 << 22
MAX_STRING_BYTES = 1 << 26


@dataclass(frozen=True)
class TensorInfo:
    name: str
    qtype: int  # gguf.GGMLQuantizationType value
    shape: tuple[int, ...]  # numpy order, logical elements: [rows, cols] / [E, rows, cols]
    data: np.ndarray  # zero-copy view into the mmap
    file: Path

    @property
    def type_name(self) -> str:
        import gguf

        return gguf.GGMLQuantizationType(self.qtype).name

    @property
    def n_bytes(self) -> int:
        return int(self.data.nbytes)

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape))


def resolve_parts(path: str | Path) -> list[Path]:
    """The list of files that make up the model at `path` (file, split part, or folder)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise KtxError(f"{p}: no such file or folder. Pass the path of a .gguf file (or of a folder holding one).")
    if p.is_dir():
        ggufs = sorted(p.glob("*.gguf"))
        if not ggufs:
            raise KtxError(f"{p}: folder holds no .gguf file.")
        stems = {SPLIT_RE.match(f.name)["stem"] if SPLIT_RE.match(f.name) else f.stem for f in ggufs}
        if len(stems) > 1:
            listing = ", ".join(sorted(stems))
            raise KtxError(f"{p}: folder holds several models ({listing}); pass the file you want.")
        p = ggufs[0]
    m = SPLIT_RE.match(p.name)
    if not m:
        return [p]
    count = int(m["count"])
    parts = [p.with_name(f"{m['stem']}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)]
    missing = [q.name for q in parts if not q.exists()]
    if missing:
        raise KtxError(f"{p}: split model is missing {len(missing)} of {count} parts ({', '.join(missing[:3])}...); download all parts into {p.parent}.")
    return parts


def _q(s: str) -> str:
    """A name from the file, quoted and cut short, so that a hostile name keeps the message one line."""
    return repr(s if len(s) <= 80 else s[:77] + "...")


class _Cursor:
    """Bounds-checked little-endian reads over the mapped file; every failure names the file and byte."""

    def __init__(self, path: Path, buf: mmap.mmap):
        self.path, self.buf, self.pos, self.size = path, buf, 0, len(buf)

    def fail(self, problem: str):
        raise KtxError(f"{self.path}: damaged GGUF: {problem}. Re-download or re-convert the file.")

    def need(self, n: int, what: str) -> None:
        if n > self.size - self.pos:
            self.fail(f"{what} at byte {self.pos} needs {n} bytes but the file ends at byte {self.size} (truncated?)")

    def scalar(self, fmt: str, what: str):
        n = struct.calcsize(fmt)
        self.need(n, what)
        (v,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return v

    def count(self, what: str, min_item_bytes: int, limit: int) -> int:
        """A u64 count of items that follow; more than the remaining bytes can hold is damage, not a request."""
        n = self.scalar("<Q", what)
        if n * min_item_bytes > self.size - self.pos:
            self.fail(f"{what} is {n} (at byte {self.pos - 8}), more than the {self.size - self.pos} bytes left can hold")
        if n > limit:
            self.fail(f"{what} is {n} (at byte {self.pos - 8}), above ktx's limit of {limit}")
        return n

    def string(self, what: str) -> str:
        start = self.pos
        n = self.count(f"length of {what}", 1, MAX_STRING_BYTES)
        raw = self.buf[self.pos: self.pos + n]
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            self.fail(f"{what} at byte {start} is not valid UTF-8")

    def value(self, vtype: int, what: str) -> Any:
        """One metadata value as a python value (numeric arrays as one numpy array)."""
        if vtype == STRING:
            return self.string(what)
        if vtype in _SCALARS:
            v = self.scalar(_SCALARS[vtype][0], what)
            return bool(v) if vtype == BOOL else v
        if vtype != ARRAY:
            self.fail(f"{what} has unknown value type {vtype}")
        item = self.scalar("<I", f"{what} item type")
        if item == STRING:
            n = self.count(f"{what} length", 8, MAX_ARRAY_ITEMS)
            return [self.string(f"{what}[{i}]") for i in range(n)]
        if item not in _SCALARS:
            # arrays of arrays: llama.cpp cannot read them either
            self.fail(f"{what} is an array of unsupported item type {item}")
        fmt, dtype = _SCALARS[item]
        n = self.count(f"{what} length", struct.calcsize(fmt), MAX_ARRAY_ITEMS)
        arr = np.frombuffer(self.buf, np.dtype(dtype).newbyteorder("<"), n, self.pos)
        self.pos += arr.nbytes
        return arr != 0 if item == BOOL else arr.astype(dtype)  # a native-order copy: metadata must not pin the mapping


def _parse_header(cur: _Cursor) -> tuple[dict[str, Any], list[tuple[str, int, tuple[int, ...], int]], int]:
    """Header -> (metadata, [(name, qtype, ggml dims, offset)], data section start). Reads nothing past the infos."""
    version = cur.scalar("<I", "version")
    if version & 0xFFFF == 0 and version >> 24 in (2, 3):
        cur.fail("big-endian GGUF; ktx reads little-endian files (re-convert without --bigendian)")
    if version not in (2, 3):
        cur.fail(f"GGUF version {version} is not supported (ktx reads versions 2 and 3)")
    n_tensors = cur.count("tensor count", MIN_TENSOR_INFO_BYTES, MAX_TENSORS)
    n_kv = cur.count("key/value count", MIN_KV_BYTES, MAX_KV)
    metadata: dict[str, Any] = {"GGUF.version": version, "GGUF.tensor_count": n_tensors, "GGUF.kv_count": n_kv}
    for i in range(n_kv):
        key = cur.string(f"key #{i}")
        if key in metadata:
            cur.fail(f"key {_q(key)} appears twice")
        vtype = cur.scalar("<I", f"type of {_q(key)}")
        metadata[key] = cur.value(vtype, f"value of {_q(key)}")
        if key == "general.alignment" and (vtype != UINT32 or not metadata[key] or metadata[key] & (metadata[key] - 1)):
            cur.fail(f"general.alignment must be a u32 power of two, not {metadata[key]!r} (type {vtype})")
    infos, names = [], set()
    for i in range(n_tensors):
        name = cur.string(f"name of tensor #{i}")
        if name in names:  # checked here, not later: a run of zeros parses as many tensors named ''
            cur.fail(f"tensor {_q(name)} appears twice")
        names.add(name)
        n_dims = cur.scalar("<I", f"n_dims of tensor {_q(name)}")
        if n_dims > MAX_DIMS:
            cur.fail(f"tensor {_q(name)} has {n_dims} dimensions (GGUF allows at most {MAX_DIMS})")
        cur.need(8 * n_dims, f"dims of tensor {_q(name)}")
        dims = struct.unpack_from(f"<{n_dims}Q", cur.buf, cur.pos)
        cur.pos += 8 * n_dims
        qtype = cur.scalar("<I", f"type of tensor {_q(name)}")
        offset = cur.scalar("<Q", f"offset of tensor {_q(name)}")
        infos.append((name, qtype, dims, offset))
    align = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    return metadata, infos, -(-cur.pos // align) * align


def _tensor_view(file: np.ndarray, start: int, qtype, shape: tuple[int, ...], n_bytes: int) -> np.ndarray:
    """Zero-copy view of one tensor: typed for plain number types, uint8 [..., row_bytes] for block types."""
    import gguf

    T = gguf.GGMLQuantizationType
    typed = {T.F32: np.float32, T.F16: np.float16, T.F64: np.float64, T.I8: np.int8, T.I16: np.int16,
             T.I32: np.int32, T.I64: np.int64}
    raw = file[start: start + n_bytes]
    if qtype in typed:
        return raw.view(np.dtype(typed[qtype]).newbyteorder("<")).reshape(shape)
    block, type_bytes = gguf.GGML_QUANT_SIZES[qtype]
    rows = shape or (1,)
    return raw.reshape(rows[:-1] + (rows[-1] // block * type_bytes,))


def _open_part(path: Path) -> tuple[dict[str, Any], list[TensorInfo]]:
    """Parse and check one GGUF file -> (metadata, tensors). Every failure is a KtxError naming `path`."""
    import gguf

    try:
        if not path.is_file():  # a FIFO or a device would block the reads below
            raise KtxError(f"{path}: not a regular file; pass a .gguf file.")
        with open(path, "rb") as f:
            head = f.read(4)
            size = f.seek(0, 2)
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else None
    except OSError as e:
        raise KtxError(f"{path}: cannot read ({e.strerror}).") from None
    if size == 0:
        raise KtxError(f"{path}: empty file (0 bytes), not a GGUF model; re-download it.")
    if head != GGUF_MAGIC:
        raise KtxError(f"{path}: not a GGUF file (magic {head!r}, expected b'GGUF'). ktx loads GGUF models; convert safetensors with `ktx convert`.")
    if size < HEADER_BYTES:
        raise KtxError(f"{path}: damaged GGUF: {size} bytes is shorter than the {HEADER_BYTES}-byte header (truncated?). Re-download the file.")
    cur = _Cursor(path, buf)
    cur.pos = 4
    metadata, infos, data_start = _parse_header(cur)

    file = np.frombuffer(buf, np.uint8)
    align = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    tensors, spans = [], []
    for name, qtype_id, dims, offset in infos:
        what = f"tensor {_q(name)}"
        try:
            qtype = gguf.GGMLQuantizationType(qtype_id)
            block, type_bytes = gguf.GGML_QUANT_SIZES[qtype]
        except (ValueError, KeyError):
            raise KtxError(f"{path}: {what} has unknown type id {qtype_id} (a damaged file, or a type newer than this ktx).") from None
        shape = tuple(reversed(dims))
        row = dims[0] if dims else 1
        if row % block:
            cur.fail(f"{what} row length {row} is not a multiple of {qtype.name}'s block size {block}")
        n_elements, span = 1, 1
        for d in dims:
            n_elements *= d  # python ints: a product of four 2**64 dims cannot wrap around
            span *= max(d, 1)  # a zero dim empties the tensor, yet numpy (and ggml) still need the others to fit
        if max(span, span // block * type_bytes) >= 2**63:  # numpy's element counts and byte sizes are int64
            cur.fail(f"{what} has dims {list(dims)} whose size overflows 64 bits")
        n_bytes = n_elements // block * type_bytes
        if offset % align:
            cur.fail(f"{what} offset {offset} is not a multiple of the alignment {align}")
        if data_start + offset + n_bytes > size:
            cur.fail(f"{what} ({n_bytes} bytes at data offset {offset}) runs past the end of the file ({size} bytes): the file is truncated or the offset damaged")
        if n_bytes:
            spans.append((offset, offset + n_bytes, name))
        tensors.append(TensorInfo(name, int(qtype), shape, _tensor_view(file, data_start + offset, qtype, shape, n_bytes), path))
    spans.sort()
    for (_, end, a), (start, _, b) in zip(spans, spans[1:]):
        if start < end:
            cur.fail(f"tensor {_q(b)} overlaps the data of tensor {_q(a)}")
    return metadata, tensors


class GGUFModel:
    """All parts of one GGUF model: `metadata` (dict) and `tensors` (name -> TensorInfo)."""

    def __init__(self, path: str | Path):
        self.parts = resolve_parts(path)
        self.path = self.parts[0]
        self.metadata: dict[str, Any] = {}
        self.tensors: dict[str, TensorInfo] = {}
        for part in self.parts:
            metadata, tensors = _open_part(part)
            if part == self.parts[0]:
                self.metadata = metadata
            for t in tensors:
                if t.name in self.tensors:
                    raise KtxError(f"{part}: tensor {_q(t.name)} is also in {self.tensors[t.name].file.name}; the split set is inconsistent.")
                self.tensors[t.name] = t

    @property
    def architecture(self) -> str:
        arch = self.metadata.get("general.architecture")
        if not isinstance(arch, str):
            raise KtxError(f"{self.path}: no general.architecture in metadata; not a model file?")
        return arch

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)

    def tensor(self, name: str) -> TensorInfo:
        t = self.tensors.get(name)
        if t is None:
            raise KtxError(f"{self.path}: tensor {name} is missing; the file is incomplete or not a {self.metadata.get('general.architecture')} model ktx understands.")
        return t

    def has(self, name: str) -> bool:
        return name in self.tensors

    @property
    def n_bytes(self) -> int:
        return sum(t.n_bytes for t in self.tensors.values())

    def identity(self) -> str:
        """A key that changes when any part changes (for on-disk caches of repacked weights)."""
        return ";".join(f"{p.resolve()}:{p.stat().st_size}:{int(p.stat().st_mtime)}" for p in self.parts)
