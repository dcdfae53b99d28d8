"""Shards on a web server, in an object store, or behind a command: read as they stream in.

The forms of ``data.shards`` (braces expand to one URL per shard, as for local paths):

* ``https://HOST/path/shard-{000000..000999}.tar`` (or ``http://``). A folder URL
  (``https://HOST/path/``, or any whose last part has no ``.``) means the shards its
  ``manifest.json`` lists.
* ``s3://BUCKET/prefix/shard-{000000..000999}.tar``. A folder URL (``s3://BUCKET/prefix/`` or
  ``s3://BUCKET/prefix``) means every ``.tar`` object directly under that prefix, in name
  order (like a local directory).
  Credentials, region and endpoint come from boto3's usual chain (``AWS_ACCESS_KEY_ID`` /
  ``AWS_SECRET_ACCESS_KEY``, ``AWS_PROFILE``, ``~/.aws/credentials`` and ``config``,
  ``AWS_DEFAULT_REGION``, ``AWS_ENDPOINT_URL``); ``GENTRAIN_S3_ENDPOINT`` sets the endpoint of an
  S3-compatible store (MinIO, Ceph, moto) and wins over ``AWS_ENDPOINT_URL``. With a custom
  endpoint, path-style addressing is used. Needs boto3 (``pip install 'gentrain[s3]'``),
  imported only when an ``s3://`` URL is read.
* ``pipe:COMMAND``: what a shell command writes to its standard output, one command per shard
  (``pipe:curl -sf https://HOST/path/shard-{000000..000999}.tar``).

``manifest.json`` is read from the same place when it is there: beside the first shard
(``https://HOST/path/manifest.json``, ``s3://BUCKET/prefix/manifest.json``), or for ``pipe:``
from the first shard's command with its ``NAME.tar`` replaced by ``manifest.json``.

Nothing is copied to local disk: a shard's bytes are read ahead by one thread per open shard
(at most ``READ_AHEAD`` x ``CHUNK`` = 4 MiB waiting), the next shard of a slot starts arriving
while one is read (data_shards.tars.prefetch), and the tar is indexed as it streams, a few MiB
at a time, into the same ShardTable records as a local shard (data_shards.tars._stream_samples):
per open shard some 12 MiB at most, plus what the shuffle window holds. Every sample is the one
the local reader yields, in the same order, so batches, skips and resume positions equal those
of a local copy. (A resumed pass re-reads, without decoding, what it had consumed of its
shards before the checkpoint, as a local one does: over the network, that is a re-download.)

Failures, per shard (``ShardChunks``):

* transient (connection refused, reset or timed out, a response cut short, HTTP 408/429/5xx,
  S3 throttling or 5xx, a command's non-zero exit status): retried after a backoff, and the
  read resumes at the first byte not yet received (HTTP ``Range``, S3 ``Range``; a command is
  run again and the bytes already received are discarded), so no byte is delivered twice or
  skipped. A shard that changed between two requests (another ETag / Last-Modified) is not
  spliced: that is permanent.
* permanent (404, 403, a changed shard) or transient after ``retries`` failed attempts in a
  row (any byte received resets the count): the rest of the shard is given up, and the
  stream counts it as ``unreadable_shard`` (data_shards.errors) and goes on with the next.
  Once a shard of a host has been given up, the next shards of that host get one attempt
  each until a byte arrives from it again, so that a run whose every shard is unreachable ends
  (``NoValidSamples``, exit 2) within about one shard's retries instead of one per shard.

Every retry and every give-up prints one line to stderr (``[gentrain] data: ...``) and is
counted in ``COUNTS`` (this process: ``retries``, ``resumed``, ``gave_up``).

Environment: ``GENTRAIN_REMOTE_RETRIES`` (6), ``GENTRAIN_REMOTE_BACKOFF`` (seconds before the
first retry, 0.5; doubling, at most ``GENTRAIN_REMOTE_MAX_BACKOFF``, 16; each wait drawn
between half and all of it: 6 retries span 16-32 s), ``GENTRAIN_REMOTE_TIMEOUT`` (socket
timeout and a command's longest silence, 30 s).
"""

