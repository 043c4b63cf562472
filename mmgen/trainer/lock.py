# The run-directory lock: one training per runs/<name>/, safe on shared filesystems, stale after a crash.
"""Rank 0 holds ``runs/<name>/.lock`` from before anything in the run directory is written
until the process exits. The file is one JSON record of its owner: host, boot id and PID
namespace (which together say whether this machine can check the PID at all), PID and that
process's start time, the Slurm job, step and restart count, torchrun's run id and restart
count, and when it was taken.

Taking it is one atomic filesystem operation that works over NFS, Lustre and GPFS, where
``flock`` may be a no-op or local to one client: the record is written to a private file
and hard-linked to ``.lock`` (``link`` fails if the name exists; after an ambiguous NFS
reply the private file's link count says who won). Filesystems without hard links fall
back to ``O_CREAT | O_EXCL``.

An existing lock is stale, and is taken over with one log line, when
* its owner ran on this machine (same host name, boot id and PID namespace) and that
  process is gone (no such PID, a zombie, or a PID reused by a process that started later);
* or its owner was this Slurm job before a requeue: the same ``SLURM_JOB_ID`` with a lower
  ``SLURM_RESTART_COUNT`` (a requeued job lands on any node; the count tells it from another
  step of the same allocation that may run at the same time).
Anything else on another machine cannot be checked and is honoured: the training is refused
with one line naming the owner, unless ``trainer.force_unlock=true`` (for a lock left by a
crashed node outside Slurm). A lock whose owner provably runs on this machine is never
forced. Take-overs are serialised by a second, short-lived lock (``.lock.takeover``), so two
starters that both find a stale lock cannot both win.
"""
from __future__ import annotations

import errno
import json
import os
import socket
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from mmgen.errors import ConfigError

LOCK_NAME = ".lock"
TAKEOVER_STALE_S = 30.0  # a take-over lasts milliseconds; an older .lock.takeover was left by a crash
NO_HARD_LINKS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK, errno.ENOSYS}


class RunDirLocked(ConfigError):
    """Another training holds the run directory (one line: owner and how to override)."""


@dataclass
class Owner:
    host: str = ""
    boot_id: str = ""
    pid_ns: str = ""
    pid: int = 0
    parent_pid: int = 0           # torchrun's agent, for a worker: the same across its restarts
    proc_start: int = -1          # clock ticks after boot (/proc/PID/stat field 22); -1: unknown
    since: float = 0.0
    slurm_job_id: str = ""
    slurm_step_id: str = ""
    slurm_restart_count: int = 0
    torchelastic_run_id: str = ""
    torchelastic_restart_count: int = 0
    token: str = ""               # tells this lock from a later one at release

    @classmethod
    def from_json(cls, text: str) -> Owner:
        raw = json.loads(text)
        if not isinstance(raw, dict):
            raise ValueError("not a lock record")
        known = {k: v for k, v in raw.items() if k in cls.__dataclass_fields__}
        return cls(**known)

    def describe(self) -> str:
        slurm = f", Slurm job {self.slurm_job_id}" if self.slurm_job_id else ""
        when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.since)) if self.since else "an unknown time"
        return f"host {self.host or '?'}, pid {self.pid}{slurm}, since {when}"


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


