# Remote shards: http(s)/s3/gs through fsspec and webdataset-style pipe: URLs, with timeouts and retries.
"""Stage 1 and 5 for shards that are not local files (README.md, "Remote shards").

* Patterns: ``http(s)://``, ``s3://``, ``gs://`` (fsspec with s3fs / gcsfs) and ``pipe:COMMAND``
  (the command writes the shard to stdout, as in webdataset). Brace expansion always; globs and
  directory listing (a pattern ending in ``/``) where the store lists (S3, GCS, an HTTP server's
  HTML index).
* Reading keeps mmgen's order: a shard's samples are visited in the same permuted order as a
  local file of the same name (``shard_name``), so the same checkpoint resumes on local or
  remote shards. With a stored index (``mmgen data index`` writes ``<shard>.offsets.json`` next
  to each shard) a sample is one byte-range request, so resuming mid-shard reads only what is
  left; without one the shard is spooled to local disk once (or kept in the shard cache) and
  read like a local file, which re-opens and advances to the cursor on resume.
* Faults: every request has connect and read timeouts; transient failures (timeouts, dropped
  connections, HTTP 5xx, short reads, a failed pipe command) are retried with exponential
  backoff; a missing shard (404, no such key) is not retried. A shard that still fails raises
  ``ShardUnavailable``; the loader then skips it for this epoch and counts it
  (``unreachable_shard``).
* Credentials come from the environment the store's own way (``AWS_*`` variables or files,
  ``GOOGLE_APPLICATION_CREDENTIALS``, netrc for HTTP); nothing secret is ever in a config, a
  URL kept in a checkpoint, or a run record.
"""
from __future__ import annotations

import json
import logging
import os
import posixpath
import re
import selectors
import shlex
import subprocess
import time
from typing import Any, Callable

import braceexpand

from mmgen.errors import ConfigError, ShardUnavailable  # noqa: F401  (re-exported)

log = logging.getLogger(__name__)

REMOTE_PREFIXES = ("http://", "https://", "s3://", "gs://", "gcs://", "pipe:")
SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")
OFFSETS_SUFFIX = ".offsets.json"
INDEX_NAME = "shardindex.json"


def is_remote(path: str) -> bool:
    """Whether ``path`` names a shard that is not a local file."""
    return path.startswith(REMOTE_PREFIXES)


def shard_name(path: str) -> str:
    """The shard's file name, the same whether it is local, behind a URL or written by a pipe
    command (the command's last argument ending in a shard suffix): epoch permutations, sample
    orders and checkpoint fingerprints use it, so local and remote copies read identically."""
    if path.startswith("pipe:"):
        words = [w for w in shlex.split(path[5:]) if w.split("?")[0].endswith(SHARD_SUFFIXES)]
        return posixpath.basename(words[-1].split("?")[0]) if words else path
    if is_remote(path):
        return posixpath.basename(path.split("?")[0])
    return os.path.basename(path)


# ----------------------------------------------------------------------------------------------
# Filesystems, one per protocol and process, with the configured timeouts
# ----------------------------------------------------------------------------------------------

_FILESYSTEMS: dict[tuple, Any] = {}


def _protocol(url: str) -> str:
    return url.split("://", 1)[0] if "://" in url else "file"


