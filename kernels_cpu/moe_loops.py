"""The blocked MoE loops that every worker runs (Numba, nogil), around the tile kernels of simd.py.

Routing is flattened into "slots" (token t, choice j) sorted by expert; expert i owns slots
[s0[i], s0[i] + n[i]), padded to a multiple of the token tile so a tile never reads past its expert: NT for
the vector tiles of simd.py, 16 for experts that run on AMX tiles (exp_amx[i], amx_loops.py).

    phase A  items = (expert, block of NR*16 rows of I):  g = W_gate x, u = W_up x for the expert's slots,
             h = silu(g) * u; the worker that finishes an expert's last item quantizes its h rows (atomic
             countdown), so no barrier is needed between the two matmuls of one expert.
    -- barrier (pool; decode, phase_both: none, each down item waits for its expert's h) --
    phase B  items = blocks of NR*16 rows of H: for every expert, down = W_down h for its slots, and
             y[t] += w * down, race-free because items own disjoint columns of y.

Items are claimed with atomic fetch-adds (`claim`): each worker takes the items of its own contiguous segment
in order, then, when it runs dry, those left in the others' (dynamic scheduling with one weight stream per
worker). A matrix is passed as md, int64 [15]: (address, expert stride, row-group stride)
for codes, d, sc, dmin, m (zeros where the type has no such field). fn_g, fn_u, fn_d are microkernel
addresses for AMX experts (0 when the batch has none: no AMX scratch is allocated and no tile code runs).
Both kinds of expert share the items, the counters and the countdown, so one prefill mixes them freely.
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import carray, literally, njit
from numba.core import cgutils, types
from numba.extending import intrinsic

from .amx import AMX_TILE_TOKENS
from .amx_bf16 import A_BYTES, BF16_TILE_TOKENS, PANEL_K, PANEL_PAIRS, call_bf16_tile, dequant_row_groups, to_bf16
from .amx_loops import LAY, amx_tile, b_operand, widen_codes
from .quantize import quantize_row, quantize_row256
from .simd import call_tile, tile, tile_nt
from .vec import axpy, silu_mul


@intrinsic
def fetch_add(typingctx, arr, idx, val):
    """Atomically arr[idx] += val (int64 array); returns the old value."""
    if not (isinstance(arr, types.Array) and arr.dtype == types.int64):
        return None
    sig = types.int64(arr, types.intp, types.int64)

    def codegen(context, builder, signature, args):
        ary = context.make_array(signature.args[0])(context, builder, args[0])
        ptr = cgutils.get_item_pointer(context, builder, signature.args[0], ary, [args[1]])
        return builder.atomic_rmw("add", ptr, args[2], "seq_cst")

    return sig, codegen


@intrinsic
def atomic_read(typingctx, arr, idx):
    """arr[idx] (int64 array) read atomically (acquire): for spin-waits, which must not write the line they poll
    (a fetch_add of 0 is a locked write: many threads polling one counter would fight over its cache line)."""
    if not (isinstance(arr, types.Array) and arr.dtype == types.int64):
        return None
    sig = types.int64(arr, types.intp)

    def codegen(context, builder, signature, args):
        ary = context.make_array(signature.args[0])(context, builder, args[0])
        ptr = cgutils.get_item_pointer(context, builder, signature.args[0], ary, [args[1]])
        return builder.load_atomic(ptr, "acquire", 8)

    return sig, codegen


@intrinsic
def sched_yield(typingctx):
    """libc sched_yield() by symbol name (a ctypes pointer would stop Numba from caching the loops): a waiting
    thread gives its core to the one it waits for, which matters on a machine busier than its cores."""
    def codegen(context, builder, signature, args):
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.IntType(32), []), "sched_yield")
        builder.call(fn, [])
        return context.get_dummy_value()

    return types.void(), codegen


@njit(nogil=True, cache=True)
def aligned_bytes(n):
    """A uint8 scratch array of n bytes starting on a 64-byte boundary (repack.aligned_empty, for the loops)."""
    buf = np.empty(n + 64, np.uint8)
    off = -np.int64(buf.ctypes.data) % 64
    return buf[off:off + n]


@njit(nogil=True, cache=True, inline="always")
def claim(C, ci, tid, n_threads, n):
    """The next of an op's n items for thread tid, or -1 when all are taken: the items are split into one
    contiguous segment per thread, each with its counter at C[ci + s]; a thread takes its own segment's items in
    order, then steals from the others' (in order after its own). So each thread streams one contiguous run of
    weights instead of every n_threads-th item: with one shared counter two threads alternated 100 KB items of a
    matrix, and each item began with a cold stream and ended prefetching the other thread's next item."""
    for j in range(n_threads):
        s = (tid + j) % n_threads
        lo, hi = s * n // n_threads, (s + 1) * n // n_threads
        if lo < hi:
            i = lo + fetch_add(C, ci + s, 1)
            if i < hi:
                return i
    return -1


@njit(nogil=True, cache=True, inline="always")
def field_at(md, f, e, rg):
    """Address of field f (repack.FIELDS: 0 codes, then the scales) of row group rg (16 rows) of matrix e in a
    descriptor md (repack.descriptor: address, expert stride, row-group stride per field)."""
    return md[3 * f] + e * md[3 * f + 1] + rg * md[3 * f + 2]


