"""Register-tiled int8 dot kernels for the repacked expert layout, emitted as LLVM IR (Numba intrinsics).

One call of `tile(V, ...)` computes, for NT tokens x NR row groups (16 rows each), the full dot over K:

    out[t, 16 rg + i] = sum_g  dx[t, g] * s[rg, g, i] * sum_{k in g} q[16 rg + i, k] * xq[t, k]
                       (- dmin * m)[rg, g, i] * xsf[t, g]           (K-quant minimums)
                       with the integer sum started at -zero * sum_{k in g} xq[t, k]   (code offset)

where xq are int8 activations with one float scale dx per 32 (see quantize.py). Inner loop, per 4 k and
row group: one 64-byte operand = 16 rows x 4 codes (repack.py: a load for byte codes; for 4/5/6-bit codes
loads of the block's low-nibble and high-bit vectors, shifts and masks), and for every token a 4-byte
broadcast of xq; `dot4` multiplies u8 codes by s8 activations and adds each row's 4 products into its int32 lane:

    vnni      vpdpbusd zmm                        (AVX-512 VNNI)
    avx2      vpmaddubsw + vpmaddwd, two ymm halves (codes > 127 use the sign trick: |w| * sign(w) x)
    portable  generic LLVM vector IR (zext/sext, mul, add lanes) that any target legalizes

Decode tiles (NT = 1) run their NR row groups one after another, an NR = 1 loop inside a rolled loop over
the row groups (unrolled into NR copies, a short-K tile streamed 10-15% slower: Zen 5, 2 threads, alternating in
one process, K = 2048: Q6_K 50.6 -> 56.9 GB/s against a 57.4 GB/s read loop, Q4_K 66.1 -> 75.9 against 86.7;
K = 7168 Q4_K 73 -> 75, Q8_0 equal; scratch harness, 0.4 s sustained runs), so the tile reads
one sequential stream (a row group's run, then the next one's, which follows it in memory) instead of NR
interleaved ones, and each step prefetches its run PF_AHEAD bytes ahead (`llvm.prefetch`: prefetchnta on AMD,
prefetcht1 on Intel, DECODE_PF_LOCALITY), plus the next row group's scale lines (locality 1). Measured streaming
from DRAM on Zen 5 (EPYC, 2 threads; [2048, 7168] x 12 matrices, best of 7): Q4_K 30 -> 43 GB/s, Q6_K 32 -> 43, Q8_0 39 -> 42, against
the NR interleaved streams with the next tile prefetched into L2 (which had measured best on Zen 4, where the
hardware prefetcher did not follow runs of a few KB: Q8_0 [512, 128] went 14 -> 25 GB/s on one core).
A whole tile in cache still runs at 65-80 GB/s per core, so the gain is memory-level parallelism, not
arithmetic (in L2 a Q4_K tile runs at ~100 GB/s per core, K = 2048). PF_AHEAD went 4096 -> 8192 when the
machine's memory moved into a faster regime (~100 GB/s for a 2-thread read loop): bytes in flight per core must
cover latency x rate (~120 ns x 45 GB/s = 5.4 KB). There, K = 2048 streams: Q4_K 77 -> 84-85 GB/s, Q6_K 78-80 ->
84.5 (12 KB: 81-82); at ~55 GB/s both distances measured the same. Prefetches never fault, so prefetching past
the end of an array is harmless.

After each group of G = 16|32 weights the int32 lanes become float and are scaled (d * sc, per row, from the
layout; dx per token): NT x NR float accumulators stay in registers across the whole K loop. Decode tiles of
K-quants run each superblock's groups as an inner loop instead (_decode_sb_group: sc applied in integers, d and
dmin once per superblock), and decode tiles of 4-bit codes take the high nibble in place (v & 0xF0, 16 q) into
accumulators of their own: Q4_K decode with the tile in L2, one Zen 4 core, 58 -> 64 -> 70 GB/s (Q6_K 56 -> 61).
A decode tile's prefetch stream runs on past the end of its rows into pf, the run the caller reads next (0: the
memory after them).
The variant number V = 100000 s256 + 10000 wide + 1000 layout + 100 isa + 10 NT + NR is a compile-time literal
(wide: the codes were widened to bytes beforehand, `widen`, and are read as a byte plane; s256: K-quant prefill
on activations with one scale per 256, see _emit), so one generated function exists per variant and Numba
caches it.
"""
from __future__ import annotations

from llvmlite import ir
from numba.core import cgutils, types
from numba.extending import intrinsic

from .cpu_features import cpu_features
from .repack import LAYOUTS

