"""`hivenode plan` and `hivenode qtable ...`: the planner's choice for a job, explained, and
this node's Q-table (show, import an old `q_table.pkl` or a JSON export, export).

Thin like `cli.py`: typer and the stdlib at import time; the planner, pydantic, numpy (and
torch, for a zoo model's layers) load inside the commands.
"""

from __future__ import annotations

import json
import math
import tomllib
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
    from hivenode.planner.plan import Plan
    from hivenode.planner.qtable import QTable
    from hivenode.planner.state import JobShape, Layer, NodeView

qtable_app = typer.Typer(
    help="This node's Q-table: show it, import an old q_table.pkl or a JSON export, export it.",
    no_args_is_help=True,
    add_completion=False,
)
NodesJsonOpt = Annotated[
    Path | None,
    typer.Option(
        "--nodes-json",
        help="Candidate nodes from a file (`hivenode peers --json` rows or NodeView fields) "
        "instead of the running daemon's peer table.",
    ),
]
PLAN_KEYS = frozenset(
    {"params", "samples", "private", "memory_mb", "feature_shape", "num_classes", "layers"}
)


def plan_command(
    job_file: Path,
    as_json: JsonOpt = False,
    state_dir: StateDirOpt = None,
    nodes_json: NodesJsonOpt = None,
    config: ConfigOpt = None,
    runtime_dir: RuntimeDirOpt = None,
) -> None:
    """Which strategy the planner picks for JOB_FILE on the swarm's trainers, and why.

    JOB_FILE is a federated job (`hivenode jobs submit`'s TOML) with an optional [plan]
    table: params, samples, private, memory_mb, feature_shape + num_classes (to count a torch
    zoo model's parameters and layers), layers (a list of name/flops/params/activation_bytes/
    output_shape tables).
    """
    from hivenode.planner.plan import make_plan
    from hivenode.planner.state import PlannerError

    raw = _read_toml(job_file)
    rows = _read_nodes(nodes_json) if nodes_json else _daemon_nodes(config, runtime_dir)
    try:
        nodes = [_node_view(row) for row in rows if _is_trainer(row)]
    except (TypeError, ValueError, KeyError, AttributeError) as exc:
        _usage(f"a node row is malformed: {exc!r}")
    try:
        job = _job_shape(raw, nodes)
    except (PlannerError, TypeError, ValueError, KeyError, AttributeError) as exc:
        _usage(f"{job_file}: {exc}")
    try:
        plan = make_plan(job, nodes, _load_table(state_dir))
    except PlannerError as exc:
        fail(str(exc))
    if as_json:
        emit_json(plan.as_json())
    else:
        _show_plan(plan)


@qtable_app.command("show")
def show_command(state_dir: StateDirOpt = None, as_json: JsonOpt = False) -> None:
    """Every visited state: the best action, Q-values and visits per action."""
    from hivenode.planner.state import ACTIONS, State

    table = _load_table(state_dir)
    visited = {key[:4] for o in table.swarm.origins() for key, _ in table.swarm.cells(o)}
    states: list[dict[str, Any]] = []
    for index in sorted(visited):
        state = State.from_index(index)
        q, visits = table.q_values(state), table.visit_counts(state)
        states.append(
            {
                "state": list(index),
                "best": table.greedy(state, [a for a in ACTIONS if visits[a]]).value,
                "q": {a.value: q[a] for a in ACTIONS},
                "visits": {a.value: visits[a] for a in ACTIONS},
            }
        )
    if as_json:
        emit_json(
            {
                "origin": table.origin,
                "origins": table.swarm.origins(),
                "epsilon": table.epsilon,
                "states": states,
            }
        )
        return
    from rich.table import Table

    grid = Table(title=f"Q-table of {table.origin}: {len(states)} visited states")
    for column in ("state", "best", *(a.value for a in ACTIONS)):
        grid.add_column(column)
    for row in states:
        cells = [f"{row['q'][a.value]:+.3f} ({row['visits'][a.value]})" for a in ACTIONS]
        grid.add_row("-".join(map(str, row["state"])), row["best"], *cells)
    console().print(grid)