from __future__ import annotations

import http.client
import json
import os
import random
import re
import select
import subprocess
import sys
import threading
from collections import Counter, deque
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

CHUNK = 1 << 20
READ_AHEAD = 4  # chunks' worth of bytes read ahead per open shard
SCHEMES = ("http", "https", "s3", "pipe")
MANIFEST_NAME = "manifest.json"

COUNTS: Counter = Counter()  # this process: retries, resumed (reads reopened mid-shard), gave_up


class SourceLost(OSError):
    """A remote shard's bytes stopped before its end: a permanent error, or retries spent."""


class _Transient(Exception):
    """A failure worth another attempt."""


class _Permanent(Exception):
    """A failure no retry mends; ``missing``: the object does not exist (404, NoSuchKey)."""

    def __init__(self, detail: str, missing: bool = False):
        super().__init__(detail)
        self.missing = missing


def scheme(url: str) -> str | None:
    """``http``, ``https``, ``s3`` or ``pipe`` for a URL this module reads; None otherwise."""
    head, sep, _ = url.partition(":")
    head = head.lower()
    return head if sep and head in SCHEMES else None


@dataclass(frozen=True)
class RetryPolicy:
    retries: int = 6
    backoff: float = 0.5
    max_backoff: float = 16.0
    timeout: float = 30.0

    @classmethod
    def from_env(cls) -> "RetryPolicy":
        env = os.environ
        return cls(retries=max(0, int(env.get("GENTRAIN_REMOTE_RETRIES", cls.retries))),
                   backoff=max(0.0, float(env.get("GENTRAIN_REMOTE_BACKOFF", cls.backoff))),
                   max_backoff=max(0.0, float(env.get("GENTRAIN_REMOTE_MAX_BACKOFF", cls.max_backoff))),
                   timeout=max(0.1, float(env.get("GENTRAIN_REMOTE_TIMEOUT", cls.timeout))))

    def wait(self, attempt: int, rng: random.Random) -> float:
        """Seconds before retry ``attempt`` (1, 2, ...): exponential, with jitter."""
        return min(self.max_backoff, self.backoff * 2 ** (attempt - 1)) * rng.uniform(0.5, 1.0)


_COUNTS_LOCK = threading.Lock()


def _count(name: str) -> None:
    with _COUNTS_LOCK:  # several readers at once (a shard and the next one, read ahead)
        COUNTS[name] += 1


