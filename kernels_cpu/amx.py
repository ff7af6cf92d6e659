"""The AMX tile shim: Intel AMX int8/bf16 microkernels built with llvmlite, plus numpy and Numba models of them.

AMX (Sapphire Rapids and newer) has 8 tile registers tmm0..7, each up to 16 rows x 64 bytes, shaped by a
64-byte configuration loaded with `ldtilecfg` (Intel SDM vol. 1, 3.2 "AMX" / TILECFG, palette 1):

    byte 0        palette_id (1)
    byte 1        start_row (0: restart an interrupted tileloadd from row 0)
    bytes 2..15   reserved, zero
    bytes 16..47  colsb[i]: bytes per row of tile i, uint16 little-endian at 16 + 2 i   (i = 0..15)
    bytes 48..63  rows[i]:  rows of tile i, uint8 at 48 + i

Microkernel (one 16 x 16 output tile; C, A, B = tmm0, tmm1, tmm2), K walked in steps of KS:

    int8  C[16, 16] i32 += A[16, K] i8 . B[K/4, 16*4] i8      tdpbssd (A, B signed) | tdpbsud (B unsigned)
          C[m][n] += sum_{k4} sum_{i<4} A[m][4 k4 + i] * B[k4][4 n + i]
          A tile: 16 rows x KS bytes;    B tile: KS/4 rows x 64 bytes
    bf16  C[16, 16] f32 += A[16, K] bf16 . B[K/2, 16*2] bf16  tdpbf16ps
          C[m][n] += sum_{k2} (A[m][2 k2] * B[k2][2 n] + A[m][2 k2 + 1] * B[k2][2 n + 1])
          A tile: 16 rows x 2 KS bytes;  B tile: KS/2 rows x 64 bytes

The B tile is "VNNI-interleaved": row k4 holds, for each of the 16 output columns n, the 4 (int8) or 2
(bf16) consecutive k of weight row n. That is exactly repack.py's byte plane, codes[rg, k4, r16, 4]: one
row group of 16 expert rows is one B operand with ldb = 64, shared with the vpdpbusd kernels unchanged
(packed 4/5/6-bit layouts are widened to bytes by `repack.unpack_codes`). The repacked codes are unsigned, so quantized
experts use tdpbsud (signed activations x unsigned codes) and start the group sum at -zero * sum(A), as
simd.py does.

llvmlite 0.50 (LLVM 22) accepts both intrinsic forms for a sapphirerapids target: the `*.internal` ones on
`x86_amx` values (LLVM writes the TILECFG itself) and the plain ones with immediate tile numbers plus an
explicit `ldtilecfg`. The plain form is used, so the configuration is ours and documented above.

Kernel ABI (C calling convention, all sizes in bytes except K):
    void ktx_amx_<kind>_k<KS>(A*, lda, B*, ldb, C*, ldc, K, zero_c)        C = (zero_c ? 0 : C) + A . B over K
    void ktx_amx_<kind>_k<KS>_steps(A*, lda, B*, ldb, C*, ldc, K, zero_c)  per K step s (KS wide), its own tile
         C_s = C + s * 16 * ldc:  C_s = (zero_c ? 0 : C_s) + A[:, s] . B[s]

Per-group scales (d * sc per 16|32 weights, dx per 32 activations) are applied outside the tile. The MoE
loops (amx_loops.py) call the steps kernel with KS = G once per (16 tokens, 16 rows, whole K): one
ldtilecfg, then one int32 tile per scale group, which Numba converts and scales. `amx_expert_matmul` is the
plain numpy version of that blocking (one call per group), the reference the tests hold it to.
Models, so every piece runs on CPUs without AMX: `TileModel` (numpy, instruction by instruction:
ldtilecfg/tileloadd/tdp*/tilestored) drives the numpy blocking code; `tdpbsud_steps_model` (a Numba cfunc
with the steps kernel's ABI) is the address the Numba loops call in place of the native kernel.

Detection (`amx_available`): CPUID.7.0:EDX bits 24 (AMX-TILE), 25 (AMX-INT8), 22 (AMX-BF16); XCR0 bits
17 (XTILECFG) and 18 (XTILEDATA); and Linux's per-process permission for the 8 KiB tile state,
arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA), asked once. Machine code is loaded only when all
three pass, so a CPU without AMX never executes a tile instruction.
"""
from __future__ import annotations

import ctypes
import errno
import functools
import platform

import numpy as np

from ktx.errors import KtxError

from .cpu_features import cpuid, xcr0
from .repack import R_GROUP, Layout, unpack_codes

