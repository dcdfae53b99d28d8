"""Adaptive discriminator augmentation: the p controller, what each op does, exact identity at
p = 0, determinism from the caller's generator, gradients through the pipeline, and resume."""
import pytest
import torch

from trainers.gan.ada import OPS, AdaptiveAugment, ada_margins, sign_stats


pytestmark = pytest.mark.usefixtures("one_thread")


def _images(b=8, ch=3, size=16, seed=0):
    return torch.rand(b, ch, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_p_rises_above_target_falls_below_and_stays_in_unit_interval():
    ada = AdaptiveAugment(target=0.6, ada_kimg=1, interval=4)  # 1,000 images take p from 0 to 1
    assert ada.p == 0.0
    rts = [ada.accumulate(0.9 * 32, 32) for _ in range(4)]
    assert rts[:3] == [None, None, None] and rts[3] == pytest.approx(0.9)
    assert ada.p == pytest.approx(4 * 32 / 1000)
    for _ in range(40):  # overfitting for long: p saturates at 1
        ada.accumulate(1.0 * 32, 32)
    assert ada.p == 1.0
    p_high = ada.p
    for _ in range(4):
        ada.accumulate(0.2 * 32, 32)
    assert ada.p == pytest.approx(p_high - 4 * 32 / 1000)
    for _ in range(200):
        ada.accumulate(-1.0 * 32, 32)
    assert ada.p == 0.0
    # r_t exactly at the target leaves p where it is; images default to the sample count
    ada.update(0.6, 10_000)
    assert ada.p == 0.0
    ada.update(0.7, 500)
    assert ada.p == pytest.approx(0.5)


def test_max_p_caps_p_and_p_still_falls_from_the_cap():
    ada = AdaptiveAugment(target=0.6, ada_kimg=1, interval=1, max_p=0.25)
    for _ in range(40):  # over-fitting for long: p stops at the cap, not at 1
        ada.accumulate(1.0 * 32, 32)
    assert ada.p == 0.25
    ada.accumulate(-1.0 * 32, 32)
    assert ada.p == pytest.approx(0.25 - 32 / 1000)
    assert AdaptiveAugment(p=0.9, max_p=0.25).p == 0.25
    with pytest.raises(ValueError, match="0 < max_p <= 1"):
        AdaptiveAugment(max_p=0.0)


def test_resuming_under_a_lower_cap_starts_at_the_cap():
    trained = AdaptiveAugment(p=0.3)
    resumed = AdaptiveAugment(max_p=0.1)
    resumed.load_state(trained.state())
    assert resumed.p == 0.1
    same = AdaptiveAugment(max_p=0.5)
    same.load_state(trained.state())
    assert same.p == 0.3  # below the cap: exactly as saved


def test_images_seen_set_the_step_size():
    ada = AdaptiveAugment(target=0.6, ada_kimg=10, interval=2)
    ada.accumulate(8.0, 8, images=64)  # 8 samples judged per rank, 64 images seen over all ranks
    assert ada.accumulate(8.0, 8, images=64) == pytest.approx(1.0)
    assert ada.p == pytest.approx(128 / 10_000)


def test_sign_stats():
    stats = sign_stats(torch.tensor([2.0, -1.0, 0.5, 3.0]))
    assert stats.tolist() == [2.0, 4.0]


@pytest.mark.parametrize("channels", [1, 3])
def test_p_zero_is_exactly_the_identity(channels):
    x = _images(ch=channels)
    assert torch.equal(AdaptiveAugment(p=0.0)(x, torch.Generator().manual_seed(0)), x)


@pytest.mark.parametrize("channels", [1, 3])
def test_p_one_changes_every_image(channels):
    x = _images(ch=channels)
    y = AdaptiveAugment(p=1.0)(x, torch.Generator().manual_seed(0))
    assert y.shape == x.shape and torch.isfinite(y).all()
    assert ((y - x).flatten(1).abs().max(1).values > 1e-3).all()


def test_unselected_samples_keep_their_values_bit_for_bit():
    x = _images(b=64)
    y = AdaptiveAugment(p=0.05)(x, torch.Generator().manual_seed(0))
    same = [(y[i] == x[i]).all().item() for i in range(64)]
    assert 10 < sum(same) < 64  # (1 - 0.05)^8 of them untouched on average: ~42


@pytest.mark.parametrize("channels", [1, 3])
def test_same_generator_state_same_output(channels):
    x = _images(ch=channels)
    ada = AdaptiveAugment(p=0.5)
    a = ada(x, torch.Generator().manual_seed(7))
    b = ada(x, torch.Generator().manual_seed(7))
    c = ada(x, torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    gen = torch.Generator().manual_seed(7)
    ada(x, gen)
    state = gen.get_state()
    d = ada(x, gen)
    gen.set_state(state)
    assert torch.equal(ada(x, gen), d)  # a resumed generator state replays the same augmentation


def test_gradients_flow_through_the_augmentation():
    torch.manual_seed(0)
    gen_net = torch.nn.Sequential(torch.nn.Linear(4, 3 * 16 * 16), torch.nn.Tanh())
    x = gen_net(torch.randn(8, 4)).view(8, 3, 16, 16)
    y = AdaptiveAugment(p=1.0)(x, torch.Generator().manual_seed(0))
    (y * torch.randn_like(y)).sum().backward()
    grad = gen_net[0].weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    # and through each op alone, images as leaves
    for op in OPS:
        leaf = _images().requires_grad_(True)
        out = AdaptiveAugment(p=1.0, ops=(op,))(leaf, torch.Generator().manual_seed(1))
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        assert leaf.grad.abs().sum() > 0, op


def test_geometric_ops_do_what_they_say():
    x = _images(b=16)
    flipped = AdaptiveAugment(p=1.0, ops=("xflip",))(x, torch.Generator().manual_seed(0))
    assert torch.equal(flipped, x.flip(3))
    rotated = AdaptiveAugment(p=1.0, ops=("rotate90",))(x, torch.Generator().manual_seed(0))
    for i in range(16):
        assert any(torch.equal(rotated[i], torch.rot90(x[i], k, dims=(1, 2))) for k in range(4))
    shifted = AdaptiveAugment(p=1.0, ops=("translate",), pad_mode="zeros")(x, torch.Generator().manual_seed(0))
    moved = 0
    for i in range(16):  # a shift by (dy, dx), |d| <= 16/8 = 2, with zeros shifted in
        hits = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)
                if torch.equal(shifted[i], _shift_zeros(x[i], dy, dx))]
        assert hits, i
        moved += hits[0] != (0, 0)
    assert moved >= 8
    reflected = AdaptiveAugment(p=1.0, ops=("translate",))(x, torch.Generator().manual_seed(0))
    for i in range(16):  # reflection padding: every pixel is one of the image's own
        assert torch.isin(reflected[i], x[i]).all()


