"""Where a node keeps its state and its control socket, under systemd or as a user."""

from __future__ import annotations

import os
from pathlib import Path

from hivenode.agent.settings import Settings

SOCKET_NAME = "control.sock"


def state_dir(settings: Settings) -> Path:
    """`state_dir` from config, else systemd's $STATE_DIRECTORY, else the user state dir."""
    if settings.state_dir is not None:
        return settings.state_dir
    if env := os.environ.get("STATE_DIRECTORY"):
        return Path(env.split(":")[0])
    from platformdirs import user_state_path

    return user_state_path("hivenode")


def runtime_dir(settings: Settings) -> Path:
    """`runtime_dir` from config, else $RUNTIME_DIRECTORY, else the user runtime dir."""
    if settings.runtime_dir is not None:
        return settings.runtime_dir
    if env := os.environ.get("RUNTIME_DIRECTORY"):
        return Path(env.split(":")[0])
    from platformdirs import user_runtime_path

    return user_runtime_path("hivenode")


def control_socket(settings: Settings) -> Path:
    return runtime_dir(settings) / SOCKET_NAME
