"""model.arch=autoencoder_kl: a trained run exports to a diffusers folder that
`AutoencoderKL.from_pretrained` loads and that decodes exactly as our model does."""
import json
import math

import pytest
import torch
from safetensors import safe_open

from tests.conftest import run_gentrain
from trainers.judge.inference import export_weights, load_sampler

# A small AutoencoderKL so a CPU run takes seconds: 32x32 -> 4x16x16 latents.
SMALL = ("model.block_out_channels=[8,16]", "model.norm_num_groups=8", "model.mid_block_attention=false",
         "loss.adversarial.d_channels=8")


@pytest.mark.slow
def test_autoencoder_kl_run_exports_to_diffusers_and_loads_with_from_pretrained(tmp_path, digit_shards):
    from diffusers import AutoencoderKL

    run_dir = tmp_path / "kl"
    run_gentrain("train", "vae_kl_digits", f"run.dir={run_dir}", f"data.shards={digit_shards}", "data.batch_size=8",
                 "trainer.max_steps=3", "trainer.ckpt_every=3", "trainer.sample_every=3", "trainer.log_every=1",
                 "trainer.progress=false", "loss.adversarial.start_step=1", *SMALL)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert "adv/weight" in records[-1] and all(math.isfinite(r["loss"]) for r in records)

    out = tmp_path / "diffusers_vae"
    proc = run_gentrain("export", run_dir, "--format", "diffusers", "--out", out, "--max-samples", 256)
    assert "scaling_factor" in proc.stdout
    assert {"config.json", "diffusion_pytorch_model.safetensors"} <= {p.name for p in out.iterdir()}
    config = json.loads((out / "config.json").read_text())
    factor = config["scaling_factor"]
    assert config["_class_name"] == "AutoencoderKL" and config["latent_channels"] == 4
    assert 0.05 < factor < 20 and factor != 0.18215  # measured, not diffusers' default

    ours, _ = load_sampler(run_dir)
    theirs = AutoencoderKL.from_pretrained(out).eval()
    assert theirs.config.scaling_factor == pytest.approx(factor)
    z = torch.randn(5, *ours.latent_shape, generator=torch.Generator().manual_seed(0))
    x = torch.rand(5, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(theirs.decode(z).sample, ours.decode(z.flatten(1)), atol=1e-5)
        posterior = theirs.encode(x * 2 - 1).latent_dist  # diffusers' convention: images in [-1, 1]
        mean, logvar = ours.encode(x)
        assert torch.allclose(posterior.mean.flatten(1), mean, atol=1e-5)
        assert torch.allclose(posterior.logvar.flatten(1), logvar, atol=1e-5)

    # The single-file export records the same measured factor (same samples, same seed).
    single, _ = export_weights(run_dir, tmp_path / "kl.safetensors", max_samples=256)
    with safe_open(str(single), "pt") as f:
        meta = f.metadata()
    assert float(meta["scaling_factor"]) == pytest.approx(factor, rel=1e-6) and meta["scaling_factor_samples"] == "256"


def test_diffusers_export_of_a_conv_vae_is_a_one_line_error(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("kind: vae\nrun:\n  name: x\n")
    proc = run_gentrain("export", run_dir, "--format", "diffusers", "--out", tmp_path / "o", check=False)
    assert proc.returncode == 2 and "model.arch=autoencoder_kl" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_architecture_mistakes_are_one_line_config_errors():
    from configs import ConfigError, load_config

    with pytest.raises(ConfigError, match="model.arch.*conv, autoencoder_kl"):
        load_config("vae_digits", ["model.arch=dcgan"])
    with pytest.raises(ConfigError, match="model.arch.*dcgan, mlp"):
        load_config("gan_digits", ["model.arch=autoencoder_kl"])
    mistakes = {"loss.likelihood=bernoulli": "not logits", "model.norm_num_groups=24": "must divide",
                "model.block_out_channels=[32,32,32,32,32,32,32]": "divisible by 64",
                "loss.adversarial.start_step=-1": "start_step"}
    for override, message in mistakes.items():  # caught when the config loads, before any process starts
        with pytest.raises(ConfigError, match=message):
            load_config("vae_kl_digits", [override])


def test_launch_refuses_a_bad_architecture_combination_before_starting_anything(tmp_path):
    """`gentrain launch --dry-run` loads the config the way a real launch does: exit 2, one line."""
    proc = run_gentrain("launch", "--dry-run", "--nproc-per-node", "2", "configs/vae_kl_digits.yaml",
                        "model.norm_num_groups=24", f"run.dir={tmp_path / 'run'}", check=False)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "must divide" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "torchrun" not in proc.stdout
