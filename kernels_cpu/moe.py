"""The fused routed-expert op on the CPU: y[t] = sum_j w[t, j] * down_e(silu(gate_e(x_t)) * up_e(x_t)), e = ids[t, j].

Paths (chosen at construction; `kernel_path` says which one runs):
    vnni       AVX-512 VNNI tile kernels on the repacked layout     (CPUID: avx512f + avx512bw + avx512_vnni)
    avx2       vpmaddubsw tile kernels on the same layout           (CPUID: avx2)
    portable   generic LLVM vector IR, same layout and loops        (any CPU)
    reference  gguf.quants.dequantize per used expert + float32 matmul (also used for F32/F16/BF16 weights)
"auto" picks the first of vnni, avx2, portable that the CPU runs, plus, where the CPU has AMX, the bf16 AMX tiles
for prefill (amx_bf16.py: each work item's weights dequantized to bf16 once, tdpbf16ps over the whole K) for
experts with more than BF16_MIN_TOKENS tokens, when the batch averages more than that per used expert. "amx"
does the same but requires AMX (KtxError with the reason where the CPU or OS cannot run it, amx.amx_available);
amx_kernel="native" swaps in the int8 tiles below, which "auto" never runs (they measured no faster than the
vnni tiles: amx.AMX_OFF_BY_DEFAULT). An explicit vnni/avx2/portable path runs that path alone.

int8 AMX prefill (amx_loops.py, amx.full_tile_module): when a batch averages more than MIN_TOKENS_PER_EXPERT tokens per
used expert, each expert with more than that many tokens runs its gate/up/down through tdpbsud tiles (16 tokens x
NR row groups per call, bit-identical to the vnni tiles' per-32 variants), the others through the vector tiles,
in the same loops, items and work counter. Packed codes (4, 5, 6 bits) are widened to bytes
per (expert, row group) into a per-worker scratch of 16 K bytes per matrix (112 KiB at K = 7168: L2-resident)
and reused by all token tiles of that expert, not once at load time into an AMX-side byte copy: the decode
path keeps streaming the packed codes, so that copy would add 1 byte per weight (about 440 GB for the Q4_K
gate/up experts of DeepSeek-V3: 58 layers x 256 experts x 2 x 7168 x 2048 weights) and prefill would stream
twice the weight bytes. Widening costs 16 K byte writes per (expert, row group), against 16 K x tokens MACs.
amx_kernel="model" swaps the native tiles for a Numba model of them (amx.tdpbsud_steps_model, one C tile per
group, and amx_loops.amx_tile's scales): the whole int8 AMX path then runs, and is tested, on any CPU. BF16/F16 expert weights still take the reference path
(the bf16 tiles could read BF16 weights as they are; not wired).

Decode (every expert has one token) uses a 1-token x 64-row tile that streams weights once; prefill uses a
4-token x 32-row register tile. For 5/6-bit codes, a prefill averaging >= WIDE_MIN_TOKENS per expert first widens
each item's row groups to bytes (simd.widen, per-worker scratch of NR x 16 K bytes) and runs the byte-plane tile:
the unpack is paid once per item instead of once per token tile (Q6_K: +5-15% GOPS at 64-256 tokens per expert;
4-bit codes, whose unpack is one op, are read packed: widening Q4_K for the per-256 tiles below had measured +1-2%
on Zen 4, and -4 to -12% on Zen 5 once those tiles ran their groups as a loop, bench_cpu_experts). Prefill
tiles of K-quants (per256_ok) take activations quantized per 256 instead of per 32 (quantize.quantize_row256, as llama.cpp's Q8_K) and skip a float multiply per group (simd.py); x goes per 256
when both gate and up take it, h when down does; a batch with AMX experts stays per 32 throughout. Decode keeps
per-32 activations and its tiles. The repacked weights
live in RAM, or, with cache_dir, in .npy files written expert by expert (bounded RAM) and memory-mapped on later
loads.
"""
from __future__ import annotations

import math
import os
import threading
from pathlib import Path

import numba
import numpy as np
from gguf import GGMLQuantizationType as QT
from gguf.quants import dequantize
from numba.core import types

from ktx.errors import KtxError