@qtable_app.command("import")
def import_command(
    file: Path,
    state_dir: StateDirOpt = None,
    config: ConfigOpt = None,
    runtime_dir: RuntimeDirOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Merge FILE into this node's table: a JSON export, or an old q_table.pkl (a 4×3×4×3×5
    numpy array, read without unpickling; any other pickle is refused). A running daemon
    merges it into its live table and gossips it; without one (or with --state-dir) the
    table file is changed."""
    import base64

    from hivenode.agent.control_client import ControlError, DaemonNotRunning, call
    from hivenode.agent.paths import client_socket_path

    try:
        data = file.read_bytes()
    except OSError as exc:
        _usage(f"cannot read {file}: {exc.strerror or exc}")
    reply: dict[str, Any] | None = None
    if state_dir is None:
        body = {"data": base64.b64encode(data).decode()}
        socket = client_socket_path(config, runtime_dir)
        try:
            reply = call(socket, "POST", "/v1/qtable/import", body=body)
        except DaemonNotRunning:
            reply = None
        except ControlError as exc:  # the daemon refusing the file is a usage error
            fail(str(exc), EXIT_USAGE if exc.status == 400 else EXIT_FAILURE)
    if reply is None:
        reply = _import_offline(data, file, state_dir)
    if as_json:
        emit_json(reply)
    else:
        typer.echo(f"imported {reply['imported_cells']} cells from {file} into {reply['path']}")


def _import_offline(data: bytes, file: Path, state_dir: Path | None) -> dict[str, Any]:
    from hivenode.agent.qtable_gossip import import_into
    from hivenode.planner.state import PlannerError

    table = _load_table(state_dir)
    try:
        changed = import_into(table, data)
    except (PlannerError, ValueError) as exc:
        _usage(f"{file}: {exc}")
    return {"imported_cells": changed, "path": str(_save(table, state_dir))}


@qtable_app.command("export")
def export_command(file: Path, state_dir: StateDirOpt = None) -> None:
    """Write this node's table to FILE as JSON (what `hivenode qtable import` reads)."""
    from hivenode.fsutil import atomic_write

    table = _load_table(state_dir)
    try:
        atomic_write(file, json.dumps(table.to_json(), indent=1, sort_keys=True).encode(), 0o644)
    except OSError as exc:
        fail(f"cannot write {file}: {exc.strerror or exc}")
    typer.echo(f"exported {file}")


def _usage(message: str) -> NoReturn:
    fail(message, EXIT_USAGE)


def _state_dir(state_dir: Path | None) -> Path:
    from hivenode.agent.paths import state_dir as default_state_dir

    return state_dir or default_state_dir(None)


def _load_table(state_dir: Path | None) -> QTable:
    from hivenode.planner.qtable import QTable
    from hivenode.planner.state import PlannerError

    try:
        return QTable.load(_state_dir(state_dir))
    except PlannerError as exc:
        fail(str(exc))


def _save(table: QTable, state_dir: Path | None) -> Path:
    try:
        return table.save(_state_dir(state_dir))
    except OSError as exc:
        fail(f"cannot write the Q-table: {exc.strerror or exc}")


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        _usage(f"cannot read {path}: {exc.strerror or exc}")
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        _usage(f"{path} is not valid TOML: {exc}")


def _read_nodes(path: Path) -> list[dict[str, Any]]:
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        _usage(f"cannot read {path}: {exc.strerror or exc}")
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        _usage(f"{path} is not JSON: {exc}")
    if not isinstance(rows, list) or not all(isinstance(row, dict) for row in rows):
        _usage(f"{path} must hold a JSON list of node objects")
    return rows


def _daemon_nodes(config: Path | None, runtime_dir: Path | None) -> list[dict[str, Any]]:
    """This node (from /v1/status) and its peer table (/v1/peers)."""
    status = ask_daemon(config, runtime_dir, "/v1/status")
    peers = ask_daemon(config, runtime_dir, "/v1/peers")
    return [{**status, "local": True}, *peers]


def _is_trainer(row: dict[str, Any]) -> bool:
    """Rows with roles must include `trainer`: only trainers run training work."""
    roles = row.get("roles")
    return not roles or "trainer" in roles


def _node_view(row: dict[str, Any]) -> NodeView:
    """A NodeView from a /v1/peers or /v1/status row, or from NodeView's own field names."""
    from hivenode.planner.state import NodeView

    hardware = row.get("hardware") or {}
    cpu = hardware.get("cpu") or {}
    gpus = hardware.get("gpus") or []
    datasets = row.get("datasets") or {}
    if isinstance(datasets, list):  # adverts list DatasetInfo objects
        datasets = {d["name"]: int(d.get("samples", 0)) for d in datasets}
    rtt, throughput = row.get("rtt_ms"), row.get("throughput")
    return NodeView(
        peer_id=str(row["peer_id"]),
        cores=int(row.get("cores") or cpu.get("affinity_cores") or cpu.get("logical_cores") or 1),
        memory_bytes=int(
            row.get("memory_bytes") or (hardware.get("memory") or {}).get("total_bytes") or 0
        ),
        gpu_memory_bytes=int(
            row.get("gpu_memory_bytes")
            or max((int(g.get("memory_total_bytes", 0)) for g in gpus), default=0)
        ),
        throughput=None if throughput is None else float(throughput),
        rtt_ms=None if rtt is None else float(rtt),
        local=bool(row.get("local", False)),
        datasets={str(k): int(v) for k, v in dict(datasets).items()},
    )


