"""`python -m bench.run --quick` on tiny inputs writes the results files with the named ratios."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_quick_bench_writes_the_named_ratios(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "bench.run", "--quick", "--only", "reader,trainer", "--out", str(tmp_path),
         "--work", str(tmp_path / "work")],
        cwd=ROOT, capture_output=True, text=True, timeout=380,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    for name in ("reader_vs_raw_decode", "reader_vs_webdataset"):
        for size in ("64", "256"):
            for fmt in ("jpg", "png"):
                assert results[name][size][fmt] > 0
    assert results["trainer_step_vs_bare_loop"]["vae"] > 0
    assert results["quick"] is True
    table = (tmp_path / "results.md").read_text()
    assert "reader_vs_raw_decode" in table and "trainer_step_vs_bare_loop" in table


@pytest.mark.slow
@pytest.mark.timeout(200)
def test_reader_limits_smoke_run_writes_every_table(tmp_path):
    out = tmp_path / "limits.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.reader_limits", "--quick", "--out", str(out), "--work", str(tmp_path / "work")],
        cwd=ROOT, capture_output=True, text=True, timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())
    assert results["quick"] is True
    for table, reference in (("source", "raw_decode"), ("destination", "raw_decode")):
        rows = results[table]
        assert "skipped" not in rows, rows  # simplejpeg is a dependency: the tables must run
        assert rows[reference]["vs_raw_decode"] == 1.0
        assert all(row["images_per_s"] > 0 for row in rows.values())
    assert "memoryview_of_mapping" in results["source"] and "fresh_64_slots_per_batch" in results["destination"]
    assert all(results["worker"][name]["images_per_s"] > 0 for name in ("in_process_batch_64", "worker_batch_64"))
    assert set(results["worker"]["fit"]) == {"us_per_image", "ms_per_batch_sent"}
    assert "QUICK smoke run" in proc.stdout


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_reader_figures_are_medians_over_fresh_processes(tmp_path):
    import statistics

    from bench.reader import bench_config_processes, build_bench_shards

    shards = build_bench_shards(tmp_path, 64, "jpg", 64, shard_size=16)
    figures = bench_config_processes(shards, 64, "jpg", 64, 1, processes=3)
    runs = figures["per_process"]
    assert figures["processes"] == 3 and len(runs) == 3
    assert figures["reader_vs_raw_decode"] == statistics.median(r["reader_vs_raw_decode"] for r in runs)
    assert figures["images_per_s"]["raw_decode"] == statistics.median(r["raw_decode_images_per_s"] for r in runs)
    assert all(r["reader_vs_raw_decode"] > 0 and r["reader_vs_raw_decode_into_batch"] > 0 for r in runs)
    assert len(figures["per_round_reader_vs_raw_decode"]) == 3  # one round in each process


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_reader_memory_check_counts_the_loader_workers(tmp_path):
    from bench.reader import build_bench_shards

    shards = build_bench_shards(tmp_path, 64, "jpg", 64, shard_size=16)

    def measure(workers: int) -> dict:
        proc = subprocess.run([sys.executable, "-m", "bench.memory", "reader", str(shards), "64", "60",
                               "--workers", str(workers)], cwd=ROOT, capture_output=True, text=True, timeout=200)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads(proc.stdout.strip().splitlines()[-1])

    alone, with_worker = measure(0), measure(1)
    assert alone["batchs"] == with_worker["batchs"] == 60 and with_worker["workers"] == 1
    # A worker is a second Python with torch imported: its RSS is in the sum.
    assert with_worker["rss_end_mib"] > alone["rss_end_mib"] + 50
    assert with_worker["peak_rss_mib"] >= with_worker["rss_end_mib"]


def test_photo_bench_pins_one_thread_per_core_and_stops_each_run_at_its_budget(tmp_path):
    """bench.photos --jobs 2: at most two commands at once, each alone on its own core with
    OMP_NUM_THREADS=1, and each sent SIGTERM when its wall-clock budget is spent."""
    import os
    import time

    from bench.photos import run_for

    cores = sorted(os.sched_getaffinity(0))[:2]
    probe = ("import json, os, signal, sys, time; "
             "signal.signal(signal.SIGTERM, lambda *a: sys.exit(75)); "
             "state = [sorted(os.sched_getaffinity(0)), os.environ['OMP_NUM_THREADS'], time.time()]; "
             "print(json.dumps(state), flush=True); "
             "time.sleep(60)")
    commands = {f"p{i}": [sys.executable, "-c", probe] for i in range(3)}
    start = time.monotonic()
    run_for(commands, 1.5 / 60, tmp_path, cores)
    assert time.monotonic() - start < 30  # a 60 s sleep each, stopped after 1.5 s
    seen = [json.loads((tmp_path / f"p{i}.log").read_text()) for i in range(3)]
    assert all(len(affinity) == 1 and affinity[0] in cores and threads == "1" for affinity, threads, _ in seen)
    if len(cores) == 2:
        assert seen[0][0] != seen[1][0]  # the first two ran side by side on different cores
        assert seen[2][2] - min(seen[0][2], seen[1][2]) > 1.0  # the third waited for a free core


def test_a_failing_photo_bench_run_is_named_and_stops_the_others(tmp_path):
    from bench.photos import run_for

    long = "import os, time; print(os.getpid(), flush=True); time.sleep(60)"
    bad = "import time; time.sleep(1.0); raise SystemExit(3)"
    cores = sorted(os.sched_getaffinity(0))[:2]
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="bad exited 3"):
        run_for({"long": [sys.executable, "-c", long], "bad": [sys.executable, "-c", bad]}, 1.0, tmp_path,
                cores if len(cores) == 2 else [cores[0], cores[0]])
    assert time.monotonic() - start < 30  # the 60 s sleeper was stopped, not waited for
    pid = int((tmp_path / "long.log").read_text())
    with pytest.raises(ProcessLookupError):  # killed and reaped, not left training
        os.kill(pid, 0)


def test_photo_bench_rows_are_seed_means_and_a_win_must_clear_the_spread(tmp_path):
    """bench.photos --seeds: a row is the mean over seeds with the spread beside it; a modern
    network is only 'better' than a DCGAN where the difference is larger than that spread; rows
    of models not run this time are kept from the earlier file at the same budget and on the same
    machine only."""
    from bench.photos import FIGURES, merge_rows, summarise, verdicts

    def run(seed, fd, acc):
        return {**{k: 1.0 for k in FIGURES}, "seed": seed, "fd_random": fd, "conditional_accuracy": acc,
                "fd_domain": 10.0, "kid_random": 0.001, "kid_domain": 0.1, "class_coverage": 1.0,
                "ada_p": [[25, seed / 10]], "n": 1000}

    r3 = summarise([run(0, 0.5, 0.90), run(1, 0.7, 0.92)])
    assert r3["seeds"] == 2 and r3["fd_random"] == pytest.approx(0.6) and r3["fd_random_seed_std"] == pytest.approx(0.1414, abs=1e-4)
    assert [r["seed"] for r in r3["per_seed"]] == [0, 1]
    assert "seed" not in r3 and "ada_p" not in r3  # seed 0's own trace would pass for the model's
    dc = summarise([run(0, 0.8, 0.90)])
    assert dc["seeds"] == 1 and "fd_random_seed_std" not in dc and dc["fd_random"] == 0.8
    (line,) = verdicts({"dcgan": dc, "r3gan": r3})
    assert line.startswith("- r3gan vs dcgan: better on fd_random;")  # 0.2 apart, spread 0.14
    assert "tied on kid_random, fd_domain, kid_domain, conditional_accuracy, class_coverage" in line  # 0.01 < 0.014
    worse = verdicts({"dcgan": dc, "r3gan": summarise([run(0, 0.95, 0.80)])})[0]
    assert "worse on fd_random, conditional_accuracy" in worse

    path = tmp_path / "photos.json"
    xeon, zen4 = "Intel(R) Xeon(R) Processor, bf16 amx", "AMD EPYC, bf16 avx512_bf16"
    rows = {"dcgan": dict(dc, machine=xeon), "r3gan": dict(dc, machine=xeon), "stylegan2": dict(dc, machine=zen4)}
    path.write_text(json.dumps({"minutes": 20.0, "rows": rows}))
    merged = merge_rows(path, 20.0, {"r3gan": r3}, xeon, "fit-a", 1000)
    assert merged["r3gan"] is r3 and merged["dcgan"]["measured"] == "earlier" and set(merged) == {"dcgan", "r3gan"}
    # Another budget's rows are not comparable, nor another CPU's:
    assert set(merge_rows(path, 8.0, {"r3gan": r3}, xeon, "fit-a", 1000)) == {"r3gan"}
    assert set(merge_rows(path, 20.0, {"r3gan": r3}, zen4, "fit-a", 1000)) == {"r3gan", "stylegan2"}
    assert set(merge_rows(path, 20.0, {"r3gan": r3}, xeon, "fit-a", 5000)) == {"r3gan"}  # nor another --n
    # Nor rows judged by another fit of the domain classifier; a row from before fits were recorded is kept.
    rows["dcgan"]["domain_sha256"] = "fit-b"
    path.write_text(json.dumps({"minutes": 20.0, "rows": rows}))
    assert set(merge_rows(path, 20.0, {"r3gan": r3}, xeon, "fit-a", 1000)) == {"r3gan"}
    assert set(merge_rows(path, 20.0, {"r3gan": r3}, xeon, "fit-b", 1000)) == {"r3gan", "dcgan"}


def test_photo_bench_sizes_the_held_out_split_for_its_n(tmp_path):
    """--n above the held-out split's default size builds that many held-out crops (a real side of
    n images), and --n alone decides the split: a split built for another n is rebuilt."""
    from bench.photos import build_data
    from data_shards.sources.photos import DEFAULT_NUM_SAMPLES

    default = DEFAULT_NUM_SAMPLES["test"]

    (tmp_path / "photos32").mkdir()
    (tmp_path / "photos32" / "manifest.json").write_text("{}")  # the train split: built elsewhere, not here

    def held_out(n):
        _, test = build_data(tmp_path, n)
        return json.loads((test / "manifest.json").read_text())

    first = held_out(1000)
    assert first["num_samples"] == default and first["split"] == "test"
    assert held_out(default + 300)["num_samples"] == default + 300
    stamp = (tmp_path / "photos32_test" / "manifest.json").stat().st_mtime_ns
    assert held_out(default + 300)["num_samples"] == default + 300  # the same n: kept as it is
    assert (tmp_path / "photos32_test" / "manifest.json").stat().st_mtime_ns == stamp
    assert held_out(500)["num_samples"] == default


def test_photo_bench_refuses_an_unknown_model_before_building_anything(tmp_path, capsys):
    from bench.photos import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--models", "r3gan,dcgn", "--work", str(tmp_path / "work")])
    assert exit_info.value.code == 2
    assert "unknown dcgn; choose from dcgan, dcgan_lr1e-3, r3gan, stylegan2" in capsys.readouterr().err
    assert not (tmp_path / "work").exists()


def test_photo_bench_judge_only_refuses_runs_that_were_never_trained(tmp_path, capsys):
    from bench.photos import main

    (tmp_path / "run-r3gan" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run-r3gan" / "checkpoints" / "latest").write_text("step-0000001")
    with pytest.raises(SystemExit) as exit_info:
        main(["--models", "r3gan", "--seeds", "2", "--judge-only", "--work", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "--judge-only: no trained run of r3gan-seed1 in" in capsys.readouterr().err
    assert not (tmp_path / "photos32").exists()  # refused before building data


def test_photo_bench_trains_the_models_side_by_side_seed_by_seed(tmp_path):
    """With --jobs 2 the runs that train at once are two models at one seed, not two seeds of one
    model: a slower hour of the machine then falls on both models' rows."""
    from bench.photos import bench_commands, run_dir

    commands, runs = bench_commands(["dcgan", "r3gan"], 2, tmp_path, tmp_path / "train", tmp_path / "test")
    assert list(commands) == ["dcgan", "r3gan", "dcgan-seed1", "r3gan-seed1"]
    assert runs["r3gan-seed1"] == run_dir(tmp_path, "r3gan-seed1")
    assert "run.seed=1" in commands["dcgan-seed1"] and "configs/gan_photos_dcgan.yaml" in commands["dcgan-seed1"]


