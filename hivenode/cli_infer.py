"""`hivenode infer NAME --input FILE` and `hivenode models serve|deploy|undeploy|stats
NAME`: inference through the local daemon. Thin like `cli.py`: typer and the stdlib at
import time; numpy only once a command reads or prints a tensor."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from hivenode.cli_common import (
    EXIT_USAGE,
    ConfigOpt,
    JsonOpt,
    RuntimeDirOpt,
    ask_daemon,
    emit_json,
    fail,
)

SHOWN_ROWS = 10
HTTP_MARGIN_S = 5.0


def infer_command(
    name: Annotated[str, typer.Argument(help="model: NAME or NAME@VERSION")],
    input_file: Annotated[
        Path,
        typer.Option(
            "--input",
            "-i",
            help='inputs, batch first: .npy, or .json (a nested list or {"dtype", "shape", "b64"})',
        ),
    ],
    timeout: Annotated[
        float, typer.Option("--timeout", min=0.001, help="seconds, the retry included")
    ] = 10.0,
    not_idempotent: Annotated[
        bool,
        typer.Option(
            "--not-idempotent", help="never resend it after a worker may have computed it"
        ),
    ] = False,
    config: ConfigOpt = None,
    runtime_dir: RuntimeDirOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Run NAME on the inputs in --input, on the swarm worker expected to answer fastest."""
    from hivenode.inference.errors import InferenceError
    from hivenode.inference.tensor_json import tensor_from_json, tensor_to_json

    try:
        inputs = tensor_to_json(_read_inputs(input_file))
    except InferenceError as exc:
        fail(f"{input_file}: {exc.message}", EXIT_USAGE)
    body = {
        "model": name,
        "inputs": inputs,
        "idempotent": not not_idempotent,
        "timeout": timeout,
    }
    reply = ask_daemon(config, runtime_dir, "/v1/infer", "POST", body, timeout + HTTP_MARGIN_S)
    outputs = [tensor_from_json(raw) for raw in reply["outputs"]]
    if as_json:
        emit_json({**reply, "outputs": [o.tolist() for o in outputs]})
        return
    typer.echo(
        f"{reply['model']} on {reply['worker']}: {reply['latency_ms']:.1f} ms, "
        f"{reply['attempts']} attempt(s), batch of {reply['batch']}"
    )
    for index, output in enumerate(outputs):
        _show_output(index, output)