def _shift_zeros(img, dy, dx):
    out = torch.zeros_like(img)
    h, w = img.shape[1:]
    out[:, max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = img[:, max(-dy, 0):h - max(dy, 0),
                                                                        max(-dx, 0):w - max(dx, 0)]
    return out


def test_color_and_cutout_ops():
    x = _images(b=16)
    grey = x.mean(1, keepdim=True).expand_as(x).contiguous()
    # saturation and hue act on chroma only: a grey image stays grey
    for op in ("saturation", "hue"):
        y = AdaptiveAugment(p=1.0, ops=(op,))(grey, torch.Generator().manual_seed(0))
        assert torch.allclose(y, grey, atol=1e-5), op
        y = AdaptiveAugment(p=1.0, ops=(op,))(x, torch.Generator().manual_seed(0))
        assert not torch.allclose(y, x, atol=1e-3) and torch.allclose(y.mean(1), x.mean(1), atol=1e-5), op
    y = AdaptiveAugment(p=1.0, ops=("brightness",))(x, torch.Generator().manual_seed(0))
    offsets = (y - x).flatten(1)
    assert torch.allclose(offsets, offsets[:, :1].expand_as(offsets), atol=1e-5)
    # single-channel images: saturation and hue are not applied
    one = _images(ch=1)
    assert torch.equal(AdaptiveAugment(p=1.0, ops=("saturation", "hue"))(one, torch.Generator().manual_seed(0)), one)
    cut = AdaptiveAugment(p=1.0, ops=("cutout",))(x, torch.Generator().manual_seed(0))
    zeroed = (cut == 0) & (x != 0)
    frac = zeroed[:, 0].flatten(1).float().mean(1)
    assert (frac > 0.05).all() and (frac <= 0.25 + 1e-6).all()  # at most a half-side square
    assert torch.equal(cut[~zeroed], x[~zeroed])


def test_state_round_trips():
    a = AdaptiveAugment(target=0.6, ada_kimg=1, interval=3)
    for value in (0.9, 0.8, 0.95, 0.7):  # one full interval and one step into the next
        a.accumulate(value * 16, 16)
    state = a.state()
    b = AdaptiveAugment(target=0.6, ada_kimg=1, interval=3)
    b.load_state(state)
    assert b.state() == state and b.p == a.p > 0
    for value in (0.9, 0.1, 0.1, 0.1, 0.2, 0.3):
        assert a.accumulate(value * 16, 16) == b.accumulate(value * 16, 16)
        assert a.p == b.p
    torch.save(state, "/dev/null")  # plain Python values: goes into any checkpoint


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="unknown ADA op"):
        AdaptiveAugment(ops=("xflip", "zoom"))
    with pytest.raises(ValueError, match="pad_mode"):
        AdaptiveAugment(pad_mode="wrap")


def test_relativistic_margins_ignore_a_constant_shift_of_d():
    """The relativistic loss cannot see a constant added to every logit, so neither may ADA's r_t:
    a D whose logits all drift up (R3GAN's did) must not read as over-fitting."""
    real, fake = torch.tensor([0.5, -0.25, 0.25, 1.0]), torch.tensor([0.25, 0.5, -0.5, 1.5])  # exact in binary
    shifted = [ada_margins(real + c, fake + c, relativistic=True) for c in (0.0, 4.0)]
    assert torch.equal(shifted[0], shifted[1]) and sign_stats(shifted[1]).tolist() == [0.0, 4.0]
    assert sign_stats(ada_margins(real + 4.0, fake + 4.0, relativistic=False)).tolist() == [4.0, 4.0]
    assert torch.equal(ada_margins(real, fake, relativistic=False), real)  # D(real) as in StyleGAN2-ADA


def test_the_r3gan_task_feeds_ada_the_pair_margins(tmp_path, one_rank, one_thread, monkeypatch):
    """gan_photos (relativistic loss) with every D logit shifted by +100: sign(D(real)) would read
    r_t = 1 (all 'right'); the pair margins it feeds ADA do not move."""
    from pathlib import Path

    from bench import trainer as bt
    from trainers.runtime.clock import Clock

    small = ("model.g_channels=8", "model.d_channels=8", "data.batch_size=8")
    cfg, _, task, _ = bt.setup("gan_photos", Path(tmp_path), "disabled", small)
    d = task.d.module
    unshifted = d.forward
    monkeypatch.setattr(d, "forward", lambda *args: unshifted(*args) + 100.0)
    metrics = task.train_step(bt.synthetic_batch(cfg), Clock(images_per_step=cfg.data.batch_size))
    assert metrics["d_real_logit"] > 90 and metrics["d_fake_logit"] > 90
    assert -1.0 < metrics["d_rt"] < 1.0
    assert abs(task.ada._sign_sum) < task.ada._count == cfg.data.batch_size  # what the controller was fed


def test_loss_ada_ops_choose_the_pipeline_the_task_applies(tmp_path, one_rank):
    """gan_photos with loss.ada_ops=[xflip,rotate90] at p = 1: every image D sees is its own pixels
    moved (no colour op touched a value), and most images did move."""
    from pathlib import Path

    from bench import trainer as bt

    small = ("model.g_channels=8", "model.d_channels=8", "data.batch_size=8", "loss.ada_ops=[xflip,rotate90]")
    _, _, task, _ = bt.setup("gan_photos", Path(tmp_path), "disabled", small)
    assert task.ada.ops == ("xflip", "rotate90")
    task.ada.p = 1.0
    x = _images(b=16)
    seen = task._aug(x)
    assert torch.equal(seen.flatten(1).sort(dim=1).values, x.flatten(1).sort(dim=1).values)
    assert sum(not torch.equal(seen[i], x[i]) for i in range(16)) >= 12