def test_photo_bench_clears_only_the_runs_it_is_about_to_train_again(tmp_path):
    """A rerun starts from empty run folders (no abandoned-* leftovers); the data, the domain
    classifier and the runs of models not in this rerun stay."""
    from bench.photos import clear_runs, run_dir

    for name in ("r3gan", "dcgan"):
        (run_dir(tmp_path, name) / "checkpoints" / "step-0000500").mkdir(parents=True)
    (tmp_path / "photos32").mkdir()
    (tmp_path / "domain.safetensors").write_bytes(b"weights")
    clear_runs([run_dir(tmp_path, "r3gan"), run_dir(tmp_path, "r3gan-seed1")])
    assert not run_dir(tmp_path, "r3gan").exists()
    assert (run_dir(tmp_path, "dcgan") / "checkpoints" / "step-0000500").is_dir()
    assert (tmp_path / "photos32").is_dir() and (tmp_path / "domain.safetensors").read_bytes() == b"weights"


def test_photo_bench_reuses_only_runs_trained_for_the_whole_budget(tmp_path):
    """--reuse keeps a run with a checkpoint whose metrics log spans the budget; one cut short
    (or never checkpointed) is trained again."""
    from bench.photos import run_dir, trained_for

    def fake_run(name, minutes_logged, checkpoint=True):
        run = run_dir(tmp_path, name)
        (run / "checkpoints").mkdir(parents=True)
        if checkpoint:
            (run / "checkpoints" / "latest").write_text("step-0005000")
        records = [{"step": 25, "time": 1000.0}, {"step": 5000, "time": 1000.0 + minutes_logged * 60}]
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        return run

    assert trained_for(fake_run("whole", 19.5), 20.0)
    assert not trained_for(fake_run("cut-short", 12.0), 20.0)
    assert not trained_for(fake_run("no-checkpoint", 19.5, checkpoint=False), 20.0)
    assert not trained_for(run_dir(tmp_path, "never-started"), 20.0)
    assert not trained_for(run_dir(tmp_path, "whole"), 40.0)  # another budget's run is not this one's


