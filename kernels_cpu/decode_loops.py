"""A whole decode step as one compiled program that every worker thread runs (Numba, nogil).

Decoding one token through a model is a few hundred small operations; run one by one from Python, each pays
a dispatch, a pool wake-up or a torch call (5-50 us, and more right after a layer's weights flushed the
caches), which added up to half the step time. Here the model's builder (ktx.layers.program) writes the
step once as a table of ops, and `run_program` executes the table on every thread:

    for each op:   parallel ops: claim items from the op's own counter (atomic fetch-add: work stealing)
                   serial ops:   the first thread to reach a run of them runs it (norms, RoPE, routing: a few
                                 microseconds each)
                   barrier after the op when it, or the next op, is parallel (the builder sets the flag): wait
                   until the work of every op so far is done (counted in units of work, not threads)

State lives in flat arenas addressed by element offsets: F float32 (activations, logits, scratch), Q/QD/QS/QF
(int8 activations with their per-32 scales, per-16 sums and scale x sum: quantize.py's four arrays), IX int64
(expert ids), WA (addresses of float32 weights: norms, router, bias), MD (one row per quantized matrix: the
md descriptor of moe_loops plus, in column 15, the address of its 1 x 64 decode tile kernel, simd.tile_address).
KV is MLA's latent cache or GQA's key cache, VC GQA's value cache, each [layers, capacity, width]; pos the
position of the token.

Ops (columns of a row of `ops`: code, parallel, barrier, then the arguments named in each function below):
    NORM      RMSNorm of `rows` rows                                        (serial)
    QUANT     int8-quantize rows into a quant buffer                         (serial)
    GEMV      y (+)= W x for a (batched) quantized matrix, items of row blocks (parallel)
    ROPE      rotate pairs (interleaved or NeoX halves) of `heads` vectors     (serial)
    CACHE     copy a row into KV[layer, pos] (or VC)                          (serial)
    MLA       absorbed latent attention over KV[layer, :pos + 1], head chunks  (parallel)
    GQA       grouped-query attention over KV/VC[layer, window .. pos], head chunks  (parallel)
    ADD       y += x (x from F, or a float32 weight: a bias)                  (serial)
    SIGMOID   in place                                                        (serial)
    ROUTER    float32 router logits, row chunks                               (parallel)
    TOPK      sigmoid/softmax, group limit, top-k, renormalise, scale, select (serial)
    MOE_UP    gate/up tiles of the chosen experts and of the shared (or dense) MLP, SiLU * up; the thread
              finishing an expert's last block quantizes its h row (countdown, no barrier)  (parallel)
    MOE_DOWN  w_j down_j h_j and shared down h, items of row blocks of one matrix, into per-thread sums (parallel)
    MOE_SUM   add the per-thread sums into the residual (or store them), column items  (parallel)

Counters C (int64, fresh zeros per call): C[0] the units of work done (run_program), then the MoE countdowns at
offsets the builder reserves, then n_threads item counters per op (the last n_threads x len(ops) entries: moe_loops.claim's segments; ops
that need no locality use the first; a serial run's claim is its first op's). A fresh array per call also means
a thread still catching up through the last call can never see the next call's counts.

Threads: with one pool per NUMA node, an MoE op may name a node; only that node's threads run it (each expert
shard is read where its memory is), and the builder leaves out the barriers between the ops of one phase so a
thread done with its own shard moves on. Attention goes through attn_simd's vector kernels (by address, like
the tiles) for blocks of four heads that share a cache head.
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import carray, njit
from numba.core import cgutils, types
from numba.extending import intrinsic

from .moe_loops import atomic_read, claim, fetch_add, field_at, sched_yield, void_ptr
from .quantize import quantize_row
from .simd import DECODE_PF_LOCALITY, _prefetch, call_codegen, call_tile
from .vec import silu_mul

(OP_NORM, OP_QUANT, OP_GEMV, OP_ROPE, OP_CACHE, OP_MLA, OP_ROUTER, OP_TOPK, OP_MOE_UP, OP_MOE_DOWN, OP_MOE_SUM, OP_ADD,
 OP_SIGMOID, OP_GQA) = range(1, 15)
PARALLEL_OPS = (OP_GEMV, OP_MLA, OP_ROUTER, OP_MOE_UP, OP_MOE_DOWN, OP_GQA, OP_MOE_SUM)
N_COLS = 32  # columns of an op row: code, parallel, barrier, up to 29 arguments
TILE_ROWS = 64  # rows of the decode tile (1 token x 4 row groups of 16)
PF_START = 8192  # bytes of a thread's first rows in the next op prefetched before a barrier (_prefetch_next)

_i64 = ir.IntType(64)


@intrinsic
def cycles(typingctx):
    """The CPU's cycle counter (llvm.readcyclecounter: rdtsc on x86), for the per-op timeline."""
    def codegen(context, builder, signature, args):
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_i64, []), "llvm.readcyclecounter")
        return builder.call(fn, [])

    return types.int64(), codegen


