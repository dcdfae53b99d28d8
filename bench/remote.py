"""Shards over HTTP against the same shards on local disk, and the HTTP server the tests use.

``ShardServer`` serves a directory on 127.0.0.1 over HTTP/1.1 with ``Range`` requests (which
Python's SimpleHTTPRequestHandler lacks), ETags, and planted faults: the n-th request for a
file can send only part of its body and then drop the connection (a clean close, or a reset),
or answer 503. ``python -m bench.remote serve DIR`` runs one in its own process and prints
its port.

Benchmark (``run``; ``make bench`` runs it as ``--only remote``): JPEG shards made as
bench.reader makes them (crops of scikit-learn's photographs, 64x64 and 256x256), 8 shards of
256 samples at both sizes (1 MB and 5.6 MB: a remote shard is one request, and the reader
indexes a streamed shard a few MiB at a time, so tiny shards would mostly time fixed costs that
real shards of 100 MB-1 GB spread over thousands of samples), read by ``make_loader``
(shuffle window 512, batch 64, channels_last) with 1 and 2 DataLoader workers, once from the
directory and once from ``http://127.0.0.1:PORT/shard-{...}.tar`` served by a ShardServer in
another process. The two loaders of a configuration are timed in alternation, round after
round, in wall-clock seconds (the work is in the workers); figures are medians over rounds and
``http_vs_local`` the median of the per-round ratios. Beside it, ``cpu_http_vs_local``: the same
per CPU second of all the processes doing the work (this one, its loader workers and, for HTTP,
the server; the kernel's share of moving the bytes through loopback TCP included), steadier
than wall clock on a shared machine. Target: ``http_vs_local`` >= 0.9 at 256x256.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

ROOT = Path(__file__).resolve().parents[1]
BATCH = 64


# ---------------------------------------------------------------------------- the server


class ShardServer:
    """A directory served over HTTP on 127.0.0.1, in a thread of this process.

    ``faults``: ``{file name: [fault of its 1st GET, of its 2nd GET, ...]}``; a fault is None
    (served whole), an int (send that many bytes of the body, then close the connection), a
    float in [0, 1) (that fraction of the body, then close), ``("reset", n)`` (n bytes or that
    fraction, then a TCP reset), or ``("status", code)`` (answer with that error status).
    Requests past the list are served whole. ``requests`` counts GETs per name, ``drops`` the
    responses cut short, ``log`` holds (name, first byte asked for, status, bytes sent).
    ``ranges=False``: ignore ``Range`` (always 200 and the whole file), as some servers do.
    """

    def __init__(self, root: str | os.PathLike, faults: dict | None = None, port: int = 0, ranges: bool = True):
        self.root = Path(root).resolve()
        self.ranges = ranges
        self.faults = {name: list(plan) for name, plan in (faults or {}).items()}
        self.requests: Counter = Counter()
        self.drops = 0
        self.log: list[tuple[str, int, int, int]] = []
        self.lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), _Handler)
        self.httpd.daemon_threads = True
        self.httpd.shard_server = self
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)

    def url(self, name: str = "") -> str:
        return f"http://127.0.0.1:{self.port}/{name}"

    def start(self) -> "ShardServer":
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self) -> "ShardServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def fault_for(self, name: str):
        with self.lock:
            index = self.requests[name]
            self.requests[name] += 1
            plan = self.faults.get(name, [])
            return plan[index] if index < len(plan) else None


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "gentrain-test"

    def log_message(self, *args) -> None:  # quiet
        pass

    def do_HEAD(self) -> None:
        self._serve(head=True)

    def do_GET(self) -> None:
        self._serve(head=False)

    def _serve(self, head: bool) -> None:
        owner: ShardServer = self.server.shard_server
        name = unquote(urlsplit(self.path).path).lstrip("/")
        path = (owner.root / name).resolve()
        if owner.root not in path.parents or not path.is_file():
            return self._status(404)
        fault = None if head else owner.fault_for(name)
        if isinstance(fault, tuple) and fault[0] == "status":
            with owner.lock:
                owner.log.append((name, 0, fault[1], 0))
            return self._status(fault[1])
        st = path.stat()
        size, status, start, end = st.st_size, 200, 0, st.st_size - 1
        asked = self.headers.get("Range") if owner.ranges else None
        found = re.fullmatch(r"bytes=(\d*)-(\d*)", asked.strip()) if asked else None
        if found and found.group(1) + found.group(2):
            first, last = found.groups()
            if first:
                start, end = int(first), min(int(last), size - 1) if last else size - 1
            else:  # a suffix: the last N bytes
                start = max(0, size - int(last))
            if start >= size or start > end:
                return self._status(416, {"Content-Range": f"bytes */{size}"})
            status = 206
        length = end - start + 1
        self.send_response(status)
        self.send_header("Content-Type", "application/x-tar")
        self.send_header("Content-Length", str(length))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("ETag", f'"{st.st_mtime_ns:x}-{size:x}"')
        self.send_header("Last-Modified", formatdate(st.st_mtime, usegmt=True))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.end_headers()
        if head:
            return
        reset = isinstance(fault, tuple) and fault[0] == "reset"
        cut = fault[1] if reset else fault
        send = length if cut is None else min(length, int(cut * length) if isinstance(cut, float) else int(cut))
        sent = 0
        try:
            with open(path, "rb") as f:
                sent = self.connection.sendfile(f, start, send) if send else 0
        except OSError:
            pass
        with owner.lock:
            owner.log.append((name, start, status, sent))
            if send < length:
                owner.drops += 1
        if send < length:  # drop the connection part-way through the body
            self.close_connection = True
            if reset:
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            else:
                try:
                    self.connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def _status(self, code: int, headers: dict | None = None) -> None:
        body = f"{code}\n".encode()
        self.send_response(code)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)


def serve_in_subprocess(root: Path) -> tuple[subprocess.Popen, int]:
    """``python -m bench.remote serve ROOT`` in its own process; (process, port)."""
    proc = subprocess.Popen([sys.executable, "-m", "bench.remote", "serve", str(root)], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if not line.strip().isdigit():
        proc.kill()
        raise RuntimeError(f"bench.remote serve did not start: {line!r}")
    return proc, int(line)


# ---------------------------------------------------------------------------- the benchmark


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds of processes so far (/proc/PID/stat)."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
        except (OSError, IndexError, ValueError):
            pass
    return total / ticks


def bench_pair(local: str, http: str, size: int, workers: int, batches: int, rounds: int,
               server_pid: int | None = None) -> dict:
    """Images/s of a loader over ``local`` and one over ``http``, timed in alternation: wall
    clock, and per CPU second of every process doing the work (this one, the loader workers,
    and for ``http`` the server), which a loaded machine disturbs much less."""
    from bench.common import interleaved_timed, median, median_ratio
    from data_shards.loader import make_loader

    loaders = {}
    for name, spec in (("local", local), ("http", http)):
        it = iter(make_loader(spec, BATCH, num_workers=workers, image_size=size, channels=3, shuffle_buffer=512,
                              channels_last=True, seed=0))
        for _ in range(512 // BATCH + 2 + 2 * workers):  # start workers, fill their shuffle windows
            next(it)
        loaders[name] = it

    pids = {name: [os.getpid()] + [w.pid for w in getattr(it, "_workers", [])] for name, it in loaders.items()}
    if server_pid is not None:
        pids["http"].append(server_pid)
    cpu: dict[str, list[float]] = {name: [] for name in loaders}

    def timed(name):
        def go():
            it = loaders[name]
            for _ in range(2 * workers):  # what the workers prefetched while the other loader was timed
                next(it)
            c0, t0 = cpu_seconds(pids[name]), time.perf_counter()
            for _ in range(batches):
                next(it)
            elapsed = time.perf_counter() - t0
            cpu[name].append((cpu_seconds(pids[name]) - c0) / (batches * BATCH))
            return elapsed
        return go

    per_image = interleaved_timed({name: timed(name) for name in loaders}, rounds, batches * BATCH)
    out = {"images_per_s": {name: 1.0 / median(t) for name, t in per_image.items()},
           "http_vs_local": median_ratio(per_image["local"], per_image["http"]),
           "per_round_http_vs_local": [a / b for a, b in zip(per_image["local"], per_image["http"])],
           "images_per_cpu_s": {name: 1.0 / median(c) for name, c in cpu.items() if median(c) > 0},
           "cpu_http_vs_local": median_ratio(cpu["local"], cpu["http"]) if min(cpu["http"]) > 0 else None}
    loaders.clear()
    return out


def run(quick: bool = False, root: Path | None = None) -> dict:
    """HTTP vs local disk at 64 and 256 px, 1 and 2 loader workers."""
    import torch

    from bench.reader import build_bench_shards
    from data_shards import remote
    from data_shards.specs import resolve_shards

    torch.set_num_threads(1)
    root = Path(root or Path(tempfile.gettempdir()) / "gentrain-bench")
    root.mkdir(parents=True, exist_ok=True)
    sizes = {64: 2048, 256: 2048} if not quick else {64: 128, 256: 32}  # 8 shards of 256 samples
    batches = {64: 96, 256: 32} if not quick else {64: 2, 256: 1}
    rounds = 9 if not quick else 1
    results: dict = {"load_avg_at_start": os.getloadavg(), "configs": {}}
    for size, n in sizes.items():
        shards = build_bench_shards(root, size, "jpg", n, shard_size=max(n // 8, 16))
        names = [Path(url).name for url in resolve_shards(shards)]
        server, port = serve_in_subprocess(shards)
        try:
            spec = f"http://127.0.0.1:{port}/" + names[0].replace("000000", f"{{000000..{len(names) - 1:06d}}}")
            for workers in (1, 2):
                before = remote.COUNTS["retries"]
                figures = bench_pair(str(shards), spec, size, workers, batches[size], rounds, server.pid)
                figures["retries"] = remote.COUNTS["retries"] - before
                results["configs"].setdefault(str(size), {})[f"workers_{workers}"] = figures
                print(f"[bench] remote {size}px {workers} worker(s): local "
                      f"{figures['images_per_s']['local']:.0f}/s, http {figures['images_per_s']['http']:.0f}/s, "
                      f"ratio {figures['http_vs_local']:.3f} (per CPU second: {figures['cpu_http_vs_local']})",
                      flush=True)
        finally:
            server.kill()
            server.wait()
    results["load_avg_at_end"] = os.getloadavg()
    results["http_vs_local_256"] = min(c["http_vs_local"] for c in results["configs"]["256"].values())
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.remote")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve a directory over HTTP with Range support; prints the port")
    serve.add_argument("root")
    serve.add_argument("--port", type=int, default=0)
    bench = sub.add_parser("bench", help="HTTP vs local disk reader throughput (JSON to stdout)")
    bench.add_argument("--quick", action="store_true")
    bench.add_argument("--work", default=None)
    args = parser.parse_args(argv)
    if args.command == "serve":
        server = ShardServer(args.root, port=args.port)
        print(server.port, flush=True)
        server.httpd.serve_forever(poll_interval=0.5)
        return 0
    print(json.dumps(run(args.quick, Path(args.work) if args.work else None), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
