"""metrics.jsonl across restarts: the curve the weights followed, each step once, nothing lost."""
import json

import pytest

from omegaconf import OmegaConf

from trainers.runtime.run_log import RunLogger, discard_metrics_after


def write_records(path, steps, torn_tail=""):
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in steps) + torn_tail)


def steps_in(path):
    return [json.loads(line)["step"] for line in path.read_text().splitlines()]


def test_records_after_the_resumed_step_and_a_torn_line_move_to_the_discarded_file(tmp_path):
    path = tmp_path / "metrics.jsonl"
    write_records(path, [2, 4, 6, 8], torn_tail='{"step": 10, "lo')  # killed mid-write
    assert discard_metrics_after(path, 4) == 3
    assert steps_in(path) == [2, 4]
    discarded = (tmp_path / "metrics.discarded.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in discarded[:2]] == [6, 8] and discarded[2] == '{"step": 10, "lo'
    assert discard_metrics_after(path, 4) == 0 and steps_in(path) == [2, 4]  # nothing more to move
    assert discard_metrics_after(tmp_path / "absent.jsonl", 0) == 0


def test_a_logger_resumed_at_a_step_continues_the_curve_from_there(tmp_path, capsys):
    cfg = OmegaConf.create({"wandb": {"mode": "disabled"}})
    write_records(tmp_path / "metrics.jsonl", [1, 2, 3, 4, 5])
    logger = RunLogger(cfg, tmp_path, enabled=True, start_step=3)
    logger.log(4, {"loss": 0.5})
    logger.close()
    assert steps_in(tmp_path / "metrics.jsonl") == [1, 2, 3, 4]
    assert "2 record(s) after step 3" in capsys.readouterr().out
    # A fresh start (resume=never, step 0) in the same directory starts a fresh curve.
    RunLogger(cfg, tmp_path, enabled=True, start_step=0).close()
    assert steps_in(tmp_path / "metrics.jsonl") == []
    assert steps_in(tmp_path / "metrics.discarded.jsonl") == [4, 5, 1, 2, 3, 4]


@pytest.mark.slow
def test_online_wandb_without_a_route_falls_back_to_offline_and_trains(tmp_path, digit_shards):
    from tests.conftest import run_gentrain

    run = tmp_path / "run"
    proc = run_gentrain("train", "configs/vae_digits.yaml", f"run.dir={run}", f"data.shards={digit_shards}",
                        "wandb.mode=online", "trainer.max_steps=4", "trainer.log_every=2", "trainer.progress=false",
                        "data.batch_size=16", "model.base_channels=8",
                        env={"WANDB_MODE": "online", "WANDB_API_KEY": "0" * 40,
                             "WANDB_BASE_URL": "http://127.0.0.1:9",  # nothing listens there: no route to W&B
                             "GENTRAIN_WANDB_INIT_TIMEOUT": "5"})
    assert "W&B online unavailable" in proc.stdout and "wandb sync" in proc.stdout
    assert list((run / "wandb").glob("offline-run-*"))
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2
