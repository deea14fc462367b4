"""What the machine can do fast: the facts the fast path's preset is chosen from.

Foundation layer: imports only torch and the standard library. The facts are plain data
(`DeviceFacts`), so the rule that turns them into switches (`choose_switches`, here for the
fast path and the evaluator alike) is a pure function that tests feed with faked facts. Also the
host allocator's setting of the `--malloc_cache` switch (`keep_freed_memory`).

- CPU: whether it has bfloat16 dot-product instructions (x86 AVX512-BF16 or AMX-BF16, ARM BF16).
  Without them oneDNN emulates bf16 matmuls and convolutions through float32 conversions, several
  times slower than float32 itself (2048^3 matmul, 2 threads: fp32 296 GFLOP/s, bf16 61 on an
  AVX512 Xeon without AVX512-BF16).
- CUDA: the compute capability. bf16 tensor cores and TF32 start at 8.0 (Ampere); below it
  (V100 7.0, T4 7.5) only fp16 runs on tensor cores.

Overrides, for tests and for machines whose /proc/cpuinfo does not tell the truth:
`GD_CPU_BF16=0|1` forces the CPU answer; `ONEDNN_MAX_CPU_ISA` capped below AVX512_CORE_BF16 (the
oneDNN switch that stops it from using bf16 instructions) means "no bf16" as well.
"""

from __future__ import annotations

import ctypes
import dataclasses
import os
import platform

import torch as th

# /proc/cpuinfo flags of bfloat16 dot-product instructions (x86 and aarch64 spellings).
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")

# ONEDNN_MAX_CPU_ISA values below the first ISA with bf16 instructions (oneDNN's ISA names).
_ONEDNN_ISAS_WITHOUT_BF16 = ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE",
                             "AVX512_CORE_VNNI")

# The compute capability from which CUDA has bf16 tensor cores and TF32 (Ampere).
CUDA_BF16_CAPABILITY = (8, 0)


@dataclasses.dataclass(frozen=True)
class DeviceFacts:
    """What the fast-path rule needs to know about the device a model runs on."""

    kind: str  # torch device type: "cpu", "cuda", "mps", ...
    cpu_bf16: tuple[str, ...] = ()  # CPU: the bf16 instruction flags found ((): none)
    cuda_capability: tuple[int, int] | None = None  # CUDA: (major, minor)
    note: str = ""  # where a fact came from when it was overridden

    def describe(self) -> str:
        if self.kind == "cuda" and self.cuda_capability is not None:
            return f"CUDA compute capability {self.cuda_capability[0]}.{self.cuda_capability[1]}"
        if self.kind == "cpu":
            found = ", ".join(self.cpu_bf16) or "none"
            return f"CPU bf16 instructions: {found}" + (f" ({self.note})" if self.note else "")
        return self.kind


