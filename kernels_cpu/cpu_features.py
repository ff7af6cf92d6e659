"""Which SIMD instructions this CPU (and OS) can run, read with CPUID at run time.

No C compiler: two tiny functions, `cpuid(leaf, subleaf, out[4])` and `xgetbv(0)`, are written as LLVM IR
with inline assembly, JIT-compiled by llvmlite for a generic x86-64 target, and called through ctypes.

Bits used (Intel SDM vol. 2, CPUID):
  leaf 1        ECX.27 OSXSAVE, ECX.28 AVX
  leaf 7 sub 0  EBX.5 AVX2, EBX.16 AVX512F, EBX.30 AVX512BW, ECX.11 AVX512_VNNI,
                EDX.22 AMX-BF16, EDX.24 AMX-TILE, EDX.25 AMX-INT8
  leaf 7 sub 1  EAX.4 AVX-VNNI (VEX-encoded vpdpbusd on ymm)
  XCR0          bits 1|2 (SSE+AVX state), 5|6|7 (opmask + ZMM state), 17|18 (AMX tile state):
                an instruction set counts only if the OS saves its registers.
  leaf 0 vendor + leaf 1 EAX family: split_512 = AMD family 0x19 (Zen 4) with AVX-512, whose 512-bit ops run
                as two 256-bit halves; a tuning fact (moe.per256_tiles), not an instruction set.
  leaf 0 vendor: intel = GenuineIntel, another tuning fact (simd.DECODE_PF_LOCALITY: which prefetch hint
                the decode tiles use).
/proc/cpuinfo flags are only a cross-check (`cpuinfo_flags`), never the source of truth.
"""
from __future__ import annotations

import ctypes
import functools
import platform
from dataclasses import dataclass, fields

_IR = r"""
define void @ktx_cpuid(i32 %leaf, i32 %sub, i32* %out) {
  %r = call {i32, i32, i32, i32} asm sideeffect "cpuid", "={ax},={bx},={cx},={dx},{ax},{cx},~{dirflag},~{fpsr},~{flags}"(i32 %leaf, i32 %sub)
  %a = extractvalue {i32, i32, i32, i32} %r, 0
  %b = extractvalue {i32, i32, i32, i32} %r, 1
  %c = extractvalue {i32, i32, i32, i32} %r, 2
  %d = extractvalue {i32, i32, i32, i32} %r, 3
  store i32 %a, i32* %out
  %p1 = getelementptr i32, i32* %out, i64 1
  store i32 %b, i32* %p1
  %p2 = getelementptr i32, i32* %out, i64 2
  store i32 %c, i32* %p2
  %p3 = getelementptr i32, i32* %out, i64 3
  store i32 %d, i32* %p3
  ret void
}

define i64 @ktx_xgetbv(i32 %idx) {
  %r = call {i32, i32} asm sideeffect "xgetbv", "={ax},={dx},{cx},~{dirflag},~{fpsr},~{flags}"(i32 %idx)
  %lo = extractvalue {i32, i32} %r, 0
  %hi = extractvalue {i32, i32} %r, 1
  %lo64 = zext i32 %lo to i64
  %hi64 = zext i32 %hi to i64
  %hs = shl i64 %hi64, 32
  %v = or i64 %hs, %lo64
  ret i64 %v
}
"""


@dataclass(frozen=True)
class CpuFeatures:
    avx2: bool = False
    avx512f: bool = False
    avx512bw: bool = False
    avx512_vnni: bool = False
    avx_vnni: bool = False
    amx_tile: bool = False
    amx_int8: bool = False
    amx_bf16: bool = False
    split_512: bool = False  # 512-bit ops as two 256-bit halves (Zen 4): a tuning fact, reported (moe.per256_tiles)
    intel: bool = False  # GenuineIntel: a tuning fact (simd.DECODE_PF_LOCALITY)

    def describe(self) -> str:
        on = [f.name for f in fields(self) if getattr(self, f.name)]
        return "cpu: " + (" ".join(on) if on else "no AVX2 (portable kernels)")


