"""`trainer.precision=auto` on a CPU: bf16 where the CPU computes it natively, unless the network's
measured choice (models.registry.CPU_PRECISION, from bench/precision.py) says otherwise; explicit
requests are always honoured."""
from __future__ import annotations

import pytest
import torch

import models
import models.cpu
from models import registry
from trainers.runtime import engines
from trainers.runtime.engines import PrecisionError, precision_choice

CPU = torch.device("cpu")


@pytest.fixture
def native_bf16(monkeypatch):
    """A CPU with AVX512-BF16 (no AMX), and a table saying fp32 is faster there for the R3GAN networks."""
    monkeypatch.setattr(engines, "cpu_bf16_isa", lambda: "avx512_bf16")
    monkeypatch.setattr(registry, "CPU_PRECISION", {("gan", "r3gan"): {"avx512_bf16": "fp32", "amx": "bf16"}})


def test_auto_takes_the_measured_choice_of_the_arch(native_bf16):
    precision, why = precision_choice("auto", CPU, "gan", "r3gan")
    assert precision == "fp32" and "r3gan" in why and "avx512_bf16" in why and "bench/precision.py" in why


def test_the_choice_is_per_kind_of_bf16_hardware(native_bf16, monkeypatch):
    monkeypatch.setattr(engines, "cpu_bf16_isa", lambda: "amx")
    assert precision_choice("auto", CPU, "gan", "r3gan") == ("bf16", "auto: native bf16 on this CPU")


@pytest.mark.parametrize("family, arch", [("gan", "stylegan2"), ("paired", "r3gan"), (None, None)])
def test_auto_is_bf16_where_nothing_was_measured(native_bf16, family, arch):
    assert precision_choice("auto", CPU, family, arch) == ("bf16", "auto: native bf16 on this CPU")


@pytest.mark.parametrize("requested", ["bf16", "fp32"])
@pytest.mark.parametrize("arch", ["r3gan", "stylegan2"])
def test_explicit_requests_are_honoured(native_bf16, requested, arch):
    assert precision_choice(requested, CPU, "gan", arch) == (requested, "")


def test_without_native_bf16_auto_is_fp32_and_bf16_can_still_be_asked_for(monkeypatch):
    monkeypatch.setattr(engines, "cpu_bf16_isa", lambda: None)
    monkeypatch.setattr(registry, "CPU_PRECISION", {("gan", "stylegan2"): {"avx512_bf16": "fp32"}})
    assert precision_choice("auto", CPU, "gan", "stylegan2") == ("fp32", "auto: no native bf16 on this CPU")
    assert precision_choice("bf16", CPU, "gan", "stylegan2") == ("bf16", "")
    with pytest.raises(PrecisionError, match="fp16 needs CUDA"):
        precision_choice("fp16", CPU, "gan", "r3gan")


def test_the_shipped_table_names_registered_archs_and_cpu_precisions():
    for (family, arch), by_isa in registry.CPU_PRECISION.items():
        assert arch in models.registry.archs(family), (family, arch)
        assert set(by_isa) <= {"amx", "avx512_bf16"} and set(by_isa.values()) <= {"fp32", "bf16"}


@pytest.mark.parametrize("cap, isa", [(None, "amx"), ("AVX512_CORE_BF16", "avx512_bf16"),
                                      ("AVX10_1_512_AMX", "amx")])
def test_bf16_kind_follows_the_cpu_flags_and_a_onednn_cap(monkeypatch, cap, isa):
    monkeypatch.setattr(models.cpu, "_cpuinfo_flags", lambda: {"avx512f", "avx512_bf16", "amx_bf16"})
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    if cap is None:
        monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    else:
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
    assert models.cpu.cpu_bf16_isa() == isa and models.cpu.cpu_has_native_bf16()


def test_no_bf16_flags_means_emulated(monkeypatch):
    monkeypatch.setattr(models.cpu, "_cpuinfo_flags", lambda: {"avx2"})
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert models.cpu.cpu_bf16_isa() is None and not models.cpu.cpu_has_native_bf16()