def _log(message: str) -> None:
    print(f"[gentrain] data: {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------- hosts given up on

_DOWN: set[str] = set()
_DOWN_LOCK = threading.Lock()


def _set_down(host: str, down: bool) -> None:
    with _DOWN_LOCK:
        (_DOWN.add if down else _DOWN.discard)(host)


def _is_down(host: str) -> bool:
    with _DOWN_LOCK:
        return host in _DOWN


# ---------------------------------------------------------------------------- one shard's bytes


class ShardChunks:
    """The bytes of one remote shard as chunks (``next()``: bytes, None at the end), read ahead
    by a thread (at most ``ahead`` bytes waiting, plus the chunk being read), retried and
    resumed as the module doc says. ``next()`` raises SourceLost when the rest of the shard is
    given up. Never raises on construction; ``close()`` stops the thread (it exits at once, or
    when its current read returns or times out)."""

    def __init__(self, url: str, policy: RetryPolicy | None = None, chunk: int = CHUNK,
                 ahead: int = READ_AHEAD * CHUNK):
        self.url, self.policy, self.chunk, self.ahead = url, policy or RetryPolicy.from_env(), chunk, max(1, ahead)
        self._items: deque = deque()
        self._queued = 0  # bytes in _items
        self._cond = threading.Condition()
        self._stop = False
        self._done = False
        self._thread = threading.Thread(target=self._run, name="gentrain-shard-reader", daemon=True)
        self._thread.start()

    def next(self) -> bytes | None:
        if self._done:
            return None
        with self._cond:
            while not self._items:
                self._cond.wait()
            item = self._items.popleft()
            if type(item) is bytes:
                self._queued -= len(item)
                self._cond.notify()
                return item
        self._done = True
        if item is not None:
            raise item
        return None

    def close(self) -> None:
        with self._cond:
            self._stop = self._done = True
            self._items.clear()
            self._queued = 0
            self._cond.notify_all()

    def _put(self, item) -> bool:
        """Queue ``item`` (bytes, None for the end, or a SourceLost), waiting while ``ahead``
        bytes are queued; False once closed."""
        with self._cond:
            while self._queued >= self.ahead and not self._stop:
                self._cond.wait()
            if self._stop:
                return False
            self._items.append(item)
            if type(item) is bytes:
                self._queued += len(item)
            self._cond.notify()
            return True

    def _stopped(self, delay: float) -> bool:
        """Wait ``delay`` seconds; True if closed meanwhile."""
        with self._cond:
            self._cond.wait_for(lambda: self._stop, timeout=delay)
            return self._stop

    def _run(self) -> None:
        offset, failures, rng = 0, 0, random.Random()
        policy = self.policy
        try:
            source = make_source(self.url, policy.timeout)
        except _Permanent as exn:
            self._give_up(0, str(exn), None)
            return
        host = source.host
        while not self._stop:
            reader = None
            try:
                reader = source.open(offset)
                if offset:
                    _count("resumed")
                while True:
                    data = reader.read(self.chunk)
                    if not data:
                        self._put(None)
                        return
                    offset += len(data)
                    if failures or _is_down(host):
                        failures = 0
                        _set_down(host, False)
                    if not self._put(data):
                        return
            except _Permanent as exn:
                self._give_up(offset, str(exn), host)
                return
            except _Transient as exn:
                failures += 1
                allowed = 1 if offset == 0 and _is_down(host) else policy.retries + 1
                if failures >= allowed:
                    self._give_up(offset, f"{exn} ({failures} attempt(s))", host)
                    return
                delay = policy.wait(failures, rng)
                _count("retries")
                _log(f"{self.url}: {exn} at byte {offset}; retry {failures} of {policy.retries} in {delay:.2f} s, "
                     f"resuming at byte {offset}")
                if self._stopped(delay):
                    return
            except BaseException as exn:  # noqa: BLE001 - a bug must not leave the reader waiting forever
                self._give_up(offset, f"{type(exn).__name__}: {exn}", None)
                return
            finally:
                if reader is not None:
                    reader.close()

    def _give_up(self, offset: int, detail: str, host: str | None) -> None:
        _count("gave_up")
        if host is not None:
            _set_down(host, True)
        _log(f"{self.url}: {detail} at byte {offset}; giving up on the rest of this shard "
             f"(counted as unreadable_shard)")
        self._put(SourceLost(f"{detail} at byte {offset}"))


def make_source(url: str, timeout: float):
    kind = scheme(url)
    if kind in ("http", "https"):
        return _HttpSource(url, timeout)
    if kind == "s3":
        return _S3Source(url, timeout)
    if kind == "pipe":
        return _PipeSource(url, timeout)
    raise _Permanent(f"not a remote URL this reader knows: {url}")


class _Empty:
    """A reader at the end of its object."""

    def read(self, n: int) -> bytes:
        return b""

    def close(self) -> None:
        pass


def _retryable_status(status: int | None) -> bool:
    return status is None or status in (408, 425, 429) or status >= 500


# ---------------------------------------------------------------------------- HTTP(S)


class _HttpSource:
    def __init__(self, url: str, timeout: float):
        self.url, self.timeout = url, timeout
        self.host = urlsplit(url).netloc
        self.validator: str | None = None  # ETag (or Last-Modified) of the first response
        self.size: int | None = None

    def open(self, offset: int):
        import urllib.error
        import urllib.request

        headers = {"Range": f"bytes={offset}-"} if offset else {}
        try:
            resp = urllib.request.urlopen(urllib.request.Request(self.url, headers=headers), timeout=self.timeout)
        except urllib.error.HTTPError as exn:
            exn.close()
            if exn.code == 416 and self.size is not None and offset >= self.size:
                return _Empty()
            detail = f"HTTP {exn.code} {exn.reason}"
            if _retryable_status(exn.code):
                raise _Transient(detail) from None
            raise _Permanent(detail, missing=exn.code in (404, 410)) from None
        except urllib.error.URLError as exn:
            raise _Transient(f"{type(exn.reason).__name__}: {exn.reason}") from None
        except (OSError, http.client.HTTPException) as exn:
            raise _Transient(f"{type(exn).__name__}: {exn}") from None
        except ValueError as exn:  # not a valid URL
            raise _Permanent(str(exn)) from None
        validator = resp.headers.get("ETag") or resp.headers.get("Last-Modified")
        if self.validator is None:
            self.validator = validator
        elif validator and validator != self.validator:
            resp.close()
            raise _Permanent(f"changed on the server while being read ({self.validator} -> {validator})")
        skip = 0
        if offset:
            if resp.status == 206:
                found = re.match(r"bytes (\d+)-", resp.headers.get("Content-Range", ""))
                if not found or int(found.group(1)) != offset:
                    resp.close()
                    raise _Permanent(f"asked for bytes {offset}-, got Content-Range "
                                     f"{resp.headers.get('Content-Range')!r}")
            else:
                skip = offset  # the server ignores Range: discard what was received before
        elif resp.length is not None:
            self.size = resp.length
        return _HttpReader(resp, skip)


class _HttpReader:
    def __init__(self, resp, skip: int):
        self.resp, self.skip = resp, skip

    def read(self, n: int) -> bytes:
        try:
            while self.skip:
                data = self.resp.read(min(self.skip, CHUNK))
                if not data:
                    raise _Transient(f"connection closed {self.skip} bytes before the resume point")
                self.skip -= len(data)
            data = self.resp.read1(n)  # what one receive brings: no copy but the kernel's
        except (OSError, http.client.HTTPException) as exn:
            raise _Transient(f"{type(exn).__name__}: {exn}") from None
        if not data and self.resp.length:  # http.client returns b"" when a response is cut short
            raise _Transient(f"connection closed with {self.resp.length} bytes of the response missing")
        return data

    def close(self) -> None:
        try:
            self.resp.close()
        except Exception:  # noqa: BLE001 - closing a broken connection
            pass


# ---------------------------------------------------------------------------- S3

_S3_CLIENTS: dict[int, object] = {}
_S3_LOCK = threading.Lock()
_S3_MISSING = ("NoSuchKey", "NoSuchBucket", "404", "NotFound")
_S3_RETRYABLE = ("SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "RequestTimeTooSkewed",
                 "InternalError", "ServiceUnavailable")


def s3_endpoint() -> str | None:
    """GENTRAIN_S3_ENDPOINT, else None (boto3 then reads AWS_ENDPOINT_URL(_S3) itself)."""
    return os.environ.get("GENTRAIN_S3_ENDPOINT") or None


def s3_client(timeout: float = 30.0):
    """This process's boto3 S3 client (one per process: clients do not survive a fork)."""
    pid = os.getpid()
    with _S3_LOCK:
        client = _S3_CLIENTS.get(pid)
        if client is None:
            try:
                import boto3
                from botocore.config import Config
            except ImportError:
                raise _Permanent("s3:// shards need boto3: pip install 'gentrain[s3]'") from None
            endpoint = s3_endpoint()
            custom = endpoint or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
            options = {"connect_timeout": timeout, "read_timeout": timeout,
                       "retries": {"max_attempts": 3, "mode": "standard"}}
            if custom:
                options["s3"] = {"addressing_style": "path"}
            client = boto3.session.Session().client("s3", endpoint_url=endpoint, config=Config(**options))
            _S3_CLIENTS.clear()  # a parent's client, inherited through fork
            _S3_CLIENTS[pid] = client
        return client


def split_s3(url: str) -> tuple[str, str]:
    """(bucket, key) of ``s3://bucket/key``."""
    parts = urlsplit(url)
    if not parts.netloc:
        raise ValueError(f"not an s3://BUCKET/KEY URL: {url}")
    return parts.netloc, parts.path.lstrip("/")


def _s3_error(exn) -> _Transient | _Permanent:
    """Our class of a botocore exception."""
    from botocore.exceptions import ClientError

    if isinstance(exn, ClientError):
        error = exn.response.get("Error", {})
        code = str(error.get("Code", ""))
        status = exn.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        detail = f"S3 {code or status}: {error.get('Message', '')}".strip()
        if code in _S3_RETRYABLE or (_retryable_status(status) and code not in _S3_MISSING):
            return _Transient(detail)
        return _Permanent(detail, missing=code in _S3_MISSING)
    return _Transient(f"{type(exn).__name__}: {exn}")


class _S3Source:
    def __init__(self, url: str, timeout: float):
        self.url, self.timeout = url, timeout
        try:
            self.bucket, self.key = split_s3(url)
        except ValueError as exn:
            raise _Permanent(str(exn)) from None
        self.host = f"s3://{self.bucket}"
        self.etag: str | None = None
        self.size: int | None = None

    def open(self, offset: int):
        client = s3_client(self.timeout)
        args = {"Bucket": self.bucket, "Key": self.key}
        if offset:
            args["Range"] = f"bytes={offset}-"
        if self.etag:
            args["IfMatch"] = self.etag  # a changed object fails (412) instead of being spliced
        try:
            resp = client.get_object(**args)
        except Exception as exn:  # noqa: BLE001 - botocore's and urllib3's exceptions, classified
            error = _s3_error(exn)
            code = str(getattr(exn, "response", {}).get("Error", {}).get("Code", ""))
            if code == "InvalidRange" and self.size is not None and offset >= self.size:
                return _Empty()
            if code in ("PreconditionFailed", "412"):
                raise _Permanent("changed in the bucket while being read (ETag)") from None
            raise error from None
        if self.etag is None:
            self.etag = resp.get("ETag")
            self.size = resp.get("ContentLength")
        return _S3Reader(resp["Body"])


class _S3Reader:
    def __init__(self, body):
        self.body = body

    def read(self, n: int) -> bytes:
        try:
            return self.body.read(n)  # raises IncompleteReadError when a response is cut short
        except Exception as exn:  # noqa: BLE001 - botocore/urllib3 streaming errors
            raise _Transient(f"{type(exn).__name__}: {exn}") from None

    def close(self) -> None:
        try:
            self.body.close()
        except Exception:  # noqa: BLE001
            pass


# ---------------------------------------------------------------------------- pipe:


class _PipeSource:
    def __init__(self, url: str, timeout: float):
        self.command, self.timeout = url[len("pipe:"):], timeout
        words = self.command.split()
        self.host = "pipe:" + (words[0] if words else "")

    def open(self, offset: int):
        try:
            proc = subprocess.Popen(self.command, shell=True, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
        except OSError as exn:
            raise _Permanent(f"cannot run {self.command!r}: {exn}") from None
        return _PipeReader(proc, self.command, offset, self.timeout)


class _PipeReader:
    def __init__(self, proc: subprocess.Popen, command: str, skip: int, timeout: float):
        self.proc, self.command, self.skip, self.timeout = proc, command, skip, timeout
        self.fd = proc.stdout.fileno()

    def _read_some(self, n: int) -> bytes:
        ready, _, _ = select.select([self.fd], [], [], self.timeout)
        if not ready:
            raise _Transient(f"{self.command!r} wrote nothing for {self.timeout:g} s")
        return os.read(self.fd, n)

    def read(self, n: int) -> bytes:
        while self.skip:  # a rerun: drop the bytes delivered before
            data = self._read_some(min(self.skip, CHUNK))
            if not data:
                status = self.proc.wait()
                raise _Transient(f"{self.command!r} exited with status {status}" if status else
                                 f"{self.command!r} wrote {self.skip} bytes less than before")
            self.skip -= len(data)
        data = self._read_some(n)
        if data:
            return data
        status = self.proc.wait()
        if status:
            raise _Transient(f"{self.command!r} exited with status {status}")
        return b""

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.stdout.close()
        self.proc.wait()


# ---------------------------------------------------------------------------- small objects, listings


def read_object(url: str, policy: RetryPolicy | None = None) -> bytes | None:
    """The whole of a small remote object (a manifest): None where it does not exist (HTTP 404,
    S3 NoSuchKey; for ``pipe:``, a non-zero exit status). Transient errors are retried.

    Raises:
        SourceLost: unreachable after the retries, or another permanent error (403, ...).
    """
    policy = policy or RetryPolicy.from_env()
    if scheme(url) == "pipe":
        try:
            done = subprocess.run(url[len("pipe:"):], shell=True, stdin=subprocess.DEVNULL, capture_output=True,
                                  timeout=max(policy.timeout, 1.0))
        except (OSError, subprocess.TimeoutExpired) as exn:
            raise SourceLost(f"{url}: {exn}") from None
        return done.stdout if done.returncode == 0 else None
    try:
        source = make_source(url, policy.timeout)
    except _Permanent as exn:
        raise SourceLost(f"{url}: {exn}") from None
    rng = random.Random()
    for attempt in range(1, policy.retries + 2):
        reader = None
        try:
            reader = source.open(0)
            parts = []
            while True:
                data = reader.read(CHUNK)
                if not data:
                    return b"".join(parts)
                parts.append(data)
        except _Permanent as exn:
            if exn.missing:
                return None
            raise SourceLost(f"{url}: {exn}") from None
        except _Transient as exn:
            if attempt > policy.retries:
                raise SourceLost(f"{url}: {exn} ({attempt} attempt(s))") from None
            _log(f"{url}: {exn}; retry {attempt} of {policy.retries}")
            threading.Event().wait(policy.wait(attempt, rng))
        finally:
            if reader is not None:
                reader.close()
    raise AssertionError("unreachable")


def manifest_url(first_shard: str) -> str | None:
    """Where the manifest of the shard set whose first shard is ``first_shard`` lives (see the
    module doc); None for a ``pipe:`` command that names no ``.tar``."""
    if scheme(first_shard) == "pipe":
        names = list(re.finditer(r"[^\s/'\"=]+\.tar(?=$|[\s'\"?])", first_shard))
        if not names:
            return None
        last = names[-1]
        return first_shard[: last.start()] + MANIFEST_NAME + first_shard[last.end():]
    parts = urlsplit(first_shard)
    base = parts.path.rsplit("/", 1)[0]
    return urlunsplit((parts.scheme, parts.netloc, f"{base}/{MANIFEST_NAME}", "", ""))


def find_manifest(first_shard: str) -> dict | None:
    """The manifest beside a remote first shard, or None where there is none.

    Raises:
        SourceLost: the manifest's place could not be reached (after a couple of retries).
    """
    url = manifest_url(first_shard)
    if url is None:
        return None
    policy = RetryPolicy.from_env()
    data = read_object(url, RetryPolicy(min(policy.retries, 2), policy.backoff, policy.max_backoff, policy.timeout))
    if data is None:
        return None
    try:
        manifest = json.loads(data)
    except ValueError:
        return None
    return manifest if isinstance(manifest, dict) else None


def is_remote_directory(url: str) -> bool:
    """An ``http(s)://`` or ``s3://`` URL naming a folder of shards: its path ends in ``/``, or
    its last part has no ``.`` (``s3://bucket/digits``, like a local directory), and it has no
    query (a presigned URL names one object)."""
    if scheme(url) not in ("http", "https", "s3") or "?" in url:
        return False
    path = urlsplit(url).path
    return path.endswith("/") or "." not in path.rsplit("/", 1)[-1]


def directory_shards(url: str) -> list[str]:
    """The shard URLs of a remote folder (see the module doc): for ``s3://``, the ``.tar``
    objects directly under the prefix, in name order; for ``http(s)://``, the shards its
    manifest.json lists, in its order.

    Raises:
        FileNotFoundError: no shard there, no manifest (HTTP), or the place is unreachable.
    """
    url = url if url.endswith("/") else url + "/"
    if scheme(url) == "s3":
        try:
            bucket, prefix = split_s3(url)
            client = s3_client(RetryPolicy.from_env().timeout)
            names = []
            for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix, Delimiter="/"):
                names += [item["Key"] for item in page.get("Contents", []) if item["Key"].endswith(".tar")]
        except _Permanent as exn:
            raise FileNotFoundError(f"{url}: {exn}") from None
        except Exception as exn:  # noqa: BLE001 - botocore's errors, in one line
            raise FileNotFoundError(f"cannot list {url}: {_s3_error(exn)}") from None
        if not names:
            raise FileNotFoundError(f"no .tar shards under {url}")
        return [f"s3://{bucket}/{name}" for name in sorted(names)]
    try:
        manifest = find_manifest(url + "shard.tar")
    except SourceLost as exn:
        raise FileNotFoundError(f"cannot read {url}{MANIFEST_NAME}: {exn}") from None
    if not manifest or not manifest.get("shards"):
        raise FileNotFoundError(f"no {MANIFEST_NAME} listing shards at {url} (give the shards as a brace pattern, "
                                f"e.g. {url}shard-{{000000..000009}}.tar)")
    return [url + entry["name"] for entry in manifest["shards"]]


class UploadFailed(OSError):
    """Writing to S3 failed (no boto3, no bucket, no permission, unreachable): one line."""


def _s3_call(what: str, call):
    try:
        return call(s3_client())
    except _Permanent as exn:
        raise UploadFailed(str(exn)) from None
    except Exception as exn:  # noqa: BLE001 - botocore's errors, in one line
        raise UploadFailed(f"{what}: {_s3_error(exn)}") from None


def upload_file(path: str | os.PathLike, url: str) -> None:
    """Put a local file at ``s3://bucket/key`` (multipart for large files: boto3's upload_file).

    Raises:
        UploadFailed: with the reason, in one line.
    """
    bucket, key = split_s3(url)
    _s3_call(f"cannot upload {os.fspath(path)} to {url}", lambda s3: s3.upload_file(os.fspath(path), bucket, key))


def delete_objects(urls: list[str]) -> None:
    """Delete ``s3://`` objects (missing ones are fine)."""
    for url in urls:
        bucket, key = split_s3(url)
        _s3_call(f"cannot delete {url}", lambda s3: s3.delete_object(Bucket=bucket, Key=key))


def list_names(url: str) -> list[str]:
    """Names of the objects directly under an ``s3://bucket/prefix/``."""
    bucket, prefix = split_s3(url)

    def names(s3) -> list[str]:
        pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix, Delimiter="/")
        return [item["Key"][len(prefix):] for page in pages for item in page.get("Contents", [])]
    return _s3_call(f"cannot list {url}", names)
