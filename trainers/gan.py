"""The GAN step: a discriminator phase (logistic loss + lazy R1) then a generator phase.

G and D are separate DeepSpeed engines with their own AdamW and learning rates. Each engine
runs exactly one backward per step (ZeRO-2 refuses a second one), so D's real, fake and
penalty terms are summed before its backward.
"""
from __future__ import annotations

import numpy as np
import torch
from omegaconf import DictConfig

from models import DCGANDiscriminator, DCGANGenerator, MLPDiscriminator, MLPGenerator
from trainers.distributed import DistInfo
from trainers.ema import EMA
from trainers.engines import make_engine, module_dtype
from trainers.guard import all_finite
from trainers.gan_losses import d_loss_nonsaturating, g_loss_nonsaturating, r1_penalty
from trainers.images import make_grid, scatter_plot, to_uint8


def build_networks(cfg: DictConfig):
    """Generator and discriminator for the config's data (images: DCGAN; 2-D points: MLP)."""
    m = cfg.model
    if m.arch == "mlp":
        return MLPGenerator(m.z_dim, m.g_channels), MLPDiscriminator(m.d_channels)
    return (DCGANGenerator(m.z_dim, cfg.data.image_size, cfg.data.channels, m.g_channels),
            DCGANDiscriminator(cfg.data.image_size, cfg.data.channels, m.d_channels))


class GANTask:
    """Owns the G and D engines and the generator EMA."""

    def __init__(self, cfg: DictConfig, dist_info: DistInfo, precision: str):
        self.cfg, self.dist = cfg, dist_info
        generator, discriminator = build_networks(cfg)
        self.g = make_engine(generator, cfg.optim.g, cfg, dist_info, precision)
        self.d = make_engine(discriminator, cfg.optim.d, cfg, dist_info, precision)
        self.engines = {"g": self.g, "d": self.d}
        self.g_dtype, self.d_dtype = module_dtype(self.g.module), module_dtype(self.d.module)
        self.ema = EMA(self.g.module, cfg.loss.ema_halflife_kimg, cfg.loss.ema_rampup) \
            if cfg.loss.ema_halflife_kimg > 0 else None
        self.noise = torch.Generator(device=dist_info.device).manual_seed(cfg.run.seed * 1000 + dist_info.rank)
        fixed = torch.Generator().manual_seed(cfg.run.seed)
        self.fixed_z = torch.randn(64 if m_is_image(cfg) else 2500, cfg.model.z_dim, generator=fixed).to(dist_info.device)
        self.images_per_step = cfg.data.batch_size * dist_info.world_size
        self.images_seen = 0
        self.num_steps = 0

    def _z(self, n: int) -> torch.Tensor:
        return torch.randn(n, self.cfg.model.z_dim, generator=self.noise, device=self.dist.device)

    def _real(self, batch: dict) -> torch.Tensor:
        if "points" in batch:
            return batch["points"].to(self.dist.device).float()
        return batch["image"].to(self.dist.device, non_blocking=True).float().div_(127.5).sub_(1.0)

    def train_step(self, batch: dict) -> dict[str, float]:
        real = self._real(batch)
        n = real.shape[0]
        self.num_steps += 1
        self.images_seen += self.images_per_step
        lazy = self.cfg.loss.r1_every
        do_r1 = self.cfg.loss.r1_gamma > 0 and self.num_steps % lazy == 0

        # Discriminator phase: one backward for real + fake (+ R1) terms.
        with torch.no_grad():
            fake = self.g.module(self._z(n).to(self.g_dtype))
        logits = self.d(torch.cat([real, fake.float()]).to(self.d_dtype)).float()
        real_logits, fake_logits = logits[:n], logits[n:]
        d_loss = d_loss_nonsaturating(real_logits, fake_logits)
        d_total = d_loss
        if batch.get("poison"):  # fault injection (trainers.faults): a real NaN through the real guard
            d_total = d_total * float("nan")
        metrics = {}
        if do_r1:
            r1 = r1_penalty(self.d.module, real)
            d_total = d_total + r1 * (self.cfg.loss.r1_gamma / 2 * lazy)
            metrics["r1"] = r1.item()
        if not all_finite(self.dist.device, d_total):
            return {"nonfinite_skipped": 1.0}  # skip the whole step: G would train against a broken D
        self.d.backward(d_total)
        self.d.step()

        # Generator phase: D's weights frozen so its engine sees no gradients from G's loss.
        self.d.module.requires_grad_(False)
        try:
            fake = self.g(self._z(n).to(self.g_dtype))
            g_loss = g_loss_nonsaturating(self.d.module(fake.to(self.d_dtype)))
            g_ok = all_finite(self.dist.device, g_loss)
            if g_ok:
                self.g.backward(g_loss)
                self.g.step()
        finally:
            self.d.module.requires_grad_(True)
        if not g_ok:
            metrics["nonfinite_skipped"] = 1.0
        if self.ema is not None:
            self.ema.update(self.g.module, self.images_per_step, self.images_seen)

        if g_ok:
            metrics["g_loss"] = g_loss.item()
        metrics.update({
            "d_loss": d_loss.item(),
            "d_real_logit": real_logits.mean().item(),
            "d_fake_logit": fake_logits.mean().item(),
            "lr_g": self.g.get_lr()[0],
            "lr_d": self.d.get_lr()[0],
        })
        return metrics

    @property
    def sampler(self) -> torch.nn.Module:
        """The generator used for samples: the EMA where there is one."""
        return self.ema.module if self.ema is not None else self.g.module

    @torch.no_grad()
    def samples(self) -> dict[str, np.ndarray]:
        out = self.sampler(self.fixed_z.to(module_dtype(self.sampler))).float()
        if not m_is_image(self.cfg):
            return {"samples": scatter_plot(out.cpu().numpy())}
        return {"samples": make_grid(to_uint8(out), nrow=8)}

    def state(self) -> dict:
        return {"noise": self.noise.get_state(), "images_seen": self.images_seen, "num_steps": self.num_steps}

    def load_state(self, state: dict, weights: dict[str, torch.Tensor]) -> None:
        self.noise.set_state(state["noise"])
        self.images_seen, self.num_steps = int(state["images_seen"]), int(state["num_steps"])
        if self.ema is not None:
            self.ema.module.load_state_dict({k[len("g_ema."):]: v for k, v in weights.items() if k.startswith("g_ema.")})

    def weights(self) -> dict[str, torch.Tensor]:
        out = {f"g.{k}": v for k, v in self.g.module.state_dict().items()}
        out.update({f"d.{k}": v for k, v in self.d.module.state_dict().items()})
        if self.ema is not None:
            out.update({f"g_ema.{k}": v for k, v in self.ema.module.state_dict().items()})
        return out


def m_is_image(cfg: DictConfig) -> bool:
    return cfg.model.arch != "mlp"
