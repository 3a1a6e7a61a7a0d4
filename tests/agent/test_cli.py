"""The `hivenode` command as a user runs it: the console script in a subprocess."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from conftest import Pair

Cli = Callable[..., subprocess.CompletedProcess[str]]


def error_lines(result: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.strip()]


# --- init --------------------------------------------------------------------------------


def _init(cli: Cli, config: Path, state: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return cli("init", "--config", config, "--state-dir", state, "--json", *extra)


@pytest.fixture
def no_hivenode_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """load_settings in this process must see the file only."""
    for key in list(os.environ):
        if key.startswith("HIVENODE_"):
            monkeypatch.delenv(key)


def test_init_writes_a_loadable_config_and_a_private_identity(
    home: Path, cli: Cli, no_hivenode_env: None
) -> None:
    from hivenode.agent.settings import load_settings

    config, state = home / "etc" / "config.toml", home / "state"
    result = _init(cli, config, state)

    assert result.returncode == 0, result.stderr
    printed = json.loads(result.stdout)
    assert printed["config"] == str(config)
    assert Path(printed["state_dir"]) == state
    assert printed["peer_id"].startswith("12D3KooW")
    assert load_settings(config).state_dir == state
    identity = state / "identity.key"
    assert stat.S_IMODE(identity.stat().st_mode) == 0o600


def test_init_refuses_to_overwrite_without_force(home: Path, cli: Cli) -> None:
    config, state = home / "config.toml", home / "state"
    assert _init(cli, config, state).returncode == 0
    written = config.read_bytes()
    config.write_bytes(written + b"\n# edited by hand\n")

    again = _init(cli, config, state)

    assert again.returncode == 1
    lines = error_lines(again)
    assert len(lines) == 1, again.stderr
    assert lines[0].startswith("hivenode: error:") and "--force" in lines[0]
    assert "Traceback" not in again.stderr
    assert config.read_bytes().endswith(b"# edited by hand\n")


def test_init_with_force_rewrites_the_config_but_keeps_the_identity(home: Path, cli: Cli) -> None:
    config, state = home / "config.toml", home / "state"
    first = _init(cli, config, state)
    assert first.returncode == 0, first.stderr
    key = (state / "identity.key").read_bytes()
    config.write_text("# edited by hand\n")

    forced = _init(cli, config, state, "--force")

    assert forced.returncode == 0, forced.stderr
    assert json.loads(forced.stdout)["peer_id"] == json.loads(first.stdout)["peer_id"]
    assert (state / "identity.key").read_bytes() == key
    assert "edited by hand" not in config.read_text()


def test_init_config_stays_valid_toml_when_the_state_dir_needs_escaping(
    home: Path, cli: Cli, no_hivenode_env: None
) -> None:
    from hivenode.agent.settings import load_settings

    # quotes and backslashes need escaping in TOML; a character beyond the BMP must not
    # turn into a surrogate pair (json.dumps' \ud83d\ude00 is not valid TOML)
    config, state = home / "config.toml", home / 'state "quoted" \\ dir \N{GRINNING FACE}'
    result = _init(cli, config, state)

    assert result.returncode == 0, result.stderr
    assert load_settings(config).state_dir == state
    assert (state / "identity.key").is_file()


# --- client commands without a daemon ----------------------------------------------------


@pytest.mark.parametrize("command", ["status", "peers"])
def test_client_command_without_daemon_fails_with_one_line(
    command: str, home: Path, cli: Cli
) -> None:
    empty = home / "no-daemon-here"
    empty.mkdir()

    result = cli(command, "--runtime-dir", empty)

    assert result.returncode == 1
    lines = error_lines(result)
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("hivenode: error:")
    assert "not running" in lines[0]
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


# --- invalid configuration ---------------------------------------------------------------


def _run_with_config(
    cli: Cli, home: Path, config: Path, **env: dict[str, str]
) -> subprocess.CompletedProcess[str]:
    # a valid config would start a daemon: the timeout ends such a run and fails the test
    return cli(
        "run",
        "--config",
        config,
        "--state-dir",
        home / "state",
        "--runtime-dir",
        home / "run",
        "--listen",
        "/ip4/127.0.0.1/tcp/0",
        "--no-metrics",
        timeout=30,
        **env,
    )


def _assert_usage_error(result: subprocess.CompletedProcess[str], *mentions: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = error_lines(result)
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("hivenode: error:")
    for text in mentions:
        assert text in lines[0]
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("content", "key"),
    [
        ('advert_period = "soon"\n', "advert_period"),
        ("advert_perod = 5\n", "advert_perod"),
        ('[gossip]\ndegree = "six"\n', "gossip.degree"),
    ],
    ids=["bad-value", "unknown-key", "bad-nested-value"],
)
def test_run_rejects_an_invalid_config_file_naming_key_and_file(
    content: str, key: str, home: Path, cli: Cli
) -> None:
    config = home / "config.toml"
    config.write_text(content)

    result = _run_with_config(cli, home, config)

    _assert_usage_error(result, f"'{key}'", str(config))
    assert not (home / "run").exists()


def test_run_rejects_broken_toml_naming_the_file(home: Path, cli: Cli) -> None:
    config = home / "config.toml"
    config.write_text("advert_period = \n[gossip\n")

    result = _run_with_config(cli, home, config)

    _assert_usage_error(result, str(config), "TOML")


def test_run_rejects_an_invalid_environment_variable_naming_it(
    home: Path, cli: Cli, env: dict[str, str]
) -> None:
    config = home / "config.toml"
    config.write_text("")

    result = _run_with_config(cli, home, config, env={**env, "HIVENODE_ADVERT_PERIOD": "abc"})

    _assert_usage_error(result, "advert_period", "HIVENODE_ADVERT_PERIOD")


# --- commands that need no daemon --------------------------------------------------------


def test_hardware_json_reports_this_machine(home: Path, cli: Cli) -> None:
    result = cli("hardware", "--state-dir", home, "--json")

    assert result.returncode == 0, result.stderr
    hardware = json.loads(result.stdout)
    assert hardware["cpu"]["logical_cores"] == os.cpu_count()
    assert hardware["memory"]["total_bytes"] > 0
    assert "torch" in hardware["frameworks"]


# --- client commands stay light ----------------------------------------------------------

LIGHT_CLIENT = textwrap.dedent(
    """
    import json, sys
    from hivenode.cli import app
    app(["status", "--runtime-dir", sys.argv[1], "--json"], standalone_mode=False)
    heavy = [m for m in ("libp2p", "torch", "tensorflow", "pydantic") if m in sys.modules]
    print(json.dumps(heavy))
    """
)


def test_status_command_imports_no_heavy_module(pair: Pair) -> None:
    result = subprocess.run(
        [sys.executable, "-c", LIGHT_CLIENT, str(pair.a.runtime_dir)],
        env=pair.a.env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert result.returncode == 0, result.stderr
    *answer, heavy = result.stdout.strip().splitlines()
    assert json.loads("\n".join(answer))["peer_id"] == pair.a.peer_id
    assert json.loads(heavy) == []
