"""gentrain's VAE against pythae, same architecture, likelihood, optimizer and budget.

    python -m bench.vae_vs_pythae [--quick] [--threads 1] [--steps 800] [--ablation]

Writes bench/vae_pythae.json and bench/vae_pythae.md. Two parts:

Throughput (samples/s, one process per system, ``--threads`` torch threads each). Every system
runs in its own long-lived worker process (its own allocator, threads and compile state, as in
real use); the driver asks each in turn, order rotating every round, to train K steps on the same
digit batches held in memory, and reads back wall and CPU seconds. Ratios are medians over
rounds of the paired ratios (the machine is shared and noisy):

* ``gentrain``: the real trainer path: ``VAETask.train_step`` through its DeepSpeed engine
  (ZeRO stage, clipping and precision from configs/vae_digits.yaml, fp32 as ``auto`` picks on
  this CPU) inside trainers/loop.py's per-step bookkeeping and metrics.jsonl logging
  (bench.trainer._LoopBody), with the trainer's default speed options.
* ``gentrain_plain`` (``--ablation``: plus one worker per option added in turn): the same with
  every speed option off, to show what each buys.
* ``bare``: a hand-written PyTorch loop: models.ConvVAE, torch AdamW, the same loss, one
  ``.item()`` a step.
* ``pythae``: pythae 0.1.2's ``BaseTrainer.train_step`` (its DataLoader over in-memory tensors,
  forward, ``_optimizers_step``, ``loss.item()``), training a pythae ``VAE`` whose encoder and
  decoder are the same ConvVAE modules (Bernoulli likelihood: pythae's "bce" on the sigmoid).

Likelihood: both are trained for the same number of steps (``--steps`` x batch 64) on the digits
train split (``gentrain train`` on the shards; pythae's ``BaseTrainer.train`` on the same images),
then judged by the same code, ``trainers.judge.evaluation.evaluate`` (IW-NLL bound with K samples, ELBO),
on the held-out test split: pythae's weights are loaded into a ConvVAE and written as a gentrain
run directory, so the estimator, its seed and the data are identical.
"""
from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PYTHAE_PIN = "pythae==0.1.2"
PRESET = REPO / "configs" / "vae_digits.yaml"

# Every speed option of the trainer and what "plain" sets it to; the ablation adds them in this order.
SPEED_OPTIONS = [
    ("trainer.keep_host_memory", "false", "true"),
    ("trainer.edge_convs_as_gemm", "false", "true"),
    ("trainer.fused_optimizer", "false", "true"),
    ("trainer.channels_last", "false", "true"),
    ("trainer.compile", "false", "true"),
]


# ----------------------------------------------------------------------------- setup helpers
def ensure_pythae() -> str:
    """Import pythae, installing the pinned version (with the repo's constraints) if missing."""
    try:
        import pythae  # noqa: F401
    except ImportError:
        cmd = [sys.executable, "-m", "pip", "install", "-q", "-c", str(REPO / "constraints.txt"), PYTHAE_PIN]
        print("[bench-vae] installing", PYTHAE_PIN, flush=True)
        subprocess.run(cmd, check=True)
    from importlib.metadata import version

    return version("pythae")


def build_data(root: Path, cap: int | None = None) -> tuple[Path, Path]:
    """The digits train split (80%) and the held-out test split (20%), optionally capped."""
    from data_shards.build import build_shards

    tag = f"-{cap}" if cap else ""
    train, test = root / f"digits-train{tag}", root / f"digits-test{tag}"
    for split, out in (("train", train), ("test", test)):
        if not (out / "manifest.json").exists():
            build_shards("digits", out, shard_size=256, split=split, progress=False, num_samples=cap)
    return train, test


def load_images(shards: Path):
    """All images of the shards as uint8 (N, 1, 32, 32), in shard order."""
    import torch

    from data_shards.stream import ShardStream

    chunks = [b["image"] for b in ShardStream(str(shards), 256, channels=1, image_size=32, passes=1,
                                              shuffle_buffer=1, return_keys=True)]
    return torch.cat(chunks)


