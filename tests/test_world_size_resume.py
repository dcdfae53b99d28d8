"""Resume at another world size keeps the optimizer state: 2 -> 1 -> 2 processes, real DeepSpeed.

Each resume at a new size is a real trainer (`gentrain train`, under torchrun for 2 processes)
that also snapshots its engines right after loading the checkpoint, before any step: the optimizer
state the snapshot holds (gathered over its ranks, padding stripped) must equal, bit for bit, the
gathered state of the checkpoint it resumed from. Run as a module, this file is that trainer
(`resume_and_snapshot`).
"""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT, run_gentrain

PRESET = "configs/gan_ring8.yaml"  # an MLP GAN on 2-D points: a step costs milliseconds
COMMON = ("model.g_channels=16", "model.d_channels=16", "data.batch_size=16", "data.num_workers=0",
          "trainer.log_every=1", "trainer.ckpt_every=100", "trainer.sample_every=100", "trainer.progress=false",
          "diagnostics.every=0", "wandb.mode=disabled")


@pytest.fixture(scope="module")
def ring8(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ring8")
    run_gentrain("shards", "build", "ring8", "--out", out, "--num-samples", 512, "--shard-size", 256, "--quiet")
    return out


def checkpoint_of(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step-{step:07d}"


def resume(nproc: int, run_dir: Path, steps: int, settings: tuple, snapshot: Path) -> str:
    """`gentrain train` of the run to `steps` in `nproc` processes, snapshotting its engines into
    `snapshot` right after the resume; its stdout."""
    train = ["-m", "tests.test_world_size_resume", snapshot, "train", PRESET, f"run.dir={run_dir}", *settings,
             f"trainer.max_steps={steps}"]
    torchrun = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"] if nproc > 1 else []
    proc = subprocess.run([sys.executable, *torchrun, *map(str, train)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, f"exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc.stdout


def held_state(checkpoint: Path) -> dict[str, torch.Tensor]:
    """What a checkpoint holds that must not depend on the world size: gathered optimizer state and weights."""
    from safetensors.torch import load_file

    from trainers.runtime.checkpoint import gathered_optimizer_state

    weights = {f"weights/{k}": v for k, v in load_file(str(checkpoint / "weights.safetensors")).items()}
    return {**gathered_optimizer_state(checkpoint), **weights}


def assert_state_in_motion(state: dict[str, torch.Tensor], precision: str) -> None:
    """The state a fresh optimizer would not have: non-zero moments, steps taken and, where a
    separate fp32 master exists, values that bf16 weights alone could not give back."""
    moments = {k: v for k, v in state.items() if k.endswith(("exp_avg", "exp_avg_sq"))}
    steps = [v for k, v in state.items() if k.endswith(".step") or k.endswith("/step")]
    assert moments and all(v.abs().max() > 0 for v in moments.values()), sorted(state)
    assert steps and all(v.item() >= 2 for v in steps), steps
    if precision == "bf16":
        masters = [v for k, v in state.items() if k.endswith("/fp32") or ".fp32_groups." in k]
        assert masters and all((m != m.bfloat16().float()).any() for m in masters), sorted(state)


def assert_bitwise_equal(expected: dict[str, torch.Tensor], held: dict[str, torch.Tensor]) -> str:
    """Same names, same bits; a line saying how much was compared."""
    missing, extra = sorted(set(expected) - set(held)), sorted(set(held) - set(expected))
    assert not missing and not extra, f"missing after the resume: {missing[:6]}; not in the checkpoint: {extra[:6]}"
    differing = [k for k in expected if not torch.equal(expected[k], held[k])]
    worst = max(((expected[k].float() - held[k].float()).abs().max().item() for k in differing), default=0.0)
    assert not differing, f"{len(differing)} of {len(expected)} differ (max abs diff {worst:g}): {differing[:4]}"
    elements = sum(v.numel() for v in expected.values())
    return f"{len(expected)} tensors ({elements} elements) bitwise equal"


CASES = [
    pytest.param(1, "bf16", id="zero1-bf16"),
    pytest.param(0, "fp32", id="zero0-fp32"),
    pytest.param(1, "fp32", id="zero1-fp32", marks=pytest.mark.slow),
    pytest.param(0, "bf16", id="zero0-bf16", marks=pytest.mark.slow),
    pytest.param(2, "bf16", id="zero2-bf16", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("stage,precision", CASES)
def test_two_one_two_keeps_the_optimizer_state(tmp_path, ring8, stage, precision):
    settings = (*COMMON, f"data.shards={ring8}", f"trainer.zero_stage={stage}", f"trainer.precision={precision}")
    run_dir = tmp_path / "run"
    run_gentrain("launch", "--nproc-per-node", 2, PRESET, f"run.dir={run_dir}", *settings, "trainer.max_steps=4")
    report = []
    for before, after, step, to in [(2, 1, 4, 6), (1, 2, 6, 8)]:
        saved = held_state(checkpoint_of(run_dir, step))
        assert_state_in_motion(saved, precision)
        out = resume(after, run_dir, to, settings, snapshot=tmp_path / f"at-{step}")
        assert f"was written by {before} process(es), this run has {after}: restoring weights, EMA, counters and " \
               f"the optimizer state of g, d (" in out and "starts afresh" not in out, out
        compared = assert_bitwise_equal(saved, held_state(tmp_path / f"at-{step}"))
        report.append(f"{before}->{after} at step {step}: {compared}")
        assert checkpoint_of(run_dir, to).is_dir()
    print("\n" + "\n".join(report))


def resume_and_snapshot(snapshot: Path, argv: list[str]) -> int:
    """`gentrain train ARGV` whose first resume also saves every engine (DeepSpeed's own
    save_checkpoint) and the fp32 weights into `snapshot`, before any step."""
    import trainers.loop as loop
    from launcher.cli import main

    restore, taken = loop.restore, []

    def restore_then_snapshot(task, checkpointer, path, clock, dist_info):
        data_state = restore(task, checkpointer, path, clock, dist_info)
        if not taken:  # a roll-back restores again: that one is not a resume
            taken.append(path)
            from safetensors.torch import save_file

            from trainers.runtime.checkpoint import DS_TAG
            from trainers.runtime.distributed import barrier

            for name, engine in task.engines.items():
                engine.save_checkpoint(str(snapshot / name), tag=DS_TAG, save_latest=False)
            if dist_info.is_main:
                save_file({k: v.detach().float().contiguous() for k, v in task.weights().items()},
                          str(snapshot / "weights.safetensors"))
            barrier()
        return data_state

    loop.restore = restore_then_snapshot
    return main(argv)


if __name__ == "__main__":
    sys.exit(resume_and_snapshot(Path(sys.argv[1]), sys.argv[2:]))
