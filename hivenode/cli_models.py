"""`hivenode models ...`: identify and analyze model files, and the local model registry.

Thin like `cli.py`: parse, call the library, print. Mounted by `cli.py`, so this module's
top imports nothing heavy (no pydantic, no sqlite, no ML framework): `hivenode status` pays
for it on every start. Shared helpers come from `cli_common`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer

from hivenode.cli_common import (
    EXIT_FAILURE,
    EXIT_USAGE,
    ConfigOpt,
    JsonOpt,
    RuntimeDirOpt,
    StateDirOpt,
    ask_daemon,
    console,
    emit_json,
    fail,
)

if TYPE_CHECKING:
    from hivenode.models.analysis import Analysis, Purpose
    from hivenode.models.info import ModelInfo
    from hivenode.models.registry import ModelVersion, Registry

models_app = typer.Typer(
    help="Identify and analyze model files; keep versions of them in this node's registry.",
    no_args_is_help=True,
    add_completion=False,
)

FETCH_TIMEOUT = 3600.0
"""A model of several GB over a slow link; the daemon bounds each chunk on its own."""
PEER_FIT_TIMEOUT = 5.0
"""Seconds to wait for the daemon's peer table; the analysis prints without it."""
LINEAGE_DEPTH = 20


@models_app.command("identify")
def identify_command(path: Path, as_json: JsonOpt = False) -> None:
    """What a model file or directory is: framework, family, architecture, size, safety."""
    info = _identify(path, compute_hash=True)
    if as_json:
        emit_json(info.as_json())
        return
    from hivenode.cli_models_views import show_model_info

    show_model_info(console(), info)


@models_app.command("analyze")
def analyze_command(
    path: Path,
    dataset_size: Annotated[
        int | None, typer.Option("--dataset-size", min=0, help="Training samples per epoch.")
    ] = None,
    throughput: Annotated[
        float | None,
        typer.Option("--throughput", help="Samples per second a node trains at (> 0)."),
    ] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1)] = 32,
    sequence_length: Annotated[
        int | None, typer.Option("--sequence-length", min=1, help="Tokens per sample.")
    ] = None,
    optimizer: Annotated[
        str, typer.Option("--optimizer", help="adam, adamw, sgd_momentum or sgd.")
    ] = "adam",
    config: ConfigOpt = None,
    runtime_dir: RuntimeDirOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Memory, GPU, cores and epoch time the model needs, and which known nodes can host it."""
    from hivenode.models.analysis import Optimizer, analyze
    from hivenode.models.errors import ModelError

    try:
        chosen = Optimizer(optimizer)
    except ValueError:
        _fail(f"unknown optimizer {optimizer!r}: use one of {', '.join(Optimizer)}", usage=True)
    if throughput is not None and not throughput > 0:
        _fail(f"--throughput must be above 0 samples/s, not {throughput:g}", usage=True)
    info = _identify(path, compute_hash=False)
    try:
        analysis = analyze(
            info,
            dataset_size,
            throughput,
            batch_size=batch_size,
            sequence_length=sequence_length,
            optimizer=chosen,
        )
    except ModelError as exc:
        _fail(str(exc))
    hosts, hosts_note = _host_fit(info, analysis, config, runtime_dir)
    if as_json:
        emit_json(
            {
                "model": info.as_json(),
                "analysis": analysis.model_dump(mode="json"),
                "hosts": hosts,
                "hosts_note": hosts_note,
            }
        )
        return
    from hivenode.cli_models_views import show_analysis

    show_analysis(console(), info, analysis, hosts, hosts_note)


@models_app.command("add")
def add_command(
    path: Path,
    name: Annotated[str, typer.Option("--name", "-n", help="Model name; versions count up.")],
    parent: Annotated[
        str | None,
        typer.Option("--parent", help="What it was derived from: NAME[@VERSION] or a sha256."),
    ] = None,
    state_dir: StateDirOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Store a model file or directory as the next version of NAME."""
    from hivenode.models.errors import ModelError
    from hivenode.models.registry import check_name

    try:
        check_name(name)
    except ModelError as exc:
        _fail(str(exc), usage=True)
    info = _identify(path, compute_hash=False)  # the registry hashes what it stores
    if not info.safe:
        _fail(
            f"{path} is unsafe (its pickle would import {', '.join(info.unsafe_globals)}); "
            "not added: the registry shares models with peers"
        )
    with _open_registry(state_dir) as registry:
        try:
            before = {v.version for v in registry.versions(name)}
        except ModelError:
            before = set()
        with _reported():
            model = registry.add(path, name, info, parent=parent)
    added = model.version not in before
    if as_json:
        emit_json({**model.as_json(), "added": added})
        return
    from hivenode.cli_views import human_bytes

    what = f"{model.framework} {model.kind}, {human_bytes(model.size_bytes)}"
    if added:
        typer.echo(f"added {model.spec} ({what}, sha256 {model.sha256[:16]}…)")
    else:
        typer.echo(f"{model.spec} already holds these bytes ({what}); nothing added")