@functools.lru_cache(maxsize=1)
def _jit():
    import llvmlite.binding as llvm

    llvm.initialize_native_target()
    llvm.initialize_native_asmprinter()
    llvm.initialize_native_asmparser()  # inline asm needs the x86 assembler parser
    mod = llvm.parse_assembly(_IR)
    mod.verify()
    tm = llvm.Target.from_default_triple().create_target_machine(cpu="x86-64", features="")
    engine = llvm.create_mcjit_compiler(mod, tm)
    engine.finalize_object()
    cpuid = ctypes.CFUNCTYPE(None, ctypes.c_uint32, ctypes.c_uint32, ctypes.POINTER(ctypes.c_uint32))(
        engine.get_function_address("ktx_cpuid"))
    xgetbv = ctypes.CFUNCTYPE(ctypes.c_uint64, ctypes.c_uint32)(engine.get_function_address("ktx_xgetbv"))
    return engine, cpuid, xgetbv  # the engine owns the machine code: keep it alive with the pointers


def xcr0() -> int:
    """XCR0 (the state components the OS saves), or 0 where XGETBV is unavailable (no OSXSAVE, not x86)."""
    if platform.machine().lower() not in ("x86_64", "amd64") or not _bit(cpuid(1)[2], 27):
        return 0
    return _jit()[2](0)


def cpuid(leaf: int, sub: int = 0) -> tuple[int, int, int, int]:
    """(eax, ebx, ecx, edx) of CPUID(leaf, sub)."""
    _, fn, _ = _jit()
    out = (ctypes.c_uint32 * 4)()
    fn(leaf, sub, out)
    return tuple(out)


def _bit(v: int, i: int) -> bool:
    return bool((v >> i) & 1)


@functools.lru_cache(maxsize=1)
def cpu_features() -> CpuFeatures:
    """Detected once per process; all False on non-x86 machines (portable kernels only)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return CpuFeatures()
    max_leaf = cpuid(0)[0]
    _, _, ecx1, _ = cpuid(1)
    if not (_bit(ecx1, 27) and _bit(ecx1, 28)):  # no OSXSAVE/AVX: xgetbv would fault
        return CpuFeatures()
    _, _, xgetbv = _jit()
    xcr0 = xgetbv(0)
    ymm_ok = (xcr0 & 0x6) == 0x6
    zmm_ok = ymm_ok and (xcr0 & 0xE0) == 0xE0
    amx_ok = (xcr0 & 0x60000) == 0x60000
    if max_leaf < 7:
        return CpuFeatures()
    _, ebx7, ecx7, edx7 = cpuid(7, 0)
    eax71 = cpuid(7, 1)[0]
    avx512f = zmm_ok and _bit(ebx7, 16)
    _, b0, c0, d0 = cpuid(0)
    vendor = b"".join(v.to_bytes(4, "little") for v in (b0, d0, c0))
    eax1 = cpuid(1)[0]
    family = (eax1 >> 8) & 0xF
    family += (eax1 >> 20) & 0xFF if family == 0xF else 0
    return CpuFeatures(
        avx2=ymm_ok and _bit(ebx7, 5),
        avx512f=avx512f,
        avx512bw=avx512f and _bit(ebx7, 30),
        avx512_vnni=avx512f and _bit(ecx7, 11),
        avx_vnni=ymm_ok and _bit(eax71, 4),
        amx_tile=amx_ok and _bit(edx7, 24),
        amx_int8=amx_ok and _bit(edx7, 24) and _bit(edx7, 25),
        amx_bf16=amx_ok and _bit(edx7, 24) and _bit(edx7, 22),
        split_512=avx512f and vendor == b"AuthenticAMD" and family == 0x19,
        intel=vendor == b"GenuineIntel",
    )


def cpuinfo_flags() -> set[str]:
    """Flags the kernel reports in /proc/cpuinfo (empty where absent): a cross-check for tests and logs."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()
