"""Build and run a compiled decode step (ktx.kernels_cpu.decode_loops): the op table, its arenas, its threads.

A model that can decode through a program writes its step once with the methods below (`norm`, `quant`,
`gemv`, ...), each of which appends one op and returns nothing; buffers are element offsets handed out by
`f32` and `qbuf`. `finish()` marks which ops need a barrier after them and allocates the arenas; `step(x0, kv,
vc, pos)` runs the table on the calling thread plus the pools' workers (pools[0]'s last worker sits out, as in
kernels_cpu/linear.py, so n threads run on n cores). With one pool per NUMA node, each expert shard's ops are
run by its own node's threads (decode_loops.run_program).

Between tokens the workers spin (decode_loops.hot_program) for up to KTX_SPIN_US microseconds (default
SPIN_US) instead of going back to their pool's queue: waking a blocked worker, which then needs the GIL to
enter the program, made the step's first barrier wait 25-50 us, and now and then 0.5-2 ms (dsv3-bench, 2
threads). A worker that waited out its spin, or that another job on its pool asked to leave (WorkerPool's
spinner hook), returns to its pool and is started again by a job at the next token. KTX_SPIN_US=0 turns this off.

Which matrices a program can take: the quantized CPU kernels' repacked layouts (`QuantLinear`, `MoEExperts`
on a vector path), since the decode tile is called through its address; float weights (norms, router, bias)
are read in place through their addresses, so the arrays are kept alive here.
"""

from __future__ import annotations

import os
import threading
import time

import numpy as np

from ktx.kernels_cpu.decode_loops import (N_COLS, OP_ADD, OP_CACHE, OP_GEMV, OP_GQA, OP_MLA, OP_MOE_DOWN, OP_MOE_SUM,
                                          OP_MOE_UP, OP_NORM, OP_QUANT, OP_ROPE, OP_ROUTER, OP_SIGMOID, OP_TOPK,
                                          PARALLEL_OPS, RING, TILE_ROWS, CTL_LEAVE, CTL_WORDS, hot_program, post_tokens,
                                          read_cycles, rope_fill, run_program, token_done, wait_left)
from ktx.errors import KtxError
from ktx.kernels_cpu.attn_simd import kernel_addresses
from ktx.kernels_cpu.simd import tile_address, variant