@models_app.command("fetch")
def fetch_command(
    sha256: str,
    peer: Annotated[str, typer.Option("--from", help="Peer id of a node that holds the blob.")],
    name: Annotated[
        str | None, typer.Option("--name", "-n", help="Also register it as the next version.")
    ] = None,
    config: ConfigOpt = None,
    runtime_dir: RuntimeDirOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Fetch a model by its sha256 from a peer into this node's registry, through the
    daemon: hash-checked, and a fetch that broke resumes where it stopped."""
    body = {"sha256": sha256, "peer": peer, "name": name}
    with console().status(f"fetching {sha256[:12]}… from {peer[-10:]}"):
        result = ask_daemon(config, runtime_dir, "/v1/models/fetch", "POST", body, FETCH_TIMEOUT)
    if as_json:
        emit_json(result)
        return
    from hivenode.cli_views import human_bytes

    verb = "fetched" if result.get("fetched") else "already held"
    typer.echo(f"{verb} {sha256} ({human_bytes(result.get('size_bytes'))})")
    if model := result.get("model"):
        typer.echo(f"registered as {model['name']}@{model['version']}")


@models_app.command("list")
def list_command(state_dir: StateDirOpt = None, as_json: JsonOpt = False) -> None:
    """The latest version of every model in the registry."""
    with _open_registry(state_dir) as registry, _reported():
        models = registry.list()
    if as_json:
        emit_json([m.as_json() for m in models])
        return
    from hivenode.cli_models_views import show_versions

    count = f"{len(models)} model" + ("s" if len(models) != 1 else "")
    show_versions(console(), models, f"{count} (latest versions)")


@models_app.command("show")
def show_command(spec: str, state_dir: StateDirOpt = None, as_json: JsonOpt = False) -> None:
    """One version (NAME@VERSION, or NAME for the latest): info, metrics, lineage."""
    name, version = _parse_spec(spec)
    with _open_registry(state_dir) as registry, _reported():
        model = registry.show(name, version)
        lineage = _lineage(registry, model)
    if as_json:
        emit_json({**model.as_json(), "lineage": lineage})
        return
    from hivenode.cli_models_views import show_version

    show_version(console(), model, lineage)


@models_app.command("versions")
def versions_command(name: str, state_dir: StateDirOpt = None, as_json: JsonOpt = False) -> None:
    """Every version of NAME, oldest first."""
    name, _ = _parse_spec(name)
    with _open_registry(state_dir) as registry, _reported():
        models = registry.versions(name)
    if as_json:
        emit_json([m.as_json() for m in models])
        return
    from hivenode.cli_models_views import show_versions

    count = f"{len(models)} version" + ("s" if len(models) != 1 else "")
    show_versions(console(), models, f"{name}: {count}")


@models_app.command("export")
def export_command(
    spec: str, dest: Path, state_dir: StateDirOpt = None, as_json: JsonOpt = False
) -> None:
    """Write NAME@VERSION to DEST (a new path): the file byte for byte, or the directory."""
    name, version = _parse_spec(spec)
    with _open_registry(state_dir) as registry, _reported():
        model = registry.show(name, version)
        registry.export(model.name, model.version, dest)
    if as_json:
        emit_json({"model": model.spec, "sha256": model.sha256, "path": str(dest)})
        return
    typer.echo(f"exported {model.spec} to {dest}")


@models_app.command("rm")
def rm_command(spec: str, state_dir: StateDirOpt = None, as_json: JsonOpt = False) -> None:
    """Remove NAME@VERSION, or every version of NAME; unused bytes are deleted."""
    name, version = _parse_spec(spec)
    with _open_registry(state_dir) as registry, _reported():
        removed = registry.remove(name, version)
    if as_json:
        emit_json([{"model": m.spec, "sha256": m.sha256} for m in removed])
        return
    typer.echo("removed " + ", ".join(m.spec for m in removed))


# --- helpers ---------------------------------------------------------------------------------


def _identify(path: Path, compute_hash: bool) -> ModelInfo:
    from hivenode.models.errors import ModelError
    from hivenode.models.identify import identify

    try:
        return identify(path, hash=compute_hash)
    except ModelError as exc:
        _fail(str(exc))
    except OSError as exc:
        _fail(f"cannot read {path}: {exc.strerror or exc}")


def _host_fit(
    info: ModelInfo, analysis: Analysis, config: Path | None, runtime_dir: Path | None
) -> tuple[list[dict[str, Any]] | None, str | None]:
    """Per node of the daemon's peer table (itself first): fits for inference and training,
    with the reason; or None and why not, when no daemon answers."""
    from hivenode.agent.control_client import ControlError, call
    from hivenode.agent.paths import client_socket_path

    socket_path = client_socket_path(config, runtime_dir)
    if not socket_path.exists():
        return None, "no daemon running: peer fit not shown"
    try:
        status = call(socket_path, "GET", "/v1/status", timeout=PEER_FIT_TIMEOUT)
        peers = call(socket_path, "GET", "/v1/peers", timeout=PEER_FIT_TIMEOUT)
    except ControlError as exc:
        return None, f"peer fit not shown: {exc}"
    rows = [_host_row(info, analysis, status, own=True)]
    rows += [_host_row(info, analysis, peer, own=False) for peer in peers]
    return rows, None


def _host_row(
    info: ModelInfo, analysis: Analysis, node: dict[str, Any], own: bool
) -> dict[str, Any]:
    from pydantic import ValidationError

    from hivenode.models.analysis import fits
    from hivenode.protocol.advert import Hardware

    row: dict[str, Any] = {"peer_id": str(node.get("peer_id", "?")), "self": own}
    try:
        hardware = Hardware.model_validate(node.get("hardware") or {})
    except ValidationError:
        hardware = None
    purposes: tuple[Purpose, ...] = ("inference", "training")
    for purpose in purposes:
        if hardware is None or not node.get("hardware"):
            row[purpose] = {"fits": False, "reason": "no hardware advert from this node"}
            continue
        ok, reason = fits(info, analysis, hardware, purpose)
        row[purpose] = {"fits": ok, "reason": reason}
    return row


def _lineage(registry: Registry, model: ModelVersion) -> list[str]:
    """Parents of `model`, nearest first, as far as the registry knows them."""
    from hivenode.models.errors import ModelError

    chain: list[str] = []
    parent = model.parent
    while parent is not None and len(chain) < LINEAGE_DEPTH:
        chain.append(parent)
        try:
            parent = registry.resolve(parent).parent
        except ModelError:  # a sha256, or a version since removed: the chain ends here
            break
    return chain


def _open_registry(state_dir: Path | None) -> Registry:
    from hivenode.agent.paths import state_dir as default_state_dir
    from hivenode.models.errors import ModelError
    from hivenode.models.registry import Registry

    try:
        return Registry(state_dir or default_state_dir(None))
    except ModelError as exc:
        _fail(str(exc))


def _parse_spec(spec: str) -> tuple[str, int | None]:
    from hivenode.models.errors import ModelError
    from hivenode.models.registry import parse_spec

    try:
        return parse_spec(spec)
    except ModelError as exc:
        _fail(str(exc), usage=True)


@contextmanager
def _reported() -> Iterator[None]:
    """A ModelError inside becomes one line on stderr and exit 1."""
    from hivenode.models.errors import ModelError

    try:
        yield
    except ModelError as exc:
        _fail(str(exc))


def _fail(message: str, usage: bool = False) -> NoReturn:
    fail(message, EXIT_USAGE if usage else EXIT_FAILURE)
