"""Open GGUF files (single or split) as memory-mapped, zero-copy tensor views plus a metadata dict.

A GGUF file is: header (magic 'GGUF', version, tensor count, kv count) | metadata key/values |
tensor infos (name, dims in ggml order ne0..neN, type, offset) | padding | tensor data.
gguf-py's `GGUFReader` parses it and memory-maps the data; here we

- accept a file, any part of a split set (`name-00002-of-00005.gguf`) or a folder holding one model,
- check every tensor's byte range against the file (a truncated download fails here, with a clear
  message, instead of deep inside a kernel),
- expose tensors in numpy order (`shape` = reversed ggml dims: `[rows, cols]`, experts `[E, rows, cols]`),
  with `data` the raw mmap view (`uint8 [..., row_bytes]` for block types, typed for F32/F16),
- turn every parser failure into a `KtxError` that names the file.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ktx.errors import KtxError

SPLIT_RE = re.compile(r"^(?P<stem>.*)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")
GGUF_MAGIC = b"GGUF"


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


def _field_value(field) -> Any:
    """A metadata field as a python value (str, int, float, bool, list)."""
    import gguf

    types = field.types
    if not types:
        return None
    if types[0] == gguf.GGUFValueType.ARRAY:
        item_type = types[1] if len(types) > 1 else None
        if item_type == gguf.GGUFValueType.STRING:
            return [bytes(field.parts[i]).decode("utf-8", errors="replace") for i in field.data]
        if item_type is not None and item_type != gguf.GGUFValueType.ARRAY:
            # numeric arrays (token types, scores): one numpy array, not a list of 100k scalars
            return np.concatenate([field.parts[i] for i in field.data]) if field.data else np.zeros(0)
        return field.contents()
    if types[0] == gguf.GGUFValueType.STRING:
        return bytes(field.parts[field.data[0]]).decode("utf-8", errors="replace")
    v = field.parts[field.data[0]][0]
    return bool(v) if types[0] == gguf.GGUFValueType.BOOL else v.item()


def _check_magic(path: Path) -> None:
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as e:
        raise KtxError(f"{path}: cannot read ({e.strerror}).") from None
    if head != GGUF_MAGIC:
        raise KtxError(f"{path}: not a GGUF file (magic {head!r}, expected b'GGUF'). ktx loads GGUF models; convert safetensors with `ktx convert`.")


def _open_part(path: Path):
    import gguf

    _check_magic(path)
    try:
        return gguf.GGUFReader(path, "r")
    except KtxError:
        raise
    except Exception as e:  # gguf-py raises ValueError/IndexError/struct errors on damaged files
        msg = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise KtxError(f"{path}: damaged or truncated GGUF ({msg}). Re-download or re-convert the file.") from None


class GGUFModel:
    """All parts of one GGUF model: `metadata` (dict) and `tensors` (name -> TensorInfo)."""

    def __init__(self, path: str | Path):
        self.parts = resolve_parts(path)
        self.path = self.parts[0]
        self.metadata: dict[str, Any] = {}
        self.tensors: dict[str, TensorInfo] = {}
        self._readers = []
        for part in self.parts:
            reader = _open_part(part)
            self._readers.append(reader)
            if part == self.parts[0]:
                try:
                    self.metadata = {k: _field_value(f) for k, f in reader.fields.items()}
                except Exception as e:
                    raise KtxError(f"{part}: damaged metadata ({type(e).__name__}: {e}). Re-download the file.") from None
            self._add_tensors(reader, part)

    def _add_tensors(self, reader, part: Path) -> None:
        import gguf

        size = part.stat().st_size
        for t in reader.tensors:
            try:
                qtype = gguf.GGMLQuantizationType(int(t.tensor_type))
            except ValueError:
                raise KtxError(f"{part}: tensor {t.name} has unknown type id {int(t.tensor_type)}; this file needs a newer ktx.") from None
            shape = tuple(int(d) for d in reversed(list(t.shape)))
            block, type_bytes = gguf.GGML_QUANT_SIZES[qtype]
            n = int(np.prod(shape, dtype=np.int64)) if shape else 1
            if shape and shape[-1] % block:
                raise KtxError(f"{part}: tensor {t.name} row length {shape[-1]} is not a multiple of {qtype.name}'s block size {block}.")
            expected = n // block * type_bytes
            if t.data.nbytes != expected or int(t.data_offset) + expected > size:
                raise KtxError(f"{part}: tensor {t.name} ({expected} bytes at offset {int(t.data_offset)}) runs past the end of the file ({size} bytes): the file is truncated. Re-download it.")
            if t.name in self.tensors:
                raise KtxError(f"{part}: tensor {t.name} appears twice.")
            self.tensors[t.name] = TensorInfo(t.name, int(qtype), shape, t.data, part)

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