def _job_shape(raw: dict[str, Any], nodes: list[NodeView]) -> JobShape:
    """JobSpec (validated as `jobs submit` does) plus the [plan] table."""
    from pydantic import ValidationError

    from hivenode.aggregator.job_spec import JobSpec
    from hivenode.planner.state import JobShape, PlannerError

    raw = dict(raw)
    extra = raw.pop("plan", {})
    if not isinstance(extra, dict) or not set(extra) <= PLAN_KEYS:
        raise PlannerError(f"[plan] takes only {', '.join(sorted(PLAN_KEYS))}")
    try:
        spec = JobSpec.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise PlannerError(f"{'.'.join(map(str, first['loc']))}: {first['msg']}") from exc
    params, layers = extra.get("params"), tuple(_layer(x) for x in extra.get("layers", []))
    input_shape = tuple(int(d) for d in extra.get("feature_shape", ()))
    if (params is None or not layers) and "feature_shape" in extra and "num_classes" in extra:
        if spec.model.framework != "torch":
            raise PlannerError("feature_shape/num_classes count only torch zoo models")
        counted, zoo_layers = _zoo_layers(spec, input_shape, int(extra["num_classes"]))
        params, layers = params if params is not None else counted, layers or zoo_layers
    if params is None:
        raise PlannerError("add [plan] params (or feature_shape and num_classes for a zoo model)")
    samples = extra.get("samples")
    if samples is None:
        samples = sum(n.datasets.get(spec.dataset, 0) for n in nodes) or None
    if samples is None:
        raise PlannerError(f"add [plan] samples: no node reports dataset {spec.dataset!r}")
    memory_mb = extra.get("memory_mb")
    return JobShape(
        params=int(params),
        samples=int(samples),
        private=bool(extra.get("private", False)),
        memory_bytes=None if memory_mb is None else int(float(memory_mb) * 2**20),
        dataset=spec.dataset,
        batch_size=spec.train.batch_size,
        epochs=spec.train.local_epochs,
        clients_per_round=spec.clients_per_round,
        deadline_s=spec.deadline_s,
        input_shape=input_shape,
        layers=layers,
    )


def _layer(raw: Any) -> Layer:
    from hivenode.planner.state import Layer

    return Layer(
        name=str(raw["name"]),
        flops=float(raw.get("flops", 0.0)),
        params=int(raw.get("params", 0)),
        activation_bytes=int(raw.get("activation_bytes", 0)),
        output_shape=tuple(int(d) for d in raw.get("output_shape", ())),
    )


def _zoo_layers(
    spec: Any, feature_shape: tuple[int, ...], classes: int
) -> tuple[int, tuple[Layer, ...]]:
    """Parameters and layers of a torch zoo model, from one forward pass on a zero sample.

    FLOPs per sample: 2 · weights · output positions for a layer with weights (a dense layer
    has one position, a convolution H·W), else one per output element; activations: the
    output's float32 bytes.
    """
    from hivenode.models.training.backend import TrainingError
    from hivenode.planner.state import Layer, PlannerError

    try:
        import torch

        from hivenode.models.training.zoo import build_model

        model = build_model(spec.model.name, spec.model.options, feature_shape, classes)
    except ImportError as exc:
        raise PlannerError(f"counting a zoo model needs torch: {exc}") from exc
    except TrainingError as exc:
        raise PlannerError(str(exc)) from exc
    modules = [*model.get_submodule("features").children(), model.get_submodule("head")]
    layers = []
    x = torch.zeros((1, *feature_shape))
    with torch.no_grad():
        for index, module in enumerate(modules):
            x = module(x)
            shape = tuple(int(d) for d in x.shape[1:])
            weights = sum(p.numel() for name, p in module.named_parameters() if "weight" in name)
            positions = math.prod(shape[1:]) if len(shape) > 1 else 1
            flops = 2.0 * weights * positions if weights else float(math.prod(shape))
            name = f"{type(module).__name__.lower()}{index}"
            params = sum(p.numel() for p in module.parameters())
            layers.append(Layer(name, flops, params, 4 * math.prod(shape), shape))
    return sum(p.numel() for p in model.parameters()), tuple(layers)


def _show_plan(plan: Plan) -> None:
    from rich.table import Table

    out = console()
    out.print(plan.explain(nodes=False), markup=False, highlight=False)
    nodes = Table(title="nodes")
    for column in ("peer", "throughput (samples/s)", "RTT ms", "memory GiB", "work"):
        nodes.add_column(column)
    for row in plan.per_node():
        rtt = "-" if row["rtt_ms"] is None else f"{row['rtt_ms']:.1f}"
        guessed = "" if row["throughput_measured"] else " (guessed)"
        nodes.add_row(
            row["peer_id"] + (" (self)" if row["local"] else ""),
            f"{row['throughput']:.0f}{guessed}",
            rtt,
            f"{row['capacity_bytes'] / 2**30:.1f}",
            row["work"],
        )
    out.print(nodes)
