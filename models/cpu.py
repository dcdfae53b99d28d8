"""What this CPU computes fast: which bf16 instructions it has (the precision choice of
trainers.runtime.engines, and the kernels some layers pick, e.g. models.r3gan's grouped convs)."""
from __future__ import annotations

import functools
import os

import torch


def cpu_bf16_isa() -> str | None:
    """How this CPU computes bf16: "amx" (AMX tiles: Intel Sapphire Rapids and later),
    "avx512_bf16" (dot-product instructions only: Cooper Lake, AMD Zen 4), or None (emulated).
    Which precision trains a network faster can differ between the two, so measured
    preferences (models.registry.CPU_PRECISION) are kept per kind: bf16 won for every network on
    both a Xeon with AMX and a real Zen 4 (bench/results/precision.md), while a Xeon with oneDNN
    capped below AMX (ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16, which counts as "avx512_bf16" here)
    ran them slower in bf16 and was no stand-in for Zen 4."""
    capability, flags = torch.backends.cpu.get_cpu_capability(), _cpuinfo_flags()
    if (capability == "AMX" or "amx_bf16" in flags) and _onednn_may_use_amx():
        return "amx"
    if capability in ("AVX512_BF16", "AMX") or "avx512_bf16" in flags:
        return "avx512_bf16"
    return None


def cpu_has_native_bf16() -> bool:
    """True when the CPU computes bf16 in hardware (AVX512-BF16 or AMX).

    Without it PyTorch emulates bf16 convolutions: measured 14x slower than fp32 on an AVX2
    EPYC core, so `auto` trains in fp32 there; bf16 can still be asked for explicitly.
    """
    return cpu_bf16_isa() is not None


def _onednn_may_use_amx() -> bool:
    cap = (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "ALL").upper()
    return cap in ("ALL", "DEFAULT") or "AMX" in cap


def _cpuinfo_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


@functools.cache
def has_amx_bf16() -> bool:
    """cpu_bf16_isa() == "amx", asked once per process (layers ask it on every forward)."""
    return cpu_bf16_isa() == "amx"
