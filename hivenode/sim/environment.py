"""The environment of a `hivenode run` the simulator (or a test, or a benchmark) starts."""

from __future__ import annotations

import os
from collections.abc import Mapping

SYSTEMD_VARIABLES = (
    "STATE_DIRECTORY",
    "RUNTIME_DIRECTORY",
    "CONFIGURATION_DIRECTORY",
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "JOURNAL_STREAM",
)
"""Set by systemd for one service; a child node that inherited them would take the service's
directories, or send READY/WATCHDOG on its behalf."""


def isolated_environment(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """`environ` (default: this process's) without HIVENODE_* settings or systemd variables."""
    source = os.environ if environ is None else environ
    return {
        key: value
        for key, value in source.items()
        if not key.startswith("HIVENODE_") and key not in SYSTEMD_VARIABLES
    }
