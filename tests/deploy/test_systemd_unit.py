"""The shipped unit passes systemd's own checks; the example config documents every default."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

from hivenode.agent.settings import (
    GossipSettings,
    InferenceSettings,
    RateLimitSettings,
    SecuritySettings,
    Settings,
    load_settings,
)

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
UNIT = DEPLOY / "hivenode.service"
EXAMPLE_CONFIG = DEPLOY / "config.example.toml"
INSTALLED_EXECUTABLE = "/opt/hivenode/bin/hivenode"
MAX_EXPOSURE = 2.5
# keys the example explains in prose instead of a value line: a sample key would get used
UNSET_IN_EXAMPLE = {"psk"}


def systemd_analyze() -> str:
    """The tool, or a failure (not a skip): an unchecked unit is how hardening rots."""
    path = shutil.which("systemd-analyze")
    if path is None:
        pytest.fail(
            "systemd-analyze not found: install Debian's systemd package "
            "(apt-get install systemd); .ci/run installs it in CI"
        )
    return path


def run_analyze(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [systemd_analyze(), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={"PATH": "/usr/bin:/bin", "SYSTEMD_LOG_COLOR": "0", "SYSTEMD_PAGER": ""},
    )


def verifiable_copy(directory: Path, unit_text: str) -> Path:
    """The unit as `systemd-analyze verify` can check it on a machine without the install.

    verify fails a unit whose ExecStart program does not exist or is not executable, and
    /opt/hivenode/bin/hivenode exists only on an installed host. The copy starts this test's
    Python instead; every other line is the shipped one. (User=hivenode need not exist: verify
    does not resolve users. `--root` is no help: it also moves the search path for
    sysinit.target and the other units the service depends on.)
    """
    executable = f"ExecStart={INSTALLED_EXECUTABLE} "
    assert unit_text.count(executable) == 1, f"expected one line starting {executable!r}"
    copy = directory / UNIT.name
    copy.write_text(unit_text.replace(executable, f"ExecStart={sys.executable} "))
    return copy


def verify_complaints(unit: Path) -> list[str]:
    """What verify says about this unit: warnings, errors, its exit status."""
    result = run_analyze("verify", "--recursive-errors=no", str(unit))
    # host units pulled in as dependencies (network-online.target, ...) may have their own
    # quirks on a developer's machine; only lines about this unit count
    complaints = [
        line
        for line in (result.stdout + result.stderr).splitlines()
        if UNIT.name in line or str(unit) in line
    ]
    if result.returncode != 0:
        complaints.append(f"exit status {result.returncode}: {result.stderr.strip()}")
    return complaints


def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    assert verify_complaints(verifiable_copy(tmp_path, UNIT.read_text())) == []


def test_verify_catches_a_broken_unit(tmp_path: Path) -> None:
    """Keeps the test above honest: a misspelt value must produce a complaint."""
    broken = UNIT.read_text().replace("Type=notify\n", "Type=notifyy\n")
    assert verify_complaints(verifiable_copy(tmp_path, broken)) != []


def test_unit_exposure_is_low() -> None:
    result = run_analyze("security", "--offline=true", "--no-pager", str(UNIT))
    output = result.stdout + result.stderr
    match = re.search(r"Overall exposure level for hivenode\.service: (\d+(?:\.\d+)?)", output)
    assert match is not None, output
    assert float(match[1]) <= MAX_EXPOSURE, output


def unit_value(key: str) -> str:
    values = re.findall(rf"^{key}=(.*)$", UNIT.read_text(), flags=re.MULTILINE)
    assert len(values) == 1, f"{key}= appears {len(values)} times in {UNIT}"
    return str(values[0])


def test_stop_timeout_leaves_room_for_a_clean_shutdown() -> None:
    default_shutdown = Settings.model_fields["shutdown_timeout"].default
    assert float(unit_value("TimeoutStopSec")) > default_shutdown


def test_unit_runs_the_installed_agent_as_a_notify_service() -> None:
    assert unit_value("ExecStart") == f"{INSTALLED_EXECUTABLE} run"
    assert unit_value("Type") == "notify"
    assert unit_value("User") == "hivenode"


# --- deploy/config.example.toml ------------------------------------------------------------


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """HIVENODE_* in the developer's environment would override both files alike."""
    for key in list(os.environ):
        if key.startswith("HIVENODE_"):
            monkeypatch.delenv(key)


def uncommented(text: str) -> str:
    """The example with every `# key = value` line switched on."""
    return re.sub(r"^# ([a-z_]+ = .*)$", r"\1", text, flags=re.MULTILINE)


@pytest.mark.usefixtures("clean_env")
def test_example_config_as_shipped_yields_the_defaults(tmp_path: Path) -> None:
    empty = tmp_path / "empty.toml"
    empty.write_text("")
    # model_dump: each load_settings() call builds its own Settings subclass, and pydantic
    # models of different classes never compare equal
    assert load_settings(EXAMPLE_CONFIG).model_dump() == load_settings(empty).model_dump()


@pytest.mark.usefixtures("clean_env")
def test_example_config_lists_every_key_with_its_default(tmp_path: Path) -> None:
    text = uncommented(EXAMPLE_CONFIG.read_text())
    values: dict[str, Any] = tomllib.loads(text)
    gossip = values.pop("gossip")
    inference = values.pop("inference")
    security = values.pop("security")
    rate_limits = security.pop("rate_limits")
    tables = {"gossip", "inference", "security"}
    assert set(values) == set(Settings.model_fields) - tables - UNSET_IN_EXAMPLE
    assert set(gossip) == set(GossipSettings.model_fields)
    assert set(inference) == set(InferenceSettings.model_fields)
    assert set(security) == set(SecuritySettings.model_fields) - {"rate_limits"}
    assert set(rate_limits) == set(RateLimitSettings.model_fields)
    for key in UNSET_IN_EXAMPLE:
        assert key in EXAMPLE_CONFIG.read_text()

    switched_on = tmp_path / "config.toml"
    switched_on.write_text(text)
    loaded = load_settings(switched_on).model_dump()
    empty = tmp_path / "empty.toml"
    empty.write_text("")
    defaults = load_settings(empty).model_dump()
    # keys without a default (None) show an example value instead
    differing = {key for key in defaults if loaded[key] != defaults[key]}
    assert differing == {key for key, value in defaults.items() if value is None} - (
        UNSET_IN_EXAMPLE
    )