def cpu_flags(cpuinfo_path: str = "/proc/cpuinfo") -> set[str]:
    """The CPU feature flags of /proc/cpuinfo (x86 'flags', aarch64 'Features'); empty if none."""
    try:
        with open(cpuinfo_path) as f:
            for line in f:
                key = line.split(":", 1)[0].strip()
                if key in ("flags", "Features"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_name(cpuinfo_path: str = "/proc/cpuinfo") -> str:
    """The CPU's model name (x86 'model name'), or what `platform` knows."""
    try:
        with open(cpuinfo_path) as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "CPU"


def cpu_bf16_instructions(flags: set[str] | None = None,
                          environ: dict[str, str] | None = None) -> tuple[tuple[str, ...], str]:
    """
    The CPU's bf16 instruction flags and a note on any override.

    :param flags: the CPU flags (default: read /proc/cpuinfo).
    :param environ: the environment to read overrides from (default: os.environ).
    :return: (flags found, note); flags () means bf16 would be emulated.
    """
    environ = os.environ if environ is None else environ
    forced = environ.get("GD_CPU_BF16", "").strip()
    if forced in ("0", "1"):
        return (("GD_CPU_BF16=1",) if forced == "1" else ()), f"GD_CPU_BF16={forced}"
    if forced:
        raise ValueError(f"GD_CPU_BF16={forced!r}: use 1 (has bf16 instructions) or 0 (has none)")
    found = tuple(f for f in CPU_BF16_FLAGS if f in (cpu_flags() if flags is None else flags))
    isa = environ.get("ONEDNN_MAX_CPU_ISA", "").strip().upper()
    if found and isa in _ONEDNN_ISAS_WITHOUT_BF16:
        return (), f"ONEDNN_MAX_CPU_ISA={isa} hides {', '.join(found)}"
    return found, ""


def detect(device: th.device | str) -> DeviceFacts:
    """The facts of `device` on this machine."""
    device = th.device(device)
    if device.type == "cpu":
        found, note = cpu_bf16_instructions()
        return DeviceFacts("cpu", cpu_bf16=found, note=note)
    if device.type == "cuda":
        return DeviceFacts("cuda", cuda_capability=tuple(th.cuda.get_device_capability(device)))
    return DeviceFacts(device.type)


def choose_switches(facts: DeviceFacts) -> tuple[dict, str]:
    """
    The preset for a device: the switches `--fast True` turns on, and a one-line reason.
    (`fast.resolve_fast_flags` applies it to a script's flags; the evaluator takes its float32
    switches.)

    The rule (README, "Fast path"), measured on CPUs and stated for GPUs:
    - CPU: bf16 autocast only with bf16 instructions (AVX512-BF16, AMX, ARM BF16); without them
      oneDNN emulates bf16 at a fraction of float32's speed, so the preset stays float32.
      SDPA, channels_last, the fused blocks and fused AdamW on either kind. (The malloc cache
      is not in it: fewer page faults, but no wall-clock gain measured; README.)
    - CUDA >= 8.0: bf16 autocast, SDPA, channels_last, fused blocks and AdamW (TF32 for what stays
      float32 comes from `--tf32`, on by default).
    - CUDA < 8.0 (V100, T4): no bf16 tensor cores; the original's fp16 with loss scaling instead.
    - anything else: SDPA only.
    torch.compile is never in the preset (its first call costs minutes; README).

    :param facts: what the device can do (`detect`, or faked in tests).
    :return: (switch name -> True for the switches to turn on, reason).
    """
    layout = dict(use_sdpa=True, channels_last=True, fused_blocks=True, fused_adam=True)
    if facts.kind == "cpu":
        if facts.cpu_bf16:
            return dict(layout, use_bf16=True), f"{facts.describe()}: bf16 autocast"
        return layout, f"{facts.describe()}: float32, bf16 would be emulated"
    if facts.kind == "cuda" and facts.cuda_capability is not None:
        cc = f"{facts.cuda_capability[0]}.{facts.cuda_capability[1]}"
        if tuple(facts.cuda_capability) >= CUDA_BF16_CAPABILITY:
            return (dict(layout, use_bf16=True),
                    f"CUDA compute capability {cc} >= 8.0: bf16 autocast (TF32 for what stays "
                    "float32: --tf32)")
        return (dict(layout, use_fp16=True),
                f"CUDA compute capability {cc} < 8.0, no bf16 tensor cores: the original's fp16 "
                "with loss scaling")
    return dict(use_sdpa=True), f"{facts.kind}: SDPA only"


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
# The largest mmap threshold glibc takes: 1 GiB from 2.35 on (measured: 2.36), 32 MiB before.
MMAP_THRESHOLDS = (1 << 30, 32 << 20)


def keep_freed_memory() -> str | None:
    """
    Make glibc's malloc keep freed memory for reuse (the `malloc_cache` switch; process-wide).

    Raises the mmap threshold (allocations above it are fresh zero-filled mappings, returned to
    the OS when freed) and the trim threshold (free memory at the heap's top above it is
    returned), so that each step's activations reuse the last step's pages. Idempotent.

    :return: None when set, else why not (no glibc, or mallopt refused), for a warning.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return "no mallopt in this C library (glibc only)"
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    if not mallopt(M_TRIM_THRESHOLD, 2**31 - 1):
        return "mallopt(M_TRIM_THRESHOLD) refused"
    if not any(mallopt(M_MMAP_THRESHOLD, size) for size in MMAP_THRESHOLDS):
        return "mallopt(M_MMAP_THRESHOLD) refused"
    return None