def batch_order(n: int, batch: int, count: int, seed: int = 0) -> list[list[int]]:
    """`count` batches of indices, reshuffled every epoch (full batches only)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    out, perm = [], []
    while len(out) < count:
        if len(perm) < batch:
            perm = torch.randperm(n, generator=g).tolist()
        out.append(perm[:batch])
        perm = perm[batch:]
    return out


def _quiet() -> None:
    """Progress bars and banners of a worker process go nowhere (they are still drawn)."""
    devnull = open(os.devnull, "w")
    os.dup2(devnull.fileno(), 1)
    os.dup2(devnull.fileno(), 2)
    sys.stdout = sys.stderr = devnull


def _worker_setup(threads: int) -> None:
    """A worker process's start: its thread count, the repository importable, output silenced."""
    os.environ["OMP_NUM_THREADS"] = str(threads)
    import torch

    torch.set_num_threads(threads)
    sys.path.insert(0, str(REPO))
    _quiet()


# ----------------------------------------------------------------------------- the systems
class PythaeSystem:
    """pythae's VAE with ConvVAE's encoder and decoder (modules shared with ``self.net``)."""

    def __init__(self, batch: int, lr: float, betas, epochs: int = 1, seed: int = 0, out_dir=None):
        import torch
        from pythae.models import VAE, VAEConfig
        from pythae.models.base.base_utils import ModelOutput
        from pythae.models.nn import BaseDecoder, BaseEncoder
        from pythae.trainers import BaseTrainerConfig

        from models import ConvVAE

        torch.manual_seed(seed)
        net = ConvVAE(32, 1, 16, 32)
        self.net = net

        class Encoder(BaseEncoder):
            def __init__(self):
                super().__init__()
                self.encoder, self.to_stats = net.encoder, net.to_stats

            def forward(self, x):
                mean, logvar = self.to_stats(self.encoder(x)).chunk(2, dim=1)
                return ModelOutput(embedding=mean, log_covariance=logvar.clamp(-30.0, 20.0))

        class Decoder(BaseDecoder):
            def __init__(self):
                super().__init__()
                self.from_latent, self.decoder = net.from_latent, net.decoder

            def forward(self, z):
                h = self.from_latent(z).view(-1, net._base_channels, 4, 4)
                return ModelOutput(reconstruction=torch.sigmoid(self.decoder(h)))

        self.model = VAE(VAEConfig(input_dim=(1, 32, 32), latent_dim=16, reconstruction_loss="bce"),
                         encoder=Encoder(), decoder=Decoder())
        self.config = BaseTrainerConfig(
            output_dir=str(out_dir or tempfile.mkdtemp(prefix="pythae-")), per_device_train_batch_size=batch,
            num_epochs=epochs, learning_rate=lr, optimizer_cls="AdamW",
            optimizer_params={"betas": tuple(betas), "weight_decay": 0.0}, no_cuda=True, seed=seed)

    def trainer(self, data):
        """pythae's BaseTrainer over float images in [0, 1] (as TrainingPipeline builds it)."""
        from pythae.data.preprocessors import DataProcessor
        from pythae.trainers import BaseTrainer

        return BaseTrainer(model=self.model, train_dataset=DataProcessor.to_dataset(data), training_config=self.config)

    def pipeline(self, data) -> None:
        """pythae's own entry point: TrainingPipeline(...)(train_data=...)."""
        from pythae.pipelines import TrainingPipeline

        TrainingPipeline(model=self.model, training_config=self.config)(train_data=data)


