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
whole K run is contiguous, a sequence of 64-byte vectors. The kernel's operand for one step of 4 k is
16 rows x 4 codes (the vpdpbusd operand): byte 4 r + j = q[16 rg + r, 4 k4 + j]. Codes wider than 4 bits
are split into a 4-bit low part and a 1- or 2-bit high part; both go into the same run, one code block after
another, so a row group is still one sequential stream:

    8-bit  block = 4 k,  1 vector      v0[4 r + j] = q[r, k0 + j]                                   (1 B / weight)
    4-bit  block = 8 k,  1 vector      v0[4 r + j] = q[r, k0 + j] | q[r, k0 + 4 + j] << 4           (0.5 B)
    6-bit  block = 16 k, 3 vectors     v0, v1 = the 4-bit vectors of k0 and k0 + 8 (low 4 bits of q)
                                       v2[4 r + j] = sum_s (q[r, k0 + 4 s + j] >> 4) << 2 s, s < 4  (0.75 B)
    5-bit  block = 32 k, 5 vectors     v0..v3 = the 4-bit vectors of k0, k0 + 8, k0 + 16, k0 + 24
                                       v4[4 r + j] = sum_s (q[r, k0 + 4 s + j] >> 4) << s,   s < 8  (0.625 B)

    one 6-bit block of a row group (192 bytes, 16 k):
      byte   0 ..  63   lo4 k0+0..3 | lo4 k0+4..7 << 4        (4 r + j)
      byte  64 .. 127   lo4 k0+8..11 | lo4 k0+12..15 << 4
      byte 128 .. 191   hi2 k0+0..3 | hi2 k0+4..7 << 2 | hi2 k0+8..11 << 4 | hi2 k0+12..15 << 6

so operand s of a block is (v[s / 2] >> 4 (s % 2)) & 15 | ((v_hi >> hb s) & (2^hb - 1)) << 4 (hb = 1|2): one
vector load per plane, shifts and masks (unpack_codes does the same in numpy). Scales, per row group:

    d [rg, K / S, 16] f16,  sc [rg, K / G, 16] u8|i8,  dmin [rg, K / 256, 16] f16,  m [rg, K / 32, 16] u8

so the scales for 16 rows are one small vector load. Products d * sc are exact in f32, so the layout
dequantizes bit-exactly to `gguf.quants.dequantize`. Bytes per weight (Layout.bytes_per_weight) match the GGUF
block within the K-quant scale unpacking: Q6_K 0.820 (GGUF 0.820), Q5_K 0.703 (0.688), Q5_0 0.688 (0.688),
Q4_K 0.578 (0.562), Q4_0 0.562 (0.562), Q8_0 1.062 (1.062).
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
    bits: int  # code width: 8 (byte plane), 4 (nibbles), 5 or 6 (nibbles + a 1|2-bit plane per block)
    G: int  # weights per sc group (16 or 32)
    S: int  # weights per d
    sc: str | None  # "u8" | "i8" | None
    mins: bool  # K-quant minimums (dmin * m per 32)
    zero: int  # code offset (q - zero)

    @property
    def kb(self) -> int:
        """k per code block (see the module docstring): 4, 8, 32 or 16 for 8, 4, 5 or 6 bits."""
        return {8: 4, 4: 8, 5: 32, 6: 16}[self.bits]

    def bytes_per_weight(self) -> float:
        b = self.bits / 8
        b += 2 / self.S + (1 / self.G if self.sc else 0)
        return b + (2 / 256 + 1 / 32 if self.mins else 0)


ALIGN = 64  # bytes: kernel buffers start on a cache line (see aligned_empty)


def aligned_empty(shape, dtype, zero: bool = False) -> np.ndarray:
    """np.empty (or zeros) starting on a 64-byte boundary. NumPy's large arrays start 16 bytes past one (malloc's
    header), so every 64-byte operand load of a tile straddled two cache lines: on the Intel Xeon with AMX measured
    here (bench/RESULTS.md) a 1 KiB tileloadd took 17.5 ns from such a buffer and 2.7 ns from an aligned one."""
    n = int(np.prod(shape)) * np.dtype(dtype).itemsize
    buf = (np.zeros if zero else np.empty)(n + ALIGN, np.uint8)
    off = -buf.ctypes.data % ALIGN
    return buf[off:off + n].view(dtype).reshape(shape)


