"""Load a preset, apply dotted overrides, validate against the schema.

Every user mistake becomes a `ConfigError` whose message is one line naming the offending key and
the nearest valid keys; the command line turns it into exit code 2 without a traceback.
"""
from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Callable, Iterable, Sequence

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from configs.checks import KIND_CHECKS
from configs.errors import ConfigError
from configs.schema import CHOICES, KIND_CHOICES, SCHEMAS

PRESET_DIR = Path(__file__).resolve().parent


def dotted_keys(cfg: DictConfig, prefix: str = "") -> list[str]:
    """All leaf keys of a config tree in dotted form (`optim.d.lr`)."""
    keys = []
    for key in cfg.keys():
        path = f"{prefix}{key}"
        node = cfg._get_node(key)
        if isinstance(node, DictConfig):
            keys.extend(dotted_keys(node, path + "."))
        else:
            keys.append(path)
    return keys


def nearest_keys(key: str, valid: Sequence[str], n: int = 3) -> list[str]:
    """Valid keys closest to a mistyped one: same leaf name first, then by spelling."""
    leaf = key.rsplit(".", 1)[-1]
    same_leaf = [k for k in valid if k.rsplit(".", 1)[-1] == leaf]
    close = difflib.get_close_matches(key, valid, n=n, cutoff=0.4)
    leaf_close = [k for k in valid if difflib.SequenceMatcher(None, leaf, k.rsplit(".", 1)[-1]).ratio() > 0.7]
    ordered = list(dict.fromkeys(same_leaf + close + leaf_close))
    return ordered[:n]


def _describe(err: OmegaConfBaseException, valid: Sequence[str], source: str) -> str:
    key = getattr(err, "full_key", None) or getattr(err, "key", None) or "?"
    if isinstance(err, ConfigKeyError):
        near = nearest_keys(str(key), valid)
        hint = f"; did you mean {', '.join(near)}?" if near else ""
        return f"unknown config key '{key}' (in {source}){hint}"
    if isinstance(err, ValidationError):
        reason = str(err).splitlines()[0]
        return f"bad value for '{key}' (in {source}): {reason}"
    return f"invalid config (in {source}): {str(err).splitlines()[0]}"


def _parse_override(text: str) -> DictConfig:
    if "=" not in text or text.startswith("="):
        raise ConfigError(f"override '{text}' is not of the form dotted.key=value (e.g. data.batch_size=64)")
    return OmegaConf.from_dotlist([text])


def resolve_preset(path: str | os.PathLike) -> Path:
    """Find a preset by path, or by bare name in the shipped configs/ folder (`gan_digits`)."""
    candidate = Path(path)
    if candidate.is_file():
        return candidate
    for shipped in (PRESET_DIR / candidate.name, PRESET_DIR / f"{candidate.name}.yaml"):
        if shipped.is_file():
            return shipped
    presets = sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))
    raise ConfigError(f"config file '{path}' not found; shipped presets: {', '.join(presets)}")


# What an unset data shape means when the shards have no manifest to say it.
SHAPE_WITHOUT_MANIFEST = {"image_size": 32, "channels": 1}


def load_config(path: str | os.PathLike | None, overrides: Iterable[str] = (),
                manifest_of: Callable[[object], dict | None] | None = None,
                notes: list[str] | None = None) -> DictConfig:
    """Build the resolved, validated config of a run from a preset and `key=value` overrides.

    `manifest_of(data.shards)` (data_shards' find_manifest, passed in by the command line:
    configs imports nothing of gentrain) supplies what the config leaves unset: the image size,
    channels and, for a conditional GAN, the number of classes. Where the config contradicts
    the manifest, a line saying so is appended to `notes`.
    """
    overrides = list(overrides)
    try:
        user = OmegaConf.load(resolve_preset(path)) if path is not None else OmegaConf.create({})
    except OmegaConfBaseException as err:  # YAML that OmegaConf cannot represent
        raise ConfigError(f"cannot read config '{path}': {str(err).splitlines()[0]}") from None
    except Exception as err:  # noqa: BLE001 - yaml.YAMLError and friends: say what and where
        raise ConfigError(f"cannot parse config '{path}': {' '.join(str(err).split())}") from None
    if not isinstance(user, DictConfig):
        raise ConfigError(f"config '{path}' must be a mapping of keys, not a {type(user).__name__}")

    parsed = [_parse_override(o) for o in overrides]
    kind = str(user.get("kind", "vae"))
    for o in parsed:
        kind = str(o.get("kind", kind))
    if kind not in SCHEMAS:
        raise ConfigError(f"unknown kind '{kind}'; valid kinds: {', '.join(SCHEMAS)}")

    cfg = OmegaConf.structured(SCHEMAS[kind])
    valid = dotted_keys(cfg)
    for source, layer in [(str(path), user)] + [(f"override '{t}'", o) for t, o in zip(overrides, parsed)]:
        try:
            cfg = OmegaConf.merge(cfg, layer)
        except OmegaConfBaseException as err:
            raise ConfigError(_describe(err, valid, source)) from None

    fill_from_manifest(cfg, manifest_of(cfg.data.shards) if manifest_of else None, notes)
    validate(cfg)
    if not cfg.run.dir:
        cfg.run.dir = str(Path("runs") / cfg.run.name)
    OmegaConf.set_readonly(cfg, True)
    return cfg


