"""Where scalars and images go: metrics.jsonl and samples/ on disk, and W&B; rank 0 only.

Other ranks get a logger that does nothing, so call sites never branch on rank.
"""
from __future__ import annotations

import json
import os
import secrets
import time
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

from trainers.runtime.images import save_png


class RunLogger:
    """Writes one JSON object per logged step to metrics.jsonl and mirrors it to W&B."""

    def __init__(self, cfg: DictConfig, run_dir: Path, enabled: bool, start_step: int = 0):
        """``start_step``: the step this process starts from (the resumed checkpoint's, or 0).
        Records of later steps come from a process whose work is not in that checkpoint (it
        crashed, was preempted, or the run restarts with resume=never): they leave
        metrics.jsonl for metrics.discarded.jsonl, so that metrics.jsonl is the curve the
        weights actually followed, each step once."""
        self.enabled = enabled
        self.run_dir = run_dir
        self._wandb = None
        if not enabled:
            return
        moved = discard_metrics_after(run_dir / "metrics.jsonl", start_step)
        if moved:
            print(f"[gentrain] metrics.jsonl: {moved} record(s) after step {start_step} (not in the checkpoint this "
                  f"run starts from) moved to metrics.discarded.jsonl", flush=True)
        self._metrics = open(run_dir / "metrics.jsonl", "a", buffering=1)
        if cfg.wandb.mode != "disabled":
            self._wandb = _init_wandb(cfg, run_dir)

    def log(self, step: int, scalars: dict[str, float]) -> None:
        """Record scalars for `step` (rank 0 writes; others ignore)."""
        if not self.enabled:
            return
        record = {"step": step, "time": round(time.time(), 3), **{k: _plain(v) for k, v in scalars.items()}}
        self._metrics.write(json.dumps(record) + "\n")
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)

    def log_image(self, step: int, name: str, image_hwc: np.ndarray, caption: str = "") -> Path | None:
        """Save a PNG under samples/ and send it to W&B."""
        if not self.enabled:
            return None
        path = save_png(image_hwc, self.run_dir / "samples" / f"{name}-{step:07d}.png")
        if self._wandb is not None:
            import wandb

            self._wandb.log({name: wandb.Image(image_hwc, caption=caption or f"step {step}")}, step=step)
        return path

    def alert(self, title: str, text: str) -> None:
        if self.enabled and self._wandb is not None and self._wandb.settings.mode == "online":
            self._wandb.alert(title=title, text=text)

    @property
    def run_id(self) -> str | None:
        """The W&B run id (kept in the run directory, reused on resume); None on ranks > 0."""
        id_file = self.run_dir / "wandb_id"
        return id_file.read_text().strip() if self.enabled and id_file.exists() else None

    def close(self) -> None:
        if not self.enabled:
            return
        self._metrics.close()
        if self._wandb is not None:
            self._wandb.finish()  # without finish(), the W&B service keeps the process alive at exit
            self._wandb = None


def discard_metrics_after(path: Path, step: int) -> int:
    """Move the records of ``path`` (metrics.jsonl) logged after ``step``, and any torn line a
    killed process left, to metrics.discarded.jsonl beside it; return how many lines moved.
    The rewrite is atomic: a crash in between leaves the old file or the new one, whole."""
    if not path.is_file():
        return 0
    keep, moved = [], []
    for line in path.read_text().splitlines(keepends=True):
        if not line.strip():
            continue
        try:
            record_step = json.loads(line)["step"]
        except (ValueError, KeyError, TypeError):
            record_step = None
        (keep if isinstance(record_step, int) and record_step <= step and line.endswith("\n") else moved).append(line)
    if not moved:
        return 0
    with open(path.with_name("metrics.discarded.jsonl"), "a") as discarded:
        discarded.writelines(line if line.endswith("\n") else line + "\n" for line in moved)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(keep))
    os.replace(tmp, path)
    return len(moved)


def _plain(value):
    return float(value) if isinstance(value, (np.floating, np.integer)) else value


ONLINE_INIT_TIMEOUT_S = 30.0  # how long an online W&B start may take before the run logs offline instead


def _init_wandb(cfg: DictConfig, run_dir: Path):
    """Start (or continue) the W&B run; its id is kept in the run directory so a resume reuses it.

    Online, a W&B server that cannot be reached (no route, no API key, a proxy) must not stop
    the training: after one line saying so, the run logs offline and can be synced later."""
    os.environ.setdefault("WANDB_SILENT", "true")
    import wandb

    id_file = run_dir / "wandb_id"
    run_id = id_file.read_text().strip() if id_file.exists() else secrets.token_hex(4)
    id_file.write_text(run_id)

    def start(mode: str, **settings):
        return wandb.init(
            project=cfg.wandb.project,
            entity=cfg.wandb.entity,
            name=cfg.run.name,
            id=run_id,
            resume="allow",
            dir=str(run_dir),
            mode=mode,
            tags=list(cfg.wandb.tags),
            config=OmegaConf.to_container(cfg, resolve=True),
            settings=wandb.Settings(console="off", x_disable_stats=True, **settings),
        )

    if cfg.wandb.mode != "online":
        return start(cfg.wandb.mode)
    timeout = float(os.environ.get("GENTRAIN_WANDB_INIT_TIMEOUT", ONLINE_INIT_TIMEOUT_S))
    try:
        return start("online", init_timeout=timeout)
    except Exception as err:  # noqa: BLE001 - any failure to reach W&B: keep training, log offline
        reason = " ".join(str(err).split())[:160] or type(err).__name__
        print(f"[gentrain] W&B online unavailable ({reason}): logging offline to {run_dir / 'wandb'}; upload it "
              f"later with: wandb sync {run_dir / 'wandb'}/offline-run-*", flush=True)
        wandb.teardown()  # the failed attempt still holds the run id in W&B's service process
        return start("offline")