@intrinsic
def prefetch_lines(typingctx, addr, n):
    """llvm.prefetch of the n cache lines from addr on, with the decode tiles' locality (simd.DECODE_PF_LOCALITY)."""
    sig = types.void(types.int64, types.int64)

    def codegen(context, b, signature, args):
        with cgutils.for_range(b, args[1]) as loop:
            _prefetch(b, b.inttoptr(b.add(args[0], b.mul(loop.index, ir.Constant(_i64, 64))), ir.IntType(8).as_pointer()),
                      DECODE_PF_LOCALITY)
        return context.get_dummy_value()

    return sig, codegen


@njit(nogil=True, cache=True, inline="always")
def _prefetch_start(md, e, rg):
    """The first lines of rows 16 rg .. of matrix e: the codes' first PF_START bytes (where a tile's own prefetch,
    PF_AHEAD bytes ahead of its reads, has not been) and the first row group's scale lines (the tile prefetches the
    next row group's)."""
    prefetch_lines(field_at(md, 0, e, rg), PF_START // 64)
    for f in range(1, 5):
        if md[3 * f]:
            prefetch_lines(field_at(md, f, e, rg), min(md[3 * f + 2], 2048) // 64)


@njit(nogil=True, cache=True)
def _prefetch_next(ops, i, MD, tid, n_threads):
    """Before a thread waits at the barrier after op i: when the next parallel op is a GEMV, prefetch the start of
    this thread's first item of it, so the item does not begin on a cold stream. (An MoE layer's experts are
    chosen only after the barrier before its gate/up, and its down follows with no barrier between.) A small GEMV
    of the attention (0.6-2.4 MB) ran at ~85% of the lm_head's rate per byte (dsv3-bench)."""
    for j in range(i + 1, ops.shape[0]):
        a = ops[j]
        if not a[1]:
            continue
        n = _units(a)
        lo = tid * n // n_threads  # first item of this thread's segment (claim)
        if a[0] == OP_GEMV and lo < (tid + 1) * n // n_threads:
            n_ib = _cdiv(_cdiv(a[5], TILE_ROWS), a[14])
            _prefetch_start(MD[a[3]], lo // n_ib, lo % n_ib * a[14] * 4)
        return


@njit(nogil=True, cache=True, inline="always")
def _tile(md, e, rg, K, xq, xd, xs, xsf, out, pf=0):
    """One 1 x 64 decode tile: rows 16 rg .. 16 rg + 63 of matrix (expert/batch) e times one activation row; pf: the
    codes read next (simd.tile), 0 for the rows after these."""
    call_tile(md[15], K, md[0] + e * md[1] + rg * md[2], md[2], md[3] + e * md[4] + rg * md[5], md[5],
              md[6] + e * md[7] + rg * md[8], md[8], md[9] + e * md[10] + rg * md[11], md[11],
              md[12] + e * md[13] + rg * md[14], md[14], xq, xd, xs, xsf, out, TILE_ROWS, pf)


@njit(nogil=True, cache=True, inline="always")
def _qrow(Q, QD, QS, QF, q, d, s, f, row, K):
    """Addresses of activation row `row` (width K) of the quant buffer at offsets q, d, s, f."""
    return (Q.ctypes.data + q + row * K, QD.ctypes.data + 4 * (d + row * (K // 32)),
            QS.ctypes.data + 4 * (s + row * (K // 16)), QF.ctypes.data + 4 * (f + row * (K // 32)))


@njit(nogil=True, cache=True)
def _norm(a, WA, F, eps):
    src, w, dst, n, rows, stride = a[3], a[4], a[5], a[6], a[7], a[8]
    wv = carray(void_ptr(WA[w]), n, np.float32)
    for r in range(rows):
        s = np.float32(0.0)
        for i in range(n):
            v = F[src + r * stride + i]
            s += v * v
        inv = np.float32(1.0) / np.sqrt(s / np.float32(n) + np.float32(eps))
        for i in range(n):
            F[dst + r * stride + i] = F[src + r * stride + i] * inv * wv[i]


@njit(nogil=True, cache=True)
def _quant(a, F, Q, QD, QS, QF):
    src, stride, rows, K, q, d, s, f = a[3], a[4], a[5], a[6], a[7], a[8], a[9], a[10]
    for r in range(rows):
        x = F[src + r * stride: src + r * stride + K]
        quantize_row(x, Q[q + r * K: q + (r + 1) * K], QD[d + r * (K // 32): d + (r + 1) * (K // 32)],
                     QS[s + r * (K // 16): s + (r + 1) * (K // 16)], QF[f + r * (K // 32): f + (r + 1) * (K // 32)])


@njit(nogil=True, cache=True, inline="always")
def _cdiv(a, b):
    return (a + b - 1) // b


@njit(nogil=True, cache=True)
def _units(a):
    """Op row a's units of work, the amount its threads add to the completion counter C[0] when it is done: the
    items of a parallel op (as each op's loop counts them), 1 for a serial op."""
    code = a[0]
    if code == OP_GEMV:
        return a[4] * _cdiv(_cdiv(a[5], TILE_ROWS), a[14])
    if code == OP_MLA:
        return _cdiv(a[5], a[9])
    if code == OP_GQA:
        return _cdiv(a[5], a[11])
    if code == OP_ROUTER:
        return _cdiv(a[4], a[8])
    if code == OP_MOE_UP:
        return a[5] * _cdiv(a[6] // TILE_ROWS, a[28]) + _cdiv(a[12] // TILE_ROWS, a[28])
    if code == OP_MOE_DOWN:
        i_h = _cdiv(a[6] // TILE_ROWS, a[20])
        return a[4] * i_h + (i_h if a[7] >= 0 else 0)
    if code == OP_MOE_SUM:
        return _cdiv(a[4], TILE_ROWS)
    return 1


@njit(nogil=True, cache=True)
def _gemv(a, C, ci, tid, n_threads, MD, F, Q, QD, QS, QF):
    mat, R, K, q, d, s, f, dst, bstride, acc, IB = a[3], a[5], a[6], a[7], a[8], a[9], a[10], a[11], a[12], a[13], a[14]
    md = MD[mat]
    tmp = np.empty(TILE_ROWS, np.float32)
    n_rb = _cdiv(R, TILE_ROWS)
    n_ib = _cdiv(n_rb, IB)
    done = 0
    while True:
        item = claim(C, ci, tid, n_threads, _units(a))  # batches x n_ib
        if item < 0:
            return done
        done += 1
        b = item // n_ib
        xq, xd, xs, xsf = _qrow(Q, QD, QS, QF, q, d, s, f, b, K)
        for rb in range(item % n_ib * IB, min(n_rb, (item % n_ib + 1) * IB)):
            r0 = rb * TILE_ROWS
            _tile(md, b, r0 // 16, K, xq, xd, xs, xsf, tmp.ctypes.data)
            o = dst + b * bstride + r0
            if acc:
                for r in range(min(TILE_ROWS, R - r0)):
                    F[o + r] += tmp[r]
            else:
                for r in range(min(TILE_ROWS, R - r0)):
                    F[o + r] = tmp[r]
    return done


@njit(nogil=True, cache=True)
def _rope(a, F):
    src, sstride, dst, dstride, heads, dim, cs, neox = a[3], a[4], a[5], a[6], a[7], a[8], a[9], a[10]
    half = dim // 2
    for h in range(heads):
        x, y = src + h * sstride, dst + h * dstride
        for i in range(half):
            c, sn = F[cs + i], F[cs + half + i]
            if neox:
                x1, x2 = F[x + i], F[x + half + i]
                F[y + i], F[y + half + i] = x1 * c - x2 * sn, x2 * c + x1 * sn
            else:
                x1, x2 = F[x + 2 * i], F[x + 2 * i + 1]
                F[y + 2 * i], F[y + 2 * i + 1] = x1 * c - x2 * sn, x2 * c + x1 * sn


@njit(nogil=True, cache=True, fastmath=True, inline="always")
def _dot(a, b):
    """sum a * b over two contiguous float32 vectors of one length (fastmath: vectorized, reassociated)."""
    acc = np.float32(0.0)
    for c in range(a.shape[0]):
        acc += a[c] * b[c]
    return acc


@intrinsic
def call5(typingctx, fn, a, b, c, d, e):
    """fn(a, b, c, d, e) through the address fn: attn_simd.scores4."""
    return types.void(fn, a, b, c, d, e), call_codegen


@intrinsic
def call8(typingctx, fn, a, b, c, d, e, f, g, h):
    """fn(a, ..., h) through the address fn: attn_simd.pv4."""
    return types.void(fn, a, b, c, d, e, f, g, h), call_codegen


@njit(nogil=True, cache=True, fastmath=True)
def _attend(Qm, Om, P, cap, K, V, layer, h0, h1, t0, S, kc, vc, d, dv, scale, fs, fp):
    """Heads h0..h1 of Qm [n_h, d] against cache rows t0..S-1 of K and V (head h's key at columns kc[h] .. + d of
    a row, its value at vc[h] .. + dv) -> Om [n_h, dv]; P: scores [n_h, cap]. Heads in blocks of four that read
    one cache head go through the attn_simd kernels at fs (scores, rows outermost: each row loaded once per
    block) and fp (values, eight rows at a time into register accumulators); the rest through plain loops."""
    simd_k, simd_v = d % 16 == 0, dv % 16 == 0
    out = np.empty(4, np.float32)
    Wv = V.shape[2]
    for t in range(t0, S):
        row = K[layer, t]
        h = h0
        while h < h1:
            if simd_k and h + 4 <= h1 and kc[h] == kc[h + 3]:
                call5(fs, Qm.ctypes.data + h * d * 4, d * 4, row.ctypes.data + kc[h] * 4, d, out.ctypes.data)
                for i in range(4):
                    P[(h + i) * cap + t] = out[i] * scale
                h += 4
            else:
                P[h * cap + t] = _dot(Qm[h], row[kc[h]:kc[h] + d]) * scale
                h += 1
    for h in range(h0, h1):
        sc = P[h * cap + t0: h * cap + S]
        sc -= sc.max()
        sc[:] = np.exp(sc)
        sc /= sc.sum()
        Om[h, :] = 0.0
    for tb in range(t0, S, 8):
        nt = min(8, S - tb)
        h = h0
        while h < h1:
            if simd_v and h + 4 <= h1 and vc[h] == vc[h + 3]:
                call8(fp, Om.ctypes.data + h * dv * 4, dv * 4, P.ctypes.data + (h * cap + tb) * 4, cap * 4,
                      V.ctypes.data + ((layer * V.shape[1] + tb) * Wv + vc[h]) * 4, Wv * 4, nt, dv)
                h += 4
            else:
                for t in range(tb, tb + nt):
                    p = P[h * cap + t]
                    v = V[layer, t, vc[h]:vc[h] + dv]
                    for c in range(dv):
                        Om[h, c] += p * v[c]
                h += 1


@njit(nogil=True, cache=True)
def _mla(a, C, ci, F, KV, pos, scale):
    """Absorbed MLA for heads of one chunk: q rows [heads, D] = [q_lat | q_pe] against cache rows [kv_c | k_pe];
    o_lat[h] = softmax(q . row * scale) @ kv_c. Every head reads the whole row (key) and its kv_c part (value)."""
    layer, qo, n_h, lat, oo, so, chunk, fs, fp = a[3], a[4], a[5], a[6], a[7], a[8], a[9], a[10], a[11]
    D, cap = KV.shape[2], KV.shape[1]
    Qm = F[qo:qo + n_h * D].reshape((n_h, D))
    Om = F[oo:oo + n_h * lat].reshape((n_h, lat))
    zero = np.zeros(n_h, np.int64)
    done = 0
    while True:
        h0 = fetch_add(C, ci, 1) * chunk
        if h0 >= n_h:
            return done
        _attend(Qm, Om, F[so:so + n_h * cap], cap, KV, KV, layer, h0, min(n_h, h0 + chunk), 0, pos + 1, zero, zero,
                D, lat, scale, fs, fp)
        done += 1


@njit(nogil=True, cache=True)
def _gqa(a, C, ci, F, K, V, pos, scale):
    """Query heads of one chunk against cache rows t in [pos + 1 - window, pos] (all when window = 0); head h
    reads cache head h // (n_h / n_kv)."""
    layer, qo, n_h, n_kv, d, dv, oo, so, chunk, window = a[3], a[4], a[5], a[6], a[7], a[8], a[9], a[10], a[11], a[12]
    fs, fp = a[13], a[14]
    cap, S = K.shape[1], pos + 1
    t0 = max(0, S - window) if window > 0 else 0
    group = n_h // n_kv
    Qm = F[qo:qo + n_h * d].reshape((n_h, d))
    Om = F[oo:oo + n_h * dv].reshape((n_h, dv))
    kc, vc = np.arange(n_h) // group * d, np.arange(n_h) // group * dv
    done = 0
    while True:
        h0 = fetch_add(C, ci, 1) * chunk
        if h0 >= n_h:
            return done
        _attend(Qm, Om, F[so:so + n_h * cap], cap, K, V, layer, h0, min(n_h, h0 + chunk), t0, S, kc, vc, d, dv, scale,
                fs, fp)
        done += 1


@njit(nogil=True, cache=True, fastmath=True)
def _router(a, C, ci, WA, F):
    w, E, H, src, dst, chunk = a[3], a[4], a[5], a[6], a[7], a[8]
    W = carray(void_ptr(WA[w]), (E, H), np.float32)
    done = 0
    while True:
        e0 = fetch_add(C, ci, 1) * chunk
        if e0 >= E:
            return done
        x = F[src:src + H]
        for e in range(e0, min(E, e0 + chunk)):
            F[dst + e] = _dot(W[e], x)
        done += 1


@njit(nogil=True, cache=True, inline="always")
def _best(v, taken):
    """Index of the largest v[i] not yet taken (the lowest index among equals)."""
    best = -1
    for i in range(v.shape[0]):
        if not taken[i] and (best < 0 or v[i] > v[best]):
            best = i
    return best


@njit(nogil=True, cache=True)
def _topk(a, WA, F, IX, scale):
    """ktx.layers.router.route for one token, then the selective-experts cut (ktx.scheduler.select_top)."""
    lo, E, k, sigmoid, bias, n_group, topk_group, norm, k_sel, ids, wo = a[3], a[4], a[5], a[6], a[7], a[8], a[9], a[10], a[11], a[12], a[13]
    probs = np.empty(E, np.float32)
    choice = np.empty(E, np.float32)
    if sigmoid:
        for e in range(E):
            probs[e] = np.float32(1.0) / (np.float32(1.0) + np.exp(-F[lo + e]))
    else:
        mx = F[lo: lo + E].max()
        tot = np.float32(0.0)
        for e in range(E):
            probs[e] = np.exp(F[lo + e] - mx)
            tot += probs[e]
        for e in range(E):
            probs[e] /= tot
    choice[:] = probs
    if sigmoid and bias >= 0:
        bv = carray(void_ptr(WA[bias]), E, np.float32)
        for e in range(E):
            choice[e] += bv[e]
    if n_group > 1 and topk_group < n_group:
        per = E // n_group
        gs = np.empty(n_group, np.float32)
        for g in range(n_group):
            m1, m2 = -np.inf, -np.inf  # the group's two best: top-2 sum (sigmoid) or the best (softmax)
            for e in range(g * per, (g + 1) * per):
                v = choice[e]
                if v > m1:
                    m1, m2 = v, m1
                elif v > m2:
                    m2 = v
            gs[g] = m1 + m2 if sigmoid else m1
        keep = np.zeros(n_group, np.bool_)
        for _ in range(topk_group):
            keep[_best(gs, keep)] = True
        for g in range(n_group):
            if not keep[g]:
                choice[g * per:(g + 1) * per] = -np.inf
    sel = np.empty(k, np.int64)
    wt = np.empty(k, np.float32)
    taken = np.zeros(E, np.bool_)
    for j in range(k):
        best = _best(choice, taken)
        taken[best] = True
        sel[j] = best
        wt[j] = probs[best]
    if norm:
        tot = np.float32(0.0)
        for j in range(k):
            tot += wt[j]
        for j in range(k):
            wt[j] = wt[j] / (tot + np.float32(1e-20))
    order = np.argsort(-wt, kind="mergesort")  # stable, as select_top
    for j in range(k_sel):
        IX[ids + j] = sel[order[j]]
        F[wo + j] = wt[order[j]] * np.float32(scale)


@njit(nogil=True, cache=True, inline="always")
def _up_start(a, item, MD, IX):
    """Address of the first gate codes of MOE_UP item `item` (0 past the op's last item)."""
    k, I, IB = a[5], a[6], a[28]
    i_r = _cdiv(I // TILE_ROWS, IB)
    if item >= _units(a):
        return 0
    if item < k * i_r:
        return field_at(MD[a[3]], 0, IX[a[26] + item // i_r], item % i_r * IB * 4)
    return field_at(MD[a[8]], 0, 0, a[10] + (item - k * i_r) * IB * 4)


@njit(nogil=True, cache=True, inline="always")
def _down_start(a, item, MD, IX):
    """Address of the first codes of MOE_DOWN item `item` (0 past the op's last item)."""
    k, IB = a[4], a[20]
    i_h = _cdiv(a[6] // TILE_ROWS, IB)
    if item >= _units(a):
        return 0
    j, rg = item // i_h, item % i_h * IB * 4
    return field_at(MD[a[3]], 0, IX[a[17] + j], rg) if j < k else field_at(MD[a[7]], 0, 0, rg)


@njit(nogil=True, cache=True)
def _moe_up(a, C, ci, tid, n_threads, MD, F, Q, QD, QS, QF, IX):
    """Items: IB consecutive blocks of 64 rows of one routed expert's I, then of the shared MLP's Is (per item, one
    run of gate's rows and one of up's, which the tiles' prefetch follows). h = act(gate x) * up x, act = SiLU or
    (gelu = 1) GELU-tanh."""
    mg, mu, k, I, H = a[3], a[4], a[5], a[6], a[7]
    sg, su, sg0, su0, Is = a[8], a[9], a[10], a[11], a[12]
    xq_, xd_, xs_, xf_ = a[13], a[14], a[15], a[16]
    ho, hq, hd, hs, hf = a[17], a[18], a[19], a[20], a[21]
    shq, shd, shs, shf, ids, cd, IB, gelu = a[22], a[23], a[24], a[25], a[26], a[27], a[28], a[29]
    n_r, n_s = I // TILE_ROWS, Is // TILE_ROWS
    i_r = _cdiv(n_r, IB)  # items per routed expert (the shared MLP's follow: _units)
    g = np.empty(TILE_ROWS * IB, np.float32)
    u = np.empty(TILE_ROWS * IB, np.float32)
    xq, xd, xs, xf = _qrow(Q, QD, QS, QF, xq_, xd_, xs_, xf_, 0, H)
    done = 0
    while True:
        item = claim(C, ci, tid, n_threads, _units(a))  # k * i_r + the shared MLP's
        if item < 0:
            return done
        done += 1
        if item < k * i_r:
            j, b0 = item // i_r, item % i_r * IB
            e, mdg, mdu, r0g, r0u, o, n, K = IX[ids + j], MD[mg], MD[mu], 0, 0, ho + j * I, n_r, I
        else:
            j, b0 = k, (item - k * i_r) * IB
            e, mdg, mdu, r0g, r0u, o, n, K = 0, MD[sg], MD[su], sg0, su0, ho + k * I, n_s, Is
        b1 = min(n, b0 + IB)
        # gate's rows of the item as one run, then up's (each tile's prefetch goes on into the rows read next: the
        # end of gate's run into up's, the end of up's into gate's next item, the one this thread most likely takes
        # next; 0 after the op's last item). Gate and up alternating per 64 rows ran the op at ~80% of the lm_head's
        # rate per byte (dsv3-bench, K = 2048: 75 KB tiles), one run each at ~91%.
        up0 = mdu[0] + e * mdu[1] + (r0u + b0 * 4) * mdu[2]
        nxt_g = _up_start(a, item + 1, MD, IX)  # past an expert's end too: the next one's gate rows
        for rb in range(b0, b1):
            _tile(mdg, e, r0g + rb * 4, H, xq, xd, xs, xf, g.ctypes.data + 4 * TILE_ROWS * (rb - b0),
                  0 if rb + 1 < b1 else up0)
        for rb in range(b0, b1):
            _tile(mdu, e, r0u + rb * 4, H, xq, xd, xs, xf, u.ctypes.data + 4 * TILE_ROWS * (rb - b0),
                  0 if rb + 1 < b1 else nxt_g)
        nh = (b1 - b0) * TILE_ROWS  # h of these rows
        if gelu:  # tanh approximation, as torch's gelu(approximate="tanh")
            for r in range(nh):
                v = g[r]
                act = np.float32(0.5) * v * (np.float32(1.0) + np.tanh(np.float32(0.7978845608028654) * (v + np.float32(0.044715) * v * v * v)))
                F[o + b0 * TILE_ROWS + r] = act * u[r]
        else:
            silu_mul(g.ctypes.data, u.ctypes.data, F.ctypes.data + 4 * (o + b0 * TILE_ROWS), nh)
        if fetch_add(C, cd + j, b1 - b0) == n - (b1 - b0):  # this row's last blocks: quantize h for the down projection
            if j < k:
                quantize_row(F[o:o + K], Q[hq + j * K: hq + (j + 1) * K], QD[hd + j * (K // 32): hd + (j + 1) * (K // 32)],
                             QS[hs + j * (K // 16): hs + (j + 1) * (K // 16)], QF[hf + j * (K // 32): hf + (j + 1) * (K // 32)])
            else:
                quantize_row(F[o:o + K], Q[shq: shq + K], QD[shd: shd + K // 32], QS[shs: shs + K // 16], QF[shf: shf + K // 32])
            fetch_add(C, cd + j, 1)  # n + 1: h_j is quantized, MOE_DOWN's items of this row may start


@njit(nogil=True, cache=True)
def _moe_down(a, C, ci, tid, n_threads, MD, F, Q, QD, QS, QF, IX):
    """Items: IB consecutive blocks of 64 rows of H of one routed expert's down (weighted), then of the shared
    MLP's (times F[sw], sw >= 0); each thread adds into its own partial sum part[tid] (summed by MOE_SUM). No
    barrier after MOE_UP: an item waits until its row's h is quantized (MOE_UP's countdown C[cd + j] at its blocks
    + 1), so a thread done with gate/up starts on the rows it finished itself instead of waiting for the others'
    last items."""
    md_, k, I, H, sd, Is = a[3], a[4], a[5], a[6], a[7], a[8]
    hq, hd, hs, hf, shq, shd, shs, shf, ids, wo, part, IB, sw = (a[9], a[10], a[11], a[12], a[13], a[14], a[15], a[16],
                                                                 a[17], a[18], a[19], a[20], a[21])
    cd = a[23]
    n_h = H // TILE_ROWS
    i_h = _cdiv(n_h, IB)
    tmp = np.empty(TILE_ROWS, np.float32)
    dst = part + tid * H
    done = 0
    while True:
        item = claim(C, ci, tid, n_threads, _units(a))
        if item < 0:
            return done
        done += 1
        j, b0 = item // i_h, item % i_h * IB
        ready = (I if j < k else Is) // TILE_ROWS + 1
        while atomic_read(C, cd + j) < ready:
            sched_yield()
        if j < k:
            xq, xd, xs, xf = _qrow(Q, QD, QS, QF, hq, hd, hs, hf, j, I)
            m, e, K, w = MD[md_], IX[ids + j], I, F[wo + j]
        else:
            xq, xd, xs, xf = _qrow(Q, QD, QS, QF, shq, shd, shs, shf, 0, Is)
            m, e, K, w = MD[sd], 0, Is, F[sw] if sw >= 0 else np.float32(1.0)  # qwen2moe: a sigmoid gate
        b1 = min(n_h, b0 + IB)
        for rb in range(b0, b1):  # the last tile's prefetch goes on into the next item's rows (another expert's too)
            _tile(m, e, rb * 4, K, xq, xd, xs, xf, tmp.ctypes.data, 0 if rb + 1 < b1 else _down_start(a, item + 1, MD, IX))
            o = dst + rb * TILE_ROWS
            for r in range(TILE_ROWS):
                F[o + r] += w * tmp[r]


@njit(nogil=True, cache=True)
def _moe_sum(a, C, ci, F, n_threads):
    """dst (+)= sum over threads of part[t], items of 64 columns (O(threads x H): serial on thread 0 it would grow
    with the machine); the partial sums are zeroed for the next layer."""
    part, H, dst, acc = a[3], a[4], a[5], a[6]
    done = 0
    while True:
        c0 = fetch_add(C, ci, 1) * TILE_ROWS
        if c0 >= H:
            return done
        done += 1
        c1 = min(H, c0 + TILE_ROWS)
        if not acc:
            F[dst + c0:dst + c1] = 0.0
        for t in range(n_threads):
            p = part + t * H
            for c in range(c0, c1):
                F[dst + c] += F[p + c]
                F[p + c] = 0.0


@njit(nogil=True, cache=True)
def run_program(tid, n_threads, node, ops, opf, MD, WA, F, Q, QD, QS, QF, IX, KV, VC, C, pos, TS):
    """Run the op table on thread tid of n_threads, which runs on NUMA node `node` (every thread calls this with
    the same other arguments). An MoE op with a node (its last argument, -1 = any) is run by that node's threads
    only: each expert shard is read where its memory is. Thread 0 adds each op's cycles (with its barrier) into
    TS[1 + i], summed over runs; TS[0] is its scratch.

    Barriers count work, not threads: each thread adds the items it finished to C[0], and a barrier after op i
    waits until C[0] holds the units (_units) of ops 0..i. A run of serial ops belongs to the first thread that
    reaches it (a claim on the run's first op), which waits until everything before is done. So a thread the
    OS took off its core holds up nobody unless it holds an item: the others take its share (claim steals) and
    go on, and when it comes back it finds the ops done and catches up. With thread-counting barriers, one busy
    process beside a 2-thread decode cut it to a third (117 -> 32 tok/s, Gemma-3-270M), below one thread's 87."""
    if tid == 0:
        TS[0] = cycles()
    target = 0  # units of the ops before this one
    serial = 0  # in a run of serial ops: 1 this thread runs it, -1 another does; 0 outside
    c0 = C.shape[0] - ops.shape[0] * n_threads  # op i's item counters are C[c0 + n_threads i ..] (claim)
    for i in range(ops.shape[0]):
        a = ops[i]
        code = a[0]
        ci = c0 + i * n_threads
        done = 0
        if a[1]:
            serial = 0
            if code == OP_GEMV:
                done = _gemv(a, C, ci, tid, n_threads, MD, F, Q, QD, QS, QF)
            elif code == OP_GQA:
                done = _gqa(a, C, ci, F, KV, VC, pos, np.float32(opf[i, 0]))
            elif code == OP_MLA:
                done = _mla(a, C, ci, F, KV, pos, np.float32(opf[i, 0]))
            elif code == OP_ROUTER:
                done = _router(a, C, ci, WA, F)
            elif code == OP_MOE_UP:
                if a[30] < 0 or a[30] == node:
                    done = _moe_up(a, C, ci, tid, n_threads, MD, F, Q, QD, QS, QF, IX)
            elif code == OP_MOE_DOWN:
                if a[22] < 0 or a[22] == node:
                    done = _moe_down(a, C, ci, tid, n_threads, MD, F, Q, QD, QS, QF, IX)
            elif code == OP_MOE_SUM:
                done = _moe_sum(a, C, ci, F, n_threads)
        else:
            if serial == 0:
                serial = 1 if fetch_add(C, ci, 1) == 0 else -1
                if serial == 1:
                    while atomic_read(C, 0) < target:
                        sched_yield()
            if serial == 1:
                done = 1
                if code == OP_NORM:
                    _norm(a, WA, F, opf[i, 0])
                elif code == OP_QUANT:
                    _quant(a, F, Q, QD, QS, QF)
                elif code == OP_ROPE:
                    _rope(a, F)
                elif code == OP_CACHE:
                    src, n, layer = a[3], a[4], a[5]
                    if a[6]:
                        VC[layer, pos, :n] = F[src:src + n]
                    else:
                        KV[layer, pos, :n] = F[src:src + n]
                elif code == OP_ADD:
                    src, dst, n = a[3], a[4], a[5]
                    if a[6]:
                        F[dst:dst + n] += carray(void_ptr(WA[src]), n, np.float32)
                    else:
                        F[dst:dst + n] += F[src:src + n]
                elif code == OP_SIGMOID:
                    for j in range(a[3], a[3] + a[4]):
                        F[j] = np.float32(1.0) / (np.float32(1.0) + np.exp(-F[j]))
                elif code == OP_TOPK:
                    _topk(a, WA, F, IX, opf[i, 0])
        if done:
            fetch_add(C, 0, done)  # after the op's writes (a locked add orders them before it)
        target += _units(a)
        if a[2]:
            serial = 0
            if atomic_read(C, 0) < target:
                _prefetch_next(ops, i, MD, tid, n_threads)
            while atomic_read(C, 0) < target:
                sched_yield()
        if tid == 0:
            now = cycles()
            TS[1 + i] += now - TS[0]
            TS[0] = now


@intrinsic
def compare_swap(typingctx, arr, idx, expected, new):
    """Atomically: if arr[idx] == expected, arr[idx] = new (int64 array); True when it swapped."""
    if not (isinstance(arr, types.Array) and arr.dtype == types.int64):
        return None
    sig = types.boolean(arr, types.intp, types.int64, types.int64)

    def codegen(context, builder, signature, args):
        ary = context.make_array(signature.args[0])(context, builder, args[0])
        ptr = cgutils.get_item_pointer(context, builder, signature.args[0], ary, [args[1]])
        res = builder.cmpxchg(ptr, args[2], args[3], "seq_cst", "seq_cst")
        return builder.extract_value(res, 1)

    return sig, codegen


# Spinning workers (hot_program). ctl, int64: [0] leave (nonzero: spinning workers go idle), [1] the posted
# token's position, [2] the number of tokens done, then per worker tid its word (number of tokens posted) << 1 |
# idle at [CTL_WORDS + tid], then the token it is inside (0: none) at [CTL_WORDS + n_threads + tid]. Token n
# runs on counters C2[n % RING].
CTL_LEAVE, CTL_POS, CTL_DONE, CTL_WORDS = 0, 1, 2, 3
RING = 4


@njit(nogil=True, cache=True)
def hot_program(tid, n_threads, node, ops, opf, MD, WA, F, Q, QD, QS, QF, IX, KV, VC, C2, TS, ctl, spin_cycles):
    """Worker tid's side of run_program over a run of tokens: the token its word announces, then the next ones
    as the caller posts them (post_tokens), spinning up to spin_cycles between two, until the wait runs out or
    ctl[CTL_LEAVE] is set; then it marks its word idle and returns (the caller submits a job again).

    Barriers count work (run_program), so the others can finish a token without a worker the OS has descheduled,
    and it may wake up behind: inside a done token, or with tokens posted that it never entered. It says which
    token it is inside before it checks that the token is still undone (a locked add, then a read: the caller
    writes CTL_DONE and then reads these words, so one of the two sees the other), and the caller zeroes token n's
    counters C2[n % RING] only when no worker is inside token n - RING (wait_left)."""
    wi, ei = CTL_WORDS + tid, CTL_WORDS + n_threads + tid
    w = atomic_read(ctl, wi)  # post_tokens cleared the idle bit when it started this job; tokens may have come since
    while True:
        t = w >> 1
        fetch_add(ctl, ei, t - ctl[ei])
        if atomic_read(ctl, CTL_DONE) < t:
            run_program(tid, n_threads, node, ops, opf, MD, WA, F, Q, QD, QS, QF, IX, KV, VC, C2[t % RING],
                        atomic_read(ctl, CTL_POS), TS)
        fetch_add(ctl, ei, -t)
        t0 = cycles()
        while True:
            cur = atomic_read(ctl, wi)
            if cur != w:  # the next token
                w = cur
                break
            if (atomic_read(ctl, CTL_LEAVE) != 0 or cycles() - t0 > spin_cycles) and compare_swap(ctl, wi, w, w | 1):
                return
            sched_yield()


@njit(nogil=True, cache=True)
def post_tokens(ctl, pos, idle):
    """Announce the next token (at pos) to every worker word; idle[tid] = 1 where that worker had gone idle (its
    word had the idle bit), so the caller must start it with a job. The bit is cleared here, not by the job: a
    job that starts late (its thread not yet scheduled) must not be started twice while the caller runs tokens
    without it."""
    ctl[CTL_POS] = pos
    for tid in range(idle.shape[0]):
        while True:
            old = atomic_read(ctl, CTL_WORDS + tid)
            if compare_swap(ctl, CTL_WORDS + tid, old, (old + 2) & ~np.int64(1)):
                idle[tid] = old & 1
                break


@njit(nogil=True, cache=True)
def token_done(ctl, n):
    """Token n is done (every unit of its program): CTL_DONE = n, as a locked write (see hot_program)."""
    fetch_add(ctl, CTL_DONE, n - ctl[CTL_DONE])


@njit(nogil=True, cache=True)
def wait_left(ctl, n_threads, t):
    """Wait until no worker is inside token t (hot_program)."""
    for tid in range(n_threads):
        while atomic_read(ctl, CTL_WORDS + n_threads + tid) == t:
            sched_yield()


@njit(nogil=True, cache=True)
def read_cycles():
    """The cycle counter that run_program's profile and hot_program's spin use, from Python."""
    return cycles()


@njit(nogil=True, cache=True)
def rope_fill(F, off, inv_freq, pos, scale, factor):
    """F[off:off + n] = cos(a) * scale, F[off + n:off + 2n] = sin(a) * scale, a = (pos / factor) * inv_freq in
    float32 (n = len(inv_freq); the same operations as Rope.cos_sin): a step's RoPE table in one call, not ten
    numpy ones (~20 us a token)."""
    n = inv_freq.shape[0]
    p = np.float32(pos)
    if factor != np.float32(1.0):
        p = p / factor
    for i in range(n):
        a = p * inv_freq[i]
        F[off + i] = np.cos(a) * scale
        F[off + n + i] = np.sin(a) * scale
