"""Config tree: presets load, overrides apply, mistakes are one clear line and exit code 2."""
import subprocess
import sys
from pathlib import Path

import pytest

from configs import ConfigError, load_config
from configs.load import PRESET_DIR

PRESETS = sorted(PRESET_DIR.glob("*.yaml"))
CONTRACT_KEYS = ["run.name", "run.dir", "data.shards", "data.batch_size", "trainer.max_steps", "wandb.mode"]


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_every_preset_loads_and_has_the_contract_keys(preset):
    from omegaconf import OmegaConf

    # Conditional presets take their class count from the shards' manifest: give them one (16 classes,
    # as the photos source writes) without building shards; the others ignore the class count.
    cfg = load_config(preset, manifest_of=lambda spec: {"kind": "image", "num_classes": 16})
    for key in CONTRACT_KEYS:
        assert OmegaConf.select(cfg, key) is not None, key
    assert cfg.run.dir == f"runs/{cfg.run.name}"
    assert cfg.wandb.mode == "offline"


def test_dotted_overrides_apply_with_types():
    cfg = load_config("configs/gan_digits.yaml", ["optim.d.lr=3e-4", "data.batch_size=32", "run.name=x"])
    assert cfg.optim.d.lr == pytest.approx(3e-4) and cfg.optim.g.lr == pytest.approx(2e-4)
    assert cfg.data.batch_size == 32 and isinstance(cfg.data.batch_size, int)
    assert cfg.run.dir == "runs/x"


def test_preset_found_by_bare_name():
    assert load_config("vae_digits").kind == "vae"


@pytest.mark.parametrize("override, expected", [
    ("optim.lr=1", ["unknown config key 'optim.lr'", "optim.g.lr", "optim.d.lr"]),
    ("data.batchsize=3", ["unknown config key 'data.batchsize'", "data.batch_size"]),
    ("trainer.max_step=3", ["'trainer.max_step'", "trainer.max_steps"]),
])
def test_unknown_key_names_it_and_the_nearest_valid_keys(override, expected):
    with pytest.raises(ConfigError) as err:
        load_config("configs/gan_digits.yaml", [override])
    message = str(err.value)
    assert "\n" not in message
    for fragment in expected:
        assert fragment in message


@pytest.mark.parametrize("override, fragment", [
    ("data.batch_size=abc", "bad value for 'data.batch_size'"),
    ("trainer.precision=fp8", "choose one of auto, bf16, fp16, fp32"),
    ("trainer.zero_stage=3", "'trainer.zero_stage'"),
    ("data.batch_size=0", "must be > 0"),
    ("kind=diffusion", "unknown kind 'diffusion'"),
    ("noequals", "dotted.key=value"),
])
def test_bad_values_are_rejected_clearly(override, fragment):
    with pytest.raises(ConfigError, match=None) as err:
        load_config("configs/vae_digits.yaml", [override])
    assert fragment in str(err.value)


def test_unknown_key_in_yaml_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("kind: vae\nmodel:\n  latent_dims: 8\n")
    with pytest.raises(ConfigError, match=r"model\.latent_dims.*model\.latent_dim"):
        load_config(bad)


def test_missing_file_lists_presets():
    with pytest.raises(ConfigError, match="not found; shipped presets: .*gan_digits"):
        load_config("nope.yaml")


def test_cli_exits_2_with_one_line_and_no_traceback():
    proc = subprocess.run([sys.executable, "-m", "launcher.cli", "train", "configs/gan_digits.yaml", "optim.lr=1"],
                          capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    assert lines[0].startswith("gentrain: error: unknown config key 'optim.lr'")


@pytest.mark.parametrize("preset,override,fragment", [
    ("gan_digits", "loss.d_steps=3", "divisible by loss.d_steps"),
    ("gan_digits", "loss.augment=[flip]", "unknown augmentation 'flip'; choose from color, translation, cutout"),
    ("gan_digits", "loss.r1_every=0", "loss.r1_every and loss.d_steps must be >= 1"),
    ("gan_digits", "optim.lr_decay_start=1.5", "optim.lr_decay_start must be in [0, 1]"),
    ("gan_ring8", "loss.augment=[color]", "the mlp (2-D points) model takes no augmentation"),
    ("gan_digits", "loss.class_matched_pairs=true", "loss.class_matched_pairs pairs real and generated images"),
    ("gan_digits", "model.projection_only=true", "model.projection_only is an option of the class-conditional r3gan"),
])
def test_gan_cross_field_mistakes_are_caught_when_the_config_loads(preset, override, fragment):
    """Caught by load_config, so `gentrain launch` (and an sbatch submission) stops before anything starts."""
    with pytest.raises(ConfigError) as err:
        load_config(preset, [override])
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_projection_only_needs_a_conditional_r3gan():
    assert load_config("gan_photos", ["model.projection_only=true", "model.num_classes=16"]).model.projection_only
    with pytest.raises(ConfigError, match="model.projection_only is an option"):
        load_config("gan_photos", ["model.projection_only=true", "model.conditional=false"])


@pytest.mark.parametrize("overrides,fragment", [
    (["loss.ada_ops=[flip]"], "bad value for 'loss.ada_ops': unknown augmentation 'flip'; choose from xflip, "
                              "translate, rotate90, brightness, contrast, saturation, hue, cutout"),
    (["loss.ada_ops=[]"], "loss.ada_ops is empty"),
    (["loss.ada_max_p=0"], "0 < loss.ada_max_p <= 1"),
])
def test_bad_ada_settings_are_caught_when_the_config_loads(overrides, fragment):
    with pytest.raises(ConfigError) as err:
        load_config("gan_digits", ["loss.ada_target=0.6", *overrides])
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_negative_mode_seeking_weight_is_rejected():
    with pytest.raises(ConfigError, match="loss.mode_seeking must be >= 0"):
        load_config("configs/gan_digits.yaml", ["loss.mode_seeking=-1"])