@njit(nogil=True, cache=True, inline="always")
def _tile_addr(md, e, rg, K, xq, xd, xs, xsf, t0, out, o_off):
    """simd.tile's addresses and strides (after K) for row group rg of matrix e and the token tile from slot t0."""
    return (md[0] + e * md[1] + rg * md[2], md[2], md[3] + e * md[4] + rg * md[5], md[5],
            md[6] + e * md[7] + rg * md[8], md[8], md[9] + e * md[10] + rg * md[11], md[11],
            md[12] + e * md[13] + rg * md[14], md[14],
            xq.ctypes.data + t0 * K, xd.ctypes.data + t0 * (K // 32) * 4, xs.ctypes.data + t0 * (K // 16) * 4,
            xsf.ctypes.data + t0 * (K // 32) * 4, out.ctypes.data + o_off * 4)


@njit(nogil=True, cache=True, inline="always")
def _mat_tile(V, md, e, rg, K, xq, xd, xs, xsf, t0, out, o_off, ldo, pf):
    a = _tile_addr(md, e, rg, K, xq, xd, xs, xsf, t0, out, o_off)
    tile(V, K, a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7], a[8], a[9], a[10], a[11], a[12], a[13], a[14], ldo, pf)


@njit(nogil=True, cache=True, inline="always")
def _part_tile(V, md, e, rg, K, xq, xd, xs, xsf, t0, left, out, o_off, ldo, pf):
    """_mat_tile for a prefill token tile with `left` real tokens from t0 on: the NT-token tile when there are NT,
    else a 2- or 3-token one (an expert's last tile; its slots are still padded to NT, so a 2-token tile over one
    real token reads a padding row, whose output goes nowhere). Padding had cost ~1.5 token columns an expert."""
    if left >= V // 10 % 10:
        _mat_tile(V, md, e, rg, K, xq, xd, xs, xsf, t0, out, o_off, ldo, pf)
        return
    a = _tile_addr(md, e, rg, K, xq, xd, xs, xsf, t0, out, o_off)
    if left <= 2:
        tile_nt(V, 2, K, a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7], a[8], a[9], a[10], a[11], a[12], a[13], a[14],
                ldo, pf)
    else:
        tile_nt(V, 3, K, a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7], a[8], a[9], a[10], a[11], a[12], a[13], a[14],
                ldo, pf)


PF_MAX_LINES = 8  # prefill tiles prefetch at most this many lines of the next rows per scale group (pf_slice)


