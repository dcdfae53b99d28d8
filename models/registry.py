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


def build(family: str, model_cfg, data_cfg, **options):
    """The networks of `model_cfg.arch` in `family` for data shaped as `data_cfg` says; `options`
    are passed on to the builder (what the family's trainer decides, such as a learned scale)."""
    found = _BUILDERS.get(family, {})
    if model_cfg.arch not in found:
        raise ValueError(f"unknown {family} model.arch '{model_cfg.arch}'; registered: {', '.join(found)}")
    return found[model_cfg.arch](model_cfg, data_cfg, **options)
