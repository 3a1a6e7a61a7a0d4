"""`hivenode data ...`: add, list, show and rm, their JSON, and one-line errors."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner, Result

from hivenode.cli_data import data_app
from hivenode.sim.environment import isolated_environment


def invoke(*args: str | Path, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(
        data_app, [str(a) for a in args], env={"COLUMNS": "160", **(env or {})}
    )


def invoke_json(*args: str | Path) -> Any:
    result = invoke(*args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def assert_one_line_error(result: Result, code: int, *fragments: str) -> None:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == code, result.output
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("hivenode: error:")
    for fragment in fragments:
        assert fragment in lines[0]
    assert "Traceback" not in result.output


@pytest.fixture
def state(tmp_path: Path) -> Path:
    return tmp_path / "state"


@pytest.fixture
def csv_file(tmp_path: Path) -> Path:
    rows = "".join(f"{i},{i % 5},{'yes' if i % 2 else 'no'}\n" for i in range(20))
    path = tmp_path / "answers.csv"
    path.write_text("a,b,answer\n" + rows)
    return path


def test_add_list_show_rm_round_trip_in_json(state: Path, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x=rng.standard_normal((30, 2, 3)), y=rng.integers(0, 3, 30))

    added = invoke_json("add", "blobs", tmp_path / "d.npz", "--state-dir", state, "--seed", "2")
    digits = invoke_json("add", "digits", "sklearn:digits", "--state-dir", state)

    assert added["source"] == f"npz:{tmp_path / 'd.npz'}" and added["replaced"] is False
    assert added["feature_shape"] == [2, 3] and added["samples"] == 30
    assert added["split_seed"] == 2 and added["test_samples"] == 6
    assert digits["preprocessing"] == "scale:0.0625"
    listed = invoke_json("list", "--state-dir", state)
    assert [d["name"] for d in listed] == ["blobs", "digits"]
    assert invoke_json("show", "digits", "--state-dir", state) == listed[1]
    assert invoke_json("rm", "blobs", "--state-dir", state)["name"] == "blobs"
    assert [d["name"] for d in invoke_json("list", "--state-dir", state)] == ["digits"]


def test_csv_path_with_options_and_human_output(state: Path, csv_file: Path) -> None:
    result = invoke(
        "add", "answers", csv_file, "--label-column", "answer", "--test-fraction", "0.25",
        "--preprocessing", "minmax:0,20", "--state-dir", state,
    )  # fmt: skip

    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("added answers: 20 samples (15 train, 5 test)")
    listing = invoke("list", "--state-dir", state)
    assert "answers" in listing.stdout and "15/5" in listing.stdout
    shown = invoke("show", "answers", "--state-dir", state)
    assert "minmax:0.0,20.0" in shown.stdout and "no, yes" in shown.stdout
    removed = invoke("rm", "answers", "--state-dir", state)
    assert removed.stdout.startswith("removed answers")


def test_replace_overwrites_and_says_so(state: Path) -> None:
    invoke_json("add", "d", "sklearn:iris", "--state-dir", state)

    replaced = invoke_json("add", "d", "sklearn:wine", "--replace", "--state-dir", state)

    assert replaced["replaced"] is True and replaced["source"] == "sklearn:wine"


def test_state_dir_defaults_as_the_daemon_resolves_it(state: Path) -> None:
    env = {**isolated_environment(), "STATE_DIRECTORY": str(state)}

    result = invoke("add", "iris", "sklearn:iris", env=env)

    assert result.exit_code == 0, result.output
    assert (state / "datasets.json").exists()


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["add", "d", "table.parquet"], ["unknown source 'table.parquet'"]),
        (["add", "d", "sklearn:mnist"], ["unknown builtin dataset 'mnist'"]),
        (["add", "d", "missing.npz"], ["no such file", "missing.npz"]),
        (["add", "d", "sklearn:iris", "--preprocessing", "log"], ["bad preprocessing 'log'"]),
        (["add", "d", "sklearn:iris", "--test-fraction", "0"], ["between 0 and 1"]),
        (["add", "d/e", "sklearn:iris"], ["invalid dataset name"]),
        (["add", "d", "{csv}"], ["needs a label column"]),
    ],
)
def test_bad_input_exits_2_on_one_line(
    state: Path, csv_file: Path, args: list[str], fragments: list[str]
) -> None:
    result = invoke(*(a.format(csv=csv_file) for a in args), "--state-dir", state)

    assert_one_line_error(result, 2, *fragments)
    assert not (state / "datasets.json").exists()


def test_failures_exit_1_on_one_line_and_lose_nothing(state: Path, csv_file: Path) -> None:
    invoke_json("add", "iris", "sklearn:iris", "--state-dir", state)
    before = (state / "datasets.json").read_bytes()

    assert_one_line_error(
        invoke("add", "iris", "sklearn:wine", "--state-dir", state), 1, "exists already"
    )
    assert_one_line_error(
        invoke("add", "c", csv_file, "--label-column", "nope", "--state-dir", state),
        1,
        "no column 'nope'",
    )
    assert_one_line_error(invoke("show", "wine", "--state-dir", state), 1, "no dataset named")
    assert_one_line_error(invoke("rm", "wine", "--state-dir", state), 1, "no dataset named")
    assert (state / "datasets.json").read_bytes() == before


def test_list_of_an_empty_node_creates_nothing(state: Path) -> None:
    assert invoke_json("list", "--state-dir", state) == []
    assert "0 datasets" in invoke("list", "--state-dir", state).stdout
    assert not os.path.exists(state)
