"""DeepSpeed engines: precision choice and the engine config built from ours."""
from __future__ import annotations

import os
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch import nn

from configs import ConfigError

from models.blocks import edge_convs_as_gemm, to_channels_last
from models.cpu import cpu_bf16_isa
from models.registry import cpu_precision
from trainers.runtime.distributed import DistInfo
from trainers.runtime.safe_load import use_safe_loading


class PrecisionError(ConfigError):
    """The requested precision cannot run on this device."""


def precision_choice(requested: str, device: torch.device, family: str | None = None,
                     arch: str | None = None) -> tuple[str, str]:
    """Map trainer.precision (auto/bf16/fp16/fp32) to what this device will run, as (precision,
    why): `why` says how `auto` decided ("" for an explicit request); `family` (the config's kind)
    and `arch` (model.arch) let `auto` take the network's measured CPU choice.

    On a CPU with native bf16, `auto` takes bf16 unless models.registry.cpu_precision names
    another precision for the architecture and this CPU's bf16 instructions: grouped or modulated
    convolutions can run slower in bf16 than in fp32 (measured per network by bench/precision.py)."""
    if device.type == "cpu":
        if requested == "fp16":
            raise PrecisionError("trainer.precision=fp16 needs CUDA (fp16 loss scaling); use bf16 or fp32 on CPU")
        if requested != "auto":
            return requested, ""
        isa = cpu_bf16_isa()
        if isa is None:
            return "fp32", "auto: no native bf16 on this CPU"
        measured = cpu_precision(family, arch, isa) if family and arch else None
        if measured in (None, "bf16"):
            return "bf16", "auto: native bf16 on this CPU"
        return measured, f"auto: faster than bf16 for {arch} on an {isa} CPU, bench/precision.py"
    if requested == "auto":
        return ("bf16", "auto") if torch.cuda.is_bf16_supported() else ("fp16", "auto: no bf16 on this GPU")
    return requested, ""


def deepspeed_config(optim: DictConfig, trainer: DictConfig, batch_size: int, world_size: int, precision: str) -> dict:
    """The DeepSpeed JSON config for one engine."""
    return {
        "train_micro_batch_size_per_gpu": batch_size,
        "gradient_accumulation_steps": 1,
        "train_batch_size": batch_size * world_size,
        # DeepSpeed clips at 1.0 when this key is absent: say what we mean.
        "gradient_clipping": float(optim.grad_clip),
        "zero_optimization": {"stage": int(trainer.zero_stage)},
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16", "loss_scale": 0, "initial_scale_power": 16,
                 "loss_scale_window": 500, "hysteresis": 2, "min_loss_scale": 1},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def make_engine(module: nn.Module, optim: DictConfig, cfg: DictConfig, dist_info: DistInfo, precision: str):
    """Wrap a module and its AdamW in a DeepSpeed engine.

    The optimizer is built here (plain torch AdamW) rather than by DeepSpeed so no fused Adam
    extension has to be JIT-compiled on first use. ``prepare_module`` applies the trainer's
    speed options (memory layout, torch.compile) first; none of them changes the parameters'
    names or values.
    """
    import deepspeed

    if dist_info.device.type == "cpu" and cfg.trainer.get("keep_host_memory", True):
        keep_freed_host_memory()
    module = prepare_module(module.to(dist_info.device), cfg.trainer)
    optimizer = make_adamw(module.parameters(), optim, dist_info.device,
                           fused=bool(cfg.trainer.get("fused_optimizer", True)))
    ds_cfg = deepspeed_config(optim, cfg.trainer, cfg.data.batch_size, dist_info.world_size, precision)
    engine, *_ = deepspeed.initialize(model=module, optimizer=optimizer, config=ds_cfg)
    if int(cfg.trainer.zero_stage) == 0 and dist_info.world_size == 1:
        # Alone, there is nothing to average: DeepSpeed would still all-reduce every gradient
        # bucket through the process group (measured on the ring8 preset's GAN step, one thread:
        # 18.7 ms with it, 15-17 ms without). ZeRO stages keep theirs: their optimizer reads the
        # reduced partitions.
        engine.enable_backward_allreduce = False
    use_safe_loading(engine)
    return engine