def filesystem(url: str, cfg) -> Any:
    """The fsspec filesystem for ``url``'s protocol (timeouts from ``cfg``, a ``RemoteConfig``).

    Raises ConfigError (one line) when the protocol's package is not installed."""
    proto = _protocol(url)
    key = (proto, os.getpid(), cfg.connect_timeout_s, cfg.read_timeout_s)
    if key in _FILESYSTEMS:
        return _FILESYSTEMS[key]
    try:
        import fsspec
    except ImportError:
        raise ConfigError(f"data: remote shard '{url}' needs fsspec (pip install 'mmgen[remote]')") from None
    if proto in ("http", "https"):
        import aiohttp

        timeout = aiohttp.ClientTimeout(total=None, sock_connect=cfg.connect_timeout_s,
                                        sock_read=cfg.read_timeout_s)
        fs = fsspec.filesystem("http", client_kwargs={"timeout": timeout}, skip_instance_cache=True)
    elif proto == "s3":
        try:
            import s3fs  # noqa: F401
        except ImportError:
            raise ConfigError("data: s3:// shards need s3fs (pip install 'mmgen[remote]')") from None
        # retries are ours (backoff, counted); botocore's own would multiply them
        fs = fsspec.filesystem("s3", skip_instance_cache=True, config_kwargs={
            "connect_timeout": cfg.connect_timeout_s, "read_timeout": cfg.read_timeout_s,
            "retries": {"max_attempts": 1, "mode": "standard"}})
    elif proto in ("gs", "gcs"):
        try:
            import gcsfs  # noqa: F401
        except ImportError:
            raise ConfigError(f"data: gs:// shards need gcsfs, which is not installed "
                              f"(pip install gcsfs); shard pattern '{url}'") from None
        fs = fsspec.filesystem("gcs", skip_instance_cache=True,
                               requests_timeout=cfg.read_timeout_s)
    else:
        raise ConfigError(f"data: unsupported shard URL '{url}' (http(s)://, s3://, gs://, pipe:)")
    _FILESYSTEMS[key] = fs
    return fs


def _transient(exn: BaseException) -> bool:
    """A failure worth retrying: anything but a missing object or a permission refusal."""
    return not isinstance(exn, (FileNotFoundError, PermissionError, ConfigError))


def _describe(exn: BaseException) -> str:
    text = str(exn).strip().splitlines()[0] if str(exn).strip() else ""
    return f"{type(exn).__name__}{': ' + text[:200] if text else ''}"