LAYOUT_IDS = {lay.name: i for i, lay in enumerate(LAYOUTS.values())}
ISA_IDS = {"portable": 0, "avx2": 1, "vnni": 2}
_LAYOUT_BY_ID = list(LAYOUTS.values())
# llvm.prefetch locality of the decode superblock loop's scale-line prefetches (_prefetch_next_scales_sb; -1: none).
# Zen 4, 2 threads, a tile stream over 24 x [2048, 7168] against a read loop alternating with it, medians of 8-12:
# Q4_K -1/0/1/2/3 -> 0.94/0.93/0.94/0.97/0.92 and 0.94/0.87/0.90/0.96/0.93 of the read, Q6_K 0.99/0.96/0.99/1.00/0.98
SCALE_PF = 2
PF_AHEAD = 8192  # decode tiles prefetch their run this many bytes ahead (module docstring)
# llvm.prefetch locality of those prefetches: 0 (prefetchnta) measured best on Zen 4/5; on an Intel Xeon with AMX
# (Sapphire Rapids class, 2 vCPUs under KVM) prefetchnta ran the decode tiles at half speed, even from cache (a
# 46 MB expert set: 20.6 ms -> 3.5 ms with prefetcht0), so Intel CPUs take prefetcht1 (bench/RESULTS.md)
DECODE_PF_LOCALITY = 2 if cpu_features().intel else 0

i8, i16, i32, i64 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64)
f16, f32 = ir.HalfType(), ir.FloatType()
V64B, V16I, V16F, V16H = ir.VectorType(i8, 64), ir.VectorType(i32, 16), ir.VectorType(f32, 16), ir.VectorType(f16, 16)


def variant(layout: str, isa: str, nt: int, nr: int, wide: bool = False, s256: bool = False) -> int:
    return 100000 * s256 + 10000 * wide + 1000 * LAYOUT_IDS[layout] + 100 * ISA_IDS[isa] + 10 * nt + nr


def _fn(b, name, ret, args):
    return cgutils.get_or_insert_function(b.module, ir.FunctionType(ret, args), name)


def _splat(b, v, vt):
    u = b.insert_element(ir.Constant(vt, ir.Undefined), v, ir.Constant(i32, 0))
    return b.shuffle_vector(u, ir.Constant(vt, ir.Undefined), ir.Constant(ir.VectorType(i32, vt.count), [0] * vt.count))


def _ptr(b, base, off, ty):
    return b.inttoptr(b.add(base, off) if not isinstance(off, int) or off else base, ty.as_pointer())


def _half(b, v, lo, n):  # lanes [lo, lo + n) of a vector
    return b.shuffle_vector(v, ir.Constant(v.type, ir.Undefined), ir.Constant(ir.VectorType(i32, n), list(range(lo, lo + n))))


def _dot4_vnni(b, acc, w, x):
    fn = _fn(b, "llvm.x86.avx512.vpdpbusd.512", V16I, [V16I, V64B, V64B])
    return b.call(fn, [acc, w, x])


def _dot4_avx2(b, acc, w, x, signed_trick):
    if signed_trick:  # codes 0..255 would saturate vpmaddubsw: use |q - 128| and move the sign onto x
        ws = b.xor(w, ir.Constant(V64B, [0x80] * 64))
        neg = b.icmp_signed("<", ws, ir.Constant(V64B, [0] * 64))
        w = b.select(neg, b.sub(ir.Constant(V64B, [0] * 64), ws), ws)
        x = b.select(neg, b.sub(ir.Constant(V64B, [0] * 64), x), x)
    v32b, v16s, v8i = ir.VectorType(i8, 32), ir.VectorType(i16, 16), ir.VectorType(i32, 8)
    maddubs = _fn(b, "llvm.x86.avx2.pmadd.ub.sw", v16s, [v32b, v32b])
    maddwd = _fn(b, "llvm.x86.avx2.pmadd.wd", v8i, [v16s, v16s])
    ones = ir.Constant(v16s, [1] * 16)
    halves = [b.call(maddwd, [b.call(maddubs, [_half(b, w, h, 32), _half(b, x, h, 32)]), ones]) for h in (0, 32)]
    both = b.shuffle_vector(halves[0], halves[1], ir.Constant(V16I, list(range(16))))
    return b.add(acc, both)


def _dot4_portable(b, acc, w, x):
    v64i = ir.VectorType(i32, 64)
    p = b.mul(b.zext(w, v64i), b.sext(x, v64i))  # [16 rows x 4 k]
    lanes = [b.shuffle_vector(p, ir.Constant(v64i, ir.Undefined), ir.Constant(V16I, [4 * i + j for i in range(16)]))
             for j in range(4)]
    return b.add(acc, b.add(b.add(lanes[0], lanes[1]), b.add(lanes[2], lanes[3])))


def _vconst(v):
    return ir.Constant(V64B, [v] * 64)


def _c64(v):
    return ir.Constant(i64, v)