class BareSystem:
    """A hand-written loop: ConvVAE, torch AdamW, the same loss, one .item() a step."""

    def __init__(self, images_u8, batches, lr, betas, seed: int = 0):
        import torch

        from models import ConvVAE
        from trainers.vae.objective import kl_per_dim, reconstruction_nll

        torch.manual_seed(seed)
        self.model = ConvVAE(32, 1, 16, 32)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=lr, betas=tuple(betas), weight_decay=0.0)
        self.noise = torch.Generator().manual_seed(seed + 1)
        self.images, self.batches, self.i = images_u8, batches, 0
        self.nll, self.kl = reconstruction_nll, kl_per_dim

    def step(self, idx) -> float:
        x = self.images[idx].float().div_(255.0)
        out = self.model(x, generator=self.noise)
        loss = (self.nll(out.logits_bchw, x, "bernoulli") + self.kl(out.mean_bz, out.logvar_bz).sum(1)).mean()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return loss.item()


def gentrain_overrides(variant: str) -> list[str]:
    """Config overrides of a gentrain variant: 'gentrain' (defaults), 'gentrain_plain' (all speed
    options off), 'gentrain+<key>' (plain plus options up to and including <key>)."""
    if variant == "gentrain":
        return []
    plain = [f"{k}={off}" for k, off, _ in SPEED_OPTIONS]
    if variant == "gentrain_plain":
        return plain
    upto = variant.split("+", 1)[1]
    out, on = [], True
    for k, off, val in SPEED_OPTIONS:
        out.append(f"{k}={val if on else off}")
        if k.endswith(upto):
            on = False
    return out


class GentrainSystem:
    """VAETask.train_step through DeepSpeed inside the loop's per-step bookkeeping."""

    def __init__(self, images_u8, batches, overrides, run_dir: Path):
        import torch

        from bench.trainer import _LoopBody, _seed
        from configs import load_config
        from trainers.runtime.distributed import init_distributed
        from trainers.tasks import build_task
        from trainers.runtime.run_log import RunLogger

        cfg = load_config(str(PRESET), [f"run.dir={run_dir}", "run.name=bench-vae-pythae", "trainer.precision=fp32",
                                        "wandb.mode=disabled", "trainer.progress=false", *overrides])
        dist_info = init_distributed()
        run_dir.mkdir(parents=True, exist_ok=True)
        _seed(cfg.run.seed)
        self.task = build_task(cfg, dist_info, "fp32")
        self.logger = RunLogger(cfg, run_dir, enabled=True)
        self.loop = _LoopBody(cfg, self.task, self.logger, dist_info)
        self.images, self.batches = images_u8, batches
        self.labels = torch.zeros(len(batches[0]), dtype=torch.int64)
        self.cfg = cfg

    def step(self, idx) -> None:
        self.loop({"image": self.images[idx], "label": self.labels, "skipped": {}})


