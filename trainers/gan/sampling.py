"""Samples from a trained (or training) generator, the same way wherever they are drawn: the
live metrics, the collapse diagnostics, `gentrain sample` and the judges."""
from __future__ import annotations

import torch

from models.stylegan2 import noise_from
from trainers.runtime.engines import module_dtype


def generator_args(net: torch.nn.Module, z: torch.Tensor, labels: torch.Tensor | None) -> tuple:
    """(z,) or (z, labels) in the network's dtype."""
    z = z.to(module_dtype(net))
    return (z,) if labels is None else (z, labels)


def balanced_labels(n: int, num_classes: int, device=None) -> torch.Tensor | None:
    """Every class equally often (0, 1, ..., K-1, 0, 1, ...), or None for an unconditional net."""
    return torch.arange(n, device=device) % num_classes if num_classes else None


@torch.no_grad()
def draw_samples(net: torch.nn.Module, n: int, z_dim: int, generator: torch.Generator,
                 labels: torch.Tensor | None = None, batch: int = 500) -> torch.Tensor:
    """n samples (float32, the network's output range) for z ~ N(0, I) drawn from `generator`
    one batch at a time, sample i of class labels[i]. StyleGAN2's noise inputs draw from
    `generator` too, so a seed fixes the samples and never touches the training noise stream."""
    device = generator.device
    chunks = []
    with noise_from(net, generator):
        for start in range(0, n, batch):
            z = torch.randn(min(batch, n - start), z_dim, generator=generator, device=device)
            chunk_labels = None if labels is None else labels[start:start + len(z)]
            chunks.append(net(*generator_args(net, z, chunk_labels)).float())
    return torch.cat(chunks)
