# Errors every layer may raise for bad input: one line that names the value (entries exit 2).
from __future__ import annotations


class ConfigError(ValueError):
    """A configuration value is wrong; the message is one line that names it."""


class ShardUnavailable(OSError):
    """A remote shard that could not be read after the configured retries, or is missing
    (mmgen/data/remote.py); ``url`` and ``reason`` name it for the skip log."""

    def __init__(self, url: str, reason: str):
        super().__init__(f"{url}: {reason}")
        self.url, self.reason = url, reason


class DataUnavailableError(RuntimeError):
    """The data cannot go on: e.g. too many remote shards in a row unreachable. Entries print
    :func:`one_line` of it and exit 1."""


def one_line(e: BaseException) -> str:
    """The message of ``e`` as one line: a DataLoader worker re-raises its exception in the main
    process with the worker's traceback in the message; its last line holds the original."""
    lines = [l for l in str(e).splitlines() if l.strip()]
    last = lines[-1] if lines else type(e).__name__
    name = type(e).__name__
    return last.split(f"{name}: ", 1)[-1] if f"{name}: " in last else last
