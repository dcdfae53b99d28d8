"""The `gentrain` command: shards, train, launch, sample, export.

Bad usage or a bad config exits with code 2 and one line on stderr; a run stopped by a
preemption signal exits with 75 after checkpointing (requeue it).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys

EXIT_USAGE = 2

EPILOG = """examples:
  gentrain shards build digits --out data/digits
  gentrain train configs/vae_digits.yaml trainer.max_steps=200
  gentrain launch --nproc-per-node 2 configs/gan_digits.yaml optim.d.lr=2e-4 data.batch_size=64
  gentrain sample runs/gan_digits --n 64 --out samples.npz
  gentrain export runs/gan_digits --out gan.safetensors
"""


SHARDS_BUILD_HELP = """\
sources:
  digits, stacked-digits   scikit-learn's shipped 8x8 digits (labelled; stacked: 3 digits as RGB)
  ring8, grid25            2-D Gaussian mixtures (KEY.npy points)
  photos                   labelled crops of the 16 photographs shipped in scikit-image, scikit-learn
                           and matplotlib (KEY.cls = photo index; manifest 'classes' = photo names)
  folder:PATH              any tree of images; first-level sub-folders are classes
  pairs:sr4:SOURCE         KEY.src.png = KEY.tgt.png downscaled 4x (PIL bicubic); SOURCE: photos,
                           digits, stacked-digits or folder:PATH
  pairs:edges:SOURCE       KEY.src.png = Sobel edge sketch of KEY.tgt.png
  pairs:folder:PATH        your aligned pairs: PATH/src/NAME.* + PATH/tgt/NAME.*, or PATH/NAME_src.* +
                           PATH/NAME_tgt.*; unmatched files are skipped and listed in the manifest
examples:
  gentrain shards build photos --out data/photos --split train
  gentrain shards build photos --out data/photos_test --split test
  gentrain shards build pairs:sr4:photos --out data/sr4 --image-size 64
  gentrain shards build pairs:folder:my_pairs --out data/my_pairs --image-size 128
"""


class UsageError(Exception):
    """Wrong usage the user can fix; printed as one line, exit code 2."""


def _fail(message: str) -> int:
    print(f"gentrain: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def load_run_config(path, overrides):
    """The config of a run to start: load_config, with what it leaves unset (image size, channels,
    class count) read from the shards' manifest; notes where the two disagree, once per job."""
    from configs import load_config

    notes = []
    cfg = load_config(path, overrides, manifest_of=_manifest_or_none, notes=notes)
    if os.environ.get("RANK", "0") == "0":
        for note in notes:
            print(f"gentrain: note: {note}", file=sys.stderr, flush=True)
    return cfg


def _manifest_or_none(spec):
    from data_shards.stream import find_manifest

    try:
        return find_manifest(spec)
    except Exception:  # noqa: BLE001 - shards not reachable from here (yet): the trainers will say so
        return None


# ---- subcommands ---------------------------------------------------------------------------
def cmd_shards_build(args) -> int:
    from data_shards.build import build_shards, parse_labels

    labels = parse_labels(args.labels)
    try:  # --out DIR, or s3://BUCKET/prefix (each shard uploaded when written, manifest.json last)
        manifest = build_shards(args.source, args.out, shard_size=args.shard_size, image_size=args.image_size,
                                seed=args.seed, image_format=args.format, progress=not args.quiet,
                                num_samples=args.num_samples, split=args.split, labels=labels)
    except OSError as err:
        if not str(args.out).lower().startswith("s3://"):
            raise
        return _fail(str(err).splitlines()[0])
    size = (f"input {manifest['src_size']} -> target {manifest['tgt_size']}" if manifest.get("paired")
            else f"size {manifest.get('image_size')}")
    print(f"wrote {manifest['num_samples']} samples in {manifest['num_shards']} shard(s) to {args.out} "
          f"({manifest['source']}, {manifest.get('kind')}, {size})")
    return 0


def cmd_train(args) -> int:
    from trainers.runtime.abort import die_with_parent

    die_with_parent()  # started by a launcher: never outlive it (torchrun's workers have sessions of their own)
    cfg = load_run_config(args.config, args.overrides)
    _apply_resume_flag(cfg, args.resume)
    return _train_one_job(cfg)


