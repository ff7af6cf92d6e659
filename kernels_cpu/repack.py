"""GGUF expert blocks -> the VNNI layout the CPU microkernels stream.

Every supported quant type is an affine code per group of G weights along a row:

    w[r, k] = d[r, k // S] * sc[r, k // G] * (q[r, k] - zero)  -  dmin[r, k // 256] * m[r, k // 32]

q is an unsigned code (0..15, 0..31, 0..63 or 0..255), so it can be the unsigned operand of `vpdpbusd`
while the activations are the signed one. Per type (GGUF block bytes -> fields):

    Q8_0  [d f16][qs i8 x32]                      q = qs + 128, zero 128, G = S = 32, no sc
    Q4_0  [d f16][qs 16 B: lo nibble = k, hi = k+16]            q 0..15, zero 8,  G = S = 32
    Q5_0  [d f16][qh u32: bit k -> q bit 4][qs 16 B]            q 0..31, zero 16, G = S = 32
    Q4_K  [d f16][dmin f16][scales 12 B: 8 x (6-bit sc, 6-bit m)][qs 128 B]
          qs chunk c (32 B) holds k = 64c + i (lo nibble) and 64c + 32 + i (hi)    G = 32, S = 256, mins
    Q5_K  Q4_K + [qh 32 B] before qs: bit 2c / 2c+1 of qh[i] is q bit 4           q 0..31
    Q6_K  [ql 128 B][qh 64 B][sc i8 x16][d f16]: q = 4 + 2 bits, zero 32, G = 16, S = 256, signed sc

Layout of one expert matrix [R rows, K] (R a multiple of 16): rows in groups of 16, and for each group the
whole K run is contiguous, 64-byte vectors of 16 rows x 4 k (the vpdpbusd operand):

    byte plane  codes[rg, k4, r16, 4]     = q[16 rg + r16, 4 k4 + j]                   (1 B / weight)
    nibble      codes[rg, k8, r16, j]     = q[.., 8 k8 + j] | q[.., 8 k8 + 4 + j] << 4 (0.5 B / weight)
    d           [rg, K / S, 16] f16,  sc [rg, K / G, 16] u8|i8,  dmin [rg, K / 256, 16] f16,  m [rg, K / 32, 16] u8

so the scales for 16 rows are one small vector load. Products d * sc are exact in f32, so the layout
dequantizes bit-exactly to `gguf.quants.dequantize`. Q6_K and the 5-bit types use the byte plane (more bytes
than the GGUF block; a packed 6-bit plane is future work).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from gguf import GGMLQuantizationType as QT

R_GROUP = 16  # rows per vector (16 int32 lanes of a zmm)


@dataclass(frozen=True)
class Layout:
    """How one GGUF type maps onto the kernel's affine form (see the module docstring)."""

    name: str
    nibble: bool  # 4-bit codes packed two per byte
    G: int  # weights per sc group (16 or 32)
    S: int  # weights per d
    sc: str | None  # "u8" | "i8" | None
    mins: bool  # K-quant minimums (dmin * m per 32)
    zero: int  # code offset (q - zero)

    def bytes_per_weight(self) -> float:
        b = 0.5 if self.nibble else 1.0
        b += 2 / self.S + (1 / self.G if self.sc else 0)
        return b + (2 / 256 + 1 / 32 if self.mins else 0)


LAYOUTS = {
    QT.Q8_0: Layout("Q8_0", False, 32, 32, None, False, 128),
    QT.Q4_0: Layout("Q4_0", True, 32, 32, None, False, 8),
    QT.Q5_0: Layout("Q5_0", False, 32, 32, None, False, 16),
    QT.Q4_K: Layout("Q4_K", True, 32, 256, "u8", True, 0),
    QT.Q5_K: Layout("Q5_K", False, 32, 256, "u8", True, 0),
    QT.Q6_K: Layout("Q6_K", False, 16, 256, "i8", False, 32),
}
FLOAT_TYPES = (QT.F32, QT.F16, QT.BF16)


