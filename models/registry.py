"""`model.arch` -> the networks of that architecture, one registry for every family.

Each architecture's file registers a builder under its family and name:

    @register("gan", "dcgan")
    def build_dcgan(model, data, **options):   # model = cfg.model, data = cfg.data
        return DCGANGenerator(...), DCGANDiscriminator(...)

A family fixes what its builders return: ``vae`` one VAE module (encode/decode/forward as
models.vae.ConvVAE); ``gan`` a (generator, discriminator) pair. Builders read the config tree
(everyone may read configs) and return plain nn.Modules.
"""
from __future__ import annotations

from typing import Callable

_BUILDERS: dict[str, dict[str, Callable]] = {}

# (family, arch) -> {how the CPU computes bf16: precision}: what `trainer.precision=auto` takes on
# a CPU with native bf16 for a network where `python -m bench.precision` measured another precision
# faster than bf16 (bench/results/precision.md). Keyed by the CPU's bf16 instructions ("amx": AMX
# tiles; "avx512_bf16": AVX512-BF16 dot products, as on AMD Zen 4), since which precision wins
# depends on them. Unlisted archs train in bf16 on such CPUs; CUDA is not affected.
# Empty: every network trains faster in bf16 on both kinds measured, one thread each:
# bf16/fp32 step time 0.61-0.88 on a Xeon with AMX (2026-12-05) and 0.64-0.83 on a real AMD EPYC
# Zen 4 (2026-12-06). The "avx512_bf16" entries that stood here (fp32 for every network) came from
# the Xeon with oneDNN capped below AMX, a stand-in that read 1.11-1.23 and was wrong for Zen 4.
CPU_PRECISION: dict[tuple[str, str], dict[str, str]] = {}


def register(family: str, arch: str) -> Callable[[Callable], Callable]:
    """Decorator: make `builder(model_cfg, data_cfg)` the one for `model.arch == arch` in `family`."""
    def add(builder: Callable) -> Callable:
        archs = _BUILDERS.setdefault(family, {})
        if arch in archs:
            raise ValueError(f"model arch '{arch}' registered twice for family '{family}'")
        archs[arch] = builder
        return builder
    return add


def archs(family: str) -> tuple[str, ...]:
    """The architectures registered for a family, in registration order."""
    return tuple(_BUILDERS.get(family, {}))


def cpu_precision(family: str, arch: str, bf16_isa: str) -> str | None:
    """The measured precision `auto` should take for this architecture on a CPU computing bf16
    with `bf16_isa` ("amx" or "avx512_bf16"), or None where nothing was measured to beat bf16."""
    return CPU_PRECISION.get((family, arch), {}).get(bf16_isa)


def build(family: str, model_cfg, data_cfg, **options):
    """The networks of `model_cfg.arch` in `family` for data shaped as `data_cfg` says; `options`
    are passed on to the builder (what the family's trainer decides, such as a learned scale)."""
    found = _BUILDERS.get(family, {})
    if model_cfg.arch not in found:
        raise ValueError(f"unknown {family} model.arch '{model_cfg.arch}'; registered: {', '.join(found)}")
    return found[model_cfg.arch](model_cfg, data_cfg, **options)
