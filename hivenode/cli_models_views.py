"""How `hivenode models ...` shows models, analyses and registry versions to a person."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from hivenode.cli_views import human_bytes, human_duration
from hivenode.models.analysis import Analysis
from hivenode.models.info import ModelInfo
from hivenode.models.registry import ModelVersion

MAX_LAYERS_SHOWN = 30


def show_model_info(console: Console, info: ModelInfo) -> None:
    table = _grid()
    table.add_row("format", info.format)
    table.add_row("framework", info.framework.value)
    family = info.family.value + (f" / {info.subtype}" if info.subtype else "")
    table.add_row("family", family)
    table.add_row("architecture", info.architecture)
    table.add_row("parameters", _count(info.parameters))
    table.add_row("input shape", _shape(info.input_shape))
    table.add_row("dtypes", ", ".join(info.dtypes) or "-")
    table.add_row("size", f"{human_bytes(info.size_bytes)} ({info.size_bytes:,} bytes)")
    table.add_row("sha256", info.sha256 or "-")
    if info.safe:
        table.add_row("safe", "[green]yes[/]")
    else:
        offenders = escape(", ".join(info.unsafe_globals) or "unknown globals")
        table.add_row("safe", f"[red]NO[/]: would import {offenders}")
    for key, value in sorted(info.details.items()):
        table.add_row(escape(key), escape(_plain(value)))
    console.print(table)
    if info.layers:
        _show_layers(console, info)


def show_analysis(
    console: Console,
    info: ModelInfo,
    analysis: Analysis,
    hosts: list[dict[str, Any]] | None,
    hosts_note: str | None,
) -> None:
    table = _grid()
    table.add_row(
        "model", f"{info.framework.value} {info.architecture}, {_count(analysis.parameters)} params"
    )
    table.add_row("complexity", analysis.complexity.value)
    table.add_row("dtype", f"{analysis.dtype} ({analysis.bytes_per_parameter} B/param)")
    inference, training = analysis.inference, analysis.training
    table.add_row(
        "inference",
        f"{human_bytes(inference.total_bytes)} = weights {human_bytes(inference.weights_bytes)}"
        f" + activations {human_bytes(inference.activations_bytes)}"
        f" (batch {analysis.inference_batch_size})",
    )
    table.add_row(
        "training",
        f"{human_bytes(training.total_bytes)} = weights {human_bytes(training.weights_bytes)}"
        f" + gradients {human_bytes(training.gradients_bytes)}"
        f" + {analysis.optimizer.value} state {human_bytes(training.optimizer_bytes)}"
        f" + activations {human_bytes(training.activations_bytes)} (batch {analysis.batch_size},"
        f" {analysis.activation_method})",
    )
    if analysis.inference_bytes_by_dtype:
        table.add_row(
            "inference by dtype",
            ", ".join(
                f"{k} {human_bytes(v)}" for k, v in analysis.inference_bytes_by_dtype.items()
            ),
        )
    if analysis.gpu_training_bytes is None or analysis.gpu_inference_bytes is None:
        table.add_row("GPU", "not used by this framework")
    else:
        table.add_row(
            "GPU memory",
            f"inference {human_bytes(analysis.gpu_inference_bytes)}, training "
            f"{human_bytes(analysis.gpu_training_bytes)}"
            + (" (GPU recommended)" if analysis.gpu_recommended else ""),
        )
    table.add_row("CPU cores", str(analysis.cpu_cores))
    table.add_row("epoch", _epoch(analysis))
    console.print(table)
    for note in analysis.notes:
        console.print(f"[dim]note: {escape(note)}[/]")
    if hosts is None:
        console.print(escape(hosts_note or "peer fit not shown"))
        return
    _show_hosts(console, hosts)


def show_versions(console: Console, versions: list[ModelVersion], title: str) -> None:
    if not versions:
        console.print("the registry is empty; add a model with `hivenode models add PATH --name N`")
        return
    table = Table(title=title, box=None, header_style="bold")
    for column in ("model", "framework", "architecture", "params", "size", "sha256", "parent"):
        table.add_column(column, no_wrap=True)
    table.add_column("created", no_wrap=True)
    for model in versions:
        table.add_row(
            escape(model.spec),
            model.framework,
            model.info.architecture,
            _count(model.info.parameters),
            human_bytes(model.size_bytes),
            model.sha256[:12],
            escape(model.parent or "-"),
            model.created,
        )
    console.print(table)


def show_version(console: Console, model: ModelVersion, lineage: list[str]) -> None:
    table = _grid()
    table.add_row("model", escape(model.spec))
    table.add_row("stored as", f"{model.kind}, {human_bytes(model.size_bytes)}")
    table.add_row("sha256", model.sha256)
    table.add_row("created", model.created)
    table.add_row("lineage", escape(" ← ".join([model.spec, *lineage])))
    table.add_row(
        "metrics",
        escape(", ".join(f"{k}={_plain(v)}" for k, v in sorted(model.metrics.items())) or "-"),
    )
    console.print(table)
    show_model_info(console, model.info)


def _show_layers(console: Console, info: ModelInfo) -> None:
    table = Table(title=f"{len(info.layers)} layers", box=None, header_style="bold")
    for column in ("layer", "kind", "params", "shape"):
        table.add_column(column, no_wrap=True)
    for layer in info.layers[:MAX_LAYERS_SHOWN]:
        table.add_row(
            escape(layer.name), escape(layer.kind), f"{layer.parameters:,}", _shape(layer.shape)
        )
    console.print(table)
    if len(info.layers) > MAX_LAYERS_SHOWN:
        console.print(f"… {len(info.layers) - MAX_LAYERS_SHOWN} more (--json lists all)")


def _show_hosts(console: Console, hosts: list[dict[str, Any]]) -> None:
    table = Table(title="which nodes can host it", box=None, header_style="bold")
    for column in ("node", "inference", "training"):
        table.add_column(column)
    for host in hosts:
        name = f"…{host['peer_id'][-10:]}" + (" (this node)" if host.get("self") else "")
        table.add_row(escape(name), _fit(host["inference"]), _fit(host["training"]))
    console.print(table)


def _fit(verdict: dict[str, Any]) -> str:
    mark = "[green]yes[/]" if verdict["fits"] else "[red]no[/]"
    return f"{mark} {escape(verdict['reason'])}"


def _epoch(analysis: Analysis) -> str:
    if analysis.epoch_seconds is not None:
        return (
            f"{human_duration(analysis.epoch_seconds)} for {analysis.dataset_size:,} samples at "
            f"{analysis.throughput_samples_per_s:g} samples/s"
        )
    if analysis.dataset_size is None:
        return "unknown (pass --dataset-size and --throughput)"
    return "unknown (pass --throughput: the samples/s a node trains at)"


def _grid() -> Table:
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold", no_wrap=True)
    table.add_column()
    return table


def _count(value: int | None) -> str:
    return "-" if value is None else f"{value:,}"


def _shape(shape: tuple[int | None, ...] | None) -> str:
    if shape is None:
        return "-"
    return "(" + ", ".join("?" if d is None else str(d) for d in shape) + ")"


def _plain(value: Any) -> str:
    if isinstance(value, list | tuple):
        shown = ", ".join(str(v) for v in value[:10])
        return f"[{shown}{', …' if len(value) > 10 else ''}]"
    return str(value)
