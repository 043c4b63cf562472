# Errors every layer may raise for bad input: one line that names the value (entries exit 2).
from __future__ import annotations


class ConfigError(ValueError):
    """A configuration value is wrong; the message is one line that names it."""