from .amx import AMX_TILE_TOKENS, MIN_TOKENS_PER_EXPERT, full_tile_address, tile_kernel_address, tile_source, tile_variant
from .amx_bf16 import BF16_MIN_TOKENS, dequant_address
from .amx_bf16 import tile_address as bf16_tile_address
from .cpu_features import cpu_features
from .moe_loops import (DECODE_BAD_ID, DECODE_NONFINITE, DECODE_NOT, DECODE_OK, KIT_READY, KIT_SYNC, KIT_WORDS, bf16_slots,
                        check_inputs, decode_step, phase_down, phase_gate_up, plan_slots, quantize_slots)
from .pool import WorkerPool
from .repack import FLOAT_TYPES, LAYOUTS, aligned_empty, descriptor, field_shapes, repack_into
from .simd import variant

DECODE_TILE = (1, 4)  # (tokens, row groups of 16)
ROW_BLOCK = 64  # rows of the largest tile's block (decode: 4 row groups of 16): expert sizes come in these
PREFILL_TILE = (4, 2)  # 8x32, 6x32 and 8x16 measured within +-5% of it (bench/RESULTS.md); it pads fewest tokens
PARALLEL_QUANT_SLOTS = 64  # from this many slots, the workers quantize x in parallel (one barrier more)
KIT_TOKENS = 4  # steps of up to this many tokens go to the decode kit before any Python check (MoEExperts._decode)
WIDE_MIN_TOKENS = 16  # prefill of 5/6-bit codes: widen each item's row groups once when tiles reuse them this often


def per256_tiles() -> bool:
    """Whether prefill may run the per-256 tiles at all (per256_ok says where): yes, unless KTX_PER256_TILES=0
    (KTX_PER256_TILES=1|0 forces the choice; tests run both on any CPU). They first ran only where 512-bit ops are
    split in halves (Zen 4, cpu_features().split_512), because with the superblock's groups unrolled into one block
    LLVM interleaved their loads and spilled registers (Zen 5: Q4_K 519-574 per 256 against 705-721 per 32). With
    the groups as an inner loop (simd._emit) they win on Zen 5 too; GOPS of one core, 4x32 tile, 64 tokens, weights
    in L3 (peak ~1140): Q4_K 737-749 -> 785-792, Q6_K packed 567 -> 712, widened 691 -> 797-801, Q5_K widened
    695-729 -> 770 (Q8_0 804-808 -> 826-839, Q4_0 824 -> 844, Q5_0 780 -> 766-785: those stay per 32, see
    per256_ok). Zen 4 was measured only with the unrolled form: Q4_K 297-300 per 32 -> 316-318 per 256."""
    return os.environ.get("KTX_PER256_TILES") != "0"


def per256_ok(lay, wide: bool, K: int) -> bool:
    """Whether a prefill tile of this layout and K runs the per-256 variant (simd.py) on per-256 activations
    (quantize.quantize_row256), where per256_tiles(): K-quants (integer sc per group, d per 256), packed or
    widened, as llama.cpp pairs K-quants with its per-256 Q8_K activations. The float multiply per group that it
    drops shares the vector pipes with vpdpbusd on Zen 4 and Zen 5 alike (a loop of 64 vpdpbusd and 16
    vmulps/vfmadd ran 1.24x as long as the 64 alone on Zen 5; vcvtdq2ps came free).

    Q8_0 and Q4_0 keep per-32 activations, as llama.cpp's Q8_0 dot does: per 256 they ran 4-7% faster (Zen 5, 2
    threads, bench_cpu_experts Q8_0: 1384-1397 -> 1445-1486 GOPS at 64 tokens per expert, 1474-1487 -> 1565-1568
    at 256) but, with a few outlier channels in x (8 of 1024 at 20x), the expert output's relative RMS error
    against float weights-as-stored grew from 1.8e-2 to 4.2e-2 (Q4_K: 1.8e-2 -> 3.8e-2, the price llama.cpp
    pays too), and whoever picks Q8_0 picks it for accuracy. K is always a multiple of 256 for K-quants; the
    check keeps the rule honest for any layout."""
    return bool(lay.sc) and K % 256 == 0 and per256_tiles()


