"""`hivenode data ...`: the datasets this node trains on, kept in its state directory.

Thin like `cli.py`: parse, call `hivenode.models.datasets`, print. Mounted by `cli.py`, so this
module's top imports typer, the stdlib and `cli_common` only; numpy, scikit-learn and rich
load inside the commands that need them.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from hivenode.cli_common import EXIT_USAGE, JsonOpt, StateDirOpt, console, emit_json, fail

if TYPE_CHECKING:
    from hivenode.models.datasets import DatasetCatalog, DatasetEntry

data_app = typer.Typer(
    help="Register the datasets this node may train on; list, show and remove them.",
    no_args_is_help=True,
    add_completion=False,
)

_FILE_KINDS = (".npz", ".csv")


@data_app.command("add")
def add_command(
    name: str,
    source: Annotated[
        str,
        typer.Argument(help="A .npz or .csv file, or sklearn:digits|iris|breast_cancer|wine."),
    ],
    label_column: Annotated[
        str | None, typer.Option("--label-column", help="The csv column holding the labels.")
    ] = None,
    test_fraction: Annotated[
        float | None,
        typer.Option("--test-fraction", help="Share held out for testing (default 0.2)."),
    ] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the train/test split.")] = 0,
    preprocessing: Annotated[
        str | None,
        typer.Option(
            "--preprocessing",
            help="none, scale:F or minmax:LO,HI (default: none; scale:0.0625 for sklearn:digits).",
        ),
    ] = None,
    replace: Annotated[
        bool, typer.Option("--replace", help="Overwrite a dataset of the same name.")
    ] = False,
    state_dir: StateDirOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Register SOURCE (a .npz or .csv file, or sklearn:NAME) as NAME, after loading it
    once to check it."""
    from hivenode.models.datasets import DatasetError, check_request

    options: dict[str, Any] = {
        "label_column": label_column,
        "split_seed": seed,
        "preprocessing": preprocessing,
    }
    if test_fraction is not None:  # else the catalog's default: one home for it
        options["test_fraction"] = test_fraction
    spec = _source_spec(source)
    try:
        check_request(name, spec, **options)  # wrong input is a usage error, before any load
    except DatasetError as exc:
        fail(str(exc), EXIT_USAGE)
    catalog = _catalog(state_dir)
    with _reported():
        existed = any(entry.name == name for entry in catalog.entries())
        entry = catalog.add(name, spec, replace=replace, **options)
    if as_json:
        emit_json({**entry.to_json(), "replaced": existed})
        return
    verb = "replaced" if existed else "added"
    typer.echo(
        f"{verb} {entry.name}: {entry.samples} samples ({entry.train_samples} train, "
        f"{entry.test_samples} test), features {_shape(entry)}, {entry.num_classes} classes, "
        f"preprocessing {entry.preprocessing}"
    )


@data_app.command("list")
def list_command(state_dir: StateDirOpt = None, as_json: JsonOpt = False) -> None:
    """Every dataset of this node."""
    with _reported():
        entries = _catalog(state_dir).entries()
    if as_json:
        emit_json([entry.to_json() for entry in entries])
        return
    _show_table(entries)


@data_app.command("show")
def show_command(name: str, state_dir: StateDirOpt = None, as_json: JsonOpt = False) -> None:
    """One dataset: where it comes from, how it is split and preprocessed, what it holds."""
    with _reported():
        entry = _catalog(state_dir).get(name)
    if as_json:
        emit_json(entry.to_json())
        return
    _show_entry(entry)


@data_app.command("rm")
def rm_command(name: str, state_dir: StateDirOpt = None, as_json: JsonOpt = False) -> None:
    """Forget NAME; its source file stays where it is."""
    with _reported():
        entry = _catalog(state_dir).remove(name)
    if as_json:
        emit_json(entry.to_json())
        return
    typer.echo(f"removed {entry.name} ({entry.source} is left in place)")


# --- helpers ---------------------------------------------------------------------------------


def _source_spec(source: str) -> str:
    """A bare path ending .npz or .csv names its kind by its suffix; specs pass unchanged
    (the catalog makes paths absolute and says what is wrong with the rest)."""
    suffix = Path(source).suffix.lower()
    if suffix in _FILE_KINDS and not source.startswith(("npz:", "csv:")):
        return f"{suffix[1:]}:{source}"
    return source


def _catalog(state_dir: Path | None) -> DatasetCatalog:
    from hivenode.agent.paths import state_dir as resolve_state_dir
    from hivenode.models.datasets import DatasetCatalog

    return DatasetCatalog(resolve_state_dir(state_dir))


@contextmanager
def _reported() -> Iterator[None]:
    """A DatasetError inside becomes one line on stderr and exit 1."""
    from hivenode.models.datasets import DatasetError

    try:
        yield
    except DatasetError as exc:
        fail(str(exc))


def _shape(entry: DatasetEntry) -> str:
    return "×".join(str(d) for d in entry.feature_shape) or "-"


def _show_table(entries: list[DatasetEntry]) -> None:
    from rich.table import Table

    from hivenode.cli_views import human_bytes

    count = f"{len(entries)} dataset" + ("s" if len(entries) != 1 else "")
    table = Table(title=count, box=None, header_style="bold")
    for column in ("name", "samples", "train/test", "features", "classes", "size", "source"):
        table.add_column(column, justify="right" if column in ("samples", "size") else "left")
    for entry in entries:
        table.add_row(
            entry.name,
            str(entry.samples),
            f"{entry.train_samples}/{entry.test_samples}",
            _shape(entry),
            str(entry.num_classes),
            human_bytes(entry.size_bytes),
            entry.source,
        )
    console().print(table)


def _show_entry(entry: DatasetEntry) -> None:
    from rich.table import Table

    from hivenode.cli_views import human_bytes

    split = f"{entry.train_samples} train, {entry.test_samples} test"
    names = ", ".join(entry.label_names) or "-"
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold")
    table.add_column()
    for label, value in (
        ("name", entry.name),
        ("source", entry.source),
        ("label column", entry.label_column or "-"),
        ("samples", f"{entry.samples} ({split})"),
        ("split", f"test fraction {entry.test_fraction:g}, seed {entry.split_seed}"),
        ("preprocessing", entry.preprocessing),
        ("features", _shape(entry)),
        ("classes", f"{entry.num_classes} ({names})"),
        ("size", human_bytes(entry.size_bytes)),
    ):
        table.add_row(label, value)
    console().print(table)
