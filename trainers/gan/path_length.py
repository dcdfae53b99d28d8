"""StyleGAN2's path-length regularisation (Karras et al. 2020, section 3.2).

For w ~ mapping(z, c) and image-space noise y ~ N(0, I) / sqrt(H W), the Jacobian-vector length
a = ||J_w^T y|| should stay constant over w: the penalty is E (a - mean_a)^2, where mean_a is a
running mean of a (decay 0.01). StyleGAN2 runs it lazily (every 4th G step, weight 2 x 4) on a
smaller batch; the caller decides when and with what weight.

Works for any generator with `mapping(z, c)`, `num_ws` and `synthesize(ws)` (models.stylegan2);
for others it measures the Jacobian with respect to z instead.
"""
from __future__ import annotations

import math

import torch
from torch import nn


def path_length_penalty(G: nn.Module, z: torch.Tensor, c: torch.Tensor | None, mean_path_length,
                        decay: float = 0.01, generator: torch.Generator | None = None):
    """(penalty, new_mean): penalty = E (|J^T y| - new_mean)^2, an fp32 scalar with a graph back to
    G's weights; new_mean = mean + decay * (E|J^T y| - mean), detached (a 0-d fp32 tensor; all-reduce
    it across ranks to keep them equal). Pass the raw module, not a DeepSpeed engine (a second
    autograd pass through the engine is refused); `generator` draws the image-space noise."""
    if hasattr(G, "mapping") and hasattr(G, "synthesize"):
        w = G.mapping(z, c)
        ws = w.unsqueeze(1).repeat(1, G.num_ws, 1)
        if not ws.requires_grad:
            ws.requires_grad_(True)
        images, wrt = G.synthesize(ws), ws
    else:
        wrt = z.detach().requires_grad_(True)
        images = G(wrt, c)
    noise = torch.randn(images.shape, generator=generator, device=images.device, dtype=torch.float32)
    noise = noise / math.sqrt(images.shape[2] * images.shape[3])
    (grad,) = torch.autograd.grad((images.float() * noise).sum(), wrt, create_graph=True)
    grad = grad.float()
    lengths = grad.square().sum(-1).mean(1).sqrt() if grad.dim() == 3 else grad.square().flatten(1).sum(1).sqrt()
    mean = torch.as_tensor(mean_path_length, dtype=torch.float32, device=lengths.device)
    new_mean = (mean + decay * (lengths.mean().detach() - mean)).detach()
    return (lengths - new_mean).square().mean(), new_mean
