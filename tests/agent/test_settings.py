"""Config precedence (file < HIVENODE_* < flags) and errors that name the key and its source."""

from __future__ import annotations

from pathlib import Path

import pytest

from hivenode.agent.errors import ConfigError
from hivenode.agent.settings import load_settings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for key in list(os.environ):
        if key.startswith("HIVENODE_"):
            monkeypatch.delenv(key)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


def test_flags_beat_environment_which_beats_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = write(tmp_path, "advert_period = 5\nping_period = 3\n[gossip]\ndegree = 3\n")
    assert load_settings(config).advert_period == 5
    monkeypatch.setenv("HIVENODE_ADVERT_PERIOD", "7")
    monkeypatch.setenv("HIVENODE_GOSSIP__DEGREE", "5")
    settings = load_settings(config)
    assert (settings.advert_period, settings.gossip.degree, settings.ping_period) == (7, 5, 3)
    assert load_settings(config, advert_period=9).advert_period == 9


def test_bad_value_in_file_names_key_and_file(tmp_path: Path) -> None:
    config = write(tmp_path, 'advert_period = "soon"\n')
    with pytest.raises(ConfigError, match=r"'advert_period' \(file .*config.toml\)"):
        load_settings(config)


def test_typo_in_file_is_an_error_not_silence(tmp_path: Path) -> None:
    config = write(tmp_path, "advert_perod = 3\n")
    with pytest.raises(ConfigError, match="advert_perod"):
        load_settings(config)


def test_bad_environment_value_names_the_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HIVENODE_PING_PERIOD", "often")
    with pytest.raises(ConfigError, match="HIVENODE_PING_PERIOD"):
        load_settings(write(tmp_path, ""))


def test_psk_must_be_32_bytes_of_hex(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="psk"):
        load_settings(write(tmp_path, 'psk = "abc"\n'))
    key = "ab" * 32
    assert load_settings(write(tmp_path, f'psk = "{key}"\n')).psk == key


def test_broken_toml_and_missing_file_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_settings(write(tmp_path, "advert_period = \n"))
    with pytest.raises(ConfigError, match="not found"):
        load_settings(tmp_path / "absent.toml")