ARCH_REQ_XCOMP_PERM = 0x1023
XFEATURE_XTILEDATA = 18
SYS_ARCH_PRCTL = 158  # x86_64
MIN_TOKENS_PER_EXPERT = 4  # below this (decode), a 16-row A tile is mostly padding: VNNI wins
_OPS = {"ssd": "tdpbssd", "sud": "tdpbsud", "bf16": "tdpbf16ps"}


# ---------------------------------------------------------------- detection

def _errno_name(e: int) -> str:
    return "EOPNOTSUPP" if e == errno.EOPNOTSUPP else errno.errorcode.get(e, f"errno {e}")


def _request_tile_permission() -> str | None:
    """arch_prctl(ARCH_REQ_XCOMP_PERM, XTILEDATA) through libc's syscall(); None on success, else the reason."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    r = libc.syscall(ctypes.c_long(SYS_ARCH_PRCTL), ctypes.c_long(ARCH_REQ_XCOMP_PERM), ctypes.c_long(XFEATURE_XTILEDATA))
    if r == 0:
        return None
    return f"arch_prctl(ARCH_REQ_XCOMP_PERM, XTILEDATA) failed: {_errno_name(ctypes.get_errno())}"


@functools.lru_cache(maxsize=1)
def amx_available() -> tuple[bool, str]:
    """(True, "amx-int8 amx-bf16") or (False, why not). Checked once per process; the permission asked once."""
    if platform.system() != "Linux" or platform.machine().lower() not in ("x86_64", "amd64"):
        return False, f"AMX needs Linux on x86_64 (this is {platform.system()} {platform.machine()})"
    reasons = []
    edx = cpuid(7, 0)[3] if cpuid(0)[0] >= 7 else 0
    for bit, name in ((24, "AMX-TILE"), (25, "AMX-INT8"), (22, "AMX-BF16")):
        if not (edx >> bit) & 1:
            reasons.append(f"CPU lacks {name} (CPUID.7.0:EDX[{bit}])")
    if (xcr0() & 0x60000) != 0x60000:
        reasons.append("OS does not enable tile state (XCR0 bits 17/18)")
    perm = _request_tile_permission()
    if perm:
        reasons.append(perm)
    return (False, "; ".join(reasons)) if reasons else (True, "amx-int8 amx-bf16")


# ---------------------------------------------------------------- tile configuration

def tile_config(shapes: dict[int, tuple[int, int]]) -> bytes:
    """64-byte TILECFG, palette 1: shapes = {tile: (rows, colsb)}; unlisted tiles stay 0 x 0 (unused)."""
    cfg = bytearray(64)
    cfg[0] = 1
    for t, (rows, colsb) in shapes.items():
        if not (0 <= t < 8 and 0 < rows <= 16 and 0 < colsb <= 64):
            raise ValueError(f"tile {t}: {rows} rows x {colsb} bytes is outside 16 x 64")
        cfg[16 + 2 * t:18 + 2 * t] = colsb.to_bytes(2, "little")
        cfg[48 + t] = rows
    return bytes(cfg)


def kernel_tiles(kind: str, ks: int) -> dict[int, tuple[int, int]]:
    """Tile shapes of the microkernel: C (tmm0) 16 x 64 B, A (tmm1) 16 x KS elements, B (tmm2) KS/pack x 64 B."""
    pack = 2 if kind == "bf16" else 4  # k per 32-bit B element
    esize = 2 if kind == "bf16" else 1
    if ks % pack or not 0 < ks * esize <= 64:
        raise ValueError(f"{kind}: K step {ks} must be a multiple of {pack} and at most {64 // esize}")
    return {0: (16, 64), 1: (16, ks * esize), 2: (ks // pack, 64)}


# ---------------------------------------------------------------- LLVM IR, compile, load

def kernel_ir(kind: str, ks: int, steps: bool = False) -> str:
    """LLVM IR of one microkernel (the non-internal AMX intrinsics: explicit tile numbers + ldtilecfg).

    steps=False accumulates the whole K into one C tile; steps=True gives every K step its own C tile at
    C + (kk / ks) * 16 * ldc (zeroed or loaded, then stored), so the caller can scale each group after one
    call: one ldtilecfg per K run instead of one per scale group."""
    cfg = tile_config(kernel_tiles(kind, ks))
    cfg_s = "".join(f"\\{b:02X}" for b in cfg)
    esize, pack, op = (2 if kind == "bf16" else 1), (2 if kind == "bf16" else 4), _OPS[kind]
    name = kernel_name(kind, ks, steps)

    def c_begin(after):  # C tile <- 0 or C memory at %cp, then jump to `after`
        return f"""  %z = icmp ne i32 %zero_c, 0
  br i1 %z, label %clear, label %load