def _widens(lay) -> bool:
    """Whether a prefill with enough tokens per expert widens this layout's codes to bytes first: 5/6-bit codes
    (the module docstring); bytes and 4-bit codes are read as they are. Zen 5, 2 threads, Q4_K experts on the
    per-256 tiles (bench_cpu_experts, 64 / 256 tokens per expert): widened 1235-1237 / 1329-1345 GOPS, packed
    1370-1438 / 1413-1425; per-32 tiles (packed) 1260-1345 / 1380-1392."""
    return lay.bits in (5, 6)


def best_isa() -> str:
    f = cpu_features()
    if f.avx512f and f.avx512bw and f.avx512_vnni:
        return "vnni"
    return "avx2" if f.avx2 else "portable"


def _check_path(path: str) -> str:
    if path == "auto":
        return best_isa()
    f = cpu_features()
    ok = {"vnni": f.avx512f and f.avx512bw and f.avx512_vnni, "avx2": f.avx2, "portable": True, "reference": True}
    if path not in ok:
        raise KtxError(f"unknown CPU kernel path {path!r}: use auto, vnni, avx2, portable, amx or reference")
    if not ok[path]:
        raise KtxError(f"CPU kernel path {path!r} needs instructions this CPU lacks ({f.describe()}); use auto")
    return path


class _Matrix:
    """One of gate/up/down for all experts: repacked arrays + the md descriptor the loops read."""

    def __init__(self, name, raw, qtype, R, K, repack, cache_dir, cache_key):
        self.name, self.raw, self.qtype, self.R, self.K = name, raw, QT(qtype), R, K
        self.layout = LAYOUTS.get(self.qtype) if repack else None
        self.arrays = {}
        if self.layout is None:
            return
        E = raw.shape[0]
        shapes = field_shapes(self.layout, E, R, K)
        if cache_dir is None:
            self.arrays = {k: aligned_empty(s, dt) for k, (s, dt) in shapes.items()}
            repack_into(self.arrays, raw, self.qtype, K, self.layout, f"repacking ffn_{name}_exps")
        else:
            self.arrays = _cached(Path(cache_dir), f"{cache_key}.{name}", shapes, raw, self.qtype, K, self.layout)
        self.md = descriptor(self.arrays)

    def nbytes_per_expert(self) -> int:
        return sum(a[0].nbytes for a in self.arrays.values())


def _cached(folder, stem, shapes, raw, qtype, K, lay):
    """Memory-mapped .npy per field; written expert by expert, marked complete by a .done file."""
    folder.mkdir(parents=True, exist_ok=True)
    done = folder / f"{stem}.done"
    paths = {k: folder / f"{stem}.{k}.npy" for k in shapes}
    if done.exists():
        arrays = {k: np.load(p, mmap_mode="r") for k, p in paths.items()}
        if all(arrays[k].shape == s and arrays[k].dtype == dt for k, (s, dt) in shapes.items()):
            return arrays
    arrays = {k: np.lib.format.open_memmap(paths[k], mode="w+", dtype=dt, shape=s) for k, (s, dt) in shapes.items()}
    repack_into(arrays, raw, qtype, K, lay, f"repacking {stem} -> {folder}")
    for a in arrays.values():
        a.flush()
    done.touch()
    return {k: np.load(p, mmap_mode="r") for k, p in paths.items()}