def step_with_grad_norm(engine, measure: bool = True) -> float | None:
    """``engine.step()``, returning the global norm of the gradients it stepped on (before
    clipping), or None where the engine could not say (or ``measure`` is False: a step whose
    norm nobody reports, such as all but the last of several D steps, costs no extra norm).

    ZeRO and DeepSpeed's bf16/fp16 optimizers compute that norm themselves; the plain fp32
    engine of ``trainer.zero_stage=0`` does not, so it is taken here from the gradients
    (already averaged over ranks, so the same on every rank) before the step clears them.
    """
    if not measure:
        engine.step()
        return None
    own = None
    if not (engine.zero_optimization() or engine.bfloat16_enabled() or engine.fp16_enabled()):
        grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
        if grads:
            own = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
    engine.step()
    norm = own if own is not None else engine.get_global_grad_norm()
    return None if norm is None else float(norm)


def make_adamw(params, optim: DictConfig, device: torch.device, fused: bool = True) -> torch.optim.AdamW:
    """torch AdamW, its fused kernel where this torch has one for the device (one pass over all
    parameters instead of a dozen foreach passes), else the foreach implementation."""
    params = list(params)
    kwargs = dict(lr=optim.lr, betas=tuple(optim.betas), weight_decay=optim.weight_decay)
    if fused:
        try:
            return torch.optim.AdamW(params, fused=True, **kwargs)
        except (RuntimeError, TypeError, ValueError):
            pass  # no fused kernel for this device or dtype
    return torch.optim.AdamW(params, foreach=True, **kwargs)


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
_HOST_MEMORY_KEPT = False


def keep_freed_host_memory(threshold: int = 1 << 30) -> bool:
    """Stop glibc handing freed activation buffers back to the OS (and mapping each large one
    afresh) so they are reused instead of page-faulting in again every step: ~4,700 minor faults
    (about 18 MB of zero-filled pages) per step of the digits VAE, one core, before; none after.
    Costs nothing but a process that keeps its peak heap. False where glibc is not the allocator."""
    global _HOST_MEMORY_KEPT
    if _HOST_MEMORY_KEPT:
        return True
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        _HOST_MEMORY_KEPT = bool(libc.mallopt(_M_MMAP_THRESHOLD, threshold)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, threshold))
    except (OSError, AttributeError):
        _HOST_MEMORY_KEPT = False
    return _HOST_MEMORY_KEPT


def _inputs_channels_last(_module, args, kwargs):
    """Forward pre-hook: 4-D tensor arguments to channels_last (a no-op when they already are)."""
    def convert(v):
        return v.contiguous(memory_format=torch.channels_last) if isinstance(v, torch.Tensor) and v.dim() == 4 else v
    return tuple(convert(a) for a in args), {k: convert(v) for k, v in kwargs.items()}


def compile_cache_dir() -> Path:
    """Where inductor keeps compiled kernels across processes (TORCHINDUCTOR_CACHE_DIR wins)."""
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "gentrain" / "inductor"
    return Path(os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(default)))


def prepare_module(module: nn.Module, trainer: DictConfig) -> nn.Module:
    """The trainer's speed options on a network, in place: channels_last weights and inputs (with
    the GEMM path for image-side convolutions), then torch.compile of its forward.

    ``nn.Module.compile`` compiles the module's call in place, so ``state_dict`` keys keep their
    names (no ``_orig_mod.`` prefix) and checkpoints, exports and ``engine.module.encode`` calls
    work unchanged; only ``module(...)`` (the engine's forward) runs compiled.
    """
    if trainer.get("edge_convs_as_gemm", False):
        edge_convs_as_gemm(module)
    if trainer.get("channels_last", False):
        # Inputs and activations only: DeepSpeed needs dense parameters (it views them as bytes to
        # broadcast, and ZeRO re-creates them as views of one flat buffer).
        to_channels_last(module, weights=False)
        module.register_forward_pre_hook(_inputs_channels_last, with_kwargs=True)
    if trainer.get("compile", False):
        compile_cache_dir()
        module.compile(dynamic=False)
    return module


def module_dtype(module: nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype
