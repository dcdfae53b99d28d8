"""bench.trainer's bare loops do GANTask's math (so the ratio compares like with like), and
bench.precision times both precisions of a preset."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bench import trainer as bt
from trainers.runtime.clock import Clock

SMALL = ("model.g_channels=8", "model.d_channels=8", "data.batch_size=8")


def _fraction_apart(a: torch.nn.Module, b: torch.nn.Module) -> float:
    """Fraction of the two networks' weights more than 1e-5 apart. Fused and plain AdamW round
    differently, and Adam turns that into a step of up to lr for the odd weight whose gradients
    are all ~0: same math leaves < 0.1% apart; one missed penalty or augmentation, > 90%."""
    gaps = torch.cat([(x.detach().float() - y.detach().float()).abs().flatten()
                      for x, y in zip(a.parameters(), b.parameters())])
    return (gaps > 1e-5).float().mean().item()


@pytest.mark.parametrize("preset", ["gan_photos", "gan_photos_stylegan2"])
def test_bare_gan_loop_reproduces_the_task_step(tmp_path, one_rank, one_thread, preset):
    """From the same weights and noise stream, 8 steps (two with lazy R1/R2 or path length, ADA
    augmenting at p=0.3, the EMA every step) leave the bare loop's G, D and EMA where the task's
    are, up to fused-vs-plain AdamW rounding (see _fraction_apart)."""
    # At the StyleGAN2 preset's lr 5e-3 with mode seeking, these 8-channel networks amplify the
    # fused-vs-plain rounding (1.5e-5 at steps 1-5, as without mode seeking) to 2e-2 by step 8:
    # chaos, not different math. At 2e-4 the same steps stay within 8e-6.
    cfg, _, task, _ = bt.setup(preset, Path(tmp_path), "disabled", SMALL + ("optim.g.lr=2e-4", "optim.d.lr=2e-4"))
    bt._seed(cfg.run.seed)
    bare = bt._BareGAN(cfg, noise_seed=cfg.run.seed * 1000)  # GANTask's stream on rank 0
    bt._hold_ada_p(task, bare, 0.3)
    batch, clock = bt.synthetic_batch(cfg), Clock(images_per_step=cfg.data.batch_size)
    assert bt.cadence(cfg) == 4 and batch["label"].max() > 0
    for _ in range(8):
        task.train_step(bt.fresh_copy(batch), clock)
        clock.tick()
        bare(bt.fresh_copy(batch))
    assert _fraction_apart(task.g.module, bare.g) < 0.01
    assert _fraction_apart(task.d.module, bare.d) < 0.01
    assert _fraction_apart(task.ema.module, bare.g_ema) < 0.01
    assert float(task.pl_mean) == pytest.approx(float(bare.pl_mean), rel=1e-4)
    assert task.ada.p == bare.ada.p == 0.3  # held: the controller's interval is never reached


def test_bare_gan_loop_builds_the_tasks_ada(tmp_path, one_rank, one_thread):
    """The bare loop's ADA pipeline and cap come from the config, as the task's do (a preset with
    fewer ops would otherwise be timed against the full pipeline)."""
    overrides = SMALL + ("loss.ada_ops=[xflip,cutout]", "loss.ada_max_p=0.2")
    cfg, _, task, _ = bt.setup("gan_photos", Path(tmp_path), "disabled", overrides)
    bare = bt._BareGAN(cfg)
    assert bare.ada.ops == task.ada.ops == ("xflip", "cutout")
    assert bare.ada.max_p == task.ada.max_p == 0.2


def test_presets_and_cadences():
    assert bt.parse_presets(None) == ("vae", "gan")
    assert bt.parse_presets("gan_digits, gan_photos") == ("gan", "gan_photos")
    with pytest.raises(ValueError, match="unknown preset"):
        bt.parse_presets("gan_photo")
    assert [bt.round_up(s, 4) for s in (1, 4, 20, 21)] == [4, 4, 20, 24]


def test_paired_synthetic_batch_has_inputs_scale_times_smaller():
    from bench.precision import load

    cfg = load("sr4_photos", Path("/tmp/unused"))
    batch = bt.synthetic_batch(cfg)
    assert batch["image"].shape == (16, 3, 64, 64) and batch["source"].shape == (16, 3, 16, 16)
    assert cfg.loss.adv_start_step == 0 and bt.cadence(cfg) == 16


def test_precision_bench_times_both_precisions(tmp_path, one_rank, one_thread):
    from bench import precision

    results = precision.run(["gan_digits"], 1, 1, tmp_path)
    r = results["presets"]["gan_digits"]
    assert r["steps_per_round"] == 4 and r["family"] == "gan" and r["arch"] == "dcgan"
    assert r["ms_per_step"]["fp32"] > 0 and r["ms_per_step"]["bf16"] > 0 and r["bf16_vs_fp32"] > 0
    assert results["per_arch"]["gan/dcgan"]["faster"] in ("fp32", "bf16")
    results.update(quick=True, command="test", bf16_isa="avx512_bf16",
                   suggested_cpu_precision={"gan/dcgan": {"avx512_bf16": "fp32"}})
    earlier = {"by_bf16_isa": {"amx": {"bf16_isa": "amx", "suggested_cpu_precision": {"gan/r3gan": {"amx": "fp32"}}}}}
    (tmp_path / "precision.json").write_text(json.dumps(earlier))
    merged = precision.merge(tmp_path / "precision.json", results)  # one run per kind of bf16 hardware
    assert set(merged["by_bf16_isa"]) == {"amx", "avx512_bf16"}
    assert merged["suggested_cpu_precision"] == {"gan/r3gan": {"amx": "fp32"}, "gan/dcgan": {"avx512_bf16": "fp32"}}
    merged["by_bf16_isa"].pop("amx")  # a bare stand-in, not a run to render
    table = precision.to_markdown(merged)
    assert "| gan_digits | gan/dcgan |" in table and "('gan', 'dcgan'): {'avx512_bf16': 'fp32'}" in table


def _figures(command: str, ratio: float) -> dict:
    """A trainer entry as bench_kind returns it, with the keys bench.run's table reads."""
    return {"batch_size": 32, "image_size": 32, "ms_per_step": {"bare": 1.0, "task_step": 1.0, "loop_step": 1.0},
            "task_step_vs_bare_loop": 1.0, "loop_step_vs_task_step": 1.0, "pieces_ms_per_step": {},
            "amortised_ms_per_step": 0.0, "trainer_step_vs_bare_loop": ratio, "command": command,
            "load_avg_at_start": [1.0, 1.0, 1.0]}


def test_photo_presets_merge_into_the_results_of_make_bench(tmp_path):
    made_by_run = {"machine": {"cpu": "x", "cores": 2, "python": "3", "torch": "2", "load_avg_at_start": [1, 1, 1]},
                   "quick": False, "command": "python -m bench.run", "seconds": 1.0,
                   "trainer": {"vae": {k: v for k, v in _figures("", 1.05).items() if k != "command"}},
                   "trainer_step_vs_bare_loop": {"vae": 1.05}, "runs": {"trainer": {"command": "python -m bench.run"}}}
    (tmp_path / "results.json").write_text(json.dumps(made_by_run))
    bt.merge_into(tmp_path, {"gan_photos": _figures("python -m bench.trainer --presets gan_photos,x", 1.02)},
                  "python -m bench.trainer --presets gan_photos,x", quick=False)
    bt.merge_into(tmp_path, {"gan_photos": _figures("python -m bench.trainer --presets gan_photos", 1.01)},
                  "python -m bench.trainer --presets gan_photos", quick=False)
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["trainer_step_vs_bare_loop"] == {"vae": 1.05, "gan_photos": 1.01}
    assert results["runs"]["trainer"]["command"] == "python -m bench.run; python -m bench.trainer --presets gan_photos"
    assert "| gan_photos (batch 32, 32px) |" in (tmp_path / "results.md").read_text()