def test_photo_bench_dcgan_keeps_the_settings_its_rows_were_measured_with(tmp_path):
    """The bench's DCGAN is a preset of its own: tuning gan_photos.yaml for R3GAN must not move the
    baseline. When it borrowed that preset, ADA's target there went 0.6 -> 0.4, a DCGAN that took
    it along ran p up to 0.3, and its class accuracy fell from 0.93 to 0.79."""
    from omegaconf import OmegaConf

    from bench.photos import MODELS, train_command
    from configs.checks import ADA_OPS
    from configs.load import load_config

    measured_with = {"model.arch": "dcgan", "model.conditional": True, "model.z_dim": 64, "model.g_channels": 64,
                     "model.d_channels": 64, "loss.loss": "nonsaturating", "loss.r1_gamma": 1.0, "loss.r2_gamma": 0,
                     "loss.r1_every": 4, "loss.mode_seeking": 0, "loss.ada_target": 0.6, "loss.ada_kimg": 100,
                     "loss.ada_ops": list(ADA_OPS), "loss.ema_halflife_kimg": 5.0, "data.batch_size": 32,
                     "optim.g.betas": [0.0, 0.99], "optim.d.betas": [0.0, 0.99]}
    for name, lr in (("dcgan", 2e-4), ("dcgan_lr1e-3", 1e-3)):
        cmd, _ = train_command(name, MODELS[name], tmp_path, tmp_path / "train", tmp_path / "test")
        preset = cmd[cmd.index("train") + 1]
        assert preset == "configs/gan_photos_dcgan.yaml", name
        cfg = load_config(preset, [*MODELS[name][2:], "model.num_classes=16"])
        expected = {**measured_with, "optim.g.lr": lr, "optim.d.lr": lr}
        assert {key: OmegaConf.select(cfg, key) for key in expected} == expected, name