def _env_rank_world() -> tuple[int, int]:
    """This process's rank and world size as its launcher set them (before torch.distributed)."""
    env = os.environ
    rank = env.get("RANK", env.get("SLURM_PROCID", "0"))
    world = env.get("WORLD_SIZE", env.get("SLURM_NTASKS", "1"))
    return int(rank), int(world)


def _train_one_job(cfg) -> int:
    """train(cfg) as one job of its run directory, whose failure on any rank stops every rank.

    Rank 0 takes RUN_DIR/.lock before anything is written (a live job's lock: one line, exit 2 on
    every rank, nothing touched); a guard on every rank turns an exception on any rank into the end
    of the whole job within seconds (trainers.runtime.abort.JobGuard). The lock is released when
    train returns (0 or 75) and when it fails.
    """
    from trainers.runtime.run_lock import RunLock, RunLocked

    rank, world = _env_rank_world()
    lock, refused = None, None
    if rank == 0:
        try:
            lock = RunLock(cfg.run.dir).acquire()
        except RunLocked as err:
            refused = _fail(str(err))  # at once, before the process group (and its seconds of setup)
        if lock is not None and lock.took_over:
            from trainers.runtime.run_lock import describe

            print(f"[gentrain] took over the lock of a job that is gone ({describe(lock.took_over)})", flush=True)
    try:
        if refused is not None and world == 1:
            return refused
        from trainers.loop import train  # heavy imports only once the config is known to be good
        from trainers.runtime.abort import JobGuard
        from trainers.runtime.distributed import any_rank, init_distributed, shutdown

        dist_info = init_distributed()
        if world > 1 and any_rank(refused is not None, dist_info.device):  # every rank leaves, nothing written
            shutdown()
            return EXIT_USAGE
        guard = JobGuard.for_default_group(dist_info)
        if lock is not None:
            guard.cleanups.append(lock.release)
            lock.on_lost = guard.stop_job  # someone took the run over: two jobs must not write it
        with guard:
            return train(cfg)
    finally:
        if lock is not None:
            lock.release()


def _apply_resume_flag(cfg, resume: str | None) -> None:
    if resume is not None:
        from omegaconf import OmegaConf

        OmegaConf.set_readonly(cfg, False)
        cfg.trainer.resume = resume
        OmegaConf.set_readonly(cfg, True)


def cmd_launch(args) -> int:
    from launcher import resources
    from launcher.resources import LaunchError

    try:
        return _launch(args, resources)
    except LaunchError as err:
        raise UsageError(str(err)) from None


def _warn(message: str) -> None:
    print(f"gentrain: warning: {message}", file=sys.stderr)


def _launch(args, resources) -> int:
    overrides = list(args.overrides)
    cfg = load_run_config(args.config, overrides)  # fail here, before any process starts
    if not args.dry_run:  # one run directory, one job: a live job's lock stops us before anything starts
        from trainers.runtime.run_lock import RunLocked, check_free

        try:
            check_free(cfg.run.dir, same_rdzv_id=args.rdzv_id if args.nnodes > 1 else None)
        except RunLocked as err:
            raise UsageError(str(err)) from None
    if args.backend == "slurm" and args.nproc_per_node is None:
        nproc = args.gpus_per_node or 1  # one process per GPU
    else:
        nproc = 1 if args.nproc_per_node is None else args.nproc_per_node
    hosts = None
    if args.backend == "deepspeed":
        hosts = _deepspeed_hosts(args, nproc)
        nnodes, world = len(hosts), sum(slots for _, slots in hosts)
    else:
        nnodes = args.nnodes
        world = resources.check_world(nnodes, nproc)
    if args.global_batch_size is not None:
        if any(o.split("=", 1)[0].strip() == "data.batch_size" for o in overrides):
            raise UsageError("give either --global-batch-size or data.batch_size=..., not both")
        per_process = resources.check_global_batch(args.global_batch_size, cfg.data.batch_size, world)
        overrides.append(f"data.batch_size={per_process}")
    else:
        per_process = resources.check_global_batch(None, cfg.data.batch_size, world)

    if args.backend == "slurm":
        warnings = resources.check_cluster_request(nproc, args.gpus_per_node or 0, args.cpus_per_task)
    elif args.backend == "deepspeed" and not _hostfile_mod().only_this_machine(hosts):
        warnings = []  # the GPUs are on the other hosts; the deepspeed launcher checks them there
    else:
        warnings = resources.check_local_devices(resources.detect(), nproc, args.gpus_per_node)
    for warning in warnings:
        _warn(warning)

    train_args = [args.config, *overrides] + (["--resume", args.resume] if args.resume else [])
    summary = (f"# world size {world} ({nnodes} node(s) x {nproc if hosts is None else '/'.join(str(s) for _, s in hosts)}"
               f" process(es)), {per_process} samples per process per step = {per_process * world} per step, "
               f"run dir {cfg.run.dir}")
    if args.backend == "slurm":
        return _launch_slurm(args, cfg, nproc, train_args, summary, resources)
    if args.backend == "deepspeed":
        return _launch_deepspeed(args, cfg, hosts, train_args, summary)
    return _launch_torchrun(args, nproc, train_args, summary)


