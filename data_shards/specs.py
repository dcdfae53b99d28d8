"""Shard specs: what a user writes in ``data.shards``, expanded into an ordered list of shards.

A spec is a directory (its ``*.tar`` files, sorted), a brace pattern such as
``dir/shard-{000000..000009}.tar``, a glob, a single ``.tar`` path, a remote URL, or a list
(or OmegaConf ListConfig) of any of these. Remote URLs (data_shards.remote) are
``https://HOST/path/shard-{000000..000999}.tar``, ``s3://BUCKET/prefix/shard-{...}.tar`` and
``pipe:COMMAND``, passed through unchecked once their braces are expanded; an ``http(s)://``
or ``s3://`` URL ending in ``/`` (or whose last part has no ``.``) is a remote folder (the
shards its manifest.json lists; for ``s3://``, the ``.tar`` objects under the prefix). Other
schemes go to webdataset's ``gopen``.
"""

from __future__ import annotations

import json
import os
import re
from glob import escape as glob_escape, glob
from pathlib import Path
from typing import Any, Iterable

from webdataset.shardlists import expand_urls

REMOTE_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):")  # pipe:, s3://, https://; not C:
_GLOB_CHARS = re.compile(r"[*?\[]")


def resolve_shards(spec: Any) -> list[str]:
    """Expand a shard spec (see the module doc) into an ordered list of shard paths/URLs.
    Duplicates are dropped, keeping the first occurrence.

    Raises:
        FileNotFoundError: a local shard is missing or the spec matches no shard.
    """
    urls = list(dict.fromkeys(_resolve(spec, spec)))
    if not urls:
        raise FileNotFoundError(f"no shards found for shard spec {spec!r}")
    return urls


def find_manifest(spec: Any) -> dict | None:
    """The ``manifest.json`` next to the first shard of ``spec``, or None if there is none
    (for remote shards, where data_shards.remote says; None for schemes it does not read).

    Raises:
        OSError: a remote manifest's place could not be reached.
    """
    first = resolve_shards(spec)[0]
    if REMOTE_RE.match(first):
        from data_shards import remote

        return remote.find_manifest(first) if remote.scheme(first) else None
    path = Path(first).parent / "manifest.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _resolve(part: Any, whole: Any) -> list[str]:
    if isinstance(part, os.PathLike):
        part = os.fspath(part)
    if isinstance(part, str):
        return _resolve_string(part.strip(), whole)
    if isinstance(part, Iterable) and not isinstance(part, (bytes, dict)):
        return [url for item in part for url in _resolve(item, whole)]
    raise TypeError(f"shard spec must be a path, pattern or list of them, got {type(part).__name__}: {part!r}")


def _resolve_string(spec: str, whole: Any) -> list[str]:
    match = REMOTE_RE.match(spec)
    if match and match.group(1).lower() != "file":
        from data_shards import remote

        urls = expand_urls(spec)
        return [shard for url in urls
                for shard in (remote.directory_shards(url) if remote.is_remote_directory(url) else [url])]
    spec = os.path.expanduser(re.sub(r"^file://?", "", spec))
    if os.path.isdir(spec):
        tars = sorted(glob(os.path.join(glob_escape(spec), "*.tar")))
        if not tars:
            raise FileNotFoundError(f"no .tar shards in directory {spec} (shard spec {whole!r})")
        return tars
    # expand_urls handles {a..b} braces, '::'-joined lists and ${VAR} -> $WDS_VAR.
    urls: list[str] = []
    missing: list[str] = []
    for path in expand_urls(spec):
        if _GLOB_CHARS.search(path):
            found = sorted(glob(path))
            urls.extend(found)
            missing.extend([] if found else [path])
        elif os.path.isfile(path):
            urls.append(path)
        else:
            missing.append(path)
    if missing:
        raise FileNotFoundError(f"shard spec {whole!r}: {len(missing)} shard file(s) not found, e.g. {missing[0]}")
    return urls
