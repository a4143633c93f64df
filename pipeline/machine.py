"""What machine a figure was measured on: the CPU, the instruction sets that decide the
precision and the speed of the CPU paths, and what ``--precision auto`` runs there.

Two 2-core "AMD EPYC" machines of this project's CI differ by 2x (PIL decodes ~505 images/s per
core against ~257) to 4x (ResNet-18 alone: 162 images/s in bf16 against 38 in fp32), measured
2026-11-29 and 2026-12-04: one with AVX-512 and AVX-512 bf16, where ``--precision auto`` runs
bf16 on the CPU, one with AVX2 only, where it runs fp32. A figure without this line cannot be
compared with another. The benchmark, the GPU check and the test runs (``tests/conftest.py``:
the header, and the last line under ``pytest -q``) all print ``describe()``.

``RESNET_PIPELINE_CPU_BF16=0`` (or ``false``, ``no``, ``off``) makes ``--precision auto`` treat
the CPU as one without native bf16 (fp32), whatever it has: how a bf16 machine plays an
AVX2-only one (``make test-slow`` sets it unless told otherwise). Any other value, or none, lets
the CPU decide; nothing forces bf16 on a CPU without it. An explicit ``--precision bf16`` still
runs bf16.
"""

from __future__ import annotations

import os
import platform

CPU_BF16_ENV = "RESNET_PIPELINE_CPU_BF16"

# /proc/cpuinfo flag -> the name people use for it (Intel's and AMD's manuals; Linux's
# arch/x86/include/asm/cpufeatures.h spells the flags)
ISA_FLAGS = (("avx2", "AVX2"), ("avx512f", "AVX-512"), ("avx512_bf16", "AVX-512 bf16"),
             ("amx_bf16", "AMX bf16"))


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo (``platform.processor()`` elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def instruction_sets(flags: set[str] | None = None) -> dict[str, bool]:
    """{"AVX2": bool, "AVX-512": bool, "AVX-512 bf16": bool, "AMX bf16": bool} from ``flags``
    (this CPU's when None)."""
    flags = cpu_flags() if flags is None else flags
    return {name: flag in flags for flag, name in ISA_FLAGS}


def cpu_bf16_forced_off() -> bool:
    """Whether RESNET_PIPELINE_CPU_BF16 (0, false, no or off, any case) tells ``--precision
    auto`` to run fp32 on the CPU."""
    return os.environ.get(CPU_BF16_ENV, "").strip().lower() in ("0", "false", "no", "off")


def native_cpu_bf16() -> bool:
    """Whether torch runs bf16 natively on this CPU (oneDNN's check: AVX-512 bf16 or AMX), as
    ``--precision auto`` decides it; False under RESNET_PIPELINE_CPU_BF16=0."""
    if cpu_bf16_forced_off():
        return False
    import torch

    return bool(torch.backends.mkldnn.is_available()
                and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def summary() -> dict:
    """The machine as a record: cpu, cores, instruction sets, torch's CPU kernels
    (``torch.backends.cpu.get_cpu_capability``), what auto runs on the CPU and whether that
    was forced, torch and Python versions."""
    import torch

    return {"cpu": cpu_name(), "cores": os.cpu_count(), "isa": instruction_sets(),
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "auto_precision_cpu": "bf16" if native_cpu_bf16() else "fp32",
            "cpu_bf16_forced_off": cpu_bf16_forced_off(),
            "torch": torch.__version__, "python": platform.python_version()}


def describe(s: dict | None = None) -> str:
    """One line, e.g. ``AMD EPYC, 2 cores, AVX2 (no AVX-512, no AVX-512 bf16, no AMX bf16);
    torch CPU kernels AVX2; --precision auto on the CPU: fp32``."""
    s = summary() if s is None else s
    have = [n for n, ok in s["isa"].items() if ok]
    lack = [n for n, ok in s["isa"].items() if not ok]
    isa = ", ".join(have) or "none of " + ", ".join(s["isa"])
    if have and lack:
        isa += f" ({', '.join('no ' + n for n in lack)})"
    auto = s["auto_precision_cpu"]
    if s["cpu_bf16_forced_off"]:
        auto += f" (forced by {CPU_BF16_ENV}=0)"
    return (f"{s['cpu']}, {s['cores']} cores, {isa}; torch CPU kernels "
            f"{s['torch_cpu_capability']}; --precision auto on the CPU: {auto}")