def _f16(b: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(b).view(np.float16)[..., 0]


def _kquant_scales(s: np.ndarray):  # s [N, 12] -> sc, m [N, 8] (6-bit each)
    sc = np.empty(s.shape[:-1] + (8,), np.uint8)
    m = np.empty_like(sc)
    sc[:, :4] = s[:, 0:4] & 63
    m[:, :4] = s[:, 4:8] & 63
    sc[:, 4:] = (s[:, 8:12] & 0xF) | ((s[:, 0:4] >> 6) << 4)
    m[:, 4:] = (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)
    return sc, m


def _nibbles_k(qs: np.ndarray) -> np.ndarray:  # qs [N, 128] -> q [N, 256] in K-quant order
    c = qs.reshape(-1, 4, 32)
    return np.stack([c & 0xF, c >> 4], axis=2).reshape(-1, 256)


def decode_blocks(raw: np.ndarray, qtype: int, K: int) -> dict:
    """raw [R, row_bytes] uint8 -> {'q' [R, K] u8, 'd' [R, K/S] f16, 'sc', 'dmin', 'm'} in the affine form."""
    R = raw.shape[0]
    qtype = QT(qtype)
    if qtype == QT.Q8_0:
        b = raw.reshape(-1, 34)
        q = (b[:, 2:].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
        return dict(q=q.reshape(R, K), d=_f16(b[:, 0:2]).reshape(R, -1))
    if qtype == QT.Q4_0:
        b = raw.reshape(-1, 18)
        q = np.concatenate([b[:, 2:] & 0xF, b[:, 2:] >> 4], axis=1)
        return dict(q=q.reshape(R, K), d=_f16(b[:, 0:2]).reshape(R, -1))
    if qtype == QT.Q5_0:
        b = raw.reshape(-1, 22)
        qh = np.ascontiguousarray(b[:, 2:6]).view("<u4")  # [N, 1]
        hi = ((qh >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8)  # [N, 32]
        q = np.concatenate([b[:, 6:] & 0xF, b[:, 6:] >> 4], axis=1) | (hi << 4)
        return dict(q=q.reshape(R, K), d=_f16(b[:, 0:2]).reshape(R, -1))
    if qtype in (QT.Q4_K, QT.Q5_K):
        bs = 144 if qtype == QT.Q4_K else 176
        b = raw.reshape(-1, bs)
        sc, m = _kquant_scales(b[:, 4:16])
        q = _nibbles_k(b[:, bs - 128:])
        if qtype == QT.Q5_K:
            qh = b[:, 16:48]  # [N, 32]: bit j of qh[i] is q bit 4 of k = 32 j + i
            q |= (((qh[:, None, :] >> np.arange(8, dtype=np.uint8)[None, :, None]) & 1) << 4).reshape(-1, 256)
        return dict(q=q.reshape(R, K), d=_f16(b[:, 0:2]).reshape(R, -1), sc=sc.reshape(R, -1),
                    dmin=_f16(b[:, 2:4]).reshape(R, -1), m=m.reshape(R, -1))
    if qtype == QT.Q6_K:
        b = raw.reshape(-1, 210)
        ql = b[:, :128].reshape(-1, 2, 2, 32)  # [N, half, l/32, 32]
        qh = b[:, 128:192].reshape(-1, 2, 1, 32)  # [N, half, 1, 32]
        lo = np.stack([ql & 0xF, ql >> 4], axis=2)  # [N, half, nib, l/32, 32]: k = 128 h + 64 nib + 32 (l/32) + i
        shift = (2 * np.arange(4, dtype=np.uint8)).reshape(1, 1, 2, 2, 1)  # qh bits 2 * (2 nib + l/32)
        hi = (qh[:, :, None] >> shift) & 3
        q = (lo | (hi << 4)).reshape(-1, 256)
        return dict(q=q.reshape(R, K), d=_f16(b[:, 208:210]).reshape(R, -1),
                    sc=b[:, 192:208].view(np.int8).reshape(R, -1))
    raise ValueError(f"no CPU expert layout for GGUF type {qtype.name}")


def dequantize_fields(f: dict, lay: Layout) -> np.ndarray:
    """Float32 weights [R, K] from decoded fields: the independent check that the layout is exact."""
    q = f["q"].astype(np.float32) - lay.zero
    d = np.repeat(f["d"].astype(np.float32), lay.S, axis=1)
    w = q * d
    if lay.sc:
        w *= np.repeat(f["sc"].astype(np.float32), lay.G, axis=1)
    if lay.mins:
        w -= np.repeat(f["dmin"].astype(np.float32), 256, axis=1) * np.repeat(f["m"].astype(np.float32), 32, axis=1)
    return w


def _rows16(a: np.ndarray) -> np.ndarray:  # [R, n] -> [R/16, n, 16]
    R, n = a.shape
    return np.ascontiguousarray(a.reshape(R // R_GROUP, R_GROUP, n).transpose(0, 2, 1))


def interleave(f: dict, lay: Layout) -> dict:
    """Decoded fields of one expert -> kernel arrays (codes [R/16, n_k, 64] u8 and scale vectors)."""
    q = f["q"]
    R, K = q.shape
    g = q.reshape(R // R_GROUP, R_GROUP, K)
    if lay.nibble:
        g = g.reshape(R // R_GROUP, R_GROUP, K // 8, 2, 4)
        g = g[:, :, :, 0, :] | (g[:, :, :, 1, :] << 4)  # [rg, 16, K/8, 4]
    else:
        g = g.reshape(R // R_GROUP, R_GROUP, K // 4, 4)
    out = dict(codes=np.ascontiguousarray(g.transpose(0, 2, 1, 3)).reshape(R // R_GROUP, -1, 64),
               d=_rows16(f["d"]))
    if lay.sc:
        out["sc"] = _rows16(f["sc"])
    if lay.mins:
        out["dmin"] = _rows16(f["dmin"])
        out["m"] = _rows16(f["m"])
    return out


def field_shapes(lay: Layout, E: int, R: int, K: int) -> dict:
    """Shapes and dtypes of the stacked kernel arrays for E experts (to preallocate or memory-map)."""
    rg = R // R_GROUP
    s = dict(codes=((E, rg, K // (8 if lay.nibble else 4), 64), np.uint8), d=((E, rg, K // lay.S, 16), np.float16))
    if lay.sc:
        s["sc"] = ((E, rg, K // lay.G, 16), np.uint8 if lay.sc == "u8" else np.int8)
    if lay.mins:
        s["dmin"] = ((E, rg, K // 256, 16), np.float16)
        s["m"] = ((E, rg, K // 32, 16), np.uint8)
    return s


def repack_into(dst: dict, raw: np.ndarray, qtype: int, K: int, lay: Layout, label: str) -> None:
    """Repack raw [E, R, row_bytes] expert by expert into the preallocated (maybe memory-mapped) dst arrays.

    One expert at a time, so peak RAM is one expert's decoded fields whatever the layer size. A rich progress
    bar shows for layers above 64 MiB."""
    from rich.console import Console
    from rich.progress import Progress

    # stderr: stdout may carry a program's real output (ktx bench --output json)
    with Progress(transient=True, disable=raw.nbytes < 64 << 20, console=Console(stderr=True)) as bar:
        task = bar.add_task(label, total=raw.shape[0])
        for e in range(raw.shape[0]):
            for name, a in interleave(decode_blocks(np.asarray(raw[e]), qtype, K), lay).items():
                dst[name][e] = a
            bar.advance(task)
