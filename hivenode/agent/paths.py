"""Where a node keeps its state and its control socket, under systemd or as a user.

Deliberately free of pydantic: the CLI's client commands resolve the socket path from here
and must start in well under 300 ms.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path

SOCKET_NAME = "control.sock"
CONFIG_ENV = "HIVENODE_CONFIG"
SYSTEM_CONFIG = Path("/etc/hivenode/config.toml")
SYSTEM_RUNTIME_DIR = Path("/run/hivenode")
"""Where systemd's RuntimeDirectory=hivenode puts the socket of the system service."""


def state_dir(configured: Path | None) -> Path:
    """`state_dir` from config, else systemd's $STATE_DIRECTORY, else the user state dir."""
    if configured is not None:
        return configured
    if env := os.environ.get("STATE_DIRECTORY"):
        return Path(env.split(":")[0])
    from platformdirs import user_state_path

    return user_state_path("hivenode")


def runtime_dir(configured: Path | None) -> Path:
    """`runtime_dir` from config, else $RUNTIME_DIRECTORY, else the user runtime dir."""
    if configured is not None:
        return configured
    if env := os.environ.get("RUNTIME_DIRECTORY"):
        return Path(env.split(":")[0])
    from platformdirs import user_runtime_path

    return user_runtime_path("hivenode")


def control_socket(configured_runtime_dir: Path | None) -> Path:
    """Where the daemon listens for the control API."""
    return runtime_dir(configured_runtime_dir) / SOCKET_NAME


def config_path(explicit: Path | None = None) -> Path | None:
    """The TOML file to read: --config, then $HIVENODE_CONFIG, then the default paths."""
    if explicit is not None:
        return explicit
    if env := os.environ.get(CONFIG_ENV):
        return Path(env)
    for candidate in _default_config_paths():
        if candidate.is_file():
            return candidate
    return None


def _default_config_paths() -> list[Path]:
    paths = []
    if conf := os.environ.get("CONFIGURATION_DIRECTORY"):  # systemd ConfigurationDirectory=
        paths.append(Path(conf.split(":")[0]) / "config.toml")
    from platformdirs import user_config_path

    return [*paths, user_config_path("hivenode") / "config.toml", SYSTEM_CONFIG]


def client_socket_path(config: Path | None, flag: Path | None = None) -> Path:
    """The daemon's control socket as a client finds it, with the daemon's own precedence
    (flag, then HIVENODE_RUNTIME_DIR, then the file) but reading only that one key."""
    if flag is not None:
        return flag / SOCKET_NAME
    if env := os.environ.get("HIVENODE_RUNTIME_DIR"):
        return Path(env) / SOCKET_NAME
    source = config_path(config)
    configured = None
    if source is not None and source.is_file():
        try:
            value = tomllib.loads(source.read_text(encoding="utf-8")).get("runtime_dir")
        except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError):
            value = None  # the daemon reports a broken file; the client just looks by default
        configured = Path(value) if isinstance(value, str) else None
    own = runtime_dir(configured) / SOCKET_NAME
    system = SYSTEM_RUNTIME_DIR / SOCKET_NAME
    if configured is None and not own.exists() and system.exists():
        return system  # an admin's shell asking the system service
    return own
