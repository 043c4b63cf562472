# Checksums of every checkpoint file (recorded in meta.json, verified before loading) and I/O error lines.
"""``meta.json["files"]`` maps each file of a checkpoint (path relative to the checkpoint
directory) to its size and SHA-256 (hashlib's, the same digest ``sha256sum`` prints). The
ranks share the hashing: after every file is written, rank ``r`` hashes every
``world_size``-th file of the sorted listing and rank 0 gathers the results into meta.json.
Verification before a resume is shared the same way.

A checkpoint written before checksums existed is checked for structure only: its ``.pt``
files must be complete zip archives whose CRCs match (torch.save writes a CRC-32 per record).
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import zipfile
from pathlib import Path

HASH = "sha256"
CHUNK = 8 << 20
META = "meta.json"


def list_files(ckpt: Path) -> list[str]:
    """Every regular file under ``ckpt`` except meta.json, as sorted relative POSIX paths."""
    out = []
    for p in ckpt.rglob("*"):
        if p.is_file() and not p.is_symlink():
            rel = p.relative_to(ckpt).as_posix()
            if rel != META:
                out.append(rel)
    return sorted(out)


def digest(path: Path) -> dict:
    """``{"bytes": size, "sha256": hex}`` of one file, read in 8 MiB chunks."""
    h = hashlib.new(HASH)
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
            size += len(chunk)
    return {"bytes": size, HASH: h.hexdigest()}


def checksum_share(ckpt: Path, rank: int, world_size: int) -> dict[str, dict]:
    """This rank's share of the checksums (every ``world_size``-th file from ``rank``)."""
    return {rel: digest(ckpt / rel) for rel in list_files(ckpt)[rank::world_size]}


def read_meta(ckpt: Path) -> dict:
    """The parsed meta.json (ValueError naming the problem if it is not a JSON object)."""
    try:
        meta = json.loads((ckpt / META).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{META} is not valid JSON ({e.msg} at byte {e.pos})") from None
    except UnicodeDecodeError:
        raise ValueError(f"{META} is not text") from None
    if not isinstance(meta, dict) or "step" not in meta:
        raise ValueError(f"{META} holds no checkpoint record")
    return meta


def verify_share(ckpt: Path, meta: dict, rank: int, world_size: int) -> list[str]:
    """What is wrong with this rank's share of the files ``meta`` lists (empty: nothing).

    Raises OSError for a file that exists but cannot be read (an I/O problem of the storage,
    not a damaged checkpoint: the caller must not set the checkpoint aside for it).
    """
    files = meta.get("files")
    if files is None:
        return legacy_problems(ckpt) if rank == 0 else []
    problems = []
    for rel in sorted(files)[rank::world_size]:
        want, path = files[rel], ckpt / rel
        if not path.is_file():
            problems.append(f"{rel} is missing")
            continue
        size = path.stat().st_size
        if size != want["bytes"]:
            problems.append(f"{rel} has {size} bytes, meta.json records {want['bytes']}")
            continue
        if digest(path)[HASH] != want[HASH]:
            problems.append(f"{rel} does not match its {HASH} in meta.json (changed or damaged on disk)")
    return problems


def legacy_problems(ckpt: Path) -> list[str]:
    """Structure checks of a checkpoint without checksums: non-empty files, complete zips."""
    problems = []
    if not (ckpt / "train_state.pt").is_file():
        problems.append("train_state.pt is missing")
    for rel in list_files(ckpt):
        path = ckpt / rel
        if path.stat().st_size == 0:
            problems.append(f"{rel} is empty")
        elif path.suffix == ".pt":
            try:
                with zipfile.ZipFile(path) as z:
                    bad = z.testzip()
                if bad is not None:
                    problems.append(f"{rel}: record {bad} fails its CRC check")
            except (zipfile.BadZipFile, EOFError, ValueError) as e:
                problems.append(f"{rel} is not a complete torch.save file ({e})")
    return problems


# -- write errors --------------------------------------------------------------------------------
_IO_WORDS = ("iostream", "unexpected pos", "file write failed", "pytorchstreamwriter", "no space left",
             "disk quota", "read-only file system", "input/output error")


def io_cause(exc: BaseException) -> OSError | None:
    """The OSError behind ``exc`` (itself, a cause or context, or one of DCP's per-rank
    failures), if any."""
    from mmgen.safe_load import find_in_chain

    return find_in_chain(exc, OSError)


def is_io_error(exc: BaseException) -> bool:
    """An error of the storage (OSError somewhere in the chain, or torch's C++ writer's
    message for a failed write), not of the program."""
    return io_cause(exc) is not None or any(w in str(exc).lower() for w in _IO_WORDS)


def disk_is_full(where: Path) -> bool:
    """No room left on ``where``'s file system (bytes or inodes)."""
    try:
        st = os.statvfs(where)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < (1 << 20) or (st.f_files > 0 and st.f_favail == 0)


def newest_file(root: Path) -> Path | None:
    """The file written last under ``root`` (the one a library was writing when it failed)."""
    try:
        files = [p for p in root.rglob("*") if p.is_file()]
    except OSError:
        return None
    return max(files, key=lambda p: p.stat().st_mtime_ns, default=None)


def describe_write_error(exc: BaseException, step: int, tmp: Path, path: Path | None = None) -> str:
    """One line: which checkpoint, what went wrong, which file.

    Args:
        exc: the error raised while writing.
        step: the checkpoint's step.
        tmp: the checkpoint's temporary directory.
        path: the file being written, if the caller knows it (else the error's file name, or
            the newest file under ``tmp``).
    """
    os_err = io_cause(exc)
    if (os_err is not None and os_err.errno == errno.ENOSPC) or disk_is_full(tmp if tmp.exists() else tmp.parent):
        cause = "no space left on device"
    elif os_err is not None and os_err.strerror:
        cause = os_err.strerror[0].lower() + os_err.strerror[1:]
    else:
        first = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        cause = f"write failed ({first[:160]})"
    target = path or (Path(os_err.filename) if os_err is not None and os_err.filename else None) or newest_file(tmp) or tmp
    return f"checkpoint step {step}: {cause} writing {target}"


def set_aside_name(ckpt: Path) -> Path:
    """``step_N.damaged`` (or ``step_N.damaged.2`` ... if taken): never matched as a checkpoint."""
    out = ckpt.with_name(ckpt.name + ".damaged")
    n = 2
    while out.exists():
        out = ckpt.with_name(f"{ckpt.name}.damaged.{n}")
        n += 1
    return out