def _proc_start(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks after boot; None if it does not run (or is a
    zombie); -1 where /proc cannot tell (then ``os.kill(pid, 0)`` decided)."""
    stat = _read(f"/proc/{pid}/stat")
    if stat:
        fields = stat[stat.rfind(")") + 2:].split()  # the command name may hold spaces and ')'
        return None if fields[0] in ("Z", "X") else int(fields[19])
    if os.path.isdir("/proc/self"):
        return None  # /proc works here and has no such process
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass  # it runs, as another user
    return -1


def this_process() -> Owner:
    """The record this process writes into the lock."""
    env = os.environ
    try:
        pid_ns = os.readlink("/proc/self/ns/pid")
    except OSError:
        pid_ns = ""
    start = _proc_start(os.getpid())
    return Owner(host=socket.gethostname(), boot_id=_read("/proc/sys/kernel/random/boot_id"), pid_ns=pid_ns,
                 pid=os.getpid(), parent_pid=os.getppid(), proc_start=-1 if start is None else start, since=time.time(),
                 slurm_job_id=env.get("SLURM_JOB_ID", ""), slurm_step_id=env.get("SLURM_STEP_ID", ""),
                 slurm_restart_count=int(env.get("SLURM_RESTART_COUNT", "0") or 0),
                 torchelastic_run_id=env.get("TORCHELASTIC_RUN_ID", ""),
                 torchelastic_restart_count=int(env.get("TORCHELASTIC_RESTART_COUNT", "0") or 0),
                 token=uuid.uuid4().hex)


def same_machine(a: Owner, b: Owner) -> bool:
    """Whether ``b`` can check ``a``'s PID: same host name, same boot, same PID namespace (a
    container with its own PID namespace, or a rebooted or cloned host, counts as another)."""
    return bool(a.host) and (a.host, a.boot_id, a.pid_ns) == (b.host, b.boot_id, b.pid_ns)


def earlier_incarnation(old: Owner, me: Owner) -> str | None:
    """Why ``old`` is an earlier incarnation of the job ``me`` belongs to, or None.

    Args:
        old: the record left by a process (a lock owner, or who started a run over).
        me: this process's record.
    """
    if (old.slurm_job_id and old.slurm_job_id == me.slurm_job_id
            and me.slurm_restart_count > old.slurm_restart_count):
        return f"Slurm job {me.slurm_job_id} was requeued (restart {me.slurm_restart_count})"
    # torchrun's run id alone is not unique (default "none"), but its agent is our parent and alive
    if (old.torchelastic_run_id and same_machine(old, me)
            and (old.torchelastic_run_id, old.parent_pid) == (me.torchelastic_run_id, me.parent_pid)
            and me.torchelastic_restart_count > old.torchelastic_restart_count):
        return f"torchrun restarted its workers (restart {me.torchelastic_restart_count})"
    return None


def stale_reason(owner: Owner, me: Owner) -> tuple[str | None, bool]:
    """(why the lock may be taken over or None, whether the owner provably runs)."""
    if same_machine(owner, me):
        start = _proc_start(owner.pid)
        if start is None or (owner.proc_start >= 0 and start >= 0 and start != owner.proc_start):
            return f"its process {owner.pid} on this host is gone", False
        return None, True
    return earlier_incarnation(owner, me), False


class RunLock:
    """The lock on one run directory, held by this process (rank 0) until ``release``."""

    def __init__(self, path: Path, owner: Owner):
        self.path, self.owner = path, owner

    @classmethod
    def acquire(cls, run_dir: Path, force: bool = False) -> tuple[RunLock, list[str]]:
        """Take ``run_dir/.lock``; return the lock and the lines to log (a take-over).

        Args:
            run_dir: the run directory (created if missing: only the directory itself).
            force: take over a lock whose owner cannot be checked (``trainer.force_unlock``).
        Raises:
            RunDirLocked: another training holds it.
        """
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        path, me = run_dir / LOCK_NAME, this_process()
        for _ in range(10):  # each round: the name was free, or the lock changed hands under us
            if _create(path, me):
                return cls(path, me), []
            text = _read(str(path))
            if not text:
                time.sleep(0.05)  # gone meanwhile, or an O_EXCL writer between create and write
                continue
            try:
                owner = Owner.from_json(text)
            except (ValueError, TypeError):
                owner = None
            reason, running = stale_reason(owner, me) if owner else (None, False)
            shown = owner.describe() if owner else f"an unreadable lock record {text[:60]!r}"
            if reason is None and force and not running:
                reason = "trainer.force_unlock=true"
            if reason is None:
                raise RunDirLocked(_refusal(run_dir, path, shown, running))
            if _take_over(path, text, me):
                return cls(path, me), [f"run directory {run_dir}: took over the lock of {shown}: {reason}"]
        raise RunDirLocked(f"run directory {run_dir}: the lock {path} kept changing hands: another training "
                           f"is starting there")

    def release(self) -> None:
        """Remove the lock if it is still this process's (not after a forced take-over)."""
        text = _read(str(self.path))
        try:
            mine = bool(text) and Owner.from_json(text).token == self.owner.token
        except (ValueError, TypeError):
            mine = False
        if mine:
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass


def _refusal(run_dir: Path, path: Path, shown: str, running: bool) -> str:
    if running:
        return (f"run directory {run_dir} is in use by a training on this host ({shown}; lock {path}): "
                f"wait for it to end or stop it, or use another name=")
    return (f"run directory {run_dir} is in use by another training ({shown}; lock {path}): wait for it "
            f"to end or use another name=; if it is gone (e.g. its node crashed), rerun with "
            f"trainer.force_unlock=true")


def _create(path: Path, owner: Owner) -> bool:
    """Create ``path`` holding ``owner``'s record atomically; False if it exists."""
    data = json.dumps(asdict(owner)) + "\n"
    private = path.with_name(f"{path.name}.{owner.token}")
    with open(private, "w") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())  # a crash right after the link must not leave an empty lock
    try:
        os.link(private, path)
        return True
    except FileExistsError:
        # NFS: a retried LINK whose first reply was lost reports EEXIST although it worked
        return os.stat(private).st_nlink == 2
    except OSError as e:
        if e.errno not in NO_HARD_LINKS:
            raise
        return _create_exclusive(path, data)
    finally:
        private.unlink()


def _create_exclusive(path: Path, data: str) -> bool:
    """Fallback for filesystems without hard links (readers retry the brief empty state)."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return True


def _take_over(path: Path, stale_text: str, me: Owner) -> bool:
    """Replace the stale lock whose record is ``stale_text`` by ``me``'s, under
    ``.lock.takeover``; False if the lock changed meanwhile (the caller looks again)."""
    guard = path.with_name(path.name + ".takeover")
    if not _create(guard, me):
        try:  # left by a process that crashed inside a take-over
            if time.time() - guard.stat().st_mtime > TAKEOVER_STALE_S:
                guard.unlink()
        except FileNotFoundError:
            pass
        time.sleep(0.1)
        return False
    try:
        if _read(str(path)) != stale_text:
            return False
        path.unlink(missing_ok=True)  # a forced owner on another host may release it right now
        return _create(path, me)  # a plain starter may win the free name first: then it holds the lock
    finally:
        guard.unlink()