class DecodeProgram:
    def __init__(self, pools):
        """pools: one WorkerPool, or one per NUMA node (pools[j]'s threads are node j's; expert shards are read by
        their own node's threads). The caller's thread counts as one of pools[0]'s, whose last worker sits out."""
        self.pools = list(pools) if isinstance(pools, (list, tuple)) else [pools]
        self.n_threads = sum(p.n_threads for p in self.pools)
        self._chain: list[bool] = []  # per op: no barrier after it (a parallel op of the same phase follows)
        self._ops: list[list[int]] = []
        self._opf: list[float] = []
        self._labels: list[str] = []  # per op: "<section> <kind>", for `profile`
        self.section = ""  # set by the builder: attention, moe, mlp, head ...
        self._tables: list = []  # rope tables filled per step
        self._mats: dict[int, int] = {}  # id(kernel matrix) -> MD row
        self._md: list[np.ndarray] = []
        self._weights: list[np.ndarray] = []  # float32 arrays the program reads by address (kept alive here)
        self._wids: dict[int, int] = {}
        self._keep: list = []  # the matrices behind MD's addresses
        self.sizes = {"F": 0, "Q": 0, "QD": 0, "QS": 0, "QF": 0, "IX": 0, "C": 1}
        self._lock = threading.Lock()  # one step at a time: the arenas are the program's state
        self._part = (0, 0)  # (F offset, H) of the MoE layers' per-thread partial sums

    # -- buffers ------------------------------------------------------------------------------------
    def _take(self, arena: str, n: int) -> int:
        off = self.sizes[arena]
        self.sizes[arena] += n
        return off

    def f32(self, n: int) -> int:
        return self._take("F", -(-n // 16) * 16)  # 64-byte steps

    def qbuf(self, rows: int, K: int) -> tuple[int, int, int, int]:
        """An int8 activation buffer of `rows` rows of width K (K a multiple of 32): offsets (q, d, s, sf)."""
        if K % 32:
            raise ValueError(f"quantized activation width {K} is not a multiple of 32")
        return (self._take("Q", rows * K), self._take("QD", rows * K // 32), self._take("QS", rows * K // 16),
                self._take("QF", rows * K // 32))

    def ids(self, n: int) -> int:
        return self._take("IX", n)

    def weight(self, w) -> int:
        """Index of a float32 weight read in place (torch tensor or numpy array, made contiguous once). `w` is kept
        alive with its array, so no later object can reuse its id."""
        if id(w) not in self._wids:
            self._wids[id(w)] = len(self._weights)
            self._weights.append((w, np.ascontiguousarray(w.numpy() if hasattr(w, "numpy") else w, dtype=np.float32)))
        return self._wids[id(w)]

    def matrix(self, obj, md: np.ndarray, layout: str, isa: str) -> int:
        """MD row of a repacked matrix (QuantLinear or one of MoEExperts' gate/up/down): md + its decode tile."""
        if id(obj) not in self._mats:
            row = np.zeros(16, np.int64)
            row[:15] = md
            row[15] = tile_address(variant(layout, isa, 1, TILE_ROWS // 16))
            self._mats[id(obj)] = len(self._md)
            self._md.append(row)
            self._keep.append(obj)  # read by address: alive as long as the program (and its id never reused)
        return self._mats[id(obj)]

    # -- ops ----------------------------------------------------------------------------------------
    def _op(self, code: int, *args: int, f: float = 0.0, chain: bool = False) -> None:
        if len(args) > N_COLS - 3:
            raise ValueError("too many op arguments")
        self._ops.append([code, int(code in PARALLEL_OPS), 0, *map(int, args)])
        self._opf.append(f)
        self._chain.append(chain)
        self._labels.append(f"{self.section} {_KINDS[code]}".strip())

    def norm(self, src, w, dst, n, eps, rows=1, stride=0):
        self._op(OP_NORM, src, self.weight(w), dst, n, rows, stride, f=eps)

    def quant(self, src, K, q, rows=1, stride=None):
        self._op(OP_QUANT, src, K if stride is None else stride, rows, K, *q)

    def gemv(self, lin, q, dst, bstride=0, acc=False):
        """dst (+)= W x for a QuantLinear (batched: B matrices, input row b, output at dst + b * bstride)."""
        n_rb = -(-lin.rows // TILE_ROWS)
        IB = lin._item_blocks(1, lin.cols, n_rb, TILE_ROWS // 16)
        self._op(OP_GEMV, self.gemv_matrix(lin), lin.B, lin.rows, lin.cols, *q, dst, bstride, int(acc), IB)

    def rope(self, src, sstride, dst, dstride, heads, dim, cos_sin, neox=False):
        self._op(OP_ROPE, src, sstride, dst, dstride, heads, dim, cos_sin, int(neox))

    def cache(self, src, n, layer, values=False):
        """KV[layer, pos, :n] = src (values: the value cache VC)."""
        self._op(OP_CACHE, src, n, layer, int(values))

    def gqa(self, layer, q, n_heads, n_kv, d, dv, o, scores, window, scale):
        chunk = self._head_chunk(n_heads)
        self._op(OP_GQA, layer, q, n_heads, n_kv, d, dv, o, scores, chunk, window, *kernel_addresses(), f=scale)

    def add(self, src, dst, n, weight=None):
        """dst += src (an F offset), or += a float32 weight (a bias) when `weight` is given."""
        if weight is not None:
            self._op(OP_ADD, self.weight(weight), dst, n, 1)
        else:
            self._op(OP_ADD, src, dst, n, 0)

    def sigmoid(self, off, n):
        self._op(OP_SIGMOID, off, n)

    def mla(self, layer, q, n_heads, kv_lora, o, scores, scale):
        chunk = self._head_chunk(n_heads)
        self._op(OP_MLA, layer, q, n_heads, kv_lora, o, scores, chunk, *kernel_addresses(), f=scale)

    def _head_chunk(self, n_heads: int) -> int:
        """Query heads per attention item: one item per thread (each item reads the cache once), but at least 8
        heads, a multiple of 4 (the SIMD kernels' block), so that many threads do not each re-read a long cache."""
        chunk = max(-(-n_heads // self.n_threads), 8)
        return min(n_heads, -(-chunk // 4) * 4)

    def router(self, w, E, H, src, dst):
        self._op(OP_ROUTER, self.weight(w), E, H, src, dst, max(1, E // (4 * self.n_threads)))

    def topk(self, logits, E, k, sigmoid, bias, n_group, topk_group, norm, k_sel, ids, w, scale):
        b = -1 if bias is None else self.weight(bias)
        self._op(OP_TOPK, logits, E, k, int(sigmoid), b, n_group, topk_group, int(norm), k_sel, ids, w, f=scale)

    def moe(self, experts, k, ids, w, x_q, dst, H, shared=None, gelu=False, shared_w=-1, acc=True):
        """dst (+)= sum_j w_j expert_{ids_j}(x) + shared(x). experts: MoEExperts, ShardedExperts (one part per NUMA
        shard, read by that node's threads) or None (k = 0: a dense MLP given as `shared`); shared: (gate QuantLinear,
        gate row offset, up QuantLinear, up row offset, down QuantLinear, Is), scaled by F[shared_w] when
        shared_w >= 0; gelu: GELU-tanh instead of SiLU; acc: add into dst, else store.

        One phase of gate/up ops and one of down ops, with no barrier inside a phase or between them: a thread done
        with its own node's shard goes on to the next op (the shared MLP, which any thread takes), and a down item
        waits only for its own row's h (decode_loops._moe_down)."""
        shards = getattr(experts, "shards", None) or ([experts] if experts is not None else [])
        if len(shards) > 1:
            parts = [(ex, self._node(ex.pool), None) for ex in shards] + ([(None, -1, shared)] if shared else [])
        else:
            parts = [(shards[0] if shards else None, -1, shared)]
        part = self._parts(H)
        downs = []
        for ex, node, sh in parts:  # no barrier before the downs either: each down item waits for its own h
            downs.append(self._moe_up(ex, k if ex is not None else 0, ids, x_q, H, sh, gelu, node))
        for j, args in enumerate(downs):
            md, k_, I, Is, sd, hq, shq, ib, node, cd = args
            self._op(OP_MOE_DOWN, md, k_, I, H, sd, Is, *hq, *shq, ids, w, part, ib, shared_w, node, cd,
                     chain=j < len(downs) - 1)
        self._op(OP_MOE_SUM, part, H, dst, int(acc))

    def _parts(self, H: int) -> int:
        """The per-thread partial sums [threads, H]: one buffer for all MoE layers (they run one after another, and
        MOE_SUM zeroes it after each)."""
        if self._part[1] != H:
            self._part = (self.f32(self.n_threads * H), H)
        return self._part[0]

    def _moe_up(self, experts, k, ids, x_q, H, shared, gelu, node):
        """The gate/up op of one part; returns what its down op needs."""
        I = experts.I if experts is not None else 0
        if I % TILE_ROWS or H % TILE_ROWS or (shared is not None and shared[5] % TILE_ROWS):
            raise Unsupported(f"MLP sizes (hidden {H}, expert {I}, shared/dense {shared and shared[5]}) not multiples of {TILE_ROWS}")
        if experts is not None:
            mg, mu, md = (self.matrix(m, m.md, m.layout.name, experts.path) for m in experts.mats)
        else:
            mg = mu = md = 0
        if shared is not None:
            g, g0, u, u0, d, Is = shared
            sg, su, sd = (self.gemv_matrix(m) for m in (g, u, d))
        else:
            sg = su = 0
            sd, g0, u0, Is = -1, 0, 0, 0
        h = self.f32(k * I + Is)
        hq, shq = self.qbuf(k, I) if k else (0, 0, 0, 0), self.qbuf(1, Is) if Is else (0, 0, 0, 0)
        cd = self._take("C", k + 1)
        n_up = k * (I // TILE_ROWS) + Is // TILE_ROWS  # row blocks of gate (and up)
        n_down = (k + (Is > 0)) * (H // TILE_ROWS)
        self._op(OP_MOE_UP, mg, mu, k, I, H, sg, su, g0 // 16, u0 // 16, Is, *x_q, h, *hq, *shq, ids, cd,
                 self._ib(n_up), int(gelu), node, chain=True)
        return md, k, I, Is, sd, hq, shq, self._ib(n_down), node, cd

    def _node(self, pool) -> int:
        for j, p in enumerate(self.pools):
            if p is pool:
                return j
        raise Unsupported("an expert shard runs on a pool the program was not given")

    def _ib(self, n_blocks: int) -> int:
        """Row blocks per MoE item: long weight streams (up to MOE_ITEM_BLOCKS), yet ITEMS_PER_THREAD items per thread."""
        return max(1, min(MOE_ITEM_BLOCKS, n_blocks // (ITEMS_PER_THREAD * self.n_threads)))

    def gemv_matrix(self, lin) -> int:
        """MD row of a QuantLinear."""
        return self.matrix(lin, lin.md, _layout(lin.qtype), lin.path)

    # -- run ----------------------------------------------------------------------------------------
    def finish(self) -> "DecodeProgram":
        ops = np.zeros((len(self._ops), N_COLS), np.int64)
        for i, row in enumerate(self._ops):
            ops[i, :len(row)] = row
        par = ops[:, 1].astype(bool)
        # barrier after a parallel op and before one (and at the end), except inside a phase of chained ops
        ops[:, 2] = (par | np.append(par[1:], True)) & ~np.array(self._chain, bool)
        self.ops, self.opf = ops, np.array(self._opf, np.float64)[:, None].repeat(2, 1)
        self.MD = np.array(self._md, np.int64).reshape(-1, 16)
        self.WA = np.array([a.ctypes.data for _, a in self._weights] or [0], np.int64)
        s = self.sizes
        self.F = np.zeros(s["F"], np.float32)
        self.Q, self.QD = np.zeros(s["Q"], np.int8), np.zeros(s["QD"], np.float32)
        self.QS, self.QF = np.zeros(s["QS"], np.int32), np.zeros(s["QF"], np.float32)
        self.IX = np.zeros(max(1, s["IX"]), np.int64)
        self.TS = np.zeros(len(self._ops) + 1, np.int64)  # run_program's scratch, then each op's cycles summed
        self._cycles = self.TS[1:]  # per op, summed over runs (take_profile)
        spin_us = self._spin_us = _spin_us()
        self._spin = spin_us > 0 and self.n_threads > 1
        # per pool: (node j, first thread id, workers): the caller is thread 0, pools[0]'s workers 1.. (its last
        # one sits out), then each further pool's in turn
        self._slots = [(j, 1 if j == 0 else sum(p.n_threads for p in self.pools[:j]),
                        p.n_threads - (j == 0)) for j, p in enumerate(self.pools)]
        if self._spin:  # spinning workers (module docstring): a ring of counter sets, control words
            self._C2 = np.zeros((RING, s["C"] + len(self._ops) * self.n_threads), np.int64)
            self._ctl = np.zeros(CTL_WORDS + 2 * self.n_threads, np.int64)
            self._ctl[CTL_WORDS:CTL_WORDS + self.n_threads] = 1  # every worker idle
            self._idle = np.zeros(self.n_threads, np.int64)
            self._posted = 0
            self._spin_cycles = int(spin_us * 1e-6 * _tsc_hz())
            self._hot_key = None
            ctl = self._ctl
            self._leave = lambda: ctl.__setitem__(CTL_LEAVE, 1)
            for pool in self.pools:
                pool.add_spinner(self._leave)
        return self

    def rope_table(self, inv_freq, scale: float = 1.0, factor: float = 1.0) -> int:
        """F offset of [cos | sin] (rope_dim / 2 each) at each step's position / factor, times scale (ktx.layers.rope)."""
        off = self.f32(2 * len(inv_freq))
        self._tables.append((off, np.asarray(inv_freq, np.float32), np.float32(scale), np.float32(factor)))
        return off

    def io(self, x: int, logits: int, vocab: int) -> None:
        """Where step() writes the token's embedding and reads the logits."""
        self.x, self.logits, self.vocab = x, logits, vocab

    def step(self, x0: np.ndarray, kv: np.ndarray, vc: np.ndarray, pos: int) -> np.ndarray:
        """One token: embedding x0 [H] at position pos, caches kv (and vc) [layers, capacity, width] -> logits
        [vocab] (a copy)."""
        F = self.F
        with self._lock:
            F[self.x:self.x + x0.shape[0]] = x0
            for off, inv_freq, scale, factor in self._tables:  # float32 angles, as Rope.cos_sin
                rope_fill(F, off, inv_freq, pos, scale, factor)
            self.run(kv, vc, pos)
            return F[self.logits:self.logits + self.vocab].copy()

    def run(self, kv: np.ndarray, vc: np.ndarray, pos: int) -> None:
        """One step at position pos (inputs already in F; outputs left there)."""
        if self._spin:
            return self._run_spinning(kv, vc, pos)
        C = np.zeros(self.sizes["C"] + len(self.ops) * self.n_threads, np.int64)  # barrier, countdowns, per op one counter a thread
        args = (self.ops, self.opf, self.MD, self.WA, self.F, self.Q, self.QD, self.QS, self.QF, self.IX, kv, vc, C,
                pos, self.TS)
        n = self.n_threads
        for pool, (j, base, k) in zip(self.pools, self._slots):
            if k > 0:
                pool.submit(lambda wid, nw, base=base, j=j: run_program(base + wid, n, j, *args), workers=k)
        run_program(0, n, 0, *args)

    def _run_spinning(self, kv, vc, pos):
        ctl = self._ctl
        key = tuple((a.ctypes.data, a.shape, a.strides, a.dtype.str) for a in (kv, vc))  # fresh views per step
        if self._hot_key != key or ctl[CTL_LEAVE]:  # other caches (workers hold the old ones) or a leave request
            self._all_idle()
            self._hot_key = key
        n_tok = self._posted + 1
        if n_tok > RING:
            wait_left(ctl, self.n_threads, n_tok - RING)  # a worker the OS held back may still be inside it
        C = self._C2[n_tok % RING]
        C[:] = 0
        post_tokens(ctl, pos, self._idle)
        self._posted = n_tok
        idle = self._idle.copy()
        args = (self.ops, self.opf, self.MD, self.WA, self.F, self.Q, self.QD, self.QS, self.QF, self.IX, kv, vc,
                self._C2, self.TS, ctl, self._spin_cycles)
        n = self.n_threads
        for pool, (j, base, k) in zip(self.pools, self._slots):  # only idle workers get a job
            if k > 0 and idle[base:base + k].any():
                pool.submit(lambda wid, nw, base=base, j=j: hot_program(base + wid, n, j, *args) if idle[base + wid]
                            else None, workers=k, spinner=self._leave)
        run_program(0, n, 0, *args[:12], C, pos, self.TS)
        token_done(ctl, n_tok)

    def _all_idle(self) -> None:
        """Ask spinning workers to return to their pools and wait until they have (they are between tokens)."""
        ctl = self._ctl
        ctl[CTL_LEAVE] = 1
        while not (ctl[CTL_WORDS + 1:CTL_WORDS + self.n_threads] & 1).all():
            time.sleep(0)
        ctl[CTL_LEAVE] = 0

    def take_profile(self) -> dict[str, float]:
        """Share of the time per "<section> <op kind>" over the runs since the last call (thread 0's cycle counter:
        an op's span includes its barrier, so a serial op's wait for the others is charged to the op before)."""
        out: dict[str, float] = {}
        for label, c in zip(self._labels, self._cycles):
            out[label] = out.get(label, 0.0) + float(c)
        total = max(sum(out.values()), 1.0)
        self._cycles[:] = 0
        return {k: v / total for k, v in sorted(out.items(), key=lambda kv: -kv[1])}

    def describe(self) -> str:
        spin = f", workers spin {self._spin_us} us between tokens" if self._spin else ""
        return (f"decode: one compiled program per token ({len(self._ops)} ops, {int(self.ops[:, 2].sum())} barriers, "
                f"{self.n_threads} threads{spin})")


def model_pools(net) -> list:
    """The pools a model's program runs on: the dense weights' (node 0), then each further NUMA shard's."""
    pools = [net.lin.pool]
    for ex in net.experts.values():
        for shard in getattr(ex, "shards", [ex]):
            if all(shard.pool is not p for p in pools):
                pools.append(shard.pool)
    return pools


def why_not(net) -> str:
    """'' when a model's weights are all where a program can run them, else the reason (its builder may add more)."""
    from ktx.kernels_cpu import MoEExperts
    from ktx.layers.linear import QuantLinears

    if getattr(net, "device", None) is not None and net.device.type != "cpu":
        return "the model runs on a GPU"
    if not isinstance(net.lin, QuantLinears):
        return "dense weights on the float path"
    for ex in net.experts.values():
        if any(not isinstance(s, MoEExperts) or s.path == "reference" for s in getattr(ex, "shards", [ex])):
            return "routed experts not on the quantized CPU kernels (reference path)"
    if any(m is not None and m.any() for m in net.scheduler.gpu_mask.values()):
        return "hot experts on a GPU"
    return ""


def build_with(make, net, rows: int, why: str = "") -> tuple[DecodeProgram | None, str]:
    """(make(net, rows), '') or (None, why not): `why`, the model-independent reasons, or an Unsupported part."""
    why = why or why_not(net)
    if why:
        return None, why
    try:
        return make(net, rows), ""
    except Unsupported as e:
        return None, str(e)


def quant_linear(net, name):
    """The QuantLinear of a dense weight (Unsupported when it runs on the float path)."""
    op = net.lin._op(name)
    if op is None:
        raise Unsupported(f"{name} is not on the quantized kernels")
    return op


class Unsupported(Exception):
    """A model part the program cannot take (its builder then returns None and the reason)."""


def linear_group(net, P: DecodeProgram, names: list[str], q, dst: int) -> None:
    """W x for weights applied to one input, outputs consecutive at dst: one stacked matrix when QuantLinears
    stacked them, else one GEMV each."""
    hit = net.lin.fused.get(tuple(names))
    if hit is not None:
        P.gemv(hit[0], q, dst)
        return
    for n in names:
        op = quant_linear(net, n)
        P.gemv(op, q, dst)
        dst += op.rows


def mlp_parts(net, p: str, kind: str):
    """(gate, gate row offset, up, up row offset, down, I) of a dense or shared MLP, stacked gate+up or not."""
    names = [f"{p}ffn_gate{kind}.weight", f"{p}ffn_up{kind}.weight"]
    down = quant_linear(net, f"{p}ffn_down{kind}.weight")
    hit = net.lin.fused.get(tuple(names))
    if hit is not None:
        op, rows = hit
        return op, 0, op, rows[0], down, rows[0]
    g, u = quant_linear(net, names[0]), quant_linear(net, names[1])
    return g, 0, u, 0, down, g.rows


SPIN_US = 2000  # default KTX_SPIN_US: how long decode workers spin between tokens (module docstring)


def _spin_us() -> int:
    v = os.environ.get("KTX_SPIN_US", str(SPIN_US))
    try:
        return max(0, int(v))
    except ValueError:
        raise KtxError(f"KTX_SPIN_US={v!r}: want microseconds, an integer (0: workers never spin)") from None


_TSC_HZ: list[float] = []


def _tsc_hz() -> float:
    """Rate of decode_loops.cycles (the TSC), measured once against perf_counter over 20 ms."""
    if not _TSC_HZ:
        c0, t0 = read_cycles(), time.perf_counter()
        time.sleep(0.02)
        _TSC_HZ.append((read_cycles() - c0) / (time.perf_counter() - t0))
    return _TSC_HZ[0]


MOE_ITEM_BLOCKS = 4  # 4 x 64 rows: a 300 KB stream of a 7168-wide Q4_K expert matrix
ITEMS_PER_THREAD = 8

_KINDS = {OP_NORM: "norm", OP_QUANT: "quant", OP_GEMV: "gemv", OP_ROPE: "rope", OP_CACHE: "cache", OP_MLA: "mla",
          OP_GQA: "gqa", OP_ROUTER: "router", OP_TOPK: "topk", OP_MOE_UP: "experts gate/up", OP_MOE_DOWN: "experts down",
          OP_MOE_SUM: "experts sum", OP_ADD: "add", OP_SIGMOID: "sigmoid"}


def _layout(qtype) -> str:
    from ktx.kernels_cpu.repack import LAYOUTS

    return LAYOUTS[qtype].name


class ProgramDecoding:
    """The forward pass every model class shares: torch on one thread for decode-sized passes, the context check,
    and one token through the compiled program where it runs; otherwise the class's own per-op `_forward`.

    The class names its builder module (`_program_builder`: build(net, cache_rows) -> (DecodeProgram | None,
    why not)) and `_cache_arrays(cache)` (the arrays the program's KV and VC are); ktx.load sets
    `decode_program`. `program_note` says which path decodes (and why, when it is the per-op one)."""

    decode_program = False
    program_note = ""
    _program_builder = ""

    def forward(self, tokens, cache, last_only: bool = False):
        """tokens [T] int64 at positions cache.length.. -> logits [T, vocab] (or [1, vocab]) float32."""
        import torch

        from ktx.errors import KtxError
        from ktx.layers.ops import torch_threads_for

        T = tokens.shape[0]
        if cache.length + T > cache.capacity:
            raise KtxError(f"context full: {cache.length} cached + {T} new tokens exceed the cache of {cache.capacity}; "
                           "raise --cache-len or start a new conversation.")
        prog = None
        if T == 1 and self.decode_program and self.routing_counts is None:
            kv, vc = self._cache_arrays(cache)
            prog = self.programs().get(kv.shape[1], False)
            if prog is False:
                with torch.inference_mode():  # a first call builds the program
                    prog = self.program_for(cache)
        if prog is None:
            with torch.inference_mode(), torch_threads_for(T):
                return self._forward(tokens, cache, last_only)
        # the compiled program runs no torch op: no torch contexts around it (~25 us a token on cold caches, and
        # ~30 us more for the inference_mode that only a program's build needs)
        logits = prog.step(self._embed_np(tokens.numpy())[0], kv, vc, cache.length)
        cache.length += 1
        return torch.from_numpy(logits)[None]

    def _embed_rows(self):
        """token_embd's rows, dequantized only where used, in one compiled call (kernels_cpu/rows.py)."""
        tab = self.__dict__.get("_embed_table")
        if tab is None:
            from ktx.kernels_cpu.rows import RowTable

            t = self.gguf.tensor("token_embd.weight")
            tab = self.__dict__["_embed_table"] = RowTable(t.data, t.qtype)
        return tab

    def _embed_np(self, ids: np.ndarray) -> np.ndarray:
        """embed() in numpy, float32 [T, H]: the decode step's path skips torch's conversions (~10 us a token)."""
        return self._embed_rows()(ids)

    def programs(self) -> dict:
        return self.__dict__.setdefault("_programs", {})  # cache rows -> DecodeProgram, or None (cannot run)

    def program_for(self, cache):
        """The program for caches shaped like `cache` (built on first use), or None where it cannot run."""
        rows = self._cache_arrays(cache)[0].shape[1]
        progs = self.programs()
        if rows not in progs:
            import importlib

            prog, why = importlib.import_module(self._program_builder).build(self, rows)
            progs[rows] = prog
            self.program_note = prog.describe() if prog is not None else f"decode: per-op path ({why})"
        return progs[rows]