clear:
  call void @llvm.x86.tilezero(i8 0)
  br label %{after}
load:
  call void @llvm.x86.tileloadd64(i8 0, ptr %cp, i64 %ldc)
  br label %{after}"""

    c_store = "  call void @llvm.x86.tilestored64(i8 0, ptr %cp, i64 %ldc)"
    if steps:
        entry = "  br label %start"
        loop_head = f"""loop:
  %kk = phi i64 [ 0, %start ], [ %kn, %body ]
  %step = udiv i64 %kk, {ks}
  %crow = mul i64 %step, 16
  %coff = mul i64 %crow, %ldc
  %cp = getelementptr i8, ptr %c, i64 %coff
{c_begin("body")}
body:"""
        step_end, done = c_store, ""
    else:
        entry = "  %cp = getelementptr i8, ptr %c, i64 0\n" + c_begin("start")
        loop_head = "loop:\n  %kk = phi i64 [ 0, %start ], [ %kn, %loop ]"
        step_end, done = "", c_store
    return f"""
@{name}_cfg = private unnamed_addr constant [64 x i8] c"{cfg_s}", align 64
declare void @llvm.x86.ldtilecfg(ptr)
declare void @llvm.x86.tilerelease()
declare void @llvm.x86.tilezero(i8 immarg)
declare void @llvm.x86.tileloadd64(i8 immarg, ptr, i64)
declare void @llvm.x86.tilestored64(i8 immarg, ptr, i64)
declare void @llvm.x86.{op}(i8 immarg, i8 immarg, i8 immarg)

