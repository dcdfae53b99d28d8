"""Paired image-to-image training (pix2pix, ESRGAN-style 4x super-resolution) and `gentrain translate`."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

from configs import ConfigError, load_config, to_yaml
from models.rrdb import RRDBGenerator, VGGStyleDiscriminator
from models.unet import PatchDiscriminator, UNetGenerator
from tests.conftest import run_gentrain
from trainers.gan.losses import r1_penalty
from trainers.paired.losses import ADV_LOSSES

SMALL_SR = ["model.arch=esrgan", "model.scale=4", "model.g_channels=8", "model.num_blocks=1",
            "model.growth_channels=4", "model.d_channels=8", "data.image_size=32", "data.channels=3",
            "data.batch_size=4", "trainer.precision=fp32", "wandb.mode=disabled"]
SMALL_P2P = ["model.arch=pix2pix", "model.scale=1", "model.g_channels=8", "model.depth=3", "model.d_channels=8",
             "model.d_layers=2", "data.image_size=32", "data.channels=3", "data.batch_size=4",
             "trainer.precision=fp32", "wandb.mode=disabled"]


# ---- networks ---------------------------------------------------------------------------------
@pytest.mark.parametrize("scale", [1, 4])
def test_unet_and_patchgan_shapes(scale):
    g = UNetGenerator(3, 3, base_channels=8, depth=4, scale=scale)
    d = PatchDiscriminator(3, 3, base_channels=8, layers=2)
    x = torch.randn(2, 3, 64 // scale, 64 // scale)
    y = g(x)
    assert y.shape == (2, 3, 64, 64) and y.abs().max() <= 1
    assert d(y, x).shape == (2, 1, 14, 14)  # 64 -> 32 -> 16 -> 15 -> 14: one logit per patch
    assert g.size_multiple == 16 // scale


@pytest.mark.parametrize("upsample", ["nearest", "pixelshuffle"])
def test_rrdb_generator_4x_and_discriminator_shapes(upsample):
    g = RRDBGenerator(3, 3, base_channels=8, num_blocks=2, growth_channels=4, scale=4, upsample=upsample)
    x = torch.rand(2, 3, 16, 12) * 2 - 1
    y = g(x)
    assert y.shape == (2, 3, 64, 48)  # any input size, 4x each side
    bicubic = F.interpolate(x, scale_factor=4, mode="bicubic", align_corners=False)
    assert (y - bicubic).abs().mean() < 0.05  # the global skip: a fresh net is nearly bicubic
    d = VGGStyleDiscriminator(3, 3, image_size=64, base_channels=8, condition=True)
    assert d(torch.randn(2, 3, 64, 64), torch.randn(2, 3, 16, 16)).shape == (2,)


def test_r1_reaches_the_conditional_discriminator_through_its_input():
    d = PatchDiscriminator(3, 3, base_channels=8, layers=2)
    real, source = torch.randn(3, 3, 32, 32), torch.randn(3, 3, 32, 32)
    r1 = r1_penalty(d, real, source)
    r1.backward()
    assert torch.isfinite(r1) and r1 > 0
    assert d.body[0].weight.grad is not None and d.body[0].weight.grad.abs().sum() > 0


def test_relativistic_average_loss():
    d_loss, g_loss = ADV_LOSSES["relativistic"]
    same = torch.zeros(4, 1, 3, 3)
    assert d_loss(same, same).item() == pytest.approx(np.log(2))
    assert g_loss(same, same).item() == pytest.approx(np.log(2))
    real, fake = torch.full((4,), 3.0), torch.full((4,), -3.0)
    assert d_loss(real, fake) < 0.01 and g_loss(fake, real) > 5  # D confident, G far from fooling it
    fake = torch.zeros(4, requires_grad=True)
    g_loss(fake, torch.zeros(4, requires_grad=True)).backward()
    assert fake.grad is not None and (fake.grad < 0).all()  # raising the fakes' logits lowers G's loss


# ---- config -----------------------------------------------------------------------------------
@pytest.mark.parametrize("preset", ["configs/sr4_photos.yaml", "configs/edges2photo.yaml"])
def test_presets_load(preset):
    cfg = load_config(preset)
    assert cfg.kind == "paired" and cfg.loss.adv_weight > 0
    assert cfg.data.image_size == 64 and cfg.data.channels == 3
    baseline = load_config(preset, ["loss.adv_weight=0"])
    assert baseline.loss.adv_weight == 0


@pytest.mark.parametrize("overrides, message", [
    (["model.scale=3"], "model.scale"),
    (["model.scale=4", "data.image_size=30"], "divisible by model.scale"),
    (["model.arch=pix2pix", "model.depth=6", "data.image_size=32"], "model.depth"),
    (["loss.feature_weight=1"], "feature_net"),
    (["loss.adv_loss=wasserstein"], "loss.adv_loss"),
    (["loss.l1_weight=0", "loss.adv_weight=0"], "nothing to train"),
])
def test_bad_paired_configs_are_refused_in_one_line(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["kind=paired", "data.image_size=64", *overrides])


# ---- one step of the task (in this process, one rank) -------------------------------------------


def _task(tmp_path, overrides, dist_info):
    from trainers.tasks import build_task

    cfg = load_config(None, ["kind=paired", f"run.dir={tmp_path}", *overrides])
    torch.manual_seed(0)
    return build_task(cfg, dist_info, "fp32"), cfg


def _batch(cfg, n=None, seed=1):
    gen = torch.Generator().manual_seed(seed)
    n, size = n or cfg.data.batch_size, cfg.data.image_size
    small = size // cfg.model.scale
    target = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=gen)
    # channels_last memory, as the reader may hand it over
    source = torch.randint(0, 256, (n, small, small, 3), dtype=torch.uint8, generator=gen).permute(0, 3, 1, 2)
    return {"image": target, "source": source, "label": torch.zeros(n, dtype=torch.int64)}


@pytest.mark.parametrize("arch_overrides, loss_overrides", [
    (SMALL_SR, ["loss.adv_loss=relativistic", "loss.adv_weight=0.01", "loss.l1_weight=1", "loss.r1_gamma=1",
                "loss.r1_every=2"]),
    (SMALL_P2P, ["loss.adv_loss=nonsaturating", "loss.r1_gamma=0.5", "loss.r1_every=1"]),
    (SMALL_P2P, ["loss.adv_loss=hinge", "model.dropout=0.5"]),
    (SMALL_SR, ["loss.feature_weight=0.1", "loss.feature_net=random", "loss.l1_weight=1"]),  # user-given feature net
])
def test_a_step_with_the_adversarial_term_gives_finite_losses(tmp_path, one_rank, arch_overrides, loss_overrides):
    from trainers.runtime.clock import Clock

    task, cfg = _task(tmp_path, arch_overrides + loss_overrides, one_rank)
    assert set(task.engines) == {"g", "d"}
    clock = Clock(images_per_step=cfg.data.batch_size)
    for _ in range(2):
        metrics = task.train_step(_batch(cfg), clock)
        clock.tick()
        for key in ("l1", "g_adv", "d_loss", "g_loss"):
            assert np.isfinite(metrics[key]), (key, metrics)
    assert "r1" in metrics or cfg.loss.r1_gamma == 0
    assert np.isfinite(metrics["feature"]) if cfg.loss.feature_weight > 0 else "feature" not in metrics
    grid = task.samples()["samples"]
    assert grid.dtype == np.uint8 and grid.shape == (3 * (32 + 2) + 2, 4 * (32 + 2) + 2, 3)  # input|output|target rows
    assert {k.split(".")[0] for k in task.weights()} == {"g", "d", "g_ema"}


def test_pixel_only_baseline_builds_no_discriminator(tmp_path, one_rank):
    from trainers.runtime.clock import Clock

    task, cfg = _task(tmp_path, SMALL_SR + ["loss.adv_weight=0", "loss.l1_weight=1"], one_rank)
    assert set(task.engines) == {"g"} and task.may_start_fresh == ("d",)
    clock = Clock(images_per_step=cfg.data.batch_size)
    before = {k: v.clone() for k, v in task.g.module.state_dict().items()}
    metrics = task.train_step(_batch(cfg), clock)
    assert np.isfinite(metrics["l1"]) and "g_adv" not in metrics and "d_loss" not in metrics
    assert any(not torch.equal(before[k], v) for k, v in task.g.module.state_dict().items())
    assert {k.split(".")[0] for k in task.weights()} == {"g", "g_ema"}


def test_adversarial_term_waits_for_its_start_step(tmp_path, one_rank):
    from trainers.runtime.clock import Clock

    task, cfg = _task(tmp_path, SMALL_P2P + ["loss.adv_start_step=1"], one_rank)
    clock = Clock(images_per_step=cfg.data.batch_size)
    d_before = {k: v.clone() for k, v in task.d.module.state_dict().items()}
    first = task.train_step(_batch(cfg), clock)
    clock.tick()
    assert "g_adv" not in first and all(torch.equal(d_before[k], v) for k, v in task.d.module.state_dict().items())
    second = task.train_step(_batch(cfg), clock)
    assert "g_adv" in second and "d_loss" in second


def test_non_finite_loss_skips_the_step_and_wrong_input_size_is_one_line(tmp_path, one_rank):
    from trainers.runtime.clock import Clock

    task, cfg = _task(tmp_path, SMALL_SR + ["loss.adv_weight=0", "loss.l1_weight=1"], one_rank)
    clock = Clock(images_per_step=cfg.data.batch_size)
    before = {k: v.clone() for k, v in task.g.module.state_dict().items()}
    assert task.train_step({**_batch(cfg), "poison": True}, clock) == {"nonfinite_skipped": 1.0}
    assert all(torch.equal(before[k], v) for k, v in task.g.module.state_dict().items())
    bad = _batch(cfg)
    bad["source"] = bad["image"]  # same size as the target, but model.scale=4
    with pytest.raises(ConfigError, match="model.scale=4"):
        task.train_step(bad, clock)
    with pytest.raises(ConfigError, match="paired shards"):
        task.train_step({"image": bad["image"]}, clock)


# ---- translate --------------------------------------------------------------------------------
def _fake_run(root: Path, overrides, seed=0) -> Path:
    """A run directory as training leaves it (config.yaml, a complete checkpoint's weights), by hand."""
    import models

    cfg = load_config(None, ["kind=paired", f"run.dir={root}", *overrides])
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.yaml").write_text(to_yaml(cfg))
    torch.manual_seed(seed)
    g, _ = models.build("paired", cfg.model, cfg.data)
    with torch.no_grad():  # a non-trivial residual
        for p in g.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    ckpt = root / "checkpoints" / "step-0000001"
    ckpt.mkdir(parents=True)
    save_file({f"g_ema.{k}": v.contiguous() for k, v in g.state_dict().items()}, str(ckpt / "weights.safetensors"))
    (ckpt / "COMPLETE").write_text(json.dumps({"step": 1}))
    (root / "checkpoints" / "latest").write_text(ckpt.name)
    return root


def _image(path: Path, w: int, h: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([np.sin(xx / 5.0), np.cos(yy / 7.0), np.sin((xx + yy) / 9.0)], -1) * 90 + 128
    array = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, quality=95) if path.suffix == ".jpg" else Image.fromarray(array).save(path)
    return path


def test_tiled_translation_equals_the_untiled_one_on_an_odd_size():
    from trainers.judge.translate import read_image, translate_tensor

    torch.manual_seed(0)
    net = RRDBGenerator(3, 3, base_channels=8, num_blocks=0, growth_channels=4, scale=4).eval()  # receptive field ~6 px
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    x = torch.rand(1, 3, 53, 77) * 2 - 1
    whole = translate_tensor(net, x, 4, tile=256)
    tiled = translate_tensor(net, x, 4, tile=40, overlap=32)
    assert whole.shape == tiled.shape == (1, 3, 212, 308)
    assert (whole - tiled).abs().max() < 1e-4
    assert (whole - F.interpolate(x, scale_factor=4, mode="bicubic")).abs().mean() > 1e-3  # not a trivial net


def test_translate_command_writes_4x_images_with_the_same_names(tmp_path):
    run = _fake_run(tmp_path / "run", SMALL_SR)
    _image(tmp_path / "in" / "a.png", 45, 31)
    _image(tmp_path / "in" / "sub" / "b.jpg", 70, 33, seed=1)  # larger than the tile: tiled
    proc = run_gentrain("translate", run, "--in", tmp_path / "in", "--out", tmp_path / "out", "--tile", "32")
    assert "wrote 2 image(s)" in proc.stdout and "(4x)" in proc.stdout
    with Image.open(tmp_path / "out" / "a.png") as a, Image.open(tmp_path / "out" / "sub" / "b.jpg") as b:
        assert a.size == (180, 124) and a.format == "PNG"
        assert b.size == (280, 132) and b.format == "JPEG"


def test_translate_pix2pix_pads_odd_sizes(tmp_path):
    from trainers.judge.translate import translate_path

    run = _fake_run(tmp_path / "run", SMALL_P2P)
    _image(tmp_path / "one.png", 37, 29)
    written, scale = translate_path(run, tmp_path / "one.png", tmp_path / "out", progress=False)
    assert scale == 1 and [p.name for p in written] == ["one.png"]
    with Image.open(written[0]) as img:
        assert img.size == (37, 29)


def test_translate_errors_are_one_line(tmp_path):
    run = _fake_run(tmp_path / "run", SMALL_SR)
    (tmp_path / "empty").mkdir()
    proc = run_gentrain("translate", run, "--in", tmp_path / "empty", "--out", tmp_path / "o", check=False)
    assert proc.returncode == 2 and "no PNG or JPEG images" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    proc = run_gentrain("translate", run, "--in", tmp_path / "missing", "--out", tmp_path / "o", check=False)
    assert proc.returncode == 2 and "no such file" in proc.stderr
    gan = tmp_path / "gan"
    gan.mkdir()
    gan_cfg = load_config(None, ["kind=gan", f"run.dir={gan}"])
    (gan / "config.yaml").write_text(to_yaml(gan_cfg))
    _image(tmp_path / "x.png", 16, 16)
    proc = run_gentrain("translate", gan, "--in", tmp_path / "x.png", "--out", tmp_path / "o", check=False)
    assert proc.returncode == 2 and "not a paired run" in proc.stderr and "Traceback" not in proc.stderr


# ---- end to end (real shards, real `gentrain train`) --------------------------------------------
@pytest.fixture(scope="module")
def sr_shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sr4")
    run_gentrain("shards", "build", "pairs:sr4:photos", "--out", out, "--image-size", 32, "--num-samples", 96,
                 "--shard-size", 32, "--quiet")
    return out


def _train_args(run_dir: Path, shards: Path, steps: int, extra=()):
    return ["train", "configs/sr4_photos.yaml", f"run.dir={run_dir}", f"data.shards={shards}", *SMALL_SR,
            "data.num_workers=0", "data.shuffle_buffer=16", f"trainer.max_steps={steps}", "trainer.ckpt_every=3",
            "trainer.sample_every=3", "trainer.log_every=1", "trainer.progress=false", "trainer.zero_stage=1",
            "loss.adv_start_step=2", "loss.r1_gamma=1", "loss.r1_every=2", *extra]


@pytest.mark.slow
def test_paired_run_resumes_bitwise_and_translates(tmp_path, sr_shards):
    from trainers.runtime.checkpoint import differing_tensors

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_gentrain(*_train_args(straight, sr_shards, 6))
    run_gentrain(*_train_args(resumed, sr_shards, 3))  # stops after step 3 (before R1's next step, after D started)
    proc = run_gentrain(*_train_args(resumed, sr_shards, 6))
    assert "resumed from" in proc.stdout
    ckpt = lambda run: run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()  # noqa: E731
    assert ckpt(straight).name == ckpt(resumed).name == "step-0000006"
    assert differing_tensors(ckpt(straight), ckpt(resumed)) == []
    lines = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert any("g_adv" in line for line in lines) and all(np.isfinite(line["l1"]) for line in lines if "l1" in line)
    assert list((straight / "samples").glob("*.png"))

    _image(tmp_path / "photo.png", 21, 13)
    run_gentrain("translate", straight, "--in", tmp_path / "photo.png", "--out", tmp_path / "out", "--quiet")
    with Image.open(tmp_path / "out" / "photo.png") as img:
        assert img.size == (84, 52)
