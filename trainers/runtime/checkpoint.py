"""Checkpoints: every engine, every rank's counters and RNG, and fp32 weights for inference.

Layout of one checkpoint, `checkpoints/step-0000500/`:
    <engine>/state/...          DeepSpeed's own files for each engine (g, d, vae)
    trainer-rank00000.pt        this rank's step counters and RNG states (tensors and ints only)
    weights.safetensors         fp32 weights (and EMA) for `gentrain sample` / `export`
    COMPLETE                    written last, with the size and sha256 of every file above: a
                                directory without it, or whose files no longer match it, is
                                never loaded (the previous checkpoint is used instead)
`checkpoints/latest` names the newest complete one; it moves only after COMPLETE exists.
`checkpoints/best/` (with `BEST.json`: step, metric, value) is a hard-linked copy of the checkpoint
that scored best during training (trainers.judge.live); keep-k pruning never removes it.
A checkpoint is written under `step-0000500.partial/` and renamed when every rank is done, so a
process killed mid-save leaves the previous checkpoint as the newest complete one.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from trainers.runtime.distributed import DistInfo, any_rank, barrier

COMPLETE = "COMPLETE"
DS_TAG = "state"


BEST, BEST_RECORD = "best", "BEST.json"


def _write_error(err: Exception, root: Path) -> str:
    """One line: what failed, and how much room the checkpoint's filesystem has left."""
    text = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    try:
        free = shutil.disk_usage(root).free / 2**20
        return f"{text}; {free:.1f} MiB free on the checkpoint filesystem"
    except OSError:
        return text


