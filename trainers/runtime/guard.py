"""Non-finite losses and weights: detect them on every rank at once so all ranks act alike."""
from __future__ import annotations

import torch

from trainers.runtime.distributed import any_rank


def all_finite(device: torch.device, *tensors: torch.Tensor) -> bool:
    """True on every rank only if every tensor is finite on every rank.

    A rank that skipped its backward alone would leave the others waiting in the gradient
    all-reduce, so the decision is agreed collectively.
    """
    local_bad = any(not torch.isfinite(t.detach()).all() for t in tensors)
    return not any_rank(local_bad, device)


def weights_finite(device: torch.device, modules) -> bool:
    """True if every parameter of every module is finite on every rank."""
    local_bad = any(not torch.isfinite(p.detach()).all() for m in modules for p in m.parameters())
    return not any_rank(local_bad, device)
