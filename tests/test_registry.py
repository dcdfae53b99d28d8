"""One registry per axis: task kinds (trainers.tasks) and network architectures (models.registry).
The config schema's choices must name exactly what is registered, so a preset can reach every
architecture and a typo is refused before any process starts."""
import pytest
from omegaconf import OmegaConf

import models
from configs.load import fill_from_manifest
from configs.schema import KIND_CHOICES, SCHEMAS
from trainers.tasks import TASKS, Task

FAMILY_OF_KIND = {"vae": "vae", "gan": "gan", "paired": "paired"}


def test_every_config_kind_has_a_task_and_every_task_a_schema():
    assert set(TASKS) == set(SCHEMAS)


@pytest.mark.parametrize("kind", sorted(FAMILY_OF_KIND))
def test_schema_arch_choices_are_the_registered_archs(kind):
    assert set(KIND_CHOICES[kind]["model.arch"]) == set(models.archs(FAMILY_OF_KIND[kind]))


@pytest.mark.parametrize("kind", sorted(FAMILY_OF_KIND))
def test_every_registered_arch_builds_from_its_schema_defaults(kind):
    cfg = OmegaConf.structured(SCHEMAS[kind])
    fill_from_manifest(cfg, None)  # the shape a manifest-less shard set gets
    for arch in models.archs(FAMILY_OF_KIND[kind]):
        cfg.model.arch = arch
        if arch == "autoencoder_kl":
            cfg.model.norm_num_groups = 8
        built = models.build(FAMILY_OF_KIND[kind], cfg.model, cfg.data)
        assert built is not None


def test_unknown_arch_names_the_registered_ones():
    cfg = OmegaConf.structured(SCHEMAS["gan"])
    cfg.model.arch = "nope"
    with pytest.raises(ValueError, match="registered: dcgan, mlp"):
        models.build("gan", cfg.model, cfg.data)


def test_registering_an_arch_twice_is_refused():
    with pytest.raises(ValueError, match="twice"):
        models.register("gan", "dcgan")(lambda model, data: None)


@pytest.mark.parametrize("kind", sorted(TASKS))
def test_task_classes_declare_the_contract(kind):
    """The loop reads these without probing: every task class must carry them."""
    module = {"vae": "trainers.vae.task", "gan": "trainers.gan.task", "paired": "trainers.paired.task"}[kind]
    cls = getattr(__import__(module, fromlist=["x"]), {"vae": "VAETask", "gan": "GANTask", "paired": "PairedTask"}[kind])
    for name in ("train_step", "samples", "state", "load_state", "weights"):
        assert callable(getattr(cls, name, None)), (kind, name)
    assert isinstance(cls.progress_keys, tuple) and cls.progress_keys
    assert isinstance(cls.may_start_fresh, tuple)
    assert Task  # the Protocol the loop is typed against