def serve_command(
    name: Annotated[str, typer.Argument(help="model in this node's registry: NAME[@VERSION]")],
    config: ConfigOpt = None,
    runtime_dir: RuntimeDirOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Serve NAME from this node's registry (memory checked first) and advertise it."""
    view = ask_daemon(config, runtime_dir, "/v1/inference/serve", "POST", {"model": name}, 300)
    if as_json:
        emit_json(view)
        return
    typer.echo(f"serving {view['model']} ({view['framework']}), input {view['input']['shape']}")


def stats_command(
    name: Annotated[str, typer.Argument(help="model NAME")],
    config: ConfigOpt = None,
    runtime_dir: RuntimeDirOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Requests, success rate, p50/p95/p99 latency and throughput of NAME as this node
    routed it, per worker and together."""
    stats = ask_daemon(config, runtime_dir, f"/v1/inference/stats/{name}")
    if as_json:
        emit_json(stats)
        return
    rows = [("all workers", stats["all"]), *sorted(stats["workers"].items())]
    typer.echo(f"{'worker':<20} {'requests':>8} {'ok %':>6} {'p50 ms':>8} {'p95 ms':>8} "
               f"{'p99 ms':>8} {'req/s':>7}")  # fmt: skip
    for worker, row in rows:
        rate = row["success_rate"]
        typer.echo(
            f"{worker[-20:]:<20} {row['requests']:>8} "
            f"{'-' if rate is None else f'{100 * rate:.1f}':>6} "
            f"{_ms(row['p50_ms']):>8} {_ms(row['p95_ms']):>8} {_ms(row['p99_ms']):>8} "
            f"{row['throughput_rps']:>7.2f}"
        )


def _read_inputs(path: Path) -> Any:
    import numpy as np

    from hivenode.inference.errors import Code, InferenceError
    from hivenode.inference.tensor_json import tensor_from_json

    try:
        if path.suffix == ".npy":
            return np.load(path, allow_pickle=False)
        if path.suffix == ".json":
            return tensor_from_json(json.loads(path.read_text()))
    except (OSError, ValueError) as exc:
        raise InferenceError(Code.BAD_INPUT, f"unreadable: {exc}") from exc
    raise InferenceError(Code.BAD_INPUT, "give a .npy or .json file")


def _show_output(index: int, output: Any) -> None:
    import numpy as np

    typer.echo(f"output {index}: {output.dtype.name} {list(output.shape)}")
    if output.ndim == 2 and output.dtype.kind == "f":
        winners = output.argmax(axis=1)
        for row, (values, best) in enumerate(zip(output[:SHOWN_ROWS], winners, strict=False)):
            shown = np.array2string(values, precision=4, max_line_width=200)
            typer.echo(f"  [{row}] class {best}  {shown}")
    else:
        typer.echo(np.array2string(output[:SHOWN_ROWS], precision=4, max_line_width=200))
    if len(output) > SHOWN_ROWS:
        typer.echo(f"  ... {len(output) - SHOWN_ROWS} more rows (--json prints them all)")


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def deploy_command(
    name: Annotated[str, typer.Argument(help="model in this node's registry: NAME[@VERSION]")],
    replicas: Annotated[
        int, typer.Option("--replicas", "-k", min=1, help="workers to serve it")
    ] = 1,
    config: ConfigOpt = None,
    runtime_dir: RuntimeDirOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Place NAME on the least loaded swarm workers whose hardware holds it; they fetch it
    from this node by hash, verify it, and serve it again after a restart."""
    body = {"model": name, "replicas": replicas}
    result = ask_daemon(config, runtime_dir, "/v1/inference/deploy", "POST", body, 600)
    if as_json:
        emit_json(result)
        return
    typer.echo(f"{result['model']}: {result['replicas']} of {result['wanted']} replicas")
    for peer, model in sorted(result["deployed"].items()):
        typer.echo(f"  deployed   {peer}  ({model})")
    for peer in result["already"]:
        typer.echo(f"  serving    {peer}")
    for peer, why in sorted(result["failed"].items()):
        typer.echo(f"  failed     {peer}: {why}")
    for peer, why in sorted(result["cannot_hold"].items()):
        typer.echo(f"  too small  {peer}: {why}")


def undeploy_command(
    name: Annotated[str, typer.Argument(help="model NAME")],
    config: ConfigOpt = None,
    runtime_dir: RuntimeDirOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Stop serving NAME on every worker that advertises it."""
    result = ask_daemon(config, runtime_dir, "/v1/inference/undeploy", "POST", {"model": name})
    if as_json:
        emit_json(result)
        return
    typer.echo(f"{name}: undeployed from {len(result['undeployed'])} worker(s)")
    for peer, why in sorted(result["failed"].items()):
        typer.echo(f"  failed  {peer}: {why}")


def optimize_command(
    name: Annotated[str, typer.Argument(help="a model this node serves: NAME")],
    accuracy_budget: Annotated[
        float,
        typer.Option(
            "--accuracy-budget", min=0, max=1, help="share of top classes that may change"
        ),
    ] = 0.01,
    apply: Annotated[bool, typer.Option("--apply", help="serve the fastest within budget")] = False,
    config: ConfigOpt = None,
    runtime_dir: RuntimeDirOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Measure NAME as loaded, quantised to int8 and exported to ONNX on this worker:
    latency, and agreement with the model as loaded on a held-out batch."""
    body = {"model": name, "accuracy_budget": accuracy_budget, "apply": apply}
    result = ask_daemon(config, runtime_dir, "/v1/inference/optimize", "POST", body, 600)
    if as_json:
        emit_json(result)
        return
    typer.echo(f"{result['model']}: serving {result['serving']}, best within budget "
               f"{result['accuracy_budget']:g}: {result['chosen']}")  # fmt: skip
    typer.echo(f"  {'variant':<10} {'ms/batch':>9} {'agreement':>9} {'max |diff|':>10}")
    for row in result["variants"]:
        if row["error"]:
            typer.echo(f"  {row['variant']:<10} unavailable: {row['error']}")
            continue
        typer.echo(
            f"  {row['variant']:<10} {row['latency_ms']:>9.3f} {row['agreement']:>9.3f} "
            f"{row['max_abs_diff']:>10.2e}"
        )