def fill_from_manifest(cfg: DictConfig, manifest: dict | None, notes: list[str] | None = None) -> None:
    """Unset data shape (and a conditional GAN's class count) from the shards' manifest."""
    notes = notes if notes is not None else []
    shape = {}
    if manifest is not None and manifest.get("kind", "image") in ("image", "pairs"):  # pairs: the target's shape
        shape = {"image_size": manifest.get("tgt_size") or manifest.get("image_size"),
                 "channels": manifest.get("channels")}
    for key, fallback in SHAPE_WITHOUT_MANIFEST.items():
        given, recorded = cfg.data[key], shape.get(key)
        if given is None:
            cfg.data[key] = recorded if recorded is not None else fallback
        elif recorded is not None and given != recorded:
            action = "resized" if key == "image_size" else "converted"
            notes.append(f"data.{key}={given} from the config, but the shards hold {recorded} "
                         f"(manifest.json): images are {action} as they are read")
    model = cfg.get("model")
    if model is not None and model.get("conditional") and not model.num_classes:
        classes = (manifest or {}).get("num_classes")
        if not classes:
            raise ConfigError("model.conditional=true needs labelled shards (a manifest.json with num_classes) "
                              "or model.num_classes set")
        model.num_classes = int(classes)


def validate(cfg: DictConfig) -> None:
    """Checks the schema's types cannot express: choices, ranges and the kind's cross-field rules."""
    for key, allowed in {**CHOICES, **KIND_CHOICES.get(cfg.kind, {})}.items():
        value = OmegaConf.select(cfg, key, default=None)
        if value is not None and value not in allowed:
            raise ConfigError(f"bad value for '{key}': {value!r}; choose one of {', '.join(map(str, allowed))}")
    positive = ["data.batch_size", "trainer.max_steps", "trainer.log_every", "trainer.sample_every",
                "trainer.ckpt_every", "trainer.keep_checkpoints", "data.image_size", "data.shuffle_buffer"]
    for key in positive:
        value = OmegaConf.select(cfg, key, default=None)
        if value is not None and value <= 0:
            raise ConfigError(f"bad value for '{key}': {value}; it must be > 0")
    if cfg.data.num_workers < 0:
        raise ConfigError(f"bad value for 'data.num_workers': {cfg.data.num_workers}; it must be >= 0")
    if cfg.trainer.resume not in ("auto", "never") and not Path(cfg.trainer.resume).exists():
        raise ConfigError(f"bad value for 'trainer.resume': {cfg.trainer.resume!r}; use auto, never or an existing checkpoint path")
    shards = cfg.data.shards
    if not isinstance(shards, (str, ListConfig)) or (isinstance(shards, ListConfig) and not len(shards)):
        raise ConfigError("bad value for 'data.shards': give a directory, a brace pattern or a non-empty list")
    metrics = cfg.get("metrics")
    if metrics is not None and metrics.every_kimg:
        if metrics.every_kimg < 0 or metrics.num_samples < 10:
            raise ConfigError("metrics.every_kimg must be >= 0 and metrics.num_samples >= 10")
        if cfg.kind == "gan" and cfg.model.arch == "mlp":
            raise ConfigError("metrics.every_kimg: image metrics need images; 2-D point sets are judged by "
                              "diagnostics.* and `python -m bench.gan_modes`")
    if cfg.kind in KIND_CHECKS:
        KIND_CHECKS[cfg.kind](cfg)


def to_yaml(cfg: DictConfig) -> str:
    """The resolved config as YAML, as written to the run directory."""
    return OmegaConf.to_yaml(cfg, resolve=True)
