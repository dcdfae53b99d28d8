"""The `gentrain` command: shards, train, launch, sample, export.

Bad usage or a bad config exits with code 2 and one line on stderr; a run stopped by a
preemption signal exits with 75 after checkpointing (requeue it).
"""
from __future__ import annotations

import argparse
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


class UsageError(Exception):
    """Wrong usage the user can fix; printed as one line, exit code 2."""


def _fail(message: str) -> int:
    print(f"gentrain: error: {message}", file=sys.stderr)
    return EXIT_USAGE


# ---- subcommands ---------------------------------------------------------------------------
def cmd_shards_build(args) -> int:
    from data_shards.build import build_shards

    manifest = build_shards(args.source, args.out, shard_size=args.shard_size, image_size=args.image_size,
                            seed=args.seed, image_format=args.format, progress=not args.quiet)
    print(f"wrote {manifest['num_samples']} samples in {manifest['num_shards']} shard(s) to {args.out} "
          f"({manifest['source']}, {manifest.get('kind')}, size {manifest.get('image_size')})")
    return 0


def cmd_train(args) -> int:
    from configs import load_config

    cfg = load_config(args.config, args.overrides)
    _apply_resume_flag(cfg, args.resume)
    from trainers.loop import train  # heavy imports only once the config is known to be good

    return train(cfg)


def _apply_resume_flag(cfg, resume: str | None) -> None:
    if resume is not None:
        from omegaconf import OmegaConf

        OmegaConf.set_readonly(cfg, False)
        cfg.trainer.resume = resume
        OmegaConf.set_readonly(cfg, True)


def cmd_launch(args) -> int:
    from configs import load_config
    from launcher.torchrun import TorchrunSpec, torchrun_command

    cfg = load_config(args.config, args.overrides)  # fail here, before any process starts
    world = args.nnodes * args.nproc_per_node
    if args.nproc_per_node < 1 or args.nnodes < 1:
        raise UsageError("--nnodes and --nproc-per-node must be >= 1")
    if args.backend != "local":
        raise UsageError(f"backend '{args.backend}' is not available yet; use --backend local")
    train_args = [args.config, *args.overrides] + (["--resume", args.resume] if args.resume else [])
    spec = TorchrunSpec(nproc_per_node=args.nproc_per_node, nnodes=args.nnodes, node_rank=args.node_rank,
                        master_addr=args.master_addr, master_port=args.master_port,
                        rdzv_endpoint=args.rdzv_endpoint, max_restarts=args.max_restarts, train_args=train_args)
    cmd = torchrun_command(spec)
    if args.dry_run:
        print(shlex.join(cmd))
        print(f"# world size {world}, {cfg.data.batch_size} samples per process per step, run dir {cfg.run.dir}")
        return 0
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.nproc_per_node)))
    return subprocess.call(cmd, env=env)


def cmd_sample(args) -> int:
    from trainers.inference import sample_to_npz

    path = sample_to_npz(args.run_dir, args.n, args.out, seed=args.seed)
    print(f"wrote {args.n} samples to {path}")
    return 0


def cmd_export(args) -> int:
    from trainers.inference import export_weights

    path = export_weights(args.run_dir, args.out, fmt=args.format)
    print(f"exported {args.run_dir} to {path}")
    return 0


# ---- parser ---------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gentrain", description="Train VAEs and GANs on sharded images with DeepSpeed.",
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    sub = parser.add_subparsers(dest="command", required=True)

    shards = sub.add_parser("shards", help="build WebDataset shards").add_subparsers(dest="shards_command", required=True)
    build = shards.add_parser("build", help="write tars + manifest.json from a source",
                              description="SOURCE: digits, stacked-digits, ring8, grid25 or folder:PATH")
    build.add_argument("source")
    build.add_argument("--out", required=True, help="output directory")
    build.add_argument("--shard-size", type=int, default=256, help="samples per tar (default 256)")
    build.add_argument("--image-size", type=int, default=None, help="square image size (digits: 32, folder: 64)")
    build.add_argument("--format", choices=["png", "jpg"], default="png", help="image encoding for folder sources")
    build.add_argument("--seed", type=int, default=0)
    build.add_argument("--quiet", action="store_true", help="no progress bar")
    build.set_defaults(func=cmd_shards_build)

    resume_help = "auto (default: continue from the run's latest checkpoint), never, or a checkpoint path"
    train = sub.add_parser("train", help="run training in this process (what torchrun/srun start)")
    train.add_argument("config", help="YAML preset (path or shipped name, e.g. gan_digits)")
    train.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
    train.add_argument("--resume", default=None, help=resume_help)
    train.set_defaults(func=cmd_train)

    launch = sub.add_parser("launch", help="start a (multi-process) training job")
    launch.add_argument("--backend", choices=["local", "slurm", "deepspeed"], default="local")
    launch.add_argument("--nnodes", type=int, default=1)
    launch.add_argument("--nproc-per-node", type=int, default=1)
    launch.add_argument("--node-rank", type=int, default=0)
    launch.add_argument("--master-addr", default="127.0.0.1")
    launch.add_argument("--master-port", type=int, default=29500)
    launch.add_argument("--rdzv-endpoint", default=None, help="host:port for c10d rendezvous")
    launch.add_argument("--max-restarts", type=int, default=0)
    launch.add_argument("--dry-run", action="store_true", help="print what would run, run nothing")
    launch.add_argument("--resume", default=None, help=resume_help)
    launch.add_argument("config")
    launch.add_argument("overrides", nargs="*")
    launch.set_defaults(func=cmd_launch)

    sample = sub.add_parser("sample", help="write generated samples (EMA generator where there is one) to .npz")
    sample.add_argument("run_dir")
    sample.add_argument("--n", type=int, default=64)
    sample.add_argument("--out", required=True)
    sample.add_argument("--seed", type=int, default=0)
    sample.set_defaults(func=cmd_sample)

    export = sub.add_parser("export", help="export the latest checkpoint's weights")
    export.add_argument("run_dir")
    export.add_argument("--out", required=True)
    export.add_argument("--format", choices=["safetensors"], default="safetensors")
    export.set_defaults(func=cmd_export)
    return parser


def main(argv: list[str] | None = None) -> int:
    from configs import ConfigError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, UsageError, FileNotFoundError) as err:
        return _fail(str(err).splitlines()[0] if str(err) else type(err).__name__)
    except ValueError as err:  # builders raise ValueError for bad sources / sizes
        if getattr(args, "command", None) in ("shards", "sample", "export"):
            return _fail(str(err).splitlines()[0])
        raise


if __name__ == "__main__":
    sys.exit(main())