def atomic_write(path: Path, text: str) -> None:
    """Replace `path` with `text` in one rename: a reader sees the old text or the new, never a torn file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class Checkpointer:
    """Saves and restores a run; every rank must call save() and restore() together."""

    def __init__(self, root: Path, dist_info: DistInfo, keep: int):
        self.root, self.dist, self.keep = Path(root), dist_info, keep
        self.last_error: str | None = None  # why the last save failed

    # ---- finding checkpoints -------------------------------------------------------------
    def complete_checkpoints(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        return complete_checkpoints(self.root)

    def latest_verified(self) -> Path | None:
        """The newest complete checkpoint whose files match their digests (every rank agrees)."""
        for path in reversed(self.complete_checkpoints()):
            problem = verify(path)
            if not any_rank(problem is not None, self.dist.device):
                return path
            if self.dist.is_main:
                print(f"[gentrain] WARNING: skipping checkpoint {path.name}: {problem or 'failed on another rank'}",
                      flush=True)
        return None

    def latest(self) -> Path | None:
        return latest_complete(self.root)

    # ---- saving ---------------------------------------------------------------------------
    def save(self, step: int, engines: dict, rank_state: dict, weights: dict[str, torch.Tensor],
             meta: dict) -> Path | None:
        """Write a checkpoint for `step`; returns its final path, or None when a write failed on
        some rank (a full disk, a quota): then the partial directory is removed, `latest` still
        names the previous checkpoint, and `self.last_error` says what failed."""
        started = time.perf_counter()
        final = self.root / f"step-{step:07d}"
        partial = final.with_name(final.name + ".partial")
        self.last_error = None
        try:
            if self.dist.is_main:
                shutil.rmtree(partial, ignore_errors=True)
                partial.mkdir(parents=True)
        except OSError as err:
            self.last_error = _write_error(err, self.root)
        barrier()
        try:
            if self.last_error is None and (partial.is_dir()):
                for name, engine in engines.items():
                    # Separate save_dir per engine: two engines in one directory overwrite each other's files.
                    engine.save_checkpoint(str(partial / name), tag=DS_TAG, save_latest=False)
                torch.save(rank_state, partial / f"trainer-rank{self.dist.rank:05d}.pt")
                if self.dist.is_main:
                    save_file({k: v.detach().float().cpu().contiguous() for k, v in weights.items()},
                              str(partial / "weights.safetensors"), metadata={"step": str(step)})
            elif self.last_error is None:
                self.last_error = "the checkpoint directory could not be created"
        except (OSError, RuntimeError) as err:  # ENOSPC, EDQUOT, EIO (torch.save's zip writer reports a
            self.last_error = _write_error(err, self.root)  # short write as RuntimeError): this checkpoint is lost
        if any_rank(self.last_error is not None, self.dist.device):
            if self.dist.is_main:
                shutil.rmtree(partial, ignore_errors=True)
                self.last_error = self.last_error or "a write failed on another rank"
            barrier()
            return None
        if self.dist.is_main:
            files = file_digests(partial)
            meta = {**meta, "step": step, "world_size": self.dist.world_size, "saved_at": time.time(),
                    "seconds": round(time.perf_counter() - started, 3),
                    "megabytes": round(sum(size for size, _ in files.values()) / 2**20, 3), "files": files}
            try:
                (partial / COMPLETE).write_text(json.dumps(meta, indent=1))
            except OSError as err:
                self.last_error = _write_error(err, self.root)
                shutil.rmtree(partial, ignore_errors=True)
        if any_rank(self.last_error is not None, self.dist.device):
            self.last_error = self.last_error or "a write failed on another rank"
            return None
        if self.dist.is_main:
            if final.exists():
                shutil.rmtree(final)
            os.replace(partial, final)
            atomic_write(self.root / "latest", final.name)
            self._prune()
        barrier()
        return final

    def keep_as_best(self, path: Path, record: dict) -> Path | None:
        """Make `path` (a complete checkpoint) `checkpoints/best`, replacing the previous best.

        Hard links, not copies: checkpoint files are never changed in place, and a link outlives
        the pruning of its step directory. Rank 0 does the work; every rank calls it."""
        best = self.root / BEST
        if self.dist.is_main:
            staging = self.root / f"{BEST}.partial"
            shutil.rmtree(staging, ignore_errors=True)
            shutil.copytree(path, staging, copy_function=os.link)
            (staging / BEST_RECORD).write_text(json.dumps({**record, "source": path.name}, indent=1))
            old = self.root / f"{BEST}.old"
            shutil.rmtree(old, ignore_errors=True)
            if best.exists():
                os.replace(best, old)
            os.replace(staging, best)
            shutil.rmtree(old, ignore_errors=True)
        barrier()
        return best

    def best_record(self) -> dict | None:
        """BEST.json of `checkpoints/best`, if there is one."""
        record = self.root / BEST / BEST_RECORD
        return json.loads(record.read_text()) if record.is_file() else None

    def _prune(self) -> None:
        for old in self.complete_checkpoints()[:-self.keep]:
            shutil.rmtree(old, ignore_errors=True)

    # ---- loading --------------------------------------------------------------------------
    def load(self, path: Path, engines: dict, may_start_fresh: tuple[str, ...] = ()) -> tuple[dict, dict[str, torch.Tensor]]:
        """Restore engines in place; return this rank's trainer state and the fp32 weights.

        At another world size the optimizer state comes along too: ZeRO's per-rank partitions are
        gathered and cut anew for this run's ranks (trainers.runtime.reshard), a whole (ZeRO-0)
        state loads as it is; one line on stdout says so. An engine named in ``may_start_fresh``
        that the checkpoint does not hold (a part switched on after it was written, such as the
        VAE's discriminator) keeps its fresh initialisation; any other missing engine is an error.
        """
        saved_world = json.loads((path / COMPLETE).read_text()).get("world_size", self.dist.world_size)
        same_world = saved_world == self.dist.world_size
        outcomes = {}  # engine -> what became of its optimizer state at another world size
        for name, engine in engines.items():
            if name in may_start_fresh and not (path / name).is_dir():
                if self.dist.is_main:
                    print(f"[gentrain] checkpoint {path.name} has no '{name}' (switched on since it was written): "
                          f"'{name}' starts fresh", flush=True)
                continue
            if same_world:
                load_path, _ = engine.load_checkpoint(str(path / name), tag=DS_TAG)
            else:
                load_path, outcomes[name] = _load_at_other_world_size(engine, path / name)
            if load_path is None:
                raise FileNotFoundError(f"checkpoint {path} has no state for engine '{name}'")
        if not same_world and self.dist.is_main:
            print(_world_size_change_line(path.name, saved_world, self.dist.world_size, outcomes), flush=True)
        own = path / f"trainer-rank{self.dist.rank:05d}.pt"
        state_file = own if own.exists() else path / "trainer-rank00000.pt"  # world size changed
        rank_state = torch.load(state_file, map_location="cpu", weights_only=True)
        weights = load_file(str(path / "weights.safetensors"))
        return rank_state, weights


def _load_at_other_world_size(engine, engine_dir: Path) -> tuple[str | None, str]:
    """Load one engine from a checkpoint written by another number of processes. Returns
    DeepSpeed's load path and what became of the optimizer state: "whole" (ZeRO-0 keeps it whole,
    loaded as at any size), "re-cut" (ZeRO partitions gathered and cut for this run's ranks), or why
    it starts afresh."""
    from trainers.runtime import reshard

    partitions = reshard.read_partitions(engine_dir / DS_TAG)
    if not partitions:
        return engine.load_checkpoint(str(engine_dir), tag=DS_TAG)[0], "whole"
    reason = reshard.why_not(partitions, engine.optimizer)
    # Weights and counters from DeepSpeed, which refuses ZeRO optimizer states saved at another world
    # size; those come from the re-cut partitions. (It refreshes the fp32 masters from the 16-bit
    # weights meanwhile: all that is left where the partitions cannot be re-cut.)
    load_path, _ = engine.load_checkpoint(str(engine_dir), tag=DS_TAG, load_optimizer_states=False)
    if load_path is None or reason is not None:
        return load_path, reason or "no state"
    reshard.load_resharded(engine, partitions)
    return load_path, "re-cut"


def _world_size_change_line(name: str, saved: int, now: int, outcomes: dict[str, str]) -> str:
    """The one line a resume at another world size prints: what carried over, what did not and why."""
    line = (f"[gentrain] checkpoint {name} was written by {saved} process(es), this run has {now}: "
            f"restoring weights, EMA, counters")
    kept = [engine for engine, outcome in outcomes.items() if outcome in ("whole", "re-cut")]
    if kept:
        how = (f"ZeRO partitions re-cut from {saved} to {now}" if "re-cut" in outcomes.values()
               else "whole in the checkpoint")
        line += f" and the optimizer state of {', '.join(kept)} (Adam moments, step, fp32 master weights; {how})"
    lost = {engine: why for engine, why in outcomes.items() if engine not in kept}
    if lost:
        line += "; the optimizer state of " + "; ".join(f"'{e}' starts afresh ({why})" for e, why in lost.items())
    return line


def complete_checkpoints(root: Path) -> list[Path]:
    """The complete checkpoints under a checkpoints/ folder, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted((p for p in root.glob("step-*") if p.is_dir() and (p / COMPLETE).exists()), key=lambda p: p.name)


def latest_complete(root: Path) -> Path | None:
    """The checkpoint `latest` points to if it is complete, else the newest complete one."""
    pointer = Path(root) / "latest"
    if pointer.exists():
        candidate = Path(root) / pointer.read_text().strip()
        if (candidate / COMPLETE).exists():
            return candidate
    found = complete_checkpoints(root)
    return found[-1] if found else None


def file_digests(root: Path) -> dict[str, list]:
    """{relative path: [size, sha256]} of every file under root."""
    out = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        out[str(path.relative_to(root))] = [path.stat().st_size, digest.hexdigest()]
    return out


def verify(path: Path) -> str | None:
    """None if the checkpoint's files match what COMPLETE recorded, else what is wrong."""
    try:
        recorded = json.loads((path / COMPLETE).read_text()).get("files")
    except (OSError, ValueError) as err:
        return f"unreadable {COMPLETE} ({err})"
    if recorded is None:
        return None  # written before digests were recorded
    actual = file_digests(path)
    actual.pop(COMPLETE, None)
    for name, (size, digest) in recorded.items():
        if name not in actual:
            return f"{name} is missing"
        if actual[name] != [size, digest]:
            return f"{name} does not match its recorded size/sha256"
    return None


def checkpoint_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint: fp32 weights (and EMA) and each rank's optimizer state.

    What two runs are compared on to decide that they are bitwise the same.
    """
    from trainers.runtime.safe_load import safe_torch_load

    path = Path(path)
    tensors = {f"weights/{k}": v for k, v in load_file(str(path / "weights.safetensors")).items()}
    for f in sorted(path.glob("*/state/*optim_states.pt")):
        _walk(safe_torch_load(f)["optimizer_state_dict"], f"{f.parent.parent.name}/{f.name}", tensors)
    for f in sorted(path.glob("*/state/*model_states.pt")):
        # Without ZeRO (trainer.zero_stage=0) the optimizer's moments live in the model file.
        optimizer = safe_torch_load(f).get("optimizer")
        if optimizer is not None:
            _walk(optimizer, f"{f.parent.parent.name}/{f.name}/optimizer", tensors)
    return tensors


def gathered_optimizer_state(path: Path) -> dict[str, torch.Tensor]:
    """Every engine's optimizer state as no particular world size holds it: ZeRO's per-rank slices
    joined with the padding stripped (per param group: fp32 master weights, exp_avg, exp_avg_sq,
    step), a whole (ZeRO-0) state as saved. A resume at another world size holds exactly this."""
    from trainers.runtime import reshard
    from trainers.runtime.safe_load import safe_torch_load

    tensors: dict[str, torch.Tensor] = {}
    for state_dir in sorted(Path(path).glob(f"*/{DS_TAG}")):
        engine = state_dir.parent.name
        partitions = reshard.read_partitions(state_dir)
        if partitions:
            for i, group in enumerate(reshard.gather(partitions)):
                tensors.update({f"{engine}/group{i}/{key}": v for key, v in group.items() if torch.is_tensor(v)})
        else:
            optimizer = safe_torch_load(state_dir / "mp_rank_00_model_states.pt").get("optimizer")
            _walk(optimizer, f"{engine}/optimizer", tensors)
    return tensors


def _walk(obj, prefix: str, out: dict[str, torch.Tensor]) -> None:
    """Every tensor inside nested dicts and lists, named by its path."""
    if isinstance(obj, torch.Tensor):
        out[prefix] = obj
    elif isinstance(obj, dict):
        for key in sorted(obj, key=str):
            _walk(obj[key], f"{prefix}.{key}", out)
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            _walk(value, f"{prefix}.{i}", out)


def differing_tensors(a: Path, b: Path) -> list[str]:
    """Names of the tensors that differ (in presence, shape or any bit) between two checkpoints."""
    ta, tb = checkpoint_tensors(a), checkpoint_tensors(b)
    names = sorted(set(ta) | set(tb))
    return [n for n in names if n not in ta or n not in tb or not torch.equal(ta[n], tb[n])]