class MoEExperts:
    """Routed experts of one MoE layer. gate/up: (raw uint8 [E, I, row_bytes], ggml type); down: [E, H, ...]."""

    def __init__(self, gate, up, down, hidden: int, inter: int, pool: WorkerPool | None = None, path: str = "auto",
                 cache_dir: str | os.PathLike | None = None, cache_key: str | None = None, amx_kernel: str = "bf16"):
        self.H, self.I = hidden, inter
        self.path = _check_path("auto" if path == "amx" else path)
        self.amx, self.amx_label = tile_source(path, amx_kernel)  # KtxError for path="amx" where AMX cannot run
        self._amx_fns = {}  # K step -> microkernel address, fetched on the first AMX batch
        self.pool = pool or WorkerPool(os.cpu_count() or 1)  # engines pass one shared pool for all layers
        if cache_dir is not None and not cache_key:
            raise KtxError("MoEExperts: cache_dir needs a cache_key naming the GGUF file and layer")
        for nm, (raw, _), rows in (("gate", gate, inter), ("up", up, inter), ("down", down, hidden)):
            if raw.ndim != 3 or raw.shape[1] != rows:
                raise KtxError(f"ffn_{nm}_exps: expected [E, {rows}, row_bytes], got {tuple(raw.shape)}")
        if hidden % ROW_BLOCK or inter % ROW_BLOCK:  # whole row blocks of the tiles (each matrix's K is checked
            # by its type: a GGUF row holds whole quant blocks, 32 or 256 weights)
            raise KtxError(f"expert shapes hidden={hidden}, inter={inter}: CPU kernels need multiples of {ROW_BLOCK}")
        self.E = gate[0].shape[0]
        types_ = [QT(t) for _, t in (gate, up, down)]
        for t in types_:
            if t not in LAYOUTS and t not in FLOAT_TYPES:
                raise KtxError(f"expert weights of type {t.name} are not supported by the CPU kernels; "
                               f"use a Q4_K/Q5_K/Q6_K/Q8_0/Q4_0/Q5_0/F16/BF16/F32 GGUF")
        if self.path != "reference" and any(t in FLOAT_TYPES for t in types_):
            self.path = "reference"  # float expert weights: numpy float matmul (correct, not the fast path)
            self.amx, self.amx_label = None, "amx off: float expert weights"
        self._entries = {}
        self._plans = {}  # (nt, nr, wide, any AMX expert, per-256 tiles on) -> _make_plan(...)
        repack = self.path != "reference"
        self.mats = [_Matrix(nm, pair[0], pair[1], R, K, repack, cache_dir, cache_key) for nm, pair, R, K in
                     (("gate", gate, inter, hidden), ("up", up, inter, hidden), ("down", down, hidden, inter))]

    @property
    def kernel_path(self) -> str:
        names = "/".join(QT(m.qtype).name for m in self.mats)
        if self.path == "reference":
            return f"reference numpy dequant + float matmul ({names})"
        label = {"vnni": "avx512-vnni vpdpbusd", "avx2": "avx2 vpmaddubsw", "portable": "portable llvm-vector"}
        if self.amx == "bf16":
            prefill = (f"{self.amx_label} tiles (32 tokens x 32 rows, weights dequantized to bf16 per item, bf16 "
                       f"activations) for experts with > {BF16_MIN_TOKENS} tokens, {self.path} for the rest")
        elif self.amx:
            prefill = (f"{self.amx_label} tiles ({'32 tokens x 32 rows, ' if self.amx == 'native' else ''}one C tile per "
                       f"scale group) for experts with > {MIN_TOKENS_PER_EXPERT} tokens, {self.path} for the rest")
        else:
            prefill = f"{self.path} ({self.amx_label})"
        return (f"{label[self.path]} gemv {DECODE_TILE[0]}x{16 * DECODE_TILE[1]} / gemm "
                f"{PREFILL_TILE[0]}x{16 * PREFILL_TILE[1]} tiles ({names}, repacked, int8 acts per 32"
                f"{', per 256 for K-quant prefill' if per256_tiles() else ''}); "
                f"prefill: {prefill}")

    # ---- API ----
    def forward(self, x, ids, w):
        """y [T, H] now, with the calling thread working as one of the pool's workers (a decode step of the
        DeepSeek-V3 shape spent 0.3-0.4 ms of ~6.5 in waking workers and handing the GIL back and forth)."""
        return self.submit(x, ids, w, here=True)

    def submit(self, x, ids, w, here: bool = False):
        """A job whose wait() gives y [T, H]; the pool's workers start now (with here, forward's mode, the
        calling thread runs a worker's share and the result is returned instead)."""
        # decode first, with as little Python as possible: right after a token's weights went through the caches each
        # Python step is slow (the checks below, the plan and the buffers took ~0.25 ms of a 6.8 ms Q4_K step of 8
        # experts of 7168 x 2048); the kit's compiled step checks the rest, or hands the batch back (None)
        if type(x) is _ND and type(ids) is _ND and type(w) is _ND and x.ndim == 2 and ids.ndim == 2 \
                and w.ndim == 2 and x.dtype is _F32 and w.dtype is _F32 and (ids.dtype is _I64 or ids.dtype is _I32) \
                and len(ids) <= KIT_TOKENS and self.path != "reference":
            out = self._decode(x, ids, w, here)
            if out is not None:
                return out
        ids = np.asarray(ids)
        if ids.dtype.kind not in "iu":  # before any cast: 1.7 must not become expert 1
            raise KtxError(f"MoEExperts.submit: expert ids must be integers, got {ids.dtype}")
        x = np.ascontiguousarray(x, dtype=np.float32)  # [T, H]
        w = np.ascontiguousarray(w, dtype=np.float32)  # [T, k]
        if x.ndim != 2 or x.shape[1] != self.H or ids.ndim != 2 or ids.shape != w.shape or ids.shape[0] != x.shape[0]:
            raise KtxError(f"MoEExperts.submit: x {x.shape}, ids {ids.shape}, w {w.shape}: want x [T, {self.H}], ids and w [T, k]")
        # one compiled pass (numpy's max, min and isfinite calls took ~30 us a decode step); on the caller's
        # dtype: 2**32 + 3 must not wrap to 3
        bad, nonfinite = check_inputs(x, np.ascontiguousarray(ids).reshape(-1), w, self.E)
        if bad >= 0:
            bad = ids.reshape(-1)[bad]
            raise KtxError(f"MoEExperts.submit: expert id {bad} out of range (layer has {self.E} experts; -1 = no expert)")
        if nonfinite:
            raise KtxError("MoEExperts.submit: activations or routing weights hold NaN/inf (an upstream layer diverged)")
        ids = ids.astype(np.int32)  # [T, k]
        pool = self.pool
        if self.path == "reference":
            job = pool.submit(lambda wid, n: None, lambda: self._reference(x, ids, w))
            return job.wait() if here else job
        return self._submit_fast(pool, x, ids, w, here)

    # ---- fast paths ----
    def _decode(self, x, ids, w, here):
        """A step in which no expert has two tokens (decode), on the decode kit for its (T, k): one compiled call per
        thread (moe_loops.decode_step), the checks, the plan and the quantization of x inside the calling thread's,
        the pool's workers woken before it. Returns y [T, H] (here) or a job; None where the kit finds a reason for
        the general path (an expert with two tokens, strided rows, mismatched shapes)."""
        T, k = ids.shape
        pool, n = self.pool, self.pool.n_threads
        scratch = _Scratch.take()
        kit = scratch.kits.get((self, T, k, ids.dtype is _I32))
        if kit is None:
            kit = self._make_kit(scratch, T, k, ids.dtype)
        kd, run, a0, _ = kit
        kd[KIT_READY:KIT_SYNC + 2] = 0
        y = np.empty((T, self.H), np.float32)  # every element stored by phase_both (or zeroed: no expert at all)
        a = a0 + (x, ids, w, y)
        prep, waiter = (n - 1, n - 1) if here else (n, -1)

        def step(wid, n_):
            try:
                run(*a, prep, waiter, wid, n_)
            except BaseException:
                kd[KIT_SYNC + 1] = 1  # the threads spinning in phase_both give up
                raise

        def finish():
            scratch.give_back()
            return y

        if here:  # the workers start waking now, while this thread plans and quantizes
            job = pool.submit(step, workers=n - 1) if n > 1 else None
            status = run(*a, prep, waiter, n - 1, n)
            # the calling thread returns when phase_both has stored y, without waiting for the workers to get back
            # through Python to the job's bookkeeping (two thread wake-ups, ~0.1 ms of a 6.5 ms step of the
            # DeepSeek-V3 shape); they touch no buffer after that. It waits for them when the plan was withdrawn or
            # one failed (its error raised here; the scratch is not given back, others may still write it).
            if job is not None and (status != DECODE_OK or kd[KIT_SYNC + 1]):
                job.wait()
        else:
            status = run(*a, prep, waiter, n, n)  # the plan, before any worker starts
        if status == DECODE_OK:
            return finish() if here else pool.submit(step, finish)
        scratch.give_back()
        if status == DECODE_NOT:
            return None
        if status == DECODE_NONFINITE:
            raise KtxError("MoEExperts.submit: activations or routing weights hold NaN/inf (an upstream layer diverged)")
        raise KtxError(f"MoEExperts.submit: expert id {ids.reshape(-1)[status - DECODE_BAD_ID]} out of range "
                       f"(layer has {self.E} experts; -1 = no expert)")

    def _make_kit(self, scratch, T: int, k: int, ids_dtype):
        """(kd, compiled decode_step, its leading arguments, the buffers) for steps of T tokens x k choices: kd holds the
        addresses of scratch buffers for T * k slots (moe_loops.KIT_*), shared with the general path's buffers of
        the same names, so that every layer's steps run in the same, cache-warm memory."""
        P, H, I, n = T * k, self.H, self.I, self.pool.n_threads
        g = scratch.get
        bufs = [g("ke", (P,), np.int64), g("ks0", (P,), np.int64), g("kn", (P,), np.int64), g("kamx", (P,), np.uint8),
                g("kst", (P,), np.int64), g("ksw", (P,), np.float32), *scratch.qbufs("x", P, H), g("g", (P, I), np.float32),
                g("u", (P, I), np.float32), *scratch.qbufs("h", P, I), g("yt", (n, T, H), np.float32),
                g("kca", (n,), np.int64), g("kcb", (n,), np.int64), g("krem", (P,), np.int64)]
        kd = np.zeros(KIT_WORDS, np.int64)
        kd[:len(bufs)] = [b.ctypes.data for b in bufs]
        mg, mu, md = self.mats
        a0 = self._plan(*DECODE_TILE, False, False)[:3] + (kd, mg.md, mu.md, md.md, self.E, I)
        like = (np.zeros((T, H), np.float32), np.zeros((T, k), ids_dtype), np.zeros((T, k), np.float32),
                np.zeros((T, H), np.float32), 0, 0, 0, n)  # x, ids, w, y, prep, waiter, tid, n_threads
        run = self._entry(decode_step, a0 + like, 3, f" ids {ids_dtype.name}")
        if len(scratch.kits) >= 256:  # batches of ever new shapes must not grow it without bound
            scratch.kits.clear()
        kit = scratch.kits[(self, T, k, ids_dtype == np.int32)] = (kd, run, a0, bufs)  # bufs: kd's memory kept alive
        return kit

    def _submit_fast(self, pool, x, ids, w, here):
        T, H, I = x.shape[0], self.H, self.I
        # the AMX/VNNI split per expert: see plan_slots
        amx_min = (BF16_MIN_TOKENS if self.amx == "bf16" else MIN_TOKENS_PER_EXPERT) if self.amx else 1 << 62
        exp_e, exp_s0, exp_n, exp_amx, slot_tok, slot_w, nt, routed = plan_slots(
            ids, w, self.E, DECODE_TILE[0], PREFILL_TILE[0], amx_min, 16 if self.amx == "model" else AMX_TILE_TOKENS)
        if nt == DECODE_TILE[0]:  # no expert has two tokens: the decode kit (its compiled step plans again, ~1 us; x, ids
            # and w are C-contiguous here, so it does not hand the batch back)
            return self._decode(x, ids, w, here)
        nr = PREFILL_TILE[1]
        P = slot_tok.shape[0]
        scratch = _Scratch.take()
        xq, xd, xs, xsf = scratch.qbufs("x", P, H)
        hq, hd, hs, hsf = scratch.qbufs("h", P, I)
        g, u = scratch.get("g", (P, I), np.float32), scratch.get("u", (P, I), np.float32)
        # y's rows padded by 64 bytes: with H a multiple of 1024 they lie a multiple of 4 KB apart, and the down
        # scatter's load of one token's row after a store to another's waited on it (4K aliasing): 1.77 -> 0.26 ms
        # for 64 tokens x 8 experts x 7168 (Zen 5, one core). Padding g and u the same way measured no gain.
        y = np.zeros((T, H + 16), np.float32)[:, :H]
        wide = bool(nt > 1 and routed >= WIDE_MIN_TOKENS * len(exp_e))
        any_amx = bool(self.amx) and bool(exp_amx.any())  # a numpy reduce: ~10 us right after a token's weights
        Vg, Vu, Vd, x256, h256, fn_g, fn_u, fn_d, full, bf16, fn_t = self._plan(nt, nr, wide, any_amx)
        c_a, c_b = np.zeros(pool.n_threads, np.int64), np.zeros(pool.n_threads, np.int64)  # claim's segments
        remaining = np.full(max(len(exp_e), 1), I // (16 * nr), np.int64)
        mg, mu, md = self.mats
        yt = scratch.get("yt", (0, T, H), np.float32)  # per-thread sums: decode only

        def finish():
            scratch.give_back()
            return y

        barrier = threading.Barrier(pool.n_threads)
        xb = scratch.get("xb", (P if bf16 else 0, H), np.uint16)
        hb = scratch.get("hb", (P if bf16 else 0, I), np.uint16)
        args_a = (Vg, Vu, mg.md, mu.md, H, I, exp_e, exp_s0, exp_n, xq, xd, xs, xsf, g, u, hq, hd, hs, hsf, c_a, remaining,
                  exp_amx, fn_g, fn_u, full, h256, xb, hb, fn_t)
        args_b = (Vd, md.md, H, I, exp_e, exp_s0, exp_n, slot_tok, slot_w, hq, hd, hs, hsf, y, yt, c_b, exp_amx, fn_d,
                  full, hb, fn_t, remaining, _NO_SYNC)
        run_a = self._entry(phase_gate_up, args_a + (0, 1), 2)
        run_b = self._entry(phase_down, args_b + (0, 1), 1)
        split_q = P >= PARALLEL_QUANT_SLOTS and pool.n_threads > 1
        if not split_q:
            quantize_slots(x, slot_tok, 0, P, xq, xd, xs, xsf, x256)
            if bf16:
                bf16_slots(x, slot_tok, 0, P, xb)

        def work(wid, n):
            if not len(exp_e):
                return
            try:
                if split_q:  # each worker quantizes a share of the slots (serial: 1.2 ms of 117, 256 x 8 x 7168)
                    quantize_slots(x, slot_tok, wid * P // n, (wid + 1) * P // n, xq, xd, xs, xsf, x256)
                    if bf16:
                        bf16_slots(x, slot_tok, wid * P // n, (wid + 1) * P // n, xb)
                    barrier.wait()
                run_a(*args_a, wid, n)
                barrier.wait()
                run_b(*args_b, wid, n)
            except BaseException:
                barrier.abort()  # the others waiting at the barrier raise instead of waiting for ever
                raise

        return pool.submit(work, finish) if not here else pool.run_here(work, finish)

    def _plan(self, nt: int, nr: int, wide: bool, any_amx: bool):
        """What a forward with this tile, widening and AMX use runs, kept per key (a decode step spent ~30 us of
        Python choosing it): the three tile variants, whether x and h go per 256, the AMX kernel addresses."""
        key = (nt, nr, wide, any_amx, nt > 1 and per256_tiles())  # KTX_PER256_TILES may change between calls
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plans[key] = self._make_plan(nt, nr, wide, any_amx)
        return plan

    def _make_plan(self, nt: int, nr: int, wide: bool, any_amx: bool):
        H, I = self.H, self.I
        s256 = [nt > 1 and not any_amx and per256_ok(m.layout, wide, K) for m, K in zip(self.mats, (H, H, I))]
        x256 = s256[0] and s256[1]  # x feeds gate and up: per-256 activations only if both tiles take them
        Vg, Vu, Vd = (variant(m.layout.name, self.path, nt, nr, wide and _widens(m.layout), s)
                      for m, s in zip(self.mats, (x256, x256, s256[2])))
        fn_g, fn_u, fn_d = (self._tile_kernel(m.layout, nr) if any_amx else 0 for m in self.mats)
        # 2: bf16 tiles (fn_* are dequant kernels, fn_t the tile); 1: whole int8 tiles; 0: the steps model
        full = {"bf16": 2, "native": 1}.get(self.amx, 0)
        bf16 = full == 2 and any_amx
        fn_t = bf16_tile_address(nr) if bf16 else 0
        return Vg, Vu, Vd, x256, s256[2], fn_g, fn_u, fn_d, full, bf16, fn_t

    def _tile_kernel(self, lay, nr: int) -> int:
        """Address of the AMX kernel for a matrix of layout lay: the native full tile (16 tokens x nr row groups,
        scales included), or the model's steps microkernel with K step G (one scale group per C tile)."""
        key = (self.amx, lay.name, nr)
        if key not in self._amx_fns:
            self._amx_fns[key] = (full_tile_address(tile_variant(lay.name, nr)) if self.amx == "native"
                                  else dequant_address(lay.name) if self.amx == "bf16"
                                  else tile_kernel_address(self.amx, lay.G))
        return self._amx_fns[key]

    def _entry(self, disp, args, n_literal, extra=""):
        """Compiled entry point for these variant literals (and `extra`, naming what else decides the argument types):
        calling the dispatcher with plain ints would re-run its failing non-literal typing on every call (tens of ms)."""
        key = (disp.py_func.__name__ + extra,) + args[:n_literal]
        fn = self._entries.get(key)
        if fn is None:
            sig = tuple(types.literal(a) for a in args[:n_literal]) + tuple(numba.typeof(a) for a in args[n_literal:])
            fn = self._entries[key] = disp.compile(sig)
        return fn

    # ---- reference ----
    def _reference(self, x, ids, w):
        y = np.zeros_like(x)  # [T, H]
        for e in np.unique(ids[ids >= 0]):
            t, j = np.nonzero(ids == e)
            Wg, Wu, Wd = (_dequant(m.raw[e], m.qtype) for m in self.mats)  # [I, H], [I, H], [H, I]
            g = x[t] @ Wg.T  # [n, I]
            h = g / (1 + np.exp(-g)) * (x[t] @ Wu.T)
            np.add.at(y, t, w[t, j][:, None] * (h @ Wd.T))
        return y


def _dequant(raw, qtype) -> np.ndarray:
    if qtype == QT.F32:
        return np.asarray(raw).view(np.float32)
    if qtype == QT.F16:
        return np.asarray(raw).view(np.float16).astype(np.float32)
    if qtype == QT.BF16:
        return (np.asarray(raw).view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    return dequantize(np.asarray(raw), qtype).astype(np.float32)


_ND, _F32, _I32, _I64 = np.ndarray, np.dtype(np.float32), np.dtype(np.int32), np.dtype(np.int64)  # identity checks
_NO_SYNC = np.zeros(2, np.int64)  # phase_down's sync outside phase_both (prefill: a threading.Barrier between phases)


class _Scratch:
    """One forward's buffers (quantized x and h, g, u), kept between forwards and layers: fresh ones per forward
    cost page faults and zeroing (256 tokens x 8 experts x 7168: every other forward took 5.3k page faults and
    12-95 ms of system time on top of 117 ms, as glibc handed the freed memory back to the kernel). A forward
    takes a free set at submit and gives it back when its job finishes, so forwards in flight at once (NUMA
    shards, queued layers) never share one. Nothing is zeroed: quantize_slots writes every slot row, padding
    included, the tiles every row of g and u, and phase A every row of h."""

    _free: list[_Scratch] = []
    _lock = threading.Lock()

    def __init__(self):
        self.bufs: dict[str, np.ndarray] = {}
        self.views: dict[tuple, np.ndarray] = {}  # (name, shape, dtype) -> view of bufs[name]
        self.kits: dict[tuple, tuple] = {}  # (MoEExperts, T, k, int32 ids) -> its decode kit: addresses in bufs

    @classmethod
    def take(cls) -> _Scratch:
        with cls._lock:
            return cls._free.pop() if cls._free else cls()

    def give_back(self) -> None:
        with self._lock:
            self._free.append(self)

    def get(self, name: str, shape: tuple[int, ...], dtype) -> np.ndarray:
        key = (name, shape, dtype)  # decode asks for the same views every step: ~2 us a view to make
        v = self.views.get(key)
        if v is not None:
            return v
        n = math.prod(shape) * np.dtype(dtype).itemsize
        buf = self.bufs.get(name)
        if buf is None or buf.size < n:
            buf = self.bufs[name] = aligned_empty(max(n, 64), np.uint8)
            self.views = {k: v for k, v in self.views.items() if k[0] != name}  # views of the old buffer
            self.kits.clear()  # their addresses may be in the old buffer
        if len(self.views) > 256:  # prefills of ever new lengths must not grow it without bound
            self.views.clear()
        v = self.views[key] = buf[:n].view(dtype).reshape(shape)
        return v

    def qbufs(self, name: str, P: int, K: int):
        """int8 codes [P, K], scales [P, K/32], 16-sums [P, K/16], scaled sums [P, K/32] (quantize.py)."""
        return (self.get(name + "q", (P, K), np.int8), self.get(name + "d", (P, K // 32), np.float32),
                self.get(name + "s", (P, K // 16), np.int32), self.get(name + "f", (P, K // 32), np.float32))