@njit(nogil=True, cache=True, inline="always")
def pf_slice(V, md, e, rg, K, i, fallback, n):
    """What the i-th tile call over an item's n tokens prefetches (simd.tile's pf): slice i, K/G cache lines (one
    per scale group), of the codes of row groups rg .. rg + NR - 1 of matrix e, the weights this worker reads
    next; fallback (an address already in cache) when e < 0 or slice i lies past them, or, for decode tiles
    (NT = 1, whose pf is where their stream goes on), 0: the memory after their rows. The first token tile of an
    item otherwise waits on DRAM: Q8_0 [2048, 7168] 4x32 tiles over 64 tokens ran at 824 GOPS on one core with
    the weights in L3 and 698 with them in DRAM. When a slice per call would not cover the rows (an expert with few
    tokens: Q4_K at K = 7168 has 8 slices, 13 tokens make 4 calls), slices of m lines per group, enough for the
    rows, up to PF_MAX_LINES (pf's low bits, see tile): at ~12 tokens per expert the op went 0.52-0.55 ->
    0.59-0.62 of the peak (bench/RESULTS.md)."""
    lines = K // LAY[V // 1000 % 10][0]
    rows = (V % 10) * md[2]
    NT = V // 10 % 10
    m = 1
    if NT > 1:
        m = min(PF_MAX_LINES, max(1, -(-rows // ((n + NT - 1) // NT * lines * 64))))
    off = i * lines * 64 * m
    if e < 0 or off >= rows:
        return fallback - fallback % 64 if NT > 1 else 0  # line-aligned: one line per group
    return field_at(md, 0, e, rg) + off + m - 1


@njit(nogil=True, cache=True, inline="always")
def _widened(V, md, e, rg, K, buf, mdw):
    """md itself, or (wide variants) mdw after widening the tile's NR row groups of (e, rg) into buf
    [NR, K/4, 64]: mdw is md with the codes triple pointing into buf (e stride 0, row-group stride 16 K)."""
    return _widen_md(V // 10000 % 10, V // 1000 % 10, V % 10, md, e, rg, K, buf, mdw)


@njit(nogil=True, cache=True, inline="always")
def _amx_md(lay, NR, md, e, rg, K, buf, mdw):
    """The B operands of an AMX tile: the byte plane as it is (8-bit codes), else widened like _widened."""
    return _widen_md(LAY[lay][5] != 8, lay, NR, md, e, rg, K, buf, mdw)


@njit(nogil=True, cache=True, inline="always")
def _widen_md(wide, lay, NR, md, e, rg, K, buf, mdw):
    if not wide:
        return md
    base = np.int64(buf.ctypes.data)
    for r in range(NR):
        widen_codes(LAY[lay][5], K, md[0] + e * md[1] + (rg + r) * md[2], base + r * 16 * K)
    mdw[:] = md
    mdw[0], mdw[1], mdw[2] = base - rg * 16 * K, 0, 16 * K
    return mdw


@njit(nogil=True, cache=True, inline="always")
def _amx_full_tile(fn, md, e, rg, K, xq, xd, xs, xsf, t0, out, o_off, ldo, scratch):
    """The native AMX tile at fn (amx.full_tile_address) for slots t0 .. t0 + AMX_TILE_TOKENS: _mat_tile's
    arguments, scratch in the place of pf."""
    call_tile(fn, K, md[0] + e * md[1] + rg * md[2], md[2], md[3] + e * md[4] + rg * md[5], md[5],
              md[6] + e * md[7] + rg * md[8], md[8], md[9] + e * md[10] + rg * md[11], md[11],
              md[12] + e * md[13] + rg * md[14], md[14],
              xq.ctypes.data + t0 * K, xd.ctypes.data + t0 * (K // 32) * 4, xs.ctypes.data + t0 * (K // 16) * 4,
              xsf.ctypes.data + t0 * (K // 32) * 4, out.ctypes.data + o_off * 4, ldo, scratch.ctypes.data)


@njit(nogil=True, cache=True)
def check_inputs(x, ids, w, E):
    """(index of the first expert id outside [-1, E) in the flat ids, or -1; whether x or w holds NaN/inf)."""
    bad = -1
    for i in range(ids.shape[0]):
        if ids[i] < -1 or ids[i] >= E:
            bad = i
            break
    nonfinite = False
    for v in x.ravel():
        if not np.isfinite(v):
            nonfinite = True
            break
    for v in w.ravel():
        if not np.isfinite(v):
            nonfinite = True
            break
    return bad, nonfinite


@njit(nogil=True, cache=True)
def plan_slots(ids, w, E, nt_one, nt_many, amx_min, amx_tile):
    """Routing ids/w [T, k] (-1 = none) -> the slot layout above, in one compiled pass (decode calls this once per
    MoE layer per token; the numpy version was ~60 small calls, slow right after a layer's weights flushed the caches).

    Slots of an expert keep the order of (t, j). The token tile is nt_one when no expert has two tokens, else
    nt_many; when the batch averages more than amx_min tokens per used expert, experts with more than amx_min tokens
    are AMX experts, padded to amx_tile. Returns exp_e, exp_s0, exp_n, exp_amx (uint8), slot_tok (-1 = padding),
    slot_w, the chosen tile and the number of routed (token, expert) pairs."""
    T, k = ids.shape
    counts = np.zeros(E, np.int64)
    for t in range(T):
        for j in range(k):
            if ids[t, j] >= 0:
                counts[ids[t, j]] += 1
    used, total, most = 0, 0, 0
    for e in range(E):
        if counts[e]:
            used += 1
            total += counts[e]
            most = max(most, counts[e])
    nt = nt_one if most <= 1 else nt_many
    amx_on = used > 0 and total > amx_min * used
    exp_e, exp_s0, exp_n = np.empty(used, np.int64), np.empty(used, np.int64), np.empty(used, np.int64)
    exp_amx = np.zeros(used, np.uint8)
    nxt = np.empty(E, np.int64)  # next free slot of each expert
    P, i = 0, 0
    for e in range(E):
        c = counts[e]
        if c == 0:
            continue
        amx = amx_on and c > amx_min
        tile_n = amx_tile if amx else nt
        exp_e[i], exp_s0[i], exp_n[i], exp_amx[i] = e, P, c, amx
        nxt[e] = P
        P += (c + tile_n - 1) // tile_n * tile_n
        i += 1
    slot_tok = np.full(P, -1, np.int64)
    slot_w = np.zeros(P, np.float32)
    for t in range(T):
        for j in range(k):
            e = ids[t, j]
            if e >= 0:
                slot_tok[nxt[e]] = t
                slot_w[nxt[e]] = w[t, j]
                nxt[e] += 1
    return exp_e, exp_s0, exp_n, exp_amx, slot_tok, slot_w, nt, total


@njit(nogil=True, cache=True)
def quantize_slots(x, slot_tok, lo, hi, xq, xd, xs, xsf, per256):
    """Quantized copy of x[slot_tok[s]] into slot rows s in [lo, hi), per 32 or (per256) per 256; padding slots
    are zeroed (the buffers are reused scratch, moe.py), so their tile rows come out 0. A token routed to k experts
    is quantized once per call and its rows copied to its other slots."""
    first = np.full(x.shape[0], -1, np.int64)  # slot that holds each token's quantized row
    for s in range(lo, hi):
        t = slot_tok[s]
        if t < 0:
            xq[s] = 0
            xd[s] = 0.0
            xs[s] = 0
            xsf[s] = 0.0
            continue
        f = first[t]
        if f >= 0:
            xq[s] = xq[f]
            xd[s] = xd[f]
            xs[s] = xs[f]
            xsf[s] = xsf[f]
        elif per256:
            quantize_row256(x[t], xq[s], xd[s], xs[s], xsf[s])
        else:
            quantize_row(x[t], xq[s], xd[s], xs[s], xsf[s])
        first[t] = s


@njit(nogil=True, cache=True)
def bf16_slots(x, slot_tok, lo, hi, xb):
    """bf16 copy of x[slot_tok[s]] into xb row s for s in [lo, hi) (the A operand of the bf16 AMX tiles,
    amx_bf16.py); padding slots are zeroed."""
    for s in range(lo, hi):
        t = slot_tok[s]
        if t < 0:
            xb[s] = 0
        else:
            to_bf16(x[t], xb[s])


@njit(nogil=True, cache=True, inline="always")
def _bf16_tiles(fn_t, K, wb, xb, s0, n, out, o_off, ldo):
    """The bf16 AMX tiles (amx_bf16.tile_module) for slots s0 .. s0 + n (whole tiles of BF16_TILE_TOKENS; the
    expert's slots are padded so), whole K, with the item's row groups in wb: slot s's outputs go to the floats of
    out from o_off + (s - s0) * ldo on."""
    for t0 in range(s0, s0 + n, BF16_TILE_TOKENS):
        call_bf16_tile(fn_t, K, wb.ctypes.data, 32 * K, xb.ctypes.data + t0 * K * 2, 2 * K,
                       out.ctypes.data + (o_off + (t0 - s0) * ldo) * 4, ldo, 0)


@njit(nogil=True, cache=True, inline="always")
def _bf16_panel(fn_dq, fn_t, md, e, rg, pp, K, wp, xb, s0, n, out, o_off, ld):
    """Rows 16 rg .. 16 (rg + 2 pp) of matrix e for slots s0 .. s0 + n (slot t, row 16 rg + i to the float
    o_off + t ld + 16 rg + i of out), for an expert whose bf16 activations
    exceed L2 (amx_bf16.A_BYTES): per PANEL_K of k, the pp row-group pairs are dequantized into wp (512 KB) and
    every token tile runs against all of them, so each 32-token slice of x comes from L3 once per panel instead of
    once per pair (the C tiles carry over through out). One core, Q4_K, K = 7168, tiles alone: 1143 GFLOPS with
    64 tokens' activations in L2, 902 with 128 and 700-750 with 256 when each pair streamed all of them."""
    for k0 in range(0, K, PANEL_K):
        kn = min(PANEL_K, K - k0)
        dequant_row_groups(fn_dq, md, e, rg, 2 * pp, k0, kn, wp)
        for t0 in range(s0, s0 + n, BF16_TILE_TOKENS):
            for p in range(pp):
                call_bf16_tile(fn_t, kn, wp.ctypes.data + p * 64 * kn, 32 * kn, xb.ctypes.data + (t0 * K + k0) * 2,
                               2 * K, out.ctypes.data + (o_off + t0 * ld + (rg + 2 * p) * 16) * 4, ld, k0)


@njit(nogil=True, cache=True)
def phase_gate_up(Vg, Vu, md_g, md_u, H, I, exp_e, exp_s0, exp_n, xq, xd, xs, xsf,
                  g, u, hq, hd, hs, hsf, counter, remaining, exp_amx, fn_g, fn_u, amx_full, h256, xb, hb, fn_t,
                  tid, n_threads):
    literally(Vg)
    literally(Vu)
    NT = Vg // 10 % 10
    NR = Vg % 10
    # decode: an item is a run of RUN tiles of gate's rows, then the same of up's (_decode_runs)
    RUN = _decode_run(I // (16 * NR)) if NT == 1 else 1
    n_rt = I // (16 * NR * RUN)
    n_items = exp_e.shape[0] * n_rt
    ld = g.strides[0] // 4  # row stride of g and u, in floats
    lay_g, lay_u = Vg // 1000 % 10, Vu // 1000 % 10
    Ka = H if fn_g and amx_full < 2 else 0  # int8 AMX scratch only where tiles may run: C per scale group, widened B
    cbuf = aligned_bytes(Ka * 64).view(np.int32).reshape((Ka // 16, 16, 16))
    wg, wu = aligned_bytes(NR * 16 * Ka), aligned_bytes(NR * 16 * Ka)
    bf16 = amx_full == 2 and fn_g != 0  # bf16 AMX experts in this batch (fn_g is 0 when it has none)
    wb = aligned_bytes(NR * 32 * (H if bf16 else 0))  # the item's row groups as B tiles
    pp = PANEL_PAIRS  # bf16 AMX panels: row-group pairs per panel, a divisor of the expert's n_rt
    while n_rt % pp:
        pp //= 2
    wp = aligned_bytes(pp * 64 * PANEL_K if bf16 else 0)
    # wide variants: the vector tile's row groups widened into this, gate's and then up's of an item
    vg = aligned_bytes(NR * 16 * (H if Vg // 10000 % 10 or Vu // 10000 % 10 else 0))
    mdw_g, mdw_u = np.empty(15, np.int64), np.empty(15, np.int64)
    while True:
        item = claim(counter, 0, tid, n_threads, n_items)
        if item < 0:
            break
        j = item // n_rt
        rg = (item % n_rt) * NR * RUN
        e, s0, n = exp_e[j], exp_s0[j], exp_n[j]
        done = NR * RUN  # row groups this item completes
        if exp_amx[j] and amx_full == 2 and n * H * 2 > A_BYTES and NR == 2:  # bf16 panels: the first item of
            if (item % n_rt) % pp:  # each pp pairs runs them all; the others have nothing to do
                continue
            _bf16_panel(fn_g, fn_t, md_g, e, rg, pp, H, wp, xb, s0, n, g, 0, ld)
            _bf16_panel(fn_u, fn_t, md_u, e, rg, pp, H, wp, xb, s0, n, u, 0, ld)
            done = NR * pp
        elif exp_amx[j] and amx_full == 2:  # bf16 AMX tiles (amx_bf16.py): dequantize gate's rows, run, then up's
            dequant_row_groups(fn_g, md_g, e, rg, NR, 0, H, wb)
            _bf16_tiles(fn_t, H, wb, xb, s0, n, g, s0 * ld + rg * 16, ld)
            dequant_row_groups(fn_u, md_u, e, rg, NR, 0, H, wb)
            _bf16_tiles(fn_t, H, wb, xb, s0, n, u, s0 * ld + rg * 16, ld)
        elif exp_amx[j] and amx_full:  # native AMX tiles: 32 tokens x NR row groups per call (amx.full_tile_module)
            mg, mu = _amx_md(lay_g, NR, md_g, e, rg, H, wg, mdw_g), _amx_md(lay_u, NR, md_u, e, rg, H, wu, mdw_u)
            for t0 in range(s0, s0 + n, AMX_TILE_TOKENS):
                _amx_full_tile(fn_g, mg, e, rg, H, xq, xd, xs, xsf, t0, g, t0 * ld + rg * 16, ld, cbuf)
                _amx_full_tile(fn_u, mu, e, rg, H, xq, xd, xs, xsf, t0, u, t0 * ld + rg * 16, ld, cbuf)
        elif exp_amx[j]:  # the tile model (amx.tdpbsud_steps_model): one row group per call, scales in Numba
            for r in range(rg, rg + NR):
                bg, bu = b_operand(lay_g, md_g, e, r, H, wg), b_operand(lay_u, md_u, e, r, H, wu)
                for t0 in range(s0, s0 + n, 16):
                    amx_tile(lay_g, fn_g, md_g, e, r, H, bg, xq, xd, xs, xsf, t0, cbuf, g, t0, r * 16)
                    amx_tile(lay_u, fn_u, md_u, e, r, H, bu, xq, xd, xs, xsf, t0, cbuf, u, t0, r * 16)
        else:
            nj = item + 1 if item + 1 < n_items else -1  # prefetched: this worker's next item, most likely
            ne, nrg = (exp_e[nj // n_rt] if nj >= 0 else -1), nj % n_rt * NR * RUN
            fb = xq.ctypes.data
            if NT == 1:  # decode: gate's run, then up's; the last tile of each prefetches on into the run read next
                for r in range(RUN):
                    pf = 0 if r + 1 < RUN else md_u[0] + e * md_u[1] + rg * md_u[2]
                    _mat_tile(Vg, md_g, e, rg + r * NR, H, xq, xd, xs, xsf, s0, g, s0 * ld + (rg + r * NR) * 16, ld, pf)
                for r in range(RUN):
                    pf = 0 if r + 1 < RUN else pf_slice(Vg, md_g, ne, nrg, H, 0, fb, 1)
                    _mat_tile(Vu, md_u, e, rg + r * NR, H, xq, xd, xs, xsf, s0, u, s0 * ld + (rg + r * NR) * 16, ld, pf)
            else:  # prefill: gate's token tiles, prefetching up's rows, then up's, prefetching the next item's gate
                # rows: the caches hold one matrix's rows (widened ones in one buffer, vg) and the next ones, not
                # gate's, up's and the next item's two (Q8_0 at K = 7168 and 64 tokens: ~0.9 MB instead of ~1.4
                # in a 1 MB L2; bench/RESULTS.md)
                mg = _widened(Vg, md_g, e, rg, H, vg, mdw_g)
                for t0 in range(s0, s0 + n, NT):
                    _part_tile(Vg, mg, e, rg, H, xq, xd, xs, xsf, t0, s0 + n - t0, g, t0 * ld + rg * 16, ld,
                               pf_slice(Vu, md_u, e, rg, H, (t0 - s0) // NT, fb, n))
                mu = _widened(Vu, md_u, e, rg, H, vg, mdw_u)
                for t0 in range(s0, s0 + n, NT):
                    _part_tile(Vu, mu, e, rg, H, xq, xd, xs, xsf, t0, s0 + n - t0, u, t0 * ld + rg * 16, ld,
                               pf_slice(Vg, md_g, ne, nrg, H, (t0 - s0) // NT, fb, n))
        for s in range(s0, s0 + n):  # h = silu(g) * u, in place in g
            o = (s * ld + rg * 16) * 4
            silu_mul(g.ctypes.data + o, u.ctypes.data + o, g.ctypes.data + o, done * 16)
        if fetch_add(remaining, j, -(done // NR)) == done // NR:  # last block of this expert: its h is complete
            s1 = exp_s0[j + 1] if j + 1 < exp_e.shape[0] else g.shape[0]  # padding slots too: their h is 0
            for s in range(s0, s1):
                if exp_amx[j] and amx_full == 2:  # the down tiles of this expert take bf16 h
                    to_bf16(g[s], hb[s])
                elif h256:  # the down tiles are per-256 variants (moe.py)
                    quantize_row256(g[s], hq[s], hd[s], hs[s], hsf[s])
                else:
                    quantize_row(g[s], hq[s], hd[s], hs[s], hsf[s])
            fetch_add(remaining, j, -1)  # -1: h quantized, its down items may start (_down_decode)


@njit(nogil=True, cache=True, inline="always")
def _decode_run(n_tiles):
    """Tiles per decode item of phase_gate_up: 8 where they divide the expert's n_tiles (else 4, 2, 1). A thread
    reads gate's tiles of the item as one run, then up's: streaming gate and up alternating per 64 rows ran at
    0.93 of a read loop (Q4_K, K = 7168, 2 threads, Zen 4; scratch harness), runs of 2 / 4 / 8 tiles at 0.95 /
    0.96 / 0.97 (K = 2048: 0.90 -> 0.88 / 0.92 / 0.94). bench_cpu_experts' decode loop, runs of 4 and 8 in
    alternating processes (5 pairs, a noisy hour): 8 ahead in 4 of them, by 0.036 of the read on average."""
    return 8 if n_tiles % 8 == 0 else 4 if n_tiles % 4 == 0 else 2 if n_tiles % 2 == 0 else 1


@njit(nogil=True, cache=True)
def phase_down(Vd, md_d, H, I, exp_e, exp_s0, exp_n, slot_tok, slot_w, hq, hd, hs, hsf, y, yt, counter, exp_amx,
               fn_d, amx_full, hb, fn_t, remaining, sync, tid, n_threads):
    literally(Vd)
    NT = Vd // 10 % 10
    NR = Vd % 10
    n_rb = H // (16 * NR)  # row blocks of NR row groups
    if NT == 1:
        _down_decode(Vd, md_d, I, exp_e, exp_s0, slot_tok, slot_w, hq, hd, hs, hsf, yt, counter, n_rb, remaining, sync,
                     tid, n_threads)
        return
    # bf16 AMX: an item is a panel of PB row blocks, so that each bf16 expert's h is read once per panel step
    # (moe_loops._bf16_panel); the other experts run the PB blocks one after another
    PB = PANEL_PAIRS if amx_full == 2 and fn_d and NR == 2 else 1
    while n_rb % PB:
        PB //= 2
    n_items = n_rb // PB
    tmp = np.empty((AMX_TILE_TOKENS, NR * 16), np.float32)  # [tokens of one tile, rows of one item]
    Ka = I if fn_d and amx_full < 2 else 0
    cbuf = aligned_bytes(Ka * 64).view(np.int32).reshape((Ka // 16, 16, 16))
    wd = aligned_bytes(NR * 16 * Ka)
    big = 0  # slots of the largest bf16 expert: its panel's outputs [slots, PB * 32] before the scatter
    for j in range(exp_e.shape[0]):
        if exp_amx[j] and amx_full == 2:
            big = max(big, (exp_n[j] + BF16_TILE_TOKENS - 1) // BF16_TILE_TOKENS * BF16_TILE_TOKENS)
    wp = aligned_bytes(PB * 64 * PANEL_K if big else 0)
    tp = aligned_bytes(big * PB * 32 * 4).view(np.float32).reshape((big, PB * 32))
    vd = aligned_bytes(NR * 16 * (I if Vd // 10000 % 10 else 0))
    mdw = np.empty(15, np.int64)
    lay_d = Vd // 1000 % 10
    while True:
        item = claim(counter, 0, tid, n_threads, n_items)
        if item < 0:
            break
        for j in range(exp_e.shape[0]):
            e, s0, n = exp_e[j], exp_s0[j], exp_n[j]
            if exp_amx[j] and amx_full == 2:
                rg = item * PB * NR
                _bf16_panel(fn_d, fn_t, md_d, e, rg, PB, I, wp, hb, s0, n, tp, -s0 * PB * 32 - rg * 16, PB * 32)
                for t0 in range(s0, s0 + n, BF16_TILE_TOKENS):
                    _scatter(tp[t0 - s0:], 0, PB * NR * 16, min(BF16_TILE_TOKENS, s0 + n - t0), t0, rg, slot_tok,
                             slot_w, y)
                continue
            for rb in range(item * PB, item * PB + PB):
                rg = rb * NR
                if exp_amx[j] and amx_full:
                    m = _amx_md(lay_d, NR, md_d, e, rg, I, wd, mdw)
                    for t0 in range(s0, s0 + n, AMX_TILE_TOKENS):
                        _amx_full_tile(fn_d, m, e, rg, I, hq, hd, hs, hsf, t0, tmp, 0, NR * 16, cbuf)
                        _scatter(tmp, 0, NR * 16, min(AMX_TILE_TOKENS, s0 + n - t0), t0, rg, slot_tok, slot_w, y)
                elif exp_amx[j]:
                    for r in range(NR):
                        bd = b_operand(lay_d, md_d, e, rg + r, I, wd)
                        for t0 in range(s0, s0 + n, 16):
                            amx_tile(lay_d, fn_d, md_d, e, rg + r, I, bd, hq, hd, hs, hsf, t0, cbuf, tmp, 0,
                                     16 * r)
                            _scatter(tmp, 16 * r, 16 * r + 16, min(16, s0 + n - t0), t0, rg, slot_tok, slot_w, y)
                else:
                    m = _widened(Vd, md_d, e, rg, I, vd, mdw)
                    if j + 1 < exp_e.shape[0]:  # prefetched: the next expert's rows of this item, or the next item's
                        ne, nrg = exp_e[j + 1], rg
                    else:
                        ne, nrg = (exp_e[0], rg + NR) if rb + 1 < n_rb else (-1, 0)
                    for t0 in range(s0, s0 + n, NT):
                        _part_tile(Vd, m, e, rg, I, hq, hd, hs, hsf, t0, s0 + n - t0, tmp, 0, NR * 16,
                                   pf_slice(Vd, md_d, ne, nrg, I, (t0 - s0) // NT, hq.ctypes.data, n))
                        _scatter(tmp, 0, NR * 16, min(NT, s0 + n - t0), t0, rg, slot_tok, slot_w, y)


@njit(nogil=True, cache=True)
def phase_both(Vg, Vu, Vd, md_g, md_u, md_d, H, I, exp_e, exp_s0, exp_n, slot_tok, slot_w, xq, xd, xs, xsf, g, u,
               hq, hd, hs, hsf, y, yt, c_a, c_b, remaining, exp_amx, sync, waiter, tid, n_threads):
    """Decode (vector tiles only): phase_gate_up, then phase_down, in one GIL-free call per thread, with no barrier
    between them: a down item waits only for its own expert's h (phase_gate_up marks an expert -1 in `remaining`
    once its h is quantized), so a thread done with gate/up starts on the down rows of the experts it finished
    first instead of waiting for the other's last item (up to ~140 us: an item is 4 tiles of gate and of up, 2 MB
    of Q4_K at K = 7168). sync (int64 [2], fresh zeros): [0] threads done (plus one once the last of them has
    stored y, the sum of the threads' sums yt), [1] set by a thread that failed (the others stop waiting). Thread
    `waiter` (the calling thread of MoEExperts.forward; -1: none) returns only when y is stored, so
    that it needs no wake-up from the workers. With a threading.Barrier between two calls from Python, a decode
    step of the DeepSeek-V3 shape lost ~0.1 ms at the barrier, each thread going back through the interpreter and
    the GIL."""
    literally(Vg)
    literally(Vu)
    literally(Vd)
    no_bf16 = np.empty((0, 0), np.uint16)
    phase_gate_up(Vg, Vu, md_g, md_u, H, I, exp_e, exp_s0, exp_n, xq, xd, xs, xsf, g, u, hq, hd, hs, hsf, c_a, remaining,
                  exp_amx, 0, 0, 0, False, no_bf16, no_bf16, 0, tid, n_threads)
    phase_down(Vd, md_d, H, I, exp_e, exp_s0, exp_n, slot_tok, slot_w, hq, hd, hs, hsf, y, yt, c_b, exp_amx, 0, 0,
               no_bf16, 0, remaining, sync, tid, n_threads)
    if atomic_read(sync, 1):  # a thread failed: forward raises its error, nobody stores y
        return
    if fetch_add(sync, 0, 1) == n_threads - 1:  # the last thread done: y = the threads' sums, then one count more
        for t in range(y.shape[0]):
            for c in range(y.shape[1]):
                v = yt[0, t, c]
                for k in range(1, yt.shape[0]):
                    v += yt[k, t, c]
                y[t, c] = v
        fetch_add(sync, 0, 1)
    if tid == waiter:
        _spin_until(sync, 0, n_threads + 1)


@njit(nogil=True, cache=True, inline="always")
def _spin_until(sync, i, n):
    """Wait until sync[i] >= n (True), or until a thread has failed (sync[1] set: False)."""
    while atomic_read(sync, i) < n:
        if atomic_read(sync, 1):
            return False
        sched_yield()
    return True


@njit(nogil=True, cache=True, inline="always")
def _down_decode(Vd, md_d, I, exp_e, exp_s0, slot_tok, slot_w, hq, hd, hs, hsf, yt, counter, n_rb, remaining, sync, tid,
                 n_threads):
    """The down phase when no expert has two tokens (decode): items of row blocks of one expert's matrix,
    expert by expert, into this thread's own sums yt[tid] [T, H] (phase_both adds them into y). Each thread
    streams whole matrices; with items of one row block through every expert (phase_down's order, which needs
    no sums) a thread switched matrices every 64 KB of Q4_K and ran the phase at 85% of the rate of gate and up."""
    NR = Vd % 10
    n_items = exp_e.shape[0] * n_rb
    ys = yt[tid]
    ys[:] = 0.0
    tmp = np.empty((1, NR * 16), np.float32)
    while True:
        item = claim(counter, 0, tid, n_threads, n_items)
        if item < 0:
            break
        j, rb = item // n_rb, item % n_rb
        s0 = exp_s0[j]
        while atomic_read(remaining, j) >= 0:  # expert j's h not yet quantized (phase_gate_up marks it -1)
            if atomic_read(sync, 1):
                return
            sched_yield()
        nxt = j + 1 if rb + 1 == n_rb and j + 1 < exp_e.shape[0] else -1  # where the stream goes on: the next matrix
        pf = md_d[0] + exp_e[nxt] * md_d[1] if nxt >= 0 else 0
        _mat_tile(Vd, md_d, exp_e[j], rb * NR, I, hq, hd, hs, hsf, s0, tmp, 0, NR * 16, pf)
        t = slot_tok[s0]
        axpy(ys.ctypes.data + t * ys.strides[0] + rb * NR * 64, tmp.ctypes.data, slot_w[s0], NR * 16)


@njit(nogil=True, cache=True, inline="always")
def _scatter(tmp, i0, i1, n_tok, t0, rg, slot_tok, slot_w, y):
    """y[token of slot t0 + ti, 16 rg + i] += w * tmp[ti, i]: items own disjoint columns of y, so no race."""
    for ti in range(n_tok):
        t = slot_tok[t0 + ti]
        axpy(y.ctypes.data + t * y.strides[0] + (rg * 16 + i0) * 4, tmp.ctypes.data + ti * tmp.strides[0] + i0 * 4,
             slot_w[t0 + ti], i1 - i0)


# A decode kit (moe.py, MoEExperts._decode): int64 [KIT_WORDS], the addresses of one (layer, T, k)'s scratch buffers,
# each sized for T * k slots, then control words. A decode step's compiled call then takes 17 arguments instead
# of ~35: each array argument costs an unboxing on every call, and right after a token's weights went through the
# caches the Python side of a step was ~0.25 ms of ~6.8 (Q4_K, 8 experts of 7168 x 2048).
# The control words: KIT_READY (0, then 1 once the plan is out, -1 if withdrawn) and phase_both's sync, 2 words
# from KIT_SYNC, are zeroed by moe.py before the step's threads start; the plan's sizes KIT_USED and KIT_SLOTS.
(KIT_EXP_E, KIT_EXP_S0, KIT_EXP_N, KIT_EXP_AMX, KIT_SLOT_TOK, KIT_SLOT_W, KIT_XQ, KIT_XD, KIT_XS, KIT_XSF, KIT_G, KIT_U,
 KIT_HQ, KIT_HD, KIT_HS, KIT_HSF, KIT_YT, KIT_CA, KIT_CB, KIT_REM, KIT_READY, KIT_SYNC) = range(22)
KIT_USED, KIT_SLOTS = KIT_SYNC + 2, KIT_SYNC + 3
KIT_WORDS = KIT_SYNC + 4
DECODE_OK, DECODE_NOT, DECODE_NONFINITE, DECODE_BAD_ID = 0, 1, 2, 3  # decode_step's status (bad id i: 3 + i)


@intrinsic
def void_ptr(typingctx, addr):
    """An address as a void pointer (numba.carray views with an explicit dtype)."""
    if not isinstance(addr, types.Integer):
        return None

    def codegen(context, builder, signature, vals):
        return builder.inttoptr(context.cast(builder, vals[0], signature.args[0], types.int64), cgutils.voidptr_t)

    return types.voidptr(addr), codegen


@njit(nogil=True, cache=True, inline="always")
def _kit(kd, i, shape, dtype):
    return carray(void_ptr(kd[i]), shape, dtype)


@njit(nogil=True, cache=True, inline="always")
def _rows(a):
    """Whether 2-D a is C-contiguous (a stride of a dimension of size 1 is anything: numpy's a[None] gives 0)."""
    return (a.shape[1] < 2 or a.strides[1] == a.itemsize) and (a.shape[0] < 2 or a.strides[0] == a.shape[1] * a.itemsize)


@njit(nogil=True, cache=True)
def _decode_prep(kd, E, I, NR, n_threads, x, ids, w, y):
    """The thread that prepares a decode step: checks what MoEExperts.submit left to it (shapes, C-contiguous rows;
    else DECODE_NOT: the general path raises or copies), check_inputs, plan_slots, and when no expert has two tokens
    quantizes x into the kit's slots and resets phase_both's counters; returns the status."""
    T, k = ids.shape
    H = x.shape[1]
    if (x.shape[0] != T or w.shape[0] != T or w.shape[1] != k or y.shape[0] != T or y.shape[1] != H
            or not (_rows(x) and _rows(ids) and _rows(w))):
        return DECODE_NOT
    bad, nonfinite = check_inputs(x, ids.reshape(-1), w, E)
    if bad >= 0:
        return DECODE_BAD_ID + bad
    if nonfinite:
        return DECODE_NONFINITE
    exp_e, exp_s0, exp_n, exp_amx, slot_tok, slot_w, nt, total = plan_slots(ids, w, E, 1, 2, 1 << 62, 16)
    if nt != 1:
        return DECODE_NOT
    used, P = exp_e.shape[0], slot_tok.shape[0]
    if used == 0:
        y[:] = 0.0
    _kit(kd, KIT_EXP_E, used, np.int64)[:] = exp_e
    _kit(kd, KIT_EXP_S0, used, np.int64)[:] = exp_s0
    _kit(kd, KIT_EXP_N, used, np.int64)[:] = exp_n
    _kit(kd, KIT_EXP_AMX, used, np.uint8)[:] = 0
    _kit(kd, KIT_SLOT_TOK, P, np.int64)[:] = slot_tok
    _kit(kd, KIT_SLOT_W, P, np.float32)[:] = slot_w
    quantize_slots(x, slot_tok, 0, P, _kit(kd, KIT_XQ, (P, H), np.int8), _kit(kd, KIT_XD, (P, H // 32), np.float32),
                   _kit(kd, KIT_XS, (P, H // 16), np.int32), _kit(kd, KIT_XSF, (P, H // 32), np.float32), False)
    _kit(kd, KIT_CA, n_threads, np.int64)[:] = 0
    _kit(kd, KIT_CB, n_threads, np.int64)[:] = 0
    _kit(kd, KIT_REM, used, np.int64)[:] = I // (16 * NR)
    kd[KIT_USED] = used
    kd[KIT_SLOTS] = P
    return DECODE_OK


@njit(nogil=True, cache=True)
def decode_step(Vg, Vu, Vd, kd, md_g, md_u, md_d, E, I, x, ids, w, y, prep, waiter, tid, n_threads):
    """One decode step on a kit: thread `prep` runs _decode_prep and publishes the plan (kd[KIT_READY] 1, or -1 when
    the step is not a decode or its inputs are bad: everyone returns that status); the others wait for it, then all
    run phase_both on the kit's buffers into y [T, H]. tid == n_threads: prepare only (MoEExperts.submit's job mode,
    whose pool workers start after the plan is out). The control words must be 0 when the step's first thread starts
    (moe.py zeroes them before it wakes the workers: a worker that fails at once sets the sync's failure word)."""
    literally(Vg)
    literally(Vu)
    literally(Vd)
    NR = Vd % 10
    if tid == prep:
        status = _decode_prep(kd, E, I, NR, n_threads, x, ids, w, y)
        fetch_add(kd, KIT_READY, 1 if status == DECODE_OK else -1)
        if status != DECODE_OK or tid == n_threads:
            return status
    else:
        while atomic_read(kd, KIT_READY) == 0:
            sched_yield()
        if atomic_read(kd, KIT_READY) < 0:
            return DECODE_NOT
    T, H = x.shape
    used, P = kd[KIT_USED], kd[KIT_SLOTS]
    if used == 0:
        return DECODE_OK
    phase_both(Vg, Vu, Vd, md_g, md_u, md_d, H, I, _kit(kd, KIT_EXP_E, used, np.int64),
               _kit(kd, KIT_EXP_S0, used, np.int64), _kit(kd, KIT_EXP_N, used, np.int64),
               _kit(kd, KIT_SLOT_TOK, P, np.int64), _kit(kd, KIT_SLOT_W, P, np.float32),
               _kit(kd, KIT_XQ, (P, H), np.int8), _kit(kd, KIT_XD, (P, H // 32), np.float32),
               _kit(kd, KIT_XS, (P, H // 16), np.int32), _kit(kd, KIT_XSF, (P, H // 32), np.float32),
               _kit(kd, KIT_G, (P, I), np.float32), _kit(kd, KIT_U, (P, I), np.float32),
               _kit(kd, KIT_HQ, (P, I), np.int8), _kit(kd, KIT_HD, (P, I // 32), np.float32),
               _kit(kd, KIT_HS, (P, I // 16), np.int32), _kit(kd, KIT_HSF, (P, I // 32), np.float32), y,
               _kit(kd, KIT_YT, (n_threads, T, H), np.float32), _kit(kd, KIT_CA, n_threads, np.int64),
               _kit(kd, KIT_CB, n_threads, np.int64), _kit(kd, KIT_REM, used, np.int64),
               _kit(kd, KIT_EXP_AMX, used, np.uint8), kd[KIT_SYNC:KIT_SYNC + 2], waiter, tid, n_threads)
    return DECODE_OK
