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
