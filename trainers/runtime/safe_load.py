"""Load DeepSpeed checkpoints without executing pickled code.

DeepSpeed's own loader calls `torch.load(..., weights_only=False)`, which runs whatever a
checkpoint file asks for. We swap in a loader that uses `weights_only=True` and allows only
the few plain DeepSpeed classes its checkpoints hold (found with
`torch.serialization.get_unsafe_globals_in_checkpoint` on ZeRO-1/2, fp32/bf16/fp16 saves).
A file naming anything else fails to load, and the checkpoint is treated as unusable.
"""
from __future__ import annotations

import torch


def _safe_globals() -> list:
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def safe_torch_load(path, map_location=None):
    """torch.load restricted to tensors, containers and the allow-listed DeepSpeed classes."""
    with torch.serialization.safe_globals(_safe_globals()):
        return torch.load(path, map_location=map_location, weights_only=True)


def use_safe_loading(engine) -> None:
    """Make a DeepSpeed engine read its checkpoints with safe_torch_load."""
    engine.checkpoint_engine.load = safe_torch_load