LAYOUTS = {
    QT.Q8_0: Layout("Q8_0", 8, 32, 32, None, False, 128),
    QT.Q4_0: Layout("Q4_0", 4, 32, 32, None, False, 8),
    QT.Q5_0: Layout("Q5_0", 5, 32, 32, None, False, 16),
    QT.Q4_K: Layout("Q4_K", 4, 32, 256, "u8", True, 0),
    QT.Q5_K: Layout("Q5_K", 5, 32, 256, "u8", True, 0),
    QT.Q6_K: Layout("Q6_K", 6, 16, 256, "i8", False, 32),
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


def pack_codes(q: np.ndarray, lay: Layout) -> np.ndarray:
    """Codes q [R, K] u8 -> the code runs [R/16, K * bits / 32, 64] of the module docstring."""
    R, K = q.shape
    if lay.bits == 8:
        g = q.reshape(R // R_GROUP, R_GROUP, K // 4, 4).transpose(0, 2, 1, 3)  # [rg, k4, r, j]
        return np.ascontiguousarray(g).reshape(R // R_GROUP, -1, 64)
    kb = lay.kb
    g = q.reshape(R // R_GROUP, R_GROUP, K // kb, kb // 8, 2, 4)  # [rg, r, block, k8, lo|hi nibble, j]
    nib = (g[..., 0, :] & 0xF) | ((g[..., 1, :] & 0xF) << 4)  # [rg, r, block, kb/8, j]
    vecs = [nib.transpose(0, 2, 3, 1, 4)]  # [rg, block, kb/8, r, j]
    if lay.bits > 4:
        hb = lay.bits - 4
        hi = (q >> 4).reshape(R // R_GROUP, R_GROUP, K // kb, kb // 4, 4)  # [rg, r, block, step, j]
        h = hi[:, :, :, 0].copy()  # [rg, r, block, j]
        for s in range(1, kb // 4):
            h |= hi[:, :, :, s] << (hb * s)
        vecs.append(h.transpose(0, 2, 1, 3)[:, :, None])  # [rg, block, 1, r, j]
    return np.ascontiguousarray(np.concatenate(vecs, axis=2)).reshape(R // R_GROUP, -1, 64)


def unpack_codes(codes_rg: np.ndarray, lay: Layout) -> np.ndarray:
    """One row group's code run [K * bits / 32, 64] -> byte operands [K/4, 64]: B[k4, 4 r + j] = q[r, 4 k4 + j]
    (the vpdpbusd operand of every step, and the AMX B tile)."""
    if lay.bits == 8:
        return np.asarray(codes_rg)
    kb = lay.kb
    v = np.asarray(codes_rg).reshape(-1, lay.bits * kb // 32, 64)  # [block, vectors, 64]
    nib = np.stack([v[:, :kb // 8] & 0xF, v[:, :kb // 8] >> 4], axis=2).reshape(-1, kb // 4, 64)  # [block, step, 64]
    if lay.bits > 4:
        hb = lay.bits - 4
        shifts = (hb * np.arange(kb // 4, dtype=np.uint8))[:, None]  # [step, 1]
        nib |= ((v[:, -1:] >> shifts) & ((1 << hb) - 1)) << 4
    return nib.reshape(-1, 64)


def interleave(f: dict, lay: Layout) -> dict:
    """Decoded fields of one expert -> kernel arrays (codes [R/16, K * bits / 32, 64] u8 and scale vectors)."""
    out = dict(codes=pack_codes(f["q"], lay), d=_rows16(f["d"]))
    if lay.sc:
        out["sc"] = _rows16(f["sc"])
    if lay.mins:
        out["dmin"] = _rows16(f["dmin"])
        out["m"] = _rows16(f["m"])
    return out


FIELDS = ("codes", "d", "sc", "dmin", "m")


def descriptor(arrays: dict) -> np.ndarray:
    """The md int64 [15] the loops read for stacked kernel arrays (field_shapes): per field of FIELDS, (address,
    expert/batch stride, row-group stride) in bytes; zeros for fields the layout has not."""
    md = np.zeros(15, np.int64)
    for i, f in enumerate(FIELDS):
        if f in arrays:
            a = arrays[f]
            md[3 * i:3 * i + 3] = (a.ctypes.data, a.strides[0], a.strides[1])
    return md


def field_shapes(lay: Layout, E: int, R: int, K: int) -> dict:
    """Shapes and dtypes of the stacked kernel arrays for E experts (to preallocate or memory-map)."""
    rg = R // R_GROUP
    s = dict(codes=((E, rg, K * lay.bits // 32, 64), np.uint8), d=((E, rg, K // lay.S, 16), np.float16))
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
    from ktx.progress import progress_bar

    with progress_bar(disable=raw.nbytes < 64 << 20) as bar:
        task = bar.add_task(label, total=raw.shape[0])
        for e in range(raw.shape[0]):
            for name, a in interleave(decode_blocks(np.asarray(raw[e]), qtype, K), lay).items():
                dst[name][e] = a
            bar.advance(task)