def _operand(b, base, lay, j, wide=False, hi16=False):
    """The 64-byte vpdpbusd operand (16 rows x 4 codes) of step j (4 k) of a group whose codes start at
    address `base`: a plain load for bytes (or codes widened beforehand), else unpacked from the code block
    (repack.py's docstring). hi16: 4-bit codes of odd steps come as 16 q (the high nibble masked in place)."""
    if wide or lay.bits == 8:
        return b.load(_ptr(b, base, _c64(64 * j), V64B), align=1)
    steps = lay.kb // 4
    blk, s = divmod(j, steps)
    blk_off = blk * 2 * lay.bits * lay.kb  # bytes per code block of a row group
    v = b.load(_ptr(b, base, _c64(blk_off + 64 * (s // 2)), V64B), align=1)
    q = b.and_(v, _vconst(0x0F)) if s % 2 == 0 else b.and_(v, _vconst(0xF0)) if hi16 else \
        b.and_(_shift_words(b, v, -4), _vconst(0x0F))
    if lay.bits == 4:
        return q
    hb = lay.bits - 4
    h = b.load(_ptr(b, base, _c64(blk_off + 64 * (lay.kb // 8)), V64B), align=1)  # loaded once: LLVM merges repeats
    sh = 4 - hb * s  # bring bits hb s .. hb s + hb - 1 to bit 4: the bits a word shift carries over between bytes
    # land below bit |sh| (left) or from bit 8 - |sh| up (right, |sh| <= 3), outside the mask
    return b.or_(q, b.and_(_shift_words(b, h, sh), _vconst(((1 << hb) - 1) << 4)))


def _shift_words(b, v, sh):
    """The bytes of v shifted left by sh (right by -sh) as 16-bit lanes: bits cross into the neighbouring byte, so
    callers mask. A byte shift would lower to vgf2p8affineqb, which on Zen 4 takes the pipes of vpdpbusd: the 4x32
    prefill tile of 4-bit codes spent 8 of them per 64 vpdpbusd, and with vpsrlw + vpandq instead Q4_K prefill at
    64 tokens per expert went 64.2-64.3% -> 70.2-70.6% of the vpdpbusd peak (Q4_0 67-69 -> 72-75%)."""
    if sh == 0:
        return v
    w16 = ir.VectorType(i16, 32)
    n = ir.Constant(w16, [abs(sh)] * 32)
    w = b.bitcast(v, w16)
    return b.bitcast(b.shl(w, n) if sh > 0 else b.lshr(w, n), V64B)


def _prefetch(b, ptr, locality=1):
    """llvm.prefetch of one line for reading; locality 0: prefetchnta, 1: prefetcht2, 2: prefetcht1."""
    pf = _fn(b, "llvm.prefetch.p0", ir.VoidType(), [i8.as_pointer(), i32, i32, i32])
    b.call(pf, [ptr, ir.Constant(i32, 0), ir.Constant(i32, locality), ir.Constant(i32, 1)])


def _prefetch_next_scales(b, a, lay, nr, g):
    """Decode: the next tile's (row group's) scale lines for group g too (d, and K-quants' sc, dmin, m): separate arrays, so
    streams of their own beside the codes' that the hardware prefetcher follows less well. Q4_K decode from DRAM
    (12 x [4096, 7168], 2 threads, alternating in one process): 29.2 -> 31.5 and 28.5 -> 30.4 GB/s in two runs,
    equal in a third; Q6_K and Q8_0 unchanged; dsv3-bench decode (K = 2048, 1536) 21.24 -> 21.07 ms/token."""
    c = lambda v: ir.Constant(i64, v)  # noqa: E731
    gk = b.mul(g, c(lay.G))
    for r in range(nr):
        rr = c(nr + r)
        addrs = [b.add(b.add(a["d"], b.mul(rr, a["ds"])), b.mul(b.sdiv(gk, c(lay.S)), c(32)))]
        if lay.sc:
            addrs.append(b.add(b.add(a["sc"], b.mul(rr, a["ss"])), b.mul(g, c(16))))
        if lay.mins:
            addrs.append(b.add(b.add(a["dmin"], b.mul(rr, a["dms"])), b.mul(b.sdiv(gk, c(256)), c(32))))
            addrs.append(b.add(b.add(a["m"], b.mul(rr, a["ms"])), b.mul(b.sdiv(gk, c(32)), c(16))))
        for addr in addrs:
            _prefetch(b, _ptr(b, addr, 0, i8))


def _prefetch_next_scales_sb(b, a, lay, sb):
    """Decode superblock loop (_decode_sb_group): every scale line of superblock sb of the next row group, once
    per superblock instead of four prefetches per group (most of them of a line already asked for)."""
    c = lambda v: ir.Constant(i64, v)  # noqa: E731
    gps = 256 // lay.G
    fields = [("d", "ds", 32, 32), ("sc", "ss", 16 * gps, 16 * gps)]  # (array, stride, bytes per sb, span)
    if lay.mins:
        fields += [("dmin", "dms", 32, 32), ("m", "ms", 16 * 8, 16 * 8)]
    for name, stride, per_sb, span in fields:
        base = b.add(b.add(a[name], a[stride]), b.mul(sb, c(per_sb)))
        for line in range(0, span, 64):
            _prefetch(b, _ptr(b, base, c(line), i8), SCALE_PF)


def _decode_sb_group(b, a, lay, g, iacc, facc, macc):
    """Decode tiles of K-quants (NT = NR = 1), one group g of a superblock loop: facc += float(iacc * sc) * dx
    (sc times the int32 dot in integers: vpmulld, exact, |iacc * sc| < 2^23 per group) and, with minimums,
    macc += float(m) * xsf; d and dmin scale the two sums once per superblock (_emit). Per group of Q4_K that
    is 8 vector ops instead of 12 (d and dmin loaded and widened, sc and m widened and multiplied per group),
    next to the 20 of the codes and their dots: decode of Q4_K is arithmetic-bound on one Zen 4 core at about
    twice the DRAM rate of a core, and the fewer ops overlap memory stalls better. Returns (facc, macc)."""
    c = lambda v: ir.Constant(i64, v)  # noqa: E731
    fma = _fn(b, "llvm.fma.v16f32", V16F, [V16F, V16F, V16F])
    g32 = b.sdiv(b.mul(g, c(lay.G)), c(32))
    scv = b.load(_ptr(b, a["sc"], b.mul(g, c(16)), ir.VectorType(i8, 16)), align=1)
    sci = b.sext(scv, V16I) if lay.sc == "i8" else b.zext(scv, V16I)
    dx = _splat(b, _token_scalar(b, a, "xd", 0, g32), V16F)
    facc = b.call(fma, [b.sitofp(b.mul(iacc, sci), V16F), dx, facc])
    if lay.mins:
        mv = b.load(_ptr(b, a["m"], b.mul(g32, c(16)), ir.VectorType(i8, 16)), align=1)
        xsf = _splat(b, _token_scalar(b, a, "xsf", 0, g32), V16F)
        macc = b.call(fma, [b.uitofp(mv, V16F), xsf, macc])
    return facc, macc


def code_offsets(b, a, G, nt, zero, g):
    """Per token t: the splat of -zero * (sum of xq over group g), the int32 start of its dot vectors, which
    moves the codes' offset (q - zero) out of the inner loop."""
    c = lambda v: ir.Constant(i64, v)  # noqa: E731
    gk = b.mul(g, c(G))
    k16 = b.sdiv(a["K"], c(16))
    xsum = []
    for t in range(nt):
        if zero:
            i16idx = b.add(b.mul(c(t), k16), b.sdiv(gk, c(16)))
            s = b.load(_ptr(b, a["xs"], b.mul(i16idx, c(4)), i32), align=4)
            if G == 32:
                s = b.add(s, b.load(_ptr(b, a["xs"], b.mul(b.add(i16idx, c(1)), c(4)), i32), align=4))
            xsum.append(_splat(b, b.mul(s, ir.Constant(i32, -zero)), V16I))
        else:
            xsum.append(ir.Constant(V16I, [0] * 16))
    return xsum


def _group_dots(b, a, lay, isa, nt, nr, bits, zero, signed_trick, wide, g, scale_pf=True):
    """The NT x NR int32 dot vectors of scale group g (G k): started at -zero * (sum of xq over the group),
    the code offset for free, then G/4 steps of one operand per row group and one broadcast per token.
    scale_pf: decode tiles prefetch the next row group's scale lines here (else the caller does, per superblock)."""
    G = lay.G
    K = a["K"]
    c = lambda v: ir.Constant(i64, v)  # noqa: E731
    gk = b.mul(g, c(G))  # first k of this group
    xsum = code_offsets(b, a, G, nt, zero, g)
    iacc = [[xsum[t] for _ in range(nr)] for t in range(nt)]
    gcodes = b.mul(gk, c(2 * bits))  # bytes of codes per k per row group (16 rows): 2 * bits
    if nt == 1:  # decode: this run PF_AHEAD bytes on, and the next row group's scales (see the module docstring)
        ahead = b.add(b.add(a["codes"], gcodes), c(PF_AHEAD))
        over = b.sub(ahead, a["end"])  # past the tile's run: continue in the caller's next run (pf), if it gave one
        cont = b.and_(b.icmp_signed(">=", over, c(0)), b.icmp_signed("!=", a["pf"], c(0)))
        ahead = b.select(cont, b.add(a["pf"], over), ahead)
        for line in range(0, G * 2 * bits, 64):  # every cache line of this group's codes
            _prefetch(b, _ptr(b, ahead, c(line), i8), locality=DECODE_PF_LOCALITY)
        if scale_pf:
            _prefetch_next_scales(b, a, lay, nr, g)
    # decode tiles of 4-bit codes on VNNI: the high nibbles as v & 0xF0 (16 q) into accumulators of their own,
    # shifted back once per group (exact: a multiple of 16), instead of a byte shift per vector; the byte shift
    # (vgf2p8affineqb) shares Zen 4's two integer-multiply pipes with vpdpbusd, vpandq runs on any pipe
    hi16 = nt == 1 and bits == 4 and isa == ISA_IDS["vnni"]
    hacc = [[ir.Constant(V16I, [0] * 16) for _ in range(nr)] for _ in range(nt)]
    for j in range(G // 4):
        ws = []
        for r in range(nr):
            base = b.add(b.add(a["codes"], b.mul(c(r), a["cs"])), gcodes)
            ws.append(_operand(b, base, lay, j, wide, hi16=hi16))
        for t in range(nt):
            xoff = b.add(b.mul(c(t), K), b.add(gk, c(4 * j)))
            xb = b.bitcast(_splat(b, b.load(_ptr(b, a["xq"], xoff, i32), align=1), V16I), V64B)
            for r in range(nr):
                if hi16 and j % 2:
                    hacc[t][r] = _dot4_vnni(b, hacc[t][r], ws[r], xb)
                elif isa == ISA_IDS["vnni"]:
                    iacc[t][r] = _dot4_vnni(b, iacc[t][r], ws[r], xb)
                elif isa == ISA_IDS["avx2"]:
                    iacc[t][r] = _dot4_avx2(b, iacc[t][r], ws[r], xb, signed_trick)
                else:
                    iacc[t][r] = _dot4_portable(b, iacc[t][r], ws[r], xb)
    if hi16:
        iacc = [[b.add(iacc[t][r], b.ashr(hacc[t][r], ir.Constant(V16I, [4] * 16))) for r in range(nr)]
                for t in range(nt)]
    return iacc


def _group_scales(b, a, lay, nr, g, with_d):
    """Per row group r: the scale vector of group g (d * sc, or sc alone without with_d; exact in f32) and the
    minimum vector dmin * m (K-quants; else None)."""
    c = lambda v: ir.Constant(i64, v)  # noqa: E731
    gk = b.mul(g, c(lay.G))
    scales, mins = [], []
    for r in range(nr):
        s = None
        if with_d:
            doff = b.add(b.mul(c(r), a["ds"]), b.mul(b.sdiv(gk, c(lay.S)), c(32)))
            s = b.fpext(b.load(_ptr(b, a["d"], doff, V16H), align=2), V16F)
        if lay.sc:
            scv = b.load(_ptr(b, a["sc"], b.add(b.mul(c(r), a["ss"]), b.mul(g, c(16))), ir.VectorType(i8, 16)), align=1)
            scf = b.sitofp(scv, V16F) if lay.sc == "i8" else b.uitofp(scv, V16F)
            s = b.fmul(s, scf) if s is not None else scf
        scales.append(s)
        if lay.mins:
            dm = b.fpext(b.load(_ptr(b, a["dmin"], b.add(b.mul(c(r), a["dms"]), b.mul(b.sdiv(gk, c(256)), c(32))), V16H),
                                align=2), V16F)
            mv = b.load(_ptr(b, a["m"], b.add(b.mul(c(r), a["ms"]), b.mul(b.sdiv(gk, c(32)), c(16))),
                                ir.VectorType(i8, 16)), align=1)
            mins.append(b.fmul(dm, b.uitofp(mv, V16F)))
        else:
            mins.append(None)
    return scales, mins


def _token_scalar(b, a, name, t, k32_index):
    """Splat of xd / xsf (float per 32) of token t (relative to the tile) at block k32_index."""
    c = lambda v: ir.Constant(i64, v)  # noqa: E731
    xi = b.mul(b.add(b.mul(c(t), b.sdiv(a["K"], c(32))), k32_index), c(4))
    return b.load(_ptr(b, a[name], xi, f32), align=4)


def scale_group(b, a, lay, nt, nr, g, iacc, acc, facc=None):
    """Group g's int32 dot vectors iacc[t][r] into the float accumulators acc[t][r] (updated in place):
    acc += float(iacc) * (d * sc) * dx, and acc -= (dmin * m) * xsf for K-quants. With facc (per-256 variants,
    see _emit) the group only adds float(iacc) * sc into facc; returns those new facc vectors."""
    fma = _fn(b, "llvm.fma.v16f32", V16F, [V16F, V16F, V16F])
    s256 = facc is not None
    scales, mins = _group_scales(b, a, lay, nr, g, with_d=not (s256 and lay.sc))
    g32 = b.sdiv(b.mul(g, ir.Constant(i64, lay.G)), ir.Constant(i64, 32))
    fnew = [[None] * nr for _ in range(nt)]
    for t in range(nt):
        dx = None if s256 else _splat(b, _token_scalar(b, a, "xd", t, g32), V16F)
        nxsf = _splat(b, b.fneg(_token_scalar(b, a, "xsf", t, g32)), V16F) if lay.mins else None
        for r in range(nr):
            fi = b.sitofp(iacc[t][r], V16F)
            if s256:
                fnew[t][r] = b.call(fma, [fi, scales[r], facc[t][r]])
            else:
                acc[t][r] = b.call(fma, [fi, b.fmul(scales[r], dx), acc[t][r]])
            if lay.mins:
                acc[t][r] = b.call(fma, [mins[r], nxsf, acc[t][r]])
    return fnew


def _loop_head(b, name):
    """Open an inner counted loop at the builder's position: (the block before it, its body block, the counter
    phi from 0); the caller adds its own phis' incoming values, then closes it with _loop_tail."""
    outer = b.block
    body = b.append_basic_block(name)
    b.branch(body)
    b.position_at_end(body)
    i = b.phi(i64)
    i.add_incoming(ir.Constant(i64, 0), outer)
    return outer, body, i


def _loop_tail(b, i, body, n, name):
    """Close a _loop_head loop after n iterations (n a Python int); the builder continues after it."""
    i1 = b.add(i, ir.Constant(i64, 1))
    i.add_incoming(i1, b.block)
    end = b.append_basic_block(name)
    b.cbranch(b.icmp_signed("<", i1, ir.Constant(i64, n)), body, end)
    b.position_at_end(end)


def _emit(b, V, a):
    """The tile kernel body; `a` holds the i64 arguments by name (addresses and sizes).

    Per-256 variants (V >= 100000, K-quant prefill with activations from quantize.quantize_row256, whose
    scale dx is the same for the 256 k of a superblock, like the weights' d): the loop runs per superblock and
    each group only does facc += float(iacc) * sc; acc += facc * (d * dx) once per superblock. That drops the
    per-group d * dx product, one of the three float ops per 8 (Q4_K) or 4 (Q6_K) vpdpbusd that share
    Zen 4's vector pipes with them."""
    s256 = V // 100000 % 10
    V = V % 100000
    lay, isa, nt, nr = _LAYOUT_BY_ID[V // 1000 % 10], V // 100 % 10, V // 10 % 10, V % 10
    if nt == 1 and "end" not in a:  # decode: the end of the tile's run (its row groups follow each other)
        a = dict(a, end=b.add(a["codes"], b.mul(a["cs"], ir.Constant(i64, nr))))
    if nt == 1 and nr > 1:  # decode: the row groups one after another, one stream (see the module docstring)
        _, head, r = _loop_head(b, "rg")
        ar = dict(a, out=b.add(a["out"], b.mul(r, ir.Constant(i64, 64))))
        for f, stride in (("codes", "cs"), ("d", "ds"), ("sc", "ss"), ("dmin", "dms"), ("m", "ms")):
            ar[f] = b.add(a[f], b.mul(a[stride], r))
        _emit(b, 100000 * s256 + V - nr + 1, ar)
        _loop_tail(b, r, head, nr, "rg_done")
        return
    wide = V >= 10000  # codes already widened to bytes (moe_loops: prefill of packed layouts)
    bits = 8 if wide else lay.bits
    signed_trick = isa == ISA_IDS["avx2"] and lay.zero == 128
    zero = 0 if signed_trick else lay.zero
    G = lay.G
    dsb = nt == 1 and bool(lay.sc) and not s256  # decode superblock loop of K-quants (_decode_sb_group)
    gpi = 256 // G if s256 or dsb else 1  # groups per loop iteration
    n_iter = b.sdiv(a["K"], ir.Constant(i64, G * gpi))
    fma = _fn(b, "llvm.fma.v16f32", V16F, [V16F, V16F, V16F])
    c = lambda v: ir.Constant(i64, v)  # noqa: E731

    entry = b.block
    loop = b.append_basic_block("tile_g")
    done = b.append_basic_block("tile_done")
    b.branch(loop)
    b.position_at_end(loop)
    it = b.phi(i64)
    it.add_incoming(c(0), entry)
    accs = [[b.phi(V16F) for _ in range(nr)] for _ in range(nt)]
    for row in accs:
        for p in row:
            p.add_incoming(ir.Constant(V16F, [0.0] * 16), entry)

    nxt = [list(row) for row in accs]
    if s256:  # the superblock's groups as an inner loop: unrolled into one block, LLVM interleaved their loads and spilled
        outer, inner, gi = _loop_head(b, "tile_sb")
        facc = [[b.phi(V16F) for _ in range(nr)] for _ in range(nt)]
        iacc_nxt = [[b.phi(V16F) for _ in range(nr)] for _ in range(nt)]
        for t in range(nt):
            for r in range(nr):
                facc[t][r].add_incoming(ir.Constant(V16F, [0.0] * 16), outer)
                iacc_nxt[t][r].add_incoming(nxt[t][r], outer)
        nxt = [list(row) for row in iacc_nxt]
        g = b.add(b.mul(it, c(gpi)), gi)
    elif dsb:  # groups of one superblock as an inner loop carrying facc and macc; acc changes once per superblock
        _prefetch_next_scales_sb(b, a, lay, it)
        outer, inner, gi = _loop_head(b, "tile_dsb")
        facc, macc = b.phi(V16F), b.phi(V16F)
        for p in (facc, macc):
            p.add_incoming(ir.Constant(V16F, [0.0] * 16), outer)
        g = b.add(b.mul(it, c(gpi)), gi)
    else:
        g = it
    if nt > 1:  # m lines of the caller's next weights per group (pf, see tile)
        m1 = b.and_(a["pf"], c(63))
        m = b.add(m1, c(1))
        p0 = b.add(b.sub(a["pf"], m1), b.mul(g, b.mul(m, c(64))))
        _prefetch(b, _ptr(b, p0, 0, i8), locality=2)
        with cgutils.for_range(b, m1) as more:
            _prefetch(b, _ptr(b, p0, b.mul(b.add(more.index, c(1)), c(64)), i8), locality=2)
    iacc = _group_dots(b, a, lay, isa, nt, nr, bits, zero, signed_trick, wide, g, scale_pf=not dsb)
    if dsb:
        f1, m1 = _decode_sb_group(b, a, lay, g, iacc[0][0], facc, macc)
        facc.add_incoming(f1, b.block)
        macc.add_incoming(m1, b.block)
        _loop_tail(b, gi, inner, gpi, "tile_dsb_end")
        d = b.fpext(b.load(_ptr(b, a["d"], b.mul(it, c(32)), V16H), align=2), V16F)
        nxt[0][0] = b.call(fma, [f1, d, nxt[0][0]])
        if lay.mins:
            dm = b.fpext(b.load(_ptr(b, a["dmin"], b.mul(it, c(32)), V16H), align=2), V16F)
            nxt[0][0] = b.call(fma, [m1, b.fneg(dm), nxt[0][0]])
    else:
        fnew = scale_group(b, a, lay, nt, nr, g, iacc, nxt, facc if s256 else None)
    if s256:  # once per superblock: the token's dx (same over the superblock), times d where that is per 256
        for t in range(nt):
            for r in range(nr):
                facc[t][r].add_incoming(fnew[t][r], b.block)
                iacc_nxt[t][r].add_incoming(nxt[t][r], b.block)
        _loop_tail(b, gi, inner, gpi, "tile_sb_end")
        ds = [b.fpext(b.load(_ptr(b, a["d"], b.add(b.mul(c(r), a["ds"]), b.mul(it, c(32))), V16H), align=2), V16F)
              for r in range(nr)] if lay.sc else None
        for t in range(nt):
            dx = _splat(b, _token_scalar(b, a, "xd", t, b.mul(it, c(8))), V16F)
            for r in range(nr):
                nxt[t][r] = b.call(fma, [fnew[t][r], b.fmul(ds[r], dx) if ds else dx, nxt[t][r]])

    it1 = b.add(it, c(1))
    tail = b.block
    it.add_incoming(it1, tail)
    for t in range(nt):
        for r in range(nr):
            accs[t][r].add_incoming(nxt[t][r], tail)
    b.cbranch(b.icmp_signed("<", it1, n_iter), loop, done)

    b.position_at_end(done)
    for t in range(nt):
        for r in range(nr):
            off = b.mul(b.add(b.mul(c(t), a["ldo"]), c(16 * r)), c(4))
            b.store(nxt[t][r], _ptr(b, a["out"], off, V16F), align=4)


_ARGS = ("K", "codes", "cs", "d", "ds", "sc", "ss", "dmin", "dms", "m", "ms", "xq", "xd", "xs", "xsf", "out", "ldo", "pf")


@intrinsic
def tile(typingctx, V, K, codes, cs, d, ds, sc, ss, dmin, dms, m, ms, xq, xd, xs, xsf, out, ldo, pf):
    """tile(V, K, codes, cs, d, ds, sc, ss, dmin, dms, m, ms, xq, xd, xs, xsf, out, ldo, pf): addresses and
    row-group strides in bytes (int64), xq/xd/xs/xsf/out point at the tile's first token, ldo in floats.
    pf, prefill tiles (NT > 1; a valid address): m K/G cache lines from pf - (m - 1) on are prefetched
    (prefetcht1), m per scale group, where m - 1 is pf's low 6 bits (0 for a line-aligned pf: one per group), so
    the caller can pull the weights of its next item into the caches while this one computes (moe_loops.pf_slice).
    Decode tiles (NT = 1): the codes the caller reads after these rows, where the tile's prefetch stream goes on
    when it passes their end (0: the memory right after them)."""
    if not isinstance(V, types.IntegerLiteral):
        return None
    rest = (K, codes, cs, d, ds, sc, ss, dmin, dms, m, ms, xq, xd, xs, xsf, out, ldo, pf)
    return types.void(V, *rest), _tile_codegen(V.literal_value, 1)


@intrinsic
def tile_nt(typingctx, V, nt, K, codes, cs, d, ds, sc, ss, dmin, dms, m, ms, xq, xd, xs, xsf, out, ldo, pf):
    """tile(V, ...) with the variant's token count NT replaced by the literal nt (2 or 3): a prefill expert's
    last, partial token tile, which would otherwise run NT tokens of which only a few are real."""
    if not (isinstance(V, types.IntegerLiteral) and isinstance(nt, types.IntegerLiteral)) or nt.literal_value not in (2, 3):
        return None
    v = V.literal_value
    rest = (K, codes, cs, d, ds, sc, ss, dmin, dms, m, ms, xq, xd, xs, xsf, out, ldo, pf)
    return types.void(V, nt, *rest), _tile_codegen(v + 10 * (nt.literal_value - v // 10 % 10), 2)


def _tile_codegen(V: int, first: int):
    """Codegen of a tile call whose i64 arguments (_ARGS) start at argument `first`."""
    def codegen(context, builder, signature, args):
        vals = [context.cast(builder, v, t, types.int64) for v, t in zip(args[first:], signature.args[first:])]
        _emit(builder, V, dict(zip(_ARGS, vals)))
        return context.get_dummy_value()

    return codegen


@intrinsic
def widen(typingctx, bits, K, src, dst):
    """widen(bits, K, src, dst): one row group's packed code run at address src (4, 5 or 6 bits, repack.py)
    -> byte operands [K/4, 64] at dst, B[k4, 4 r + j] = q[r, 4 k4 + j] (the AMX B tile), with the same
    vector unpacking as the tile kernels: one loop iteration per code block."""
    if not isinstance(bits, types.IntegerLiteral) or bits.literal_value not in (4, 5, 6):
        return None
    lay = next(lay for lay in LAYOUTS.values() if lay.bits == bits.literal_value)
    sig = types.void(bits, K, src, dst)

    def codegen(context, b, signature, args):
        K_, src_, dst_ = (context.cast(b, v, t, types.int64) for v, t in zip(args[1:], signature.args[1:]))
        n_blocks = b.sdiv(K_, _c64(lay.kb))
        entry = b.block
        loop, done = b.append_basic_block("widen_blk"), b.append_basic_block("widen_done")
        b.cbranch(b.icmp_signed(">", n_blocks, _c64(0)), loop, done)
        b.position_at_end(loop)
        i = b.phi(i64)
        i.add_incoming(_c64(0), entry)
        base = b.add(src_, b.mul(i, _c64(2 * lay.bits * lay.kb)))  # code bytes per block of a row group
        out = b.add(dst_, b.mul(i, _c64(16 * lay.kb)))
        for s in range(lay.kb // 4):
            b.store(_operand(b, base, lay, s), _ptr(b, out, _c64(64 * s), V64B), align=1)
        i1 = b.add(i, _c64(1))
        i.add_incoming(i1, b.block)
        b.cbranch(b.icmp_signed("<", i1, n_blocks), loop, done)
        b.position_at_end(done)
        return context.get_dummy_value()

    return sig, codegen


_JIT = {}  # V -> (MCJIT engine that owns the machine code, address)


def jit_host(mod: ir.Module):
    """An llvmlite MCJIT engine holding `mod` compiled for this CPU (llvmlite's host name and features, as Numba
    compiles); the engine owns the machine code, so keep it as long as any address taken from it."""
    import llvmlite.binding as llvm

    llvm.initialize_native_target()
    llvm.initialize_native_asmprinter()
    tm = llvm.Target.from_default_triple().create_target_machine(
        cpu=llvm.get_host_cpu_name(), features=llvm.get_host_cpu_features().flatten(), opt=3, codemodel="jitdefault")
    parsed = llvm.parse_assembly(str(mod))
    parsed.verify()
    engine = llvm.create_mcjit_compiler(parsed, tm)
    engine.finalize_object()
    return engine


def tile_address(V: int) -> int:
    """Address of a standalone native function `void tile_V(i64 K, codes, cs, ..., out, ldo)` with the body of
    `tile(V, ...)`: for code that picks the kernel at run time (decode_loops.py holds one address per matrix)
    instead of inlining one copy of each variant. Compiled once per variant per process (~0.1 s); callers choose
    V from CPUID, as for the inlined kernels."""
    hit = _JIT.get(V)
    if hit is None:
        mod = ir.Module(name=f"ktx_tile_{V}")
        fn = ir.Function(mod, ir.FunctionType(ir.VoidType(), [i64] * len(_ARGS)), name=f"ktx_tile_{V}")
        b = ir.IRBuilder(fn.append_basic_block("entry"))
        _emit(b, V, dict(zip(_ARGS, fn.args)))
        b.ret_void()
        engine = jit_host(mod)
        hit = _JIT[V] = (engine, engine.get_function_address(f"ktx_tile_{V}"))
    return hit[1]


def call_codegen(context, builder, signature, vals):
    """Call the function at address vals[0] with the other values as i64 arguments (ints and addresses)."""
    v = [context.cast(builder, a, t, types.int64) for a, t in zip(vals, signature.args)]
    f = builder.inttoptr(v[0], ir.FunctionType(ir.VoidType(), [i64] * (len(v) - 1)).as_pointer())
    builder.call(f, v[1:])
    return context.get_dummy_value()


@intrinsic
def call_tile(typingctx, fn, K, codes, cs, d, ds, sc, ss, dmin, dms, m, ms, xq, xd, xs, xsf, out, ldo, pf):
    """The tile kernel at address fn (tile_address, or amx.full_tile_address with scratch for pf), with tile's
    arguments."""
    return types.void(fn, K, codes, cs, d, ds, sc, ss, dmin, dms, m, ms, xq, xd, xs, xsf, out, ldo, pf), call_codegen
