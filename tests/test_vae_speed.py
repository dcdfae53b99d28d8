"""The trainer's speed options compute the same function with the same parameters: GEMM edge
convolutions, the channels_last GroupNorm, channels_last inputs, compile without renamed keys;
and the pythae benchmark runs end to end on tiny budgets."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from models import ConvVAE
from models.blocks import EdgeConv2d, EdgeConvTranspose2d, GroupNorm, edge_convs_as_gemm, to_channels_last
from trainers.runtime.engines import keep_freed_host_memory, make_adamw, prepare_module

CL = torch.channels_last


def _grads(module, x, out_fn):
    out = out_fn(x)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    grads = torch.autograd.grad(out, [x, *module.parameters()], g)
    return out, grads


def _close(a, b, rtol=1e-5):
    scale = b.abs().max().clamp(min=1e-6)
    err = float((a.detach() - b.detach()).abs().max() / scale.detach())
    assert err < rtol, err


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("cls, cin, cout, size", [(EdgeConv2d, 1, 32, 32), (EdgeConv2d, 3, 8, 16),
                                                   (EdgeConvTranspose2d, 32, 1, 16), (EdgeConvTranspose2d, 8, 3, 8)])
def test_edge_convs_as_gemm_match_the_direct_kernels(cls, cin, cout, size, channels_last):
    torch.manual_seed(0)
    conv = cls(cin, cout, 4, stride=2, padding=1)
    x = torch.randn(5, cin, size, size, requires_grad=True)
    ref, ref_g = _grads(conv, x, conv)
    edge_convs_as_gemm(conv)
    if channels_last:
        to_channels_last(conv)
    out, g = _grads(conv, x, lambda t: conv(t.contiguous(memory_format=CL) if channels_last else t))
    assert out.shape == ref.shape
    _close(out, ref)
    for a, b in zip(g, ref_g):
        _close(a, b)


@pytest.mark.parametrize("channels, size, groups", [(32, 16, 8), (64, 8, 16), (128, 4, 32)])
def test_channels_last_group_norm_matches_aten(channels, size, groups):
    torch.manual_seed(0)
    gn = GroupNorm(groups, channels)
    gn.weight.data.normal_()
    gn.bias.data.normal_()
    x = (torch.randn(4, channels, size, size) * 3 + 1).requires_grad_()
    ref, ref_g = _grads(gn, x, lambda t: F.group_norm(t, groups, gn.weight, gn.bias))
    out, g = _grads(gn, x, lambda t: gn(t.contiguous(memory_format=CL)))
    assert out.is_contiguous(memory_format=CL)
    _close(out, ref)
    for a, b in zip(g, ref_g):
        _close(a, b)


def test_speed_options_keep_the_vae_function_and_its_state_dict_keys():
    torch.manual_seed(0)
    plain = ConvVAE(32, 1, 16, 32)
    fast = ConvVAE(32, 1, 16, 32)
    fast.load_state_dict(plain.state_dict())
    prepare_module(fast, OmegaConf.create({"channels_last": True, "edge_convs_as_gemm": True}))
    assert list(fast.state_dict()) == list(plain.state_dict())
    x = torch.rand(8, 1, 32, 32)
    a = plain(x, generator=torch.Generator().manual_seed(1))
    b = fast(x, generator=torch.Generator().manual_seed(1))
    _close(b.logits_bchw, a.logits_bchw, 1e-4)
    _close(b.mean_bz, a.mean_bz, 1e-4)
    # encode/decode called directly (samples, evaluation) take NCHW inputs and still agree
    _close(fast.decode(a.z_bz), plain.decode(a.z_bz), 1e-4)
    # compile is in place: no `_orig_mod.` prefix on checkpoint keys
    compiled = prepare_module(ConvVAE(32, 1, 16, 32), OmegaConf.create({"compile": True}))
    assert list(compiled.state_dict()) == list(plain.state_dict())


def test_fused_adamw_falls_back_cleanly_and_host_memory_is_kept():
    opt = make_adamw([torch.nn.Parameter(torch.zeros(3))], OmegaConf.create({"lr": 1e-3, "betas": [0.9, 0.99],
                                                                              "weight_decay": 0.0}), torch.device("cpu"))
    assert opt.defaults.get("fused") or opt.defaults.get("foreach")
    assert keep_freed_host_memory() in (True, False)
    assert keep_freed_host_memory() == keep_freed_host_memory()  # idempotent


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_vae_vs_pythae_bench_runs_on_tiny_budgets(tmp_path):
    pytest.importorskip("pythae")
    from bench.vae_vs_pythae import run

    out = tmp_path / "vae_pythae.json"
    res = run(quick=True, root=tmp_path / "work", out_json=out, out_md=tmp_path / "vae_pythae.md")
    saved = json.loads(Path(out).read_text())
    assert saved["throughput"]["samples_per_s"].keys() == {"gentrain", "bare", "pythae"}
    for name, value in saved["throughput"]["samples_per_s"].items():
        assert value > 0, name
    for key in ("gentrain/pythae", "gentrain/bare", "pythae/bare"):
        assert saved["throughput"]["ratios"][key] > 0
    lk = res["likelihood"]
    for name in ("gentrain", "pythae"):
        nll = lk["eval"][name][f"iw_nll_k{lk['k']}"]
        assert 0 < nll < 32 * 32 * 0.7 + 50, nll  # below the all-0.5 Bernoulli guess (710 nats)
    table = (tmp_path / "vae_pythae.md").read_text()
    assert "gentrain" in table and "pythae" in table and "IW-NLL" in table