def _worker(name: str, spec: dict, conn) -> None:
    """One system in its own process: build, warm up, then run K steps per request."""
    try:
        _worker_setup(spec["threads"])
        import torch

        images = load_images(Path(spec["train"]))
        k, batch = spec["steps"], spec["batch"]
        batches = batch_order(len(images), batch, k * 1000)
        t0 = time.perf_counter()
        if name == "pythae":
            data = (images.float() / 255.0)[torch.tensor(sum(batches[:k], []))]  # K batches a pythae "epoch"
            trainer = PythaeSystem(batch, spec["lr"], spec["betas"]).trainer(data)
            trainer.prepare_training()  # what BaseTrainer.train() does first: optimizer, callbacks, output dir
            epoch = [0]

            def run() -> int:
                epoch[0] += 1
                trainer.train_step(epoch[0])
                return len(trainer.train_loader)
        else:
            system = BareSystem(images, batches, spec["lr"], spec["betas"]) if name == "bare" else \
                GentrainSystem(images, batches, gentrain_overrides(name), Path(spec["root"]) / f"run-{name}")
            cursor = [0]

            def run() -> int:
                for _ in range(k):
                    system.step(batches[cursor[0] % len(batches)])
                    cursor[0] += 1
                return k
        setup_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(spec["warmup"]):  # allocator, oneDNN primitives, DeepSpeed's first step, compile
            run()
        conn.send({"ready": True, "setup_s": setup_s, "warmup_s": time.perf_counter() - t0})
        import resource

        while conn.recv() == "run":
            f = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            w, c = time.perf_counter(), time.process_time()
            n = run()
            conn.send({"wall_s": time.perf_counter() - w, "cpu_s": time.process_time() - c, "steps": n,
                       "minor_faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f})
    except Exception as exn:  # noqa: BLE001 - report to the driver instead of hanging it
        import traceback

        conn.send({"error": f"{type(exn).__name__}: {exn}", "traceback": traceback.format_exc()})
    finally:
        conn.close()


def throughput(systems: list[str], spec: dict, rounds: int) -> dict:
    """Interleaved rounds of K steps per system, each in its own process."""
    ctx = mp.get_context("spawn")
    procs, conns, ready = {}, {}, {}
    for name in systems:  # one at a time: setup (imports, compile) must not overlap the others
        parent, child = ctx.Pipe()
        p = ctx.Process(target=_worker, args=(name, spec, child), daemon=True)
        p.start()
        child.close()
        msg = parent.recv()
        if "error" in msg:
            raise RuntimeError(f"{name} worker failed: {msg['error']}\n{msg.get('traceback', '')}")
        procs[name], conns[name], ready[name] = p, parent, msg
        print(f"[bench-vae] {name}: ready (setup {msg['setup_s']:.1f} s, warm-up {msg['warmup_s']:.1f} s)", flush=True)
    wall = {n: [] for n in systems}
    cpu = {n: [] for n in systems}
    faults = {n: [] for n in systems}
    load = []
    try:
        for r in range(rounds):
            load.append(os.getloadavg()[0])
            for name in systems[r % len(systems):] + systems[:r % len(systems)]:
                conns[name].send("run")
                msg = conns[name].recv()
                if "error" in msg:
                    raise RuntimeError(f"{name} worker failed: {msg['error']}\n{msg.get('traceback', '')}")
                wall[name].append(msg["steps"] * spec["batch"] / msg["wall_s"])
                cpu[name].append(msg["steps"] * spec["batch"] / msg["cpu_s"])
                faults[name].append(msg["minor_faults"] / msg["steps"])
    finally:
        for name in systems:
            try:
                conns[name].send("stop")
            except (BrokenPipeError, OSError):
                pass
            procs[name].join(timeout=30)
    med = statistics.median
    out = {"samples_per_s": {n: med(v) for n, v in wall.items()},
           "samples_per_cpu_s": {n: med(v) for n, v in cpu.items()},
           "minor_page_faults_per_step": {n: med(v) for n, v in faults.items()},
           "per_round_samples_per_s": wall, "setup_s": {n: ready[n]["setup_s"] for n in systems},
           "warmup_s": {n: ready[n]["warmup_s"] for n in systems}, "load_avg_1min": load}
    ratios = {}
    for num in [s for s in systems if s.startswith("gentrain")]:
        for den in ("pythae", "bare"):
            if den in systems:
                ratios[f"{num}/{den}"] = med(a / b for a, b in zip(wall[num], wall[den]))
                ratios[f"{num}/{den} (cpu time)"] = med(a / b for a, b in zip(cpu[num], cpu[den]))
    if "pythae" in systems and "bare" in systems:
        ratios["pythae/bare"] = med(a / b for a, b in zip(wall["pythae"], wall["bare"]))
    out["ratios"] = ratios
    return out


# ----------------------------------------------------------------------------- likelihood
def train_gentrain(train: Path, run_dir: Path, steps: int, threads: int, seed: int = 0) -> dict:
    if run_dir.exists():
        shutil.rmtree(run_dir)
    gentrain = Path(sys.executable).parent / "gentrain"
    cmd = [str(gentrain) if gentrain.exists() else sys.executable, *([] if gentrain.exists() else ["-m", "launcher.cli"]),
           "train", str(PRESET), f"data.shards={train}", f"run.dir={run_dir}", "run.name=bench-vae-gentrain",
           f"trainer.max_steps={steps}", "trainer.precision=fp32", "wandb.mode=disabled", "trainer.progress=false",
           f"trainer.sample_every={steps}", f"trainer.ckpt_every={steps}", f"run.seed={seed}"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=REPO, env=env, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    sps = [r["samples_per_sec"] for r in rows if "samples_per_sec" in r]
    return {"steps": steps, "samples": steps * 64, "wall_s": wall,
            "logged_samples_per_s_median": statistics.median(sps[1:] or sps) if sps else None}


def _train_pythae(spec: dict, conn) -> None:
    try:
        _worker_setup(spec["threads"])
        from safetensors.torch import save_file

        images = load_images(Path(spec["train"]))
        n, steps, epochs = len(images), spec["steps"], spec["epochs"]
        per_epoch = math.ceil(n / spec["batch"])
        system = PythaeSystem(spec["batch"], spec["lr"], spec["betas"], epochs=epochs, out_dir=spec["out_dir"],
                              seed=spec.get("seed", 0))
        t0 = time.perf_counter()
        system.pipeline(images.float() / 255.0)
        wall = time.perf_counter() - t0
        run_dir = Path(spec["run_dir"])
        ckpt = run_dir / "checkpoints" / f"step-{steps:07d}"
        ckpt.mkdir(parents=True, exist_ok=True)
        save_file({f"vae.{k}": v.detach().contiguous() for k, v in system.net.state_dict().items()},
                  str(ckpt / "weights.safetensors"))
        (ckpt / "COMPLETE").write_text(json.dumps({"step": steps, "kind": "vae", "source": "pythae"}))
        (run_dir / "checkpoints" / "latest").write_text(ckpt.name)
        conn.send({"steps": epochs * per_epoch, "samples": epochs * n, "epochs": epochs, "wall_s": wall,
                   "samples_per_s": epochs * n / wall})
    except Exception as exn:  # noqa: BLE001
        import traceback

        conn.send({"error": f"{type(exn).__name__}: {exn}", "traceback": traceback.format_exc()})
    finally:
        conn.close()


def train_pythae(spec: dict, run_dir: Path, like: Path) -> dict:
    """Train pythae in its own process and write its weights as a gentrain run directory."""
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    text = (like / "config.yaml").read_text().replace("bench-vae-gentrain", "bench-vae-pythae")
    (run_dir / "config.yaml").write_text(text)
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    p = ctx.Process(target=_train_pythae, args=({**spec, "run_dir": str(run_dir), "out_dir": str(run_dir / "pythae")}, child))
    p.start()
    child.close()
    msg = parent.recv()
    p.join(timeout=60)
    if "error" in msg:
        raise RuntimeError(f"pythae training failed: {msg['error']}\n{msg.get('traceback', '')}")
    return msg


def likelihood(spec: dict, steps: int, k: int, root: Path) -> dict:
    from trainers.judge.evaluation import evaluate

    train, test = Path(spec["train"]), Path(spec["test"])
    g_dir, p_dir = root / "nll-gentrain", root / "nll-pythae"
    # pythae trains whole epochs (the last batch of each partial): match the number of samples.
    n = int(json.loads((train / "manifest.json").read_text()).get("num_samples", 0)) or len(load_images(train))
    epochs = max(1, round(steps * spec["batch"] / n))
    steps = max(1, round(epochs * n / spec["batch"]))
    print(f"[bench-vae] training gentrain for {steps} steps", flush=True)
    g_train = train_gentrain(train, g_dir, steps, spec["threads"], spec.get("seed", 0))
    print(f"[bench-vae] training pythae for {epochs} epochs of {n} images", flush=True)
    p_train = train_pythae({**spec, "steps": steps, "epochs": epochs}, p_dir, like=g_dir)
    out = {"train": {"gentrain": g_train, "pythae": p_train}, "k": k, "seed": spec.get("seed", 0), "eval": {}}
    for name, run_dir in (("gentrain", g_dir), ("pythae", p_dir)):
        metrics = evaluate(run_dir, str(test), root / f"metrics-{name}.json", k=k, seed=0)
        out["eval"][name] = {key: metrics[key] for key in (f"iw_nll_k{k}", "neg_elbo", "recon_nll", "kl",
                                                           "active_units", "num_samples") if key in metrics}
    out["iw_nll_gentrain_minus_pythae"] = out["eval"]["gentrain"][f"iw_nll_k{k}"] - out["eval"]["pythae"][f"iw_nll_k{k}"]
    return out


# ----------------------------------------------------------------------------- report
def markdown(res: dict) -> str:
    lines = []
    tp = res.get("throughput") or {"load_avg_1min": [os.getloadavg()[0]], "samples_per_s": {}, "samples_per_cpu_s": {},
                                   "ratios": {}}
    lines += [f"# gentrain VAE vs pythae {res['pythae_version']} (digits 32x32, ConvVAE latent 16, batch 64, fp32)", "",
              f"`{res['command']}`, {res['threads']} torch thread(s) per process, {res['rounds']} rounds x "
              f"{res['steps_per_round']} steps, wall {res['seconds']:.0f} s; 1-min load average during the rounds "
              f"{min(tp['load_avg_1min']):.1f}-{max(tp['load_avg_1min']):.1f} on {res['machine']['cpus']} cores.", "",
              "| system | samples/s (median) | samples per CPU-second | vs pythae | vs bare loop | page faults/step |",
              "|---|---:|---:|---:|---:|---:|"]
    r = tp["ratios"]
    for name in tp["samples_per_s"]:
        vs_p = r.get(f"{name}/pythae", 1.0 if name == "pythae" else None)
        vs_b = r.get(f"{name}/bare", r.get("pythae/bare") if name == "pythae" else (1.0 if name == "bare" else None))
        fmt = lambda v: "" if v is None else f"{v:.3f}x"  # noqa: E731
        pf = tp.get("minor_page_faults_per_step", {}).get(name)
        lines.append(f"| {name} | {tp['samples_per_s'][name]:.0f} | {tp['samples_per_cpu_s'][name]:.0f} | {fmt(vs_p)} | "
                     f"{fmt(vs_b)} | {'' if pf is None else f'{pf:.0f}'} |")
    lines += ["", "Ratios are medians over rounds of paired ratios (each round runs every system back to back, "
              "order rotating); samples/s and samples per CPU-second are medians over rounds."]
    if "likelihood" in res:
        lk = res["likelihood"]
        k = lk["k"]
        lines += ["", f"## Held-out likelihood (digits test split, same `trainers.judge.evaluation` code, K={k})", "",
                  "| system | train steps | train samples | train samples/s (end to end) | IW-NLL (nats) | -ELBO (nats) | active units |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        g, p = lk["train"]["gentrain"], lk["train"]["pythae"]
        rows = (("gentrain", g["steps"], g["samples"], g.get("logged_samples_per_s_median")),
                ("pythae", p["steps"], p["samples"], p.get("samples_per_s")))
        for name, st, sa, sps in rows:
            e = lk["eval"][name]
            lines.append(f"| {name} | {st} | {sa} | {sps:.0f} | {e[f'iw_nll_k{k}']:.2f} | {e['neg_elbo']:.2f} | {e.get('active_units', '')} |")
        lines += ["", f"IW-NLL gentrain - pythae: {lk['iw_nll_gentrain_minus_pythae']:+.2f} nats (lower is better)."]
    return "\n".join(lines) + "\n"


def run(quick: bool = False, threads: int = 1, steps: int | None = None, rounds: int | None = None,
        k_steps: int | None = None, iw_k: int | None = None, ablation: bool = False, root: Path | None = None,
        out_json: Path | None = None, out_md: Path | None = None, command: str = "", nll: bool = True,
        throughput_part: bool = True, seed: int = 0) -> dict:
    t_start = time.perf_counter()
    os.environ["OMP_NUM_THREADS"] = str(threads)
    version = ensure_pythae()
    root = Path(root or Path(tempfile.gettempdir()) / "gentrain-bench-vae")
    root.mkdir(parents=True, exist_ok=True)
    train, test = build_data(root / "data", cap=256 if quick else None)
    from configs import load_config

    preset = load_config(str(PRESET))
    spec = {"threads": threads, "train": str(train), "test": str(test), "root": str(root),
            "batch": int(preset.data.batch_size), "lr": float(preset.optim.lr), "betas": list(preset.optim.betas),
            "steps": k_steps or (1 if quick else 10), "warmup": 1 if quick else 2, "seed": seed}
    systems = ["gentrain", "bare", "pythae"]
    if ablation:
        systems[1:1] = ["gentrain_plain"] + [f"gentrain+{k.rsplit('.', 1)[1]}" for k, _, _ in SPEED_OPTIONS]
    rounds = rounds or (2 if quick else 15)
    res = {"command": command or "python -m bench.vae_vs_pythae", "pythae_version": version, "threads": threads,
           "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
           "rounds": rounds, "steps_per_round": spec["steps"], "batch_size": spec["batch"],
           "systems": systems, "gentrain_overrides": {s: gentrain_overrides(s) for s in systems if s.startswith("gentrain")}}
    res["targets"] = {}
    if throughput_part:
        res["throughput"] = throughput(systems, spec, rounds)
        res["targets"].update({"throughput_vs_pythae_min": 1.2,
                               "throughput_met": res["throughput"]["ratios"].get("gentrain/pythae", 0) >= 1.2})
    if nll:
        res["likelihood"] = likelihood(spec, steps or (4 if quick else 800), iw_k or (4 if quick else 64), root / "nll")
        res["targets"]["iw_nll_met"] = res["likelihood"]["iw_nll_gentrain_minus_pythae"] <= 0
    res["seconds"] = time.perf_counter() - t_start
    out_json = Path(out_json or REPO / "bench" / "vae_pythae.json")
    out_md = Path(out_md or REPO / "bench" / "vae_pythae.md")
    out_json.write_text(json.dumps(res, indent=1))
    out_md.write_text(markdown(res))
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny budgets (smoke test)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process (default 1)")
    ap.add_argument("--steps", type=int, default=None, help="training steps for the likelihood runs (default 800)")
    ap.add_argument("--rounds", type=int, default=None, help="throughput rounds (default 15)")
    ap.add_argument("--k-steps", type=int, default=None, help="steps per system per round (default 10)")
    ap.add_argument("--iw-k", type=int, default=None, help="importance samples of the IW-NLL bound (default 64)")
    ap.add_argument("--ablation", action="store_true", help="also time gentrain with its speed options added one by one")
    ap.add_argument("--no-nll", action="store_true", help="throughput only (no training runs, no IW-NLL)")
    ap.add_argument("--no-throughput", action="store_true", help="likelihood only")
    ap.add_argument("--seed", type=int, default=0, help="seed of both likelihood runs (gentrain's run.seed, pythae's seed)")
    ap.add_argument("--root", type=Path, default=None, help="work directory (data, runs)")
    ap.add_argument("--out", type=Path, default=None, help="JSON output (default bench/vae_pythae.json)")
    args = ap.parse_args(argv)
    out_md = args.out.with_suffix(".md") if args.out else None
    res = run(args.quick, args.threads, args.steps, args.rounds, args.k_steps, args.iw_k, args.ablation, args.root,
              args.out, out_md, command="python -m bench.vae_vs_pythae " + " ".join(argv if argv is not None else sys.argv[1:]),
              nll=not args.no_nll, throughput_part=not args.no_throughput, seed=args.seed)
    print(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