define void @{name}(ptr %a, i64 %lda, ptr %b, i64 %ldb, ptr %c, i64 %ldc, i64 %k, i32 %zero_c) {{
entry:
  call void @llvm.x86.ldtilecfg(ptr @{name}_cfg)
{entry}
start:
  %any = icmp sgt i64 %k, 0
  br i1 %any, label %loop, label %done
{loop_head}
  %aoff = mul i64 %kk, {esize}
  %ap = getelementptr i8, ptr %a, i64 %aoff
  %brow = udiv i64 %kk, {pack}
  %boff = mul i64 %brow, %ldb
  %bp = getelementptr i8, ptr %b, i64 %boff
  call void @llvm.x86.tileloadd64(i8 1, ptr %ap, i64 %lda)
  call void @llvm.x86.tileloadd64(i8 2, ptr %bp, i64 %ldb)
  call void @llvm.x86.{op}(i8 0, i8 1, i8 2)
{step_end}
  %kn = add i64 %kk, {ks}
  %more = icmp slt i64 %kn, %k
  br i1 %more, label %loop, label %done
done:
{done}
  call void @llvm.x86.tilerelease()
  ret void
}}
"""


def kernel_name(kind: str, ks: int, steps: bool = False) -> str:
    return f"ktx_amx_{kind}_k{ks}" + ("_steps" if steps else "")


def _target_machine():
    import llvmlite.binding as llvm

    llvm.initialize_native_target()
    llvm.initialize_native_asmprinter()
    return llvm.Target.from_triple("x86_64-unknown-linux-gnu").create_target_machine(
        cpu="sapphirerapids", features="+amx-tile,+amx-int8,+amx-bf16", opt=2, codemodel="jitdefault")


def _module(kernels):
    import llvmlite.binding as llvm

    text = "\n".join(kernel_ir(*spec) for spec in kernels)
    # each kernel declares the shared intrinsics; keep the first declaration of each
    seen, lines = set(), []
    for line in text.splitlines():
        if line.startswith("declare"):
            if line in seen:
                continue
            seen.add(line)
        lines.append(line)
    mod = llvm.parse_assembly("\n".join(lines))
    mod.verify()
    return mod


# (kind, K step, steps): the plain kernels for whole-K products, the "steps" ones for the MoE loops (one C tile
# per scale group of G = 16 | 32 weights)
DEFAULT_KERNELS = (("ssd", 64, False), ("sud", 16, False), ("sud", 32, False), ("sud", 64, False), ("bf16", 32, False),
                   ("sud", 16, True), ("sud", 32, True))


def compile_assembly(kernels=DEFAULT_KERNELS) -> str:
    """Sapphire Rapids assembly of the microkernels: the compile-only path, safe on any CPU (nothing runs)."""
    return _target_machine().emit_assembly(_module(kernels))


def compile_object(kernels=DEFAULT_KERNELS) -> bytes:
    """ELF object of the microkernels (for inspection with objdump on machines without AMX)."""
    return _target_machine().emit_object(_module(kernels))


_SIG = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p,
                        ctypes.c_int64, ctypes.c_int64, ctypes.c_int32)


@functools.lru_cache(maxsize=1)
def load_kernels(kernels=DEFAULT_KERNELS):
    """{(kind, ks, steps): ctypes function} JIT-compiled into this process; KtxError where AMX cannot run.

    The only place machine code with tile instructions enters the process: guarded by amx_available()."""
    ok, why = amx_available()
    if not ok:
        raise KtxError(f"AMX kernels cannot run on this machine: {why}; use the vnni/avx2 path (path='auto')")
    import llvmlite.binding as llvm

    engine = llvm.create_mcjit_compiler(_module(kernels), _target_machine())
    engine.finalize_object()
    fns = {spec: _SIG(engine.get_function_address(kernel_name(*spec))) for spec in kernels}
    fns["_engine"] = engine  # owns the machine code: lives as long as the pointers
    return fns


def native_kernel(kind: str, ks: int, steps: bool = False):
    """The real microkernel as a Python callable on numpy arrays (same ABI as `TileModel.kernel`'s callables)."""
    fn = load_kernels()[(kind, ks, steps)]

    def run(A, lda, B, ldb, C, ldc, K, zero_c):
        fn(A.ctypes.data, lda, B.ctypes.data, ldb, C.ctypes.data, ldc, K, int(zero_c))

    return run


# ---------------------------------------------------------------- the whole tile: AMX dots + vector scales

AMX_TILE_TOKENS = 32  # tokens per full tile: two A tiles of 16 rows
MAX_TILE_NR = 2  # row groups per full tile: 2 A + NR B + 2 NR C tiles <= 8 registers


def tile_variant(layout: str, nr: int) -> int:
    """Variant number of a full AMX tile: 1000 * layout id (simd.LAYOUT_IDS) + row groups."""
    from .simd import LAYOUT_IDS

    if not 0 < nr <= MAX_TILE_NR:
        raise ValueError(f"a full AMX tile holds 1..{MAX_TILE_NR} row groups, not {nr}")
    return 1000 * LAYOUT_IDS[layout] + nr


def tile_function(name: str, args, shapes: dict[int, tuple[int, int]], dot: str):
    """A new module holding `void name(i64 args...)` that starts by loading the TILECFG of shapes (a private
    constant): (module, {arg: value}, builder, (tilezero, tileloadd64, tilestored64, the dot intrinsic `dot`)),
    the intrinsics taking explicit tile numbers. The caller emits the body and ends it with tilerelease."""
    from llvmlite import ir

    from .simd import _fn, i8, i64

    mod = ir.Module(name=name)
    fn = ir.Function(mod, ir.FunctionType(ir.VoidType(), [i64] * len(args)), name=name)
    b = ir.IRBuilder(fn.append_basic_block("entry"))
    p8, void = i8.as_pointer(), ir.VoidType()
    cfg_t = ir.ArrayType(i8, 64)
    cfg = ir.GlobalVariable(mod, cfg_t, name=f"{name}_cfg")
    cfg.global_constant, cfg.linkage, cfg.align = True, "private", 64
    cfg.initializer = ir.Constant(cfg_t, bytearray(tile_config(shapes)))
    ops = (_fn(b, "llvm.x86.tilezero", void, [i8]), _fn(b, "llvm.x86.tileloadd64", void, [i8, p8, i64]),
           _fn(b, "llvm.x86.tilestored64", void, [i8, p8, i64]), _fn(b, f"llvm.x86.{dot}", void, [i8, i8, i8]))
    b.call(_fn(b, "llvm.x86.ldtilecfg", void, [p8]), [b.bitcast(cfg, p8)])
    return mod, dict(zip(args, fn.args)), b, ops


def full_tile_module(V: int):
    """llvmlite IR module of `void ktx_amx_tile_V(K, codes, cs, d, ds, sc, ss, dmin, dms, m, ms, xq, xd, xs, xsf,
    out, ldo, scratch)`, all i64: simd.tile's ABI (simd._ARGS, with `scratch` in the place of pf) and its result,
    out[t, 16 r + i] for AMX_TILE_TOKENS = 32 tokens x NR row groups, with the integer dots on AMX tiles.

    codes must be a byte plane ([K/4, 64] per row group, cs bytes apart: repack.py's Q8_0 codes as they are, the
    packed layouts widened first). Each group of G weights needs int32 tiles of its own (its scales differ per
    row), so per group g (k0 = G g), a 2 x NR block of C tiles:

        tilezero C_h,r;  tileloadd A_h <- xq[16 h : 16 h + 16, k0 : k0 + G] (lda K);  tileloadd B_r <- codes_r rows k0/4..
        tdpbsud C_h,r, A_h, B_r;  tilestored C_h,r -> scratch + 1024 (2 h + r)     (A tmm0-1, B tmm2-3, C tmm4-7)

    then the 32 x NR int32 rows of scratch go through simd.scale_group, the float code of the vector tiles' per-32
    variants (same operations, same order), with the code offset from simd.code_offsets, so a full tile's output
    equals the vnni tile's bit for bit. Two token halves share each B load and two row groups each A load: on the
    machine measured (bench/RESULTS.md) a 1 KiB tileloadd cost ~19 ns and a tilestored ~8-13 ns against ~6 ns for
    a 16 x 16 x 64 tdpbsud, so the loads and stores per MAC set the speed. scratch: 4 KiB."""
    from llvmlite import ir

    from .simd import _ARGS, _LAYOUT_BY_ID, V16F, V16I, _fn, _ptr, code_offsets, i8, i64, scale_group

    lay, nr = _LAYOUT_BY_ID[V // 1000 % 10], V % 10
    G, nt = lay.G, AMX_TILE_TOKENS
    halves = nt // 16
    ctile = lambda h, r: 4 + 2 * h + r  # noqa: E731
    shapes = {**{h: (16, G) for h in range(halves)}, **{2 + r: (G // 4, 64) for r in range(nr)},
              **{ctile(h, r): (16, 64) for h in range(halves) for r in range(nr)}}
    mod, a, b, (tilezero, tileload, tilestore, dp) = tile_function(f"ktx_amx_tile_{V}", _ARGS[:-1] + ("scratch",),
                                                                   shapes, "tdpbsud")
    c = lambda v: ir.Constant(i64, v)  # noqa: E731
    t8 = lambda v: ir.Constant(i8, v)  # noqa: E731
    void = ir.VoidType()

    entry = b.block
    loop, done = b.append_basic_block("amx_g"), b.append_basic_block("amx_done")
    b.branch(loop)
    b.position_at_end(loop)
    g = b.phi(i64)
    g.add_incoming(c(0), entry)
    accs = [[b.phi(V16F) for _ in range(nr)] for _ in range(nt)]
    for row in accs:
        for p in row:
            p.add_incoming(ir.Constant(V16F, [0.0] * 16), entry)
    gk = b.mul(g, c(G))
    for h in range(halves):
        for r in range(nr):
            b.call(tilezero, [t8(ctile(h, r))])
    for h in range(halves):
        b.call(tileload, [t8(h), _ptr(b, a["xq"], b.add(b.mul(c(16 * h), a["K"]), gk), i8), a["K"]])
    for r in range(nr):
        b.call(tileload, [t8(2 + r), _ptr(b, a["codes"], b.add(b.mul(c(r), a["cs"]), b.mul(gk, c(16))), i8), c(64)])
    for h in range(halves):
        for r in range(nr):
            b.call(dp, [t8(ctile(h, r)), t8(h), t8(2 + r)])
    for h in range(halves):
        for r in range(nr):
            b.call(tilestore, [t8(ctile(h, r)), _ptr(b, a["scratch"], c(1024 * (2 * h + r)), i8), c(64)])
    xsum = code_offsets(b, a, G, nt, lay.zero, g)
    iacc = [[b.add(b.load(_ptr(b, a["scratch"], c(1024 * (2 * (t // 16) + r) + 64 * (t % 16)), V16I), align=4),
                   xsum[t]) for r in range(nr)] for t in range(nt)]
    nxt = [list(row) for row in accs]
    scale_group(b, a, lay, nt, nr, g, iacc, nxt)
    g1 = b.add(g, c(1))
    g.add_incoming(g1, b.block)
    for t in range(nt):
        for r in range(nr):
            accs[t][r].add_incoming(nxt[t][r], b.block)
    b.cbranch(b.icmp_signed("<", g1, b.sdiv(a["K"], c(G))), loop, done)
    b.position_at_end(done)
    b.call(_fn(b, "llvm.x86.tilerelease", void, []), [])
    for t in range(nt):
        for r in range(nr):
            off = b.mul(b.add(b.mul(c(t), a["ldo"]), c(16 * r)), c(4))
            b.store(nxt[t][r], _ptr(b, a["out"], off, V16F), align=4)
    b.ret_void()
    return mod


_FULL = {}  # V -> (MCJIT engine that owns the machine code, address)


def full_tile_assembly(V: int) -> str:
    """Sapphire Rapids assembly of a full tile: the compile-only check, safe on any CPU (nothing runs)."""
    import llvmlite.binding as llvm

    tm = _target_machine()
    mod = llvm.parse_assembly(str(full_tile_module(V)))
    mod.verify()
    return tm.emit_assembly(mod)


def full_tile_address(V: int) -> int:
    """Address of the full tile V, JIT-compiled once per process; KtxError where AMX cannot run."""
    hit = _FULL.get(V)
    if hit is None:
        ok, why = amx_available()
        if not ok:
            raise KtxError(f"AMX kernels cannot run on this machine: {why}; use the vnni/avx2 path (path='auto')")
        import llvmlite.binding as llvm

        mod = llvm.parse_assembly(str(full_tile_module(V)))
        mod.verify()
        engine = llvm.create_mcjit_compiler(mod, _target_machine())
        engine.finalize_object()
        hit = _FULL[V] = (engine, engine.get_function_address(f"ktx_amx_tile_{V}"))
    return hit[1]


# ---------------------------------------------------------------- models of the tiles (numpy, Numba)

class TileModel:
    """tmm0..7 as numpy byte arrays, shaped by a 64-byte TILECFG; memory operands are numpy arrays (bytes)."""

    def __init__(self):
        self.rows = [0] * 8
        self.colsb = [0] * 8
        self.t = [None] * 8

    def ldtilecfg(self, cfg: bytes):
        if cfg[0] != 1:
            raise ValueError("palette must be 1")
        self.colsb = [int.from_bytes(cfg[16 + 2 * i:18 + 2 * i], "little") for i in range(8)]
        self.rows = list(cfg[48:56])

    def tilezero(self, i):
        self.t[i] = np.zeros((self.rows[i], self.colsb[i]), np.uint8)

    def tileloadd(self, i, mem, off, stride):  # rows[i] rows of colsb[i] bytes, `stride` bytes apart
        buf = mem.reshape(-1).view(np.uint8)
        idx = off + np.arange(self.rows[i])[:, None] * stride + np.arange(self.colsb[i])[None, :]
        self.t[i] = buf[idx]

    def tilestored(self, i, mem, off, stride):
        buf = mem.reshape(-1).view(np.uint8)
        idx = off + np.arange(self.rows[i])[:, None] * stride + np.arange(self.colsb[i])[None, :]
        buf[idx] = self.t[i]

    def _dp_int8(self, c, a, b, a_dt, b_dt):
        A = self.t[a].view(a_dt).astype(np.int64).reshape(self.rows[a], -1, 4)  # [M, K/4, 4]
        B = self.t[b].view(b_dt).astype(np.int64).reshape(self.rows[b], -1, 4)  # [K/4, N, 4]
        C = self.t[c].view(np.int32)  # [M, N]
        acc = C.astype(np.int64) + np.einsum("mki,kni->mn", A, B)
        self.t[c] = (acc & 0xFFFFFFFF).astype(np.uint32).view(np.uint8).reshape(C.shape[0], -1)  # wraps like int32

    def tdpbssd(self, c, a, b):
        self._dp_int8(c, a, b, np.int8, np.int8)

    def tdpbsud(self, c, a, b):
        self._dp_int8(c, a, b, np.int8, np.uint8)

    def tdpbf16ps(self, c, a, b):
        A = _bf16_to_f32(self.t[a].view(np.uint16)).reshape(self.rows[a], -1, 2)  # [M, K/2, 2]
        B = _bf16_to_f32(self.t[b].view(np.uint16)).reshape(self.rows[b], -1, 2)  # [K/2, N, 2]
        C = self.t[c].view(np.float32).copy()  # [M, N]
        for k2 in range(A.shape[1]):  # bf16 x bf16 is exact in f32: the pair sum, then the accumulate, round
            C += A[:, k2, 0:1] * B[k2, :, 0][None, :] + A[:, k2, 1:2] * B[k2, :, 1][None, :]
        self.t[c] = C.view(np.uint8)

    def kernel(self, kind: str, ks: int, steps: bool = False):
        """A callable with the real microkernel's ABI that runs the same instruction sequence on the model."""
        esize, pack, op = (2 if kind == "bf16" else 1), (2 if kind == "bf16" else 4), _OPS[kind]

        def c_begin(C, off, ldc, zero_c):
            if zero_c:
                self.tilezero(0)
            else:
                self.tileloadd(0, C, off, ldc)

        def run(A, lda, B, ldb, C, ldc, K, zero_c):
            self.ldtilecfg(tile_config(kernel_tiles(kind, ks)))
            if not steps:
                c_begin(C, 0, ldc, zero_c)
            for kk in range(0, K, ks):
                c_off = kk // ks * 16 * ldc if steps else 0
                if steps:
                    c_begin(C, c_off, ldc, zero_c)
                self.tileloadd(1, A, kk * esize, lda)
                self.tileloadd(2, B, kk // pack * ldb, ldb)
                getattr(self, op)(0, 1, 2)
                if steps:
                    self.tilestored(0, C, c_off, ldc)
            if not steps:
                self.tilestored(0, C, 0, ldc)

        return run


@functools.lru_cache(maxsize=None)
def tdpbsud_steps_model(ks: int):
    """A Numba cfunc with the ABI of the `sud` steps microkernel that computes, in plain loops, what its
    instructions do: per K step s, C[s][m][n] (+)= sum_{k<ks} A[m][kk + k] * B[(kk + k)/4][4 n + k%4] in int32.

    Its address stands in for the native kernel's in the Numba MoE loops (amx_loops.py), so the integrated
    AMX path runs end to end on CPUs without AMX; tests check it against TileModel and, where AMX runs, the
    native kernel."""
    from numba import cfunc, types

    i64 = types.int64
    sig = types.void(types.CPointer(types.int8), i64, types.CPointer(types.uint8), i64, types.CPointer(types.int32),
                     i64, i64, types.int32)
    kernel_tiles("sud", ks)  # same K-step limits as the real kernel

    @cfunc(sig, nopython=True, nogil=True)
    def run(a, lda, b, ldb, c, ldc, K, zero_c):
        ldc4 = ldc // 4
        for kk in range(0, K, ks):
            c0 = kk // ks * 16 * ldc4
            for m in range(16):
                for n in range(16):
                    acc = np.int32(0) if zero_c else c[c0 + m * ldc4 + n]
                    for k in range(ks):
                        acc += np.int32(a[m * lda + kk + k]) * np.int32(b[(kk + k) // 4 * ldb + 4 * n + k % 4])
                    c[c0 + m * ldc4 + n] = np.int32(acc)

    return run


def _bf16_to_f32(u16: np.ndarray) -> np.ndarray:
    return (u16.astype(np.uint32) << 16).view(np.float32)


# ---------------------------------------------------------------- packing and blocking

def pack_a(x: np.ndarray) -> np.ndarray:
    """Activations [T, K] (int8, or bf16 as uint16) -> [ceil(T/16) * 16, K] row-major, zero-padded to 16 rows."""
    T = x.shape[0]
    a = np.zeros((-(-T // 16) * 16, x.shape[1]), x.dtype)
    a[:T] = x
    return a


def pack_b_weights(w: np.ndarray, pack: int) -> np.ndarray:
    """Weights [N, K] (N a multiple of 16) -> B operands [N/16, K/pack, 16*pack]: B[k][pack n + i] = w[n, pack k + i].

    pack = 4 for int8, 2 for bf16 (uint16 bits); for uint8 codes this equals repack.py's byte plane."""
    N, K = w.shape
    g = w.reshape(N // 16, 16, K // pack, pack).transpose(0, 2, 1, 3)  # [N/16, K/pack, 16, pack]
    return np.ascontiguousarray(g).reshape(N // 16, K // pack, 16 * pack)


def matmul_tiles(a: np.ndarray, B: np.ndarray, kind: str, ks: int, kernel) -> np.ndarray:
    """Plain blocked product: a [T, K] . w.T -> [T, N] int32 (int8 kinds) or float32 (bf16), B from
    pack_b_weights. `kernel(kind, ks)` returns the microkernel (TileModel.kernel or native_kernel)."""
    A = pack_a(a)  # [Tp, K]
    esize = A.itemsize
    K = A.shape[1]
    run = kernel(kind, ks)
    C = np.zeros((A.shape[0], 16 * B.shape[0]), np.float32 if kind == "bf16" else np.int32)  # [Tp, N]
    tile = np.empty((16, 16), C.dtype)
    for m in range(0, A.shape[0], 16):
        for rg in range(B.shape[0]):
            Bt = np.ascontiguousarray(B[rg])
            run(np.ascontiguousarray(A[m:m + 16]), K * esize, Bt, 64, tile, 64, K, True)
            C[m:m + 16, 16 * rg:16 * rg + 16] = tile
    return C[:a.shape[0]]


def amx_expert_matmul(xq, xd, xs, xsf, arrays: dict, lay: Layout, kernel) -> np.ndarray:
    """One repacked expert matrix times int8 activations: out [T, R] float32, the same sum as simd.py's tile.

    xq [T, K] int8, xd [T, K/32], xs [T, K/16] int32, xsf [T, K/32] (quantize.py); arrays: one expert's
    repack.py fields (codes [R/16, ., 64], d, sc, dmin, m). One tdpbsud call per (16 tokens, row group,
    scale group of G weights); the int32 tile is offset by -zero * sum(xq), converted and scaled."""
    T, K = xq.shape
    G = lay.G
    run = kernel("sud", G)
    A = pack_a(xq)  # [Tp, K]
    Tp = A.shape[0]
    n_rg = arrays["codes"].shape[0]
    out = np.zeros((Tp, n_rg * R_GROUP), np.float32)  # [Tp, R]
    xs_p = pack_a(xs).astype(np.int64)  # [Tp, K/16]
    xd_p, xsf_p = pack_a(xd), pack_a(xsf)  # [Tp, K/32]
    tile = np.empty((16, 16), np.int32)
    for rg in range(n_rg):
        B = unpack_codes(arrays["codes"][rg], lay)  # [K/4, 64]
        rows = slice(R_GROUP * rg, R_GROUP * rg + R_GROUP)
        for m in range(0, Tp, 16):
            acc = np.zeros((16, 16), np.float32)
            for g in range(K // G):
                k0 = g * G
                run(np.ascontiguousarray(A[m:m + 16, k0:k0 + G]), G, np.ascontiguousarray(B[k0 // 4:(k0 + G) // 4]),
                    64, tile, 64, G, True)
                xsum = xs_p[m:m + 16, k0 // 16:(k0 + G) // 16].sum(axis=1)  # [16]
                isum = (tile.astype(np.int64) - lay.zero * xsum[:, None]).astype(np.float32)  # [16 tok, 16 rows]
                s = arrays["d"][rg, k0 // lay.S].astype(np.float32)  # [16 rows]
                if lay.sc:
                    s = s * arrays["sc"][rg, g].astype(np.float32)
                acc += isum * (xd_p[m:m + 16, k0 // 32][:, None] * s[None, :])
                if lay.mins and k0 % 32 == 0:
                    mn = arrays["dmin"][rg, k0 // 256].astype(np.float32) * arrays["m"][rg, k0 // 32].astype(np.float32)
                    acc -= xsf_p[m:m + 16, k0 // 32][:, None] * mn[None, :]
            out[m:m + 16, rows] = acc
    return out[:T]


# ---------------------------------------------------------------- dispatch

TILE_SOURCES = ("bf16", "native", "model")
# Why "auto" leaves the int8 tiles off where AMX runs: on the one AMX machine measured (bench/RESULTS.md, 2 vCPUs of a
# Sapphire Rapids class Xeon) the full int8 tiles ran MoE prefill at 0.68-0.98x the vnni tiles: K-quant scales need a
# C tile stored and the vnni tiles' float code per group of 16-32 k. The bf16 tiles (amx_bf16.py) need neither.
AMX_OFF_BY_DEFAULT = "int8 amx tiles are off in auto: measured no faster than vnni (path amx, amx_kernel native)"
BF16_LABEL = "amx tdpbf16ps"


def tile_source(path: str, kernel: str = "bf16") -> tuple[str | None, str]:
    """Where a MoE op's prefill tiles come from: ("bf16" | "native" | "model", label) or (None, why no AMX runs).

    kernel: "bf16" (amx_bf16.py: weights dequantized to bf16 per item, tdpbf16ps over the whole K), "native"
    (amx.full_tile_module: int8 tdpbsud per scale group, bit-identical to the vnni tiles) or "model" (the Numba
    model of the int8 steps kernel: tests the integrated loops on any CPU; slow). path is the MoEExperts path:
    "auto" runs the bf16 tiles where AMX runs (the int8 ones stay off: AMX_OFF_BY_DEFAULT), "amx" runs the chosen
    kernel and requires AMX (KtxError with the reason where it cannot run), vnni/avx2/portable/reference ask
    for that path alone."""
    if kernel not in TILE_SOURCES:
        raise KtxError(f"unknown AMX kernel {kernel!r}: use 'bf16', 'native' or 'model'")
    if path not in ("auto", "amx"):
        return None, f"amx off: path={path!r}"
    if kernel == "model":
        return "model", "amx tdpbsud on the numba tile model (testing)"
    ok, why = amx_available()
    label = BF16_LABEL if kernel == "bf16" else "amx tdpbsud"
    if not ok:
        if path == "amx":
            raise KtxError(f"CPU kernel path 'amx' cannot run on this machine: {why}; use path='auto'")
        return None, f"amx unavailable: {why}"
    if path == "auto" and kernel == "native":
        return None, AMX_OFF_BY_DEFAULT
    return kernel, label


def tile_kernel_address(source: str, ks: int) -> int:
    """Address of the `sud` steps microkernel for K step ks: the real one (loads the shim, so only where
    amx_available() said yes: tile_source never returns "native" elsewhere) or the Numba model."""
    if source == "model":
        return tdpbsud_steps_model(ks).address
    return ctypes.cast(load_kernels()[("sud", ks, True)], ctypes.c_void_p).value