def _hostfile_mod():
    from launcher import hostfile

    return hostfile


def _deepspeed_hosts(args, nproc: int) -> list[tuple[str, int]]:
    hostfile = _hostfile_mod()
    if args.hosts:
        return hostfile.parse_hosts(args.hosts, nproc)
    if os.environ.get("SLURM_JOB_NODELIST"):
        from launcher.slurm import allocation_hosts

        return [(host, nproc) for host in allocation_hosts()]
    if args.nnodes > 1:
        raise UsageError("--backend deepspeed with --nnodes > 1 needs --hosts a,b,... (or run inside a SLURM allocation)")
    return [("localhost", nproc)]


def _launch_torchrun(args, nproc: int, train_args: list[str], summary: str) -> int:
    from launcher.torchrun import DEFAULT_MASTER_PORT, TorchrunSpec, torchrun_command

    spec = TorchrunSpec(nproc_per_node=nproc, nnodes=args.nnodes, node_rank=args.node_rank,
                        master_addr=args.master_addr or "127.0.0.1", master_port=args.master_port or DEFAULT_MASTER_PORT,
                        rdzv_endpoint=args.rdzv_endpoint, rdzv_id=args.rdzv_id, max_restarts=args.max_restarts,
                        local_addr=args.local_addr, train_args=train_args)
    if args.nnodes > 1 and not args.rdzv_endpoint and not args.master_addr:
        raise UsageError("--nnodes > 1 needs --rdzv-endpoint HOST:PORT or --master-addr (and --node-rank on each node)")
    if not 0 <= args.node_rank < args.nnodes:
        raise UsageError(f"--node-rank {args.node_rank} is outside 0..{args.nnodes - 1}")
    cmd = torchrun_command(spec)
    if args.dry_run:
        print(shlex.join(cmd))
        print(summary)
        return 0
    env = dict(os.environ)
    from launcher.resources import cpu_count

    env.setdefault("OMP_NUM_THREADS", str(max(1, cpu_count() // nproc)))
    print(f"[gentrain] launch: {shlex.join(cmd)}", file=sys.stderr, flush=True)
    return _run_launcher(cmd, env)


def _run_launcher(cmd: list[str], env: dict) -> int:
    """Run the launcher (torchrun wrapper, deepspeed) as our child; it is SIGKILLed if we die, and its
    trainers follow it (they die with their launcher): killing `gentrain launch` ends the job."""
    from trainers.runtime.abort import preexec_die_with_parent

    return subprocess.call(cmd, env=env, preexec_fn=preexec_die_with_parent())


def _launch_slurm(args, cfg, nproc: int, train_args: list[str], summary: str, resources) -> int:
    from launcher import slurm

    submit = not (args.dry_run or args.no_submit)
    if submit:
        missing = resources.missing_slurm_tools()
        if missing:
            raise UsageError(f"--backend slurm needs {', '.join(missing)} on PATH (not found); "
                             "use --dry-run or --no-submit to only write the sbatch script")
    spec = slurm.SlurmSpec(job_name=args.job_name or cfg.run.name, run_dir=str(cfg.run.dir), workdir=os.getcwd(),
                           nnodes=args.nnodes, nproc_per_node=nproc, gpus_per_node=args.gpus_per_node or 0,
                           cpus_per_task=args.cpus_per_task, time=args.time, partition=args.partition,
                           account=args.account, qos=args.qos, signal_grace=args.signal_grace,
                           rdzv_port=args.master_port, max_restarts=args.max_restarts, train_args=train_args,
                           extra_sbatch=list(args.sbatch_arg or []),
                           command_line="gentrain " + shlex.join(sys.argv[1:]) if sys.argv[1:2] == ["launch"] else "")
    path = slurm.script_path(slurm._abs(spec.run_dir, spec.workdir))
    if args.dry_run:
        print(f"# {path}")
        print(slurm.render_sbatch(spec), end="")
        print(f"# submit: {shlex.join(slurm.sbatch_command(path))}")
        print(summary)
        return 0
    path = slurm.write_script(spec)
    if not submit:
        print(f"wrote {path}; submit it with: {shlex.join(slurm.sbatch_command(path))}")
        return 0
    try:
        job_id = slurm.submit(path)
    except RuntimeError as err:
        raise UsageError(str(err)) from None
    log = path.parent / f"slurm-{job_id}.out"
    print(f"submitted job {job_id} ({args.nnodes} node(s) x {nproc} process(es)); script {path}; log {log}")
    print(job_id)
    return 0


def _launch_deepspeed(args, cfg, hosts, train_args: list[str], summary: str) -> int:
    from pathlib import Path

    from launcher.torchrun import DEFAULT_MASTER_PORT

    hostfile = _hostfile_mod()
    path = Path(cfg.run.dir) / "launch" / "hostfile"
    # Only this machine in the hostfile: no ssh needed (deepspeed would otherwise ssh to localhost).
    no_ssh = args.no_ssh or hostfile.only_this_machine(hosts)
    cmd = hostfile.deepspeed_command(path, hosts, args.master_addr, args.master_port or DEFAULT_MASTER_PORT,
                                     train_args, launcher=args.deepspeed_launcher,
                                     no_ssh_node_rank=args.node_rank if no_ssh else None)
    if args.dry_run:
        print(f"# {path}:")
        print("".join(f"#   {line}\n" for line in hostfile.render_hostfile(hosts).splitlines()), end="")
        print(shlex.join(cmd))
        print(summary)
        return 0
    hostfile.write_hostfile(cfg.run.dir, hosts)
    env = dict(os.environ)
    from launcher.resources import cpu_count

    env.setdefault("OMP_NUM_THREADS", str(max(1, cpu_count() // max(slots for _, slots in hosts))))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [os.getcwd(), env.get("PYTHONPATH")]))
    print(f"[gentrain] launch: {shlex.join(cmd)}", file=sys.stderr, flush=True)
    return _run_launcher(cmd, env)


def cmd_sample(args) -> int:
    from trainers.judge.inference import sample_to_npz

    path = sample_to_npz(args.run_dir, args.n, args.out, seed=args.seed, class_index=args.class_index)
    which = f" of class {args.class_index}" if args.class_index is not None else ""
    print(f"wrote {args.n} samples{which} to {path}")
    return 0


def cmd_evaluate(args) -> int:
    from trainers.judge.evaluation import evaluate

    from trainers.judge.quality import parse_metrics

    metrics = evaluate(args.run_dir, args.shards or _run_shards(args.run_dir), args.out, k=args.k,
                       num_samples=args.num_samples, seed=args.seed, metrics=parse_metrics(args.metrics),
                       extractor=args.extractor)
    print(json.dumps(metrics, indent=1))
    print(f"wrote {args.out}")
    return 0


def cmd_anomaly(args) -> int:
    from data_shards.build import parse_labels
    from trainers.judge.evaluation import anomaly_scores

    summary = anomaly_scores(args.run_dir, args.shards, args.out, normal_labels=parse_labels(args.normal_labels), k=args.k)
    print(json.dumps(summary, indent=1))
    return 0


def cmd_encode(args) -> int:
    from trainers.judge.evaluation import encode

    n = encode(args.run_dir, args.shards, args.out)
    print(f"wrote posterior mean and std of {n} samples to {args.out}")
    return 0


def _run_shards(run_dir: str):
    from omegaconf import OmegaConf

    return OmegaConf.load(os.path.join(run_dir, "config.yaml")).data.shards


def cmd_export(args) -> int:
    from trainers.judge.inference import export_weights

    path, facts = export_weights(args.run_dir, args.out, fmt=args.format, shards=args.shards,
                                 max_samples=args.max_samples)
    extra = (f" (scaling_factor {float(facts['scaling_factor']):.5g} over {facts['scaling_factor_samples']} samples)"
             if "scaling_factor" in facts else "")
    print(f"exported {args.run_dir} to {path}{extra}")
    return 0


def cmd_translate(args) -> int:
    from trainers.judge.translate import translate_path

    written, scale = translate_path(args.run_dir, args.inp, args.out, tile=args.tile, overlap=args.overlap,
                                    progress=not args.quiet)
    print(f"wrote {len(written)} image(s) to {args.out} ({scale}x)")
    return 0


def cmd_report(args) -> int:
    from trainers.judge.report import build_report, claims_text
    from data_shards.build import parse_labels

    anomaly = sorted(parse_labels(args.anomaly_labels)) if args.anomaly_labels else None
    report = build_report(args.run_dirs, args.out, shards=args.shards, n=args.num_samples, extractor=args.extractor,
                          seed=args.seed, k=args.k, anomaly=anomaly, wandb=args.wandb,
                          command="gentrain " + shlex.join(sys.argv[1:]) if sys.argv[1:2] == ["report"] else None)
    print(claims_text(report.claims))
    print(f"wrote {report.path} ({len(report.runs)} runs, {report.seconds:.0f} s; numbers in {report.json_path})")
    return 0


# ---- parser ---------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gentrain", description="Train VAEs and GANs on sharded images with DeepSpeed.",
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    sub = parser.add_subparsers(dest="command", required=True)

    shards = sub.add_parser("shards", help="build WebDataset shards").add_subparsers(dest="shards_command", required=True)
    build = shards.add_parser("build", help="write tars + manifest.json from a source",
                              formatter_class=argparse.RawDescriptionHelpFormatter, description=SHARDS_BUILD_HELP)
    build.add_argument("source", help="digits, stacked-digits, ring8, grid25, photos, folder:PATH, "
                                      "pairs:sr4:SOURCE, pairs:edges:SOURCE or pairs:folder:PATH")
    build.add_argument("--out", required=True, help="output directory")
    build.add_argument("--shard-size", type=int, default=256, help="samples per tar (default 256)")
    build.add_argument("--image-size", type=int, default=None,
                       help="square image size; pairs: the target's (defaults: digits 32, stacked-digits 16, "
                            "photos 64, folder 64; pairs take their inner source's; sr4 needs a multiple of 4)")
    build.add_argument("--format", choices=["png", "jpg"], default="png",
                       help="image encoding (jpg: quality 90); pairs use it for both members")
    build.add_argument("--seed", type=int, default=0)
    build.add_argument("--num-samples", type=int, default=None,
                       help="samples for generated sources (photos: 6000, 1200 for --split test; stacked-digits "
                            "30000; ring8/grid25 50000); a cap for digits and folders")
    build.add_argument("--split", choices=["all", "train", "test"], default="all",
                       help="train: 80%% of the seeded order; test: the held-out 20%%; photos: test crops from "
                            "each photo's bottom-right 45%%x45%% block, train crops never touch it")
    build.add_argument("--labels", default=None, help="keep only these labels, e.g. 0-8 or 0,3,7")
    build.add_argument("--quiet", action="store_true", help="no progress bar")
    build.set_defaults(func=cmd_shards_build)

    resume_help = "auto (default: continue from the run's latest checkpoint), never, or a checkpoint path"
    train = sub.add_parser("train", help="run training in this process (what torchrun/srun start)")
    train.add_argument("config", help="YAML preset (path or shipped name, e.g. gan_digits)")
    train.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
    train.add_argument("--resume", default=None, help=resume_help)
    train.set_defaults(func=cmd_train)

    launch = sub.add_parser(
        "launch", help="start a (multi-process, multi-node) training job: local torchrun, SLURM or deepspeed",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="backends:\n"
               "  local      torchrun on this node (--nnodes>1: one launch per node, with --rdzv-endpoint or\n"
               "             --master-addr/--node-rank)\n"
               "  slurm      writes RUN_DIR/launch/sbatch.sh (one torchrun per node via srun, requeue on\n"
               "             preemption) and submits it with sbatch; prints the job id\n"
               "  deepspeed  writes RUN_DIR/launch/hostfile and runs the deepspeed launcher\n"
               "exit codes: 0 done, 2 bad usage/config, 75 checkpointed after a preemption signal (requeue me)")
    launch.add_argument("--backend", choices=["local", "slurm", "deepspeed"], default="local")
    launch.add_argument("--nnodes", type=int, default=1)
    launch.add_argument("--nproc-per-node", type=int, default=None,
                        help="processes per node (default 1; slurm: --gpus-per-node when given)")
    launch.add_argument("--dry-run", action="store_true", help="print what would run (scripts included), run nothing")
    launch.add_argument("--resume", default=None, help=resume_help)
    launch.add_argument("--global-batch-size", type=int, default=None,
                        help="samples per step over all processes; sets data.batch_size = this / world size")
    launch.add_argument("--gpus-per-node", type=int, default=None, help="GPUs per node (checked on local launches)")
    group = launch.add_argument_group("multi-node torchrun (local backend)")
    group.add_argument("--node-rank", type=int, default=0)
    group.add_argument("--master-addr", default=None, help="static rendezvous host (with --node-rank); "
                       "deepspeed: address of the first host")
    group.add_argument("--master-port", type=int, default=None,
                       help="port (default 29500; slurm: rendezvous port, default 20000 + job id %% 20000)")
    group.add_argument("--rdzv-endpoint", default=None, help="host:port for c10d rendezvous (same on every node)")
    group.add_argument("--rdzv-id", default=None, help="c10d rendezvous id (same on every node)")
    group.add_argument("--local-addr", default=None, help="this node's address as the other nodes reach it "
                       "(default: its hostname)")
    group.add_argument("--max-restarts", type=int, default=0, help="torchrun restarts of failed workers")
    group = launch.add_argument_group("slurm backend")
    group.add_argument("--partition", default=None)
    group.add_argument("--account", default=None)
    group.add_argument("--qos", default=None)
    group.add_argument("--time", default=None, help="time limit, e.g. 24:00:00 or 2-00:00:00")
    group.add_argument("--cpus-per-task", type=int, default=None, help="CPU cores per node (one task per node)")
    group.add_argument("--signal-grace", type=int, default=120,
                       help="seconds before the time limit at which SLURM sends SIGUSR1 (default 120)")
    group.add_argument("--job-name", default=None, help="default: run.name")
    group.add_argument("--sbatch-arg", action="append", metavar="ARG",
                       help="extra #SBATCH line, e.g. --sbatch-arg=--exclusive (repeatable)")
    group.add_argument("--no-submit", action="store_true", help="write the sbatch script, do not submit it")
    group = launch.add_argument_group("deepspeed backend")
    group.add_argument("--hosts", default=None, help="a,b or a:8,b:8 (HOST:SLOTS); default: the SLURM "
                       "allocation, else localhost")
    group.add_argument("--no-ssh", action="store_true", help="start only this host's processes (as --node-rank); "
                       "run the same command on every host. Automatic when the hosts are all this machine")
    group.add_argument("--deepspeed-launcher", default=None, help="deepspeed's --launcher (pdsh, openmpi, slurm, ...)")
    launch.add_argument("config")
    launch.add_argument("overrides", nargs="*")
    launch.set_defaults(func=cmd_launch)

    sample = sub.add_parser("sample", help="write generated samples (EMA generator where there is one) to .npz")
    sample.add_argument("run_dir")
    sample.add_argument("--n", type=int, default=64)
    sample.add_argument("--out", required=True)
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--class", dest="class_index", type=int, default=None,
                        help="class-conditional GAN: only this class (default: every class equally often)")
    sample.set_defaults(func=cmd_sample)

    export = sub.add_parser("export", help="export the latest checkpoint's weights")
    export.add_argument("run_dir")
    export.add_argument("--out", required=True)
    export.add_argument("--format", choices=["safetensors", "diffusers"], default="safetensors",
                        help="diffusers: a folder for AutoencoderKL.from_pretrained (model.arch=autoencoder_kl)")
    export.add_argument("--shards", default=None,
                        help="VAE: shards the latents' scaling factor is measured on (default: the training shards)")
    export.add_argument("--max-samples", type=int, default=None, help="VAE: measure the scaling factor on at most N")
    export.set_defaults(func=cmd_export)

    translate = sub.add_parser("translate", help="apply a paired run (super-resolution, edges -> photo) to images")
    translate.add_argument("run_dir")
    translate.add_argument("--in", dest="inp", required=True, help="a PNG/JPEG file or a directory of them")
    translate.add_argument("--out", required=True, help="output directory (file names and formats kept)")
    translate.add_argument("--tile", type=int, default=256,
                           help="larger images run in tiles of this many input pixels a side (default 256)")
    translate.add_argument("--overlap", type=int, default=None, help="tile overlap in input pixels (default tile/4)")
    translate.add_argument("--quiet", action="store_true", help="no progress bar")
    translate.set_defaults(func=cmd_translate)

    evaluate = sub.add_parser("evaluate", help="FD, KID, precision/recall, density/coverage against held-out shards; "
                              "VAE: also ELBO, IW NLL bound, PSNR/SSIM; GAN: class coverage")
    evaluate.add_argument("run_dir")
    evaluate.add_argument("--shards", default=None, help="held-out shards (default: the run's data.shards)")
    evaluate.add_argument("--out", required=True, help="metrics.json")
    evaluate.add_argument("--k", type=int, default=64, help="importance samples for the NLL bound (VAE)")
    evaluate.add_argument("--n", "--num-samples", dest="num_samples", type=int, default=5000,
                          help="images a side for the set metrics (real from the shards, generated)")
    evaluate.add_argument("--metrics", default="fd,kid,pr,dc",
                          help="any of fd (Frechet distance), kid, pr (precision/recall), dc (density/coverage)")
    evaluate.add_argument("--extractor", default="random",
                          help="random (fixed-seed conv net, the default offline), domain (a classifier fitted on "
                               "the run's training shards, kept in RUN_DIR/judge/) or inception:PATH (the FID "
                               "Inception weights file, sha256-checked: fd_inception compares with published FIDs)")
    evaluate.add_argument("--seed", type=int, default=0)
    evaluate.set_defaults(func=cmd_evaluate)

    report = sub.add_parser("report", help="one self-contained HTML page comparing VAE and GAN runs on the same images",
                            description="Measures every run on the same reference images (FD/KID, precision/recall, "
                                        "per-class coverage, sharpness, latent paths, VAE likelihood/reconstructions/"
                                        "anomaly AUROC), reads stability and cost from metrics.jsonl, and writes one "
                                        "HTML file (images embedded, no network) with the claims table "
                                        "'claim | measured | holds?', plus the numbers as JSON beside it.")
    report.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    report.add_argument("--out", required=True, help="report.html (its numbers and claims go to report.json beside it)")
    report.add_argument("--shards", default=None,
                        help="reference (held-out) shards every run is measured on (default: the first run's data.shards)")
    report.add_argument("--n", "--num-samples", dest="num_samples", type=int, default=500,
                        help="reference images, and samples per run (default 500)")
    report.add_argument("--extractor", default="random", help="features for FD/KID/PR/DC, as for evaluate: random, "
                        "domain or inception:PATH")
    report.add_argument("--k", type=int, default=8, help="importance samples for the VAE's likelihood bound")
    report.add_argument("--anomaly-labels", default=None,
                        help="labels the VAE should flag as anomalies, e.g. 9 (default: the reference's labels the "
                             "VAE's training shards lack, else the last label, marked as a proxy)")
    report.add_argument("--wandb", choices=["auto", "offline", "online", "disabled"], default="auto",
                        help="log the table and figures to a new W&B run under the report's folder (auto: when the "
                             "runs logged to W&B, offline unless one was online)")
    report.add_argument("--seed", type=int, default=0)
    report.set_defaults(func=cmd_report)

    anomaly = sub.add_parser("anomaly", help="VAE anomaly scores per sample (scores.csv) and AUROC")
    anomaly.add_argument("run_dir")
    anomaly.add_argument("--shards", required=True)
    anomaly.add_argument("--out", required=True, help="scores.csv")
    anomaly.add_argument("--normal-labels", default=None, help="labels that are normal, e.g. 0-8; others are anomalies")
    anomaly.add_argument("--k", type=int, default=16, help="importance samples for the NLL score")
    anomaly.set_defaults(func=cmd_anomaly)

    encode = sub.add_parser("encode", help="VAE posterior mean and std per sample (latents.npz)")
    encode.add_argument("run_dir")
    encode.add_argument("--shards", required=True)
    encode.add_argument("--out", required=True)
    encode.set_defaults(func=cmd_encode)
    return parser


def main(argv: list[str] | None = None) -> int:
    from configs import ConfigError
    from data_shards.errors import NoValidSamples

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, UsageError, FileNotFoundError, NoValidSamples) as err:
        return _fail(str(err).splitlines()[0] if str(err) else type(err).__name__)
    except ValueError as err:  # builders raise ValueError for bad sources / sizes
        if getattr(args, "command", None) in ("shards", "sample", "export", "evaluate", "anomaly", "encode",
                                              "translate", "report"):
            return _fail(str(err).splitlines()[0])
        raise


if __name__ == "__main__":
    sys.exit(main())