def with_retries(url: str, cfg, what: str, fn: Callable[[], Any]) -> Any:
    """``fn()``, retried ``cfg.retries`` times with exponential backoff on transient failures.

    Raises ShardUnavailable naming the URL, the attempts and the last error."""
    attempts = 1 + max(0, cfg.retries)
    for attempt in range(attempts):
        try:
            return fn()
        except ShardUnavailable:
            raise
        except Exception as exn:  # noqa: BLE001 - any network/library error is classified here
            if not _transient(exn):
                raise ShardUnavailable(url, f"{what}: {_describe(exn)}") from None
            if attempt + 1 == attempts:
                raise ShardUnavailable(url, f"{what} failed {attempts} times, last: "
                                            f"{_describe(exn)}") from None
            delay = cfg.backoff_s * (2 ** attempt)
            log.info("data: %s of %s failed (%s); retry %d/%d in %.2fs", what, url,
                     _describe(exn), attempt + 1, attempts - 1, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


# ----------------------------------------------------------------------------------------------
# Stage 1: expand a remote pattern
# ----------------------------------------------------------------------------------------------

def expand_remote(part: str, cfg) -> list[str]:
    """URLs named by one remote pattern: brace expansion, then globs / listing where the store
    lists. A pattern without wildcards is taken as named (its existence is checked when read:
    a missing shard is skipped and counted, not a start-up error)."""
    if part.startswith("pipe:"):
        return list(braceexpand.braceexpand(part))
    out: list[str] = []
    for url in braceexpand.braceexpand(part):
        # "?" starts an HTTP query string, so only "*" and "[" make an HTTP URL a glob
        wild = "*[" if url.startswith(("http://", "https://")) else "*?["
        if not (url.endswith("/") or any(c in url.split("://", 1)[1] for c in wild)):
            out.append(url)
            continue
        fs = filesystem(url, cfg)
        proto = _protocol(url)
        try:
            if url.endswith("/"):
                found = [p for p in fs.find(url) if p.endswith(SHARD_SUFFIXES)]
            else:
                found = [p for p in fs.glob(url)]
        except Exception as exn:  # noqa: BLE001
            raise FileNotFoundError(f"shard pattern '{part}': cannot list {url} ({_describe(exn)})") from None
        for p in found:
            out.append(p if "://" in p else f"{proto}://{p}")
    return out


# ----------------------------------------------------------------------------------------------
# Stage 5: read a remote shard
# ----------------------------------------------------------------------------------------------

_USERINFO = re.compile(r"^[a-z][a-z0-9+.-]*://[^/@]*:[^/@]*@", re.I)


def check_no_credentials(pattern: str, where: str) -> None:
    """Refuse a shard URL with a password in it (``https://user:secret@host/...``): patterns are
    written into the run's config.yaml, so secrets belong in the environment (netrc, AWS_*)."""
    for part in pattern.split("::"):
        if _USERINFO.match(part.strip()):
            raise ConfigError(f"data config: {where} has credentials in its URL; they would be "
                              f"written to the run records: give them through the environment "
                              f"(~/.netrc, AWS_* variables, GOOGLE_APPLICATION_CREDENTIALS)")


def _parent(url: str) -> str:
    return url.split("?")[0].rsplit("/", 1)[0]


_INDEXES: dict[str, dict] = {}


def folder_index(url: str, cfg) -> dict[str, dict]:
    """``name -> entry`` of the ``shardindex.json`` next to ``url`` ({} if none); one request per
    folder and process."""
    folder = _parent(url)
    if folder not in _INDEXES:
        fs = filesystem(url, cfg)
        try:
            data = json.loads(with_retries(folder, cfg, "index read",
                                           lambda: fs.cat_file(f"{folder}/{INDEX_NAME}")))
            _INDEXES[folder] = {e["url"]: e for e in data.get("shardlist", [])}
        except (ShardUnavailable, ValueError, KeyError, TypeError):
            _INDEXES[folder] = {}
    return _INDEXES[folder]


def read_range(url: str, start: int, end: int, cfg) -> bytes:
    """Bytes ``[start, end)`` of ``url`` with retries; a short or wrong-length reply is retried."""
    fs = filesystem(url, cfg)

    def get() -> bytes:
        data = fs.cat_file(url, start=start, end=end)
        if len(data) != end - start:
            raise OSError(f"range {start}-{end}: got {len(data)} bytes")
        return data

    return with_retries(url, cfg, f"read of bytes {start}-{end}", get)


def _pipe_to(cmd: str, dst: str, read_timeout: float) -> None:
    """Run ``cmd`` (a shell command), its stdout into ``dst``; OSError on a stall or failure."""
    proc = subprocess.Popen(cmd, shell=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    try:
        with open(dst, "wb") as out:
            while True:
                if not sel.select(read_timeout):
                    raise TimeoutError(f"no output for {read_timeout}s")
                chunk = os.read(proc.stdout.fileno(), 1 << 20)
                if not chunk:
                    break
                out.write(chunk)
        rc = proc.wait(timeout=read_timeout)
        if rc != 0:
            err = proc.stderr.read().decode("utf-8", "replace").strip().splitlines()
            raise OSError(f"exit status {rc}{': ' + err[-1][:200] if err else ''}")
    finally:
        sel.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()


def download(url: str, dst: str, cfg) -> None:
    """Copy the whole shard ``url`` into the local file ``dst`` (retried; a partial file never
    stays at ``dst``: it is written to a temporary name and renamed)."""
    tmp = f"{dst}.part-{os.getpid()}"

    def get() -> None:
        try:
            if url.startswith("pipe:"):
                _pipe_to(url[5:], tmp, cfg.read_timeout_s)
            else:
                fs = filesystem(url, cfg)
                size = fs.size(url)
                fs.get_file(url, tmp)
                got = os.path.getsize(tmp)
                if size is not None and got != size:
                    raise OSError(f"connection closed after {got} of {size} bytes")
            os.replace(tmp, dst)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    with_retries(url, cfg, "download", get)
