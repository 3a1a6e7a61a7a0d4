"""Distributed inference: K workers on 127.0.0.1 and C concurrent clients against the model
called in-process; then a worker killed mid-run.

    python benchmarks/bench_inference.py [--json] [--workers 3] [--clients 8] [--seconds 5]

Each worker is its own OS process (a real node with the inference worker role, serving the
models from its own registry, torch on one thread); the clients are trio tasks behind one
router in this process, on its own node. A small torch MLP (784 → 256 → 128 → 10, the zoo's
"mlp") and a tiny transformer (a 2-layer BERT classifier, 32 tokens), one sample per
request. Phases: the MLP on 1..K workers (throughput against workers), at light and
moderate load (1 and 2 clients: the latency added over the in-process call), the
transformer on K workers, and the MLP on K workers with one worker SIGKILLed halfway:
every request is idempotent, so `failed_requests_after_kill` must be 0.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import trio
from _common import clean_env, emit, machine, make_parser, percentile, progress, rounded

MLP = {"framework": "torch", "name": "mlp", "options": {"hidden": [256, 128]}}
MLP_FEATURES, MLP_CLASSES = 784, 10
BERT_CONFIG = {
    "model_type": "bert",
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 128,
    "vocab_size": 1000,
    "max_position_embeddings": 64,
}
BERT = {"framework": "hf", "name": "AutoModelForSequenceClassification", "options": {}}
BERT_TOKENS, BERT_CLASSES = 32, 4
READY_TIMEOUT = 120.0
REQUEST_TIMEOUT = 5.0
MODERATE_CLIENTS = 2
WARMUP_S = 1.0
FAILURE_PAUSE_S = 0.05


# --- model files ---------------------------------------------------------------------------


def write_models(directory: Path) -> dict[str, Path]:
    """The MLP and the transformer as jobs save them: safetensors + their spec."""
    import torch
    from safetensors.numpy import save_file

    from hivenode.models.training import zoo
    from hivenode.models.training.backend import ModelSpec
    from hivenode.models.training.hf_backend import build_model
    from hivenode.models.training.torch_backend import state_arrays

    torch.manual_seed(0)
    mlp = zoo.build_model("mlp", MLP["options"], (MLP_FEATURES,), MLP_CLASSES)
    bert_spec = {**BERT, "options": {"config": BERT_CONFIG}}
    bert = build_model(ModelSpec("hf", BERT["name"], bert_spec["options"]), BERT_CLASSES)
    paths = {"mlp": directory / "mlp.safetensors", "bert": directory / "bert.safetensors"}
    for name, module, spec in (("mlp", mlp, MLP), ("bert", bert, bert_spec)):
        meta = {"hivenode-model": json.dumps(spec)}
        save_file(state_arrays(module), str(paths[name]), metadata=meta)
    return paths


def register_all(state_dir: Path, paths: dict[str, Path]) -> None:
    from hivenode.models.identify import identify
    from hivenode.models.registry import Registry

    with Registry(state_dir) as registry:
        for name, path in paths.items():
            registry.add(path, name, identify(path))


def inputs(name: str) -> np.ndarray:
    rng = np.random.default_rng(0)
    if name == "bert":
        return rng.integers(0, BERT_CONFIG["vocab_size"], size=(1, BERT_TOKENS))
    return rng.normal(size=(1, MLP_FEATURES)).astype(np.float32)


def in_process(state_dir: Path, name: str, calls: int = 2000) -> dict[str, float | None]:
    """The same model, loaded the same way, called directly: the floor for the swarm."""
    from hivenode.inference.loaders import load_model
    from hivenode.models.registry import Registry

    with Registry(state_dir) as registry:
        version = registry.resolve(name)
        model = load_model(version, registry.blob_path(version.sha256))
    x = inputs(name)
    for _ in range(50):
        model.predict(model.prepare(x))
    times = []
    for _ in range(calls):
        started = time.perf_counter()
        model.predict(model.prepare(x))
        times.append((time.perf_counter() - started) * 1000)
    return {"p50_ms": percentile(times, 0.5), "p95_ms": percentile(times, 0.95)}


# --- worker processes ----------------------------------------------------------------------


async def serve_worker(state_dir: Path, max_batch_wait: float) -> None:
    """A worker process: a node serving every model of its registry until killed; prints
    its address once they are loaded."""
    from libp2p.crypto.ed25519 import create_new_key_pair

    from hivenode.agent.hardware import HardwareProbe
    from hivenode.agent.node import Node
    from hivenode.agent.settings import Settings
    from hivenode.inference.settings import InferenceSettings
    from hivenode.inference.worker import InferenceWorker
    from hivenode.protocol.advert import Role

    settings = Settings(
        listen_addrs=["/ip4/127.0.0.1/tcp/0"],
        state_dir=state_dir,
        runtime_dir=state_dir / "run",
        metrics_enabled=False,
        roles=[Role.INFERENCE],
    )
    node = Node(settings, create_new_key_pair(), HardwareProbe(state_dir))
    serving = InferenceSettings(serve=["mlp", "bert"], max_batch_wait=max_batch_wait)
    worker = InferenceWorker(node, state_dir, serving)
    worker.install()
    async with trio.open_nursery() as nursery:
        await nursery.start(node.run)
        await nursery.start(worker.run)
        while len(worker.models) < 2:
            await trio.sleep(0.05)
        print(json.dumps({"addr": node.swarm.listen_addrs()[0]}), flush=True)


@dataclass
class Worker:
    process: trio.Process
    addr: str
    log: Path

    @property
    def peer_id(self) -> str:
        return self.addr.rsplit("/p2p/", 1)[1]

    def kill(self) -> None:
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGKILL)


async def start_worker(directory: Path, paths: dict[str, Path], max_batch_wait: float) -> Worker:
    state = directory / "state"
    register_all(state, paths)
    env = {**clean_env(), "OMP_NUM_THREADS": "1"}
    log = directory / "worker.log"
    with log.open("wb") as errors:
        command = [sys.executable, __file__, "--serve-worker", str(state)]
        command += ["--max-batch-wait", str(max_batch_wait)]
        process = await trio.lowlevel.open_process(
            command,
            stdout=subprocess.PIPE,
            stderr=errors,
            env=env,
        )
    assert process.stdout is not None
    line = b""
    with trio.move_on_after(READY_TIMEOUT):
        while not line.endswith(b"\n"):
            chunk = await process.stdout.receive_some(4096)
            if not chunk:
                break
            line += chunk
    if not line.endswith(b"\n"):
        process.kill()
        raise RuntimeError(f"worker in {directory} not ready:\n{log.read_text()[-2000:]}")
    return Worker(process, json.loads(line)["addr"], log)


# --- load ----------------------------------------------------------------------------------


@dataclass
class Phase:
    latencies_ms: list[float] = field(default_factory=list)
    failures: list[tuple[float, str]] = field(default_factory=list)
    retried: int = 0
    seconds: float = 0.0
    per_worker: dict[str, int] = field(default_factory=dict)
    cpu_s: dict[str, float] = field(default_factory=dict)
    """CPU seconds (user + system) each process spent in the phase: 'client', the workers."""
    machine_busy: float | None = None
    """The whole machine's busy share over the phase (every core, every process)."""

    def figures(self) -> dict[str, Any]:
        return {
            "requests": len(self.latencies_ms) + len(self.failures),
            "failed": len(self.failures),
            "rps": round(len(self.latencies_ms) / self.seconds, 1) if self.seconds else None,
            "p50_ms": rounded(percentile(self.latencies_ms, 0.5), 2),
            "p95_ms": rounded(percentile(self.latencies_ms, 0.95), 2),
            "p99_ms": rounded(percentile(self.latencies_ms, 0.99), 2),
            "retried": self.retried,
            "failure_codes": dict(Counter(code for _, code in self.failures)),
            "per_worker": dict(sorted(self.per_worker.items())),
            # cores' worth of CPU each side used: where throughput stops growing with workers
            "client_cores": rounded(self.cpu_s.get("client", 0.0) / self.seconds, 2)
            if self.seconds
            else None,
            "worker_cores": rounded(
                sum(v for k, v in self.cpu_s.items() if k != "client") / self.seconds, 2
            )
            if self.seconds
            else None,
            "machine_busy": rounded(self.machine_busy, 2),
        }


async def load(
    router: Any,
    name: str,
    workers: list[str],
    clients: int,
    seconds: float,
    kill: Worker | None = None,
    processes: dict[str, int] | None = None,
) -> tuple[Phase, float | None]:
    """C clients back to back on `workers` for `seconds` (after a warm-up that does not
    count); with `kill`, that worker is SIGKILLed halfway. Returns the phase and when the
    kill happened (perf_counter). `processes` (name → pid, this one is 'client'): their CPU
    seconds over the phase are measured."""
    import psutil

    from hivenode.inference.errors import InferenceError

    x = inputs(name)
    phase = Phase()
    killed_at: float | None = None

    async def client(until: float, record: bool) -> None:
        while time.perf_counter() < until:
            started = time.perf_counter()
            try:
                result = await router.infer(name, x, timeout=REQUEST_TIMEOUT, workers=workers)
            except InferenceError as exc:
                if record:
                    phase.failures.append((started, exc.code))
                await trio.sleep(FAILURE_PAUSE_S)  # as a client would, not a hot loop
                continue
            if record:
                phase.latencies_ms.append((time.perf_counter() - started) * 1000)
                phase.retried += result.attempts > 1
                short = result.worker[-6:]
                phase.per_worker[short] = phase.per_worker.get(short, 0) + 1

    async def killer() -> None:
        nonlocal killed_at
        assert kill is not None
        await trio.sleep(seconds / 2)
        killed_at = time.perf_counter()
        kill.kill()

    async with trio.open_nursery() as nursery:
        warm_until = time.perf_counter() + WARMUP_S
        for _ in range(clients):
            nursery.start_soon(client, warm_until, False)
    watched = {name: psutil.Process(pid) for name, pid in (processes or {}).items()}
    before = {name: _cpu_s(proc) for name, proc in watched.items()}
    psutil.cpu_percent()  # starts the machine-wide interval
    started = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for _ in range(clients):
            nursery.start_soon(client, started + seconds, True)
        if kill is not None:
            nursery.start_soon(killer)
    phase.seconds = time.perf_counter() - started
    phase.machine_busy = psutil.cpu_percent() / 100
    for name, proc in watched.items():
        with contextlib.suppress(psutil.NoSuchProcess):
            phase.cpu_s[name] = _cpu_s(proc) - before[name]
    return phase, killed_at


def _cpu_s(process: Any) -> float:
    times = process.cpu_times()
    return float(times.user + times.system)


async def run(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    paths = write_models(tmp)
    progress(f"starting {args.workers} worker processes")
    async with trio.open_nursery() as nursery:
        started = []

        async def one(index: int) -> None:
            worker = await start_worker(tmp / f"w{index}", paths, args.max_batch_wait)
            started.append(worker)

        for index in range(args.workers):
            nursery.start_soon(one, index)
    workers = sorted(started, key=lambda w: w.addr)
    try:
        return await measure(args, tmp, workers)
    finally:
        for worker in workers:
            worker.kill()
            await worker.process.wait()


async def measure(args: argparse.Namespace, tmp: Path, workers: list[Worker]) -> dict[str, Any]:
    """The phases, from a client node whose router knows the workers from their adverts."""
    from libp2p.crypto.ed25519 import create_new_key_pair

    from hivenode.agent.hardware import HardwareProbe
    from hivenode.agent.node import Node
    from hivenode.agent.settings import Settings
    from hivenode.inference.router import Router

    settings = Settings(
        listen_addrs=["/ip4/127.0.0.1/tcp/0"],
        state_dir=tmp / "client",
        runtime_dir=tmp / "client" / "run",
        metrics_enabled=False,
        roles=[],
        bootstrap_peers=[w.addr for w in workers],
    )
    node = Node(settings, create_new_key_pair(), HardwareProbe(tmp))
    router = Router(node)
    ids = [w.peer_id for w in workers]
    result: dict[str, Any] = {}
    async with trio.open_nursery() as nursery:
        await nursery.start(node.run)
        with trio.fail_after(READY_TIMEOUT):
            while set(router.workers_for("mlp")) != set(ids):
                await trio.sleep(0.1)
        scaling = {}
        for k in range(1, len(workers) + 1):
            progress(f"mlp: {args.clients} clients on {k} worker(s), {args.seconds:g} s")
            pids = {"client": os.getpid()} | {w.peer_id[-6:]: w.process.pid for w in workers[:k]}
            phase, _ = await load(
                router, "mlp", ids[:k], args.clients, args.seconds, processes=pids
            )
            scaling[k] = phase.figures()
        progress(f"mlp: 1 and {MODERATE_CLIENTS} clients on {len(ids)} workers")
        light, _ = await load(router, "mlp", ids, 1, args.seconds)
        moderate, _ = await load(router, "mlp", ids, MODERATE_CLIENTS, args.seconds)
        result["mlp_by_workers"] = scaling
        result["mlp_light"] = light.figures()
        result["mlp_moderate"] = moderate.figures()
        if not args.no_transformer:
            progress(f"bert: {args.clients} clients on {len(ids)} workers")
            bert, _ = await load(router, "bert", ids, args.clients, args.seconds)
            result["transformer"] = bert.figures()
        progress(f"mlp: killing a worker halfway through {2 * args.seconds:g} s")
        faulty, killed_at = await load(
            router, "mlp", ids, args.clients, 2 * args.seconds, kill=workers[0]
        )
        result["kill"] = faulty.figures()
        assert killed_at is not None
        result["failed_requests_after_kill"] = sum(1 for t, _ in faulty.failures if t >= killed_at)
        result["failure_codes"] = sorted({code for _, code in faulty.failures})
        result["router_stats_mlp"] = router.metrics.summary("mlp").as_json()
        node.stop()
        await node.wait_stopped()
        nursery.cancel_scope.cancel()
    return result


def main() -> None:
    parser = make_parser(__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=5.0, help="per phase")
    parser.add_argument("--no-transformer", action="store_true")
    parser.add_argument(
        "--max-batch-wait", type=float, default=None, help="the workers' (default: theirs)"
    )
    parser.add_argument("--serve-worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    if args.max_batch_wait is None:
        from hivenode.inference.settings import InferenceSettings

        args.max_batch_wait = InferenceSettings().max_batch_wait
    if args.serve_worker is not None:
        with contextlib.suppress(KeyboardInterrupt):
            trio.run(serve_worker, args.serve_worker, args.max_batch_wait)
        return
    import torch

    torch.set_num_threads(1)  # as the workers run it
    with tempfile.TemporaryDirectory(prefix="hn-infer-") as name:
        tmp = Path(name)
        swarm = trio.run(run, args, tmp)
        baseline = {"mlp": in_process(tmp / "w0" / "state", "mlp")}
        if not args.no_transformer:
            baseline["bert"] = in_process(tmp / "w0" / "state", "bert")
    full = swarm["mlp_by_workers"][args.workers]
    moderate = swarm["mlp_moderate"]
    result = {
        "machine": machine(),
        "workers": args.workers,
        "clients": args.clients,
        "rps": full["rps"],
        "p50_ms": full["p50_ms"],
        "p95_ms": full["p95_ms"],
        "inprocess_p50_ms": rounded(baseline["mlp"]["p50_ms"], 3),
        "inprocess_p95_ms": rounded(baseline["mlp"]["p95_ms"], 3),
        "moderate_p95_added_ms": rounded(moderate["p95_ms"] - baseline["mlp"]["p95_ms"], 2),
        "light_p95_added_ms": rounded(swarm["mlp_light"]["p95_ms"] - baseline["mlp"]["p95_ms"], 2),
        "failed_requests_after_kill": swarm["failed_requests_after_kill"],
        **swarm,
    }
    if "bert" in baseline:
        result["transformer"]["inprocess_p50_ms"] = rounded(baseline["bert"]["p50_ms"], 3)
    rows: list[tuple[str, Any]] = [
        (f"mlp rps, {args.clients} clients, 1..{args.workers} workers",
         [swarm["mlp_by_workers"][k]["rps"] for k in sorted(swarm["mlp_by_workers"])]),
        ("cores busy, client / workers / whole machine, 1..K workers",
         [f"{swarm['mlp_by_workers'][k]['client_cores']} / "
          f"{swarm['mlp_by_workers'][k]['worker_cores']} / "
          f"{swarm['mlp_by_workers'][k]['machine_busy']}"
          for k in sorted(swarm["mlp_by_workers"])]),
        ("mlp p50 / p95 ms", f"{full['p50_ms']} / {full['p95_ms']}"),
        ("mlp in-process p50 / p95 ms",
         f"{result['inprocess_p50_ms']} / {result['inprocess_p95_ms']}"),
        ("light load (1 client) p50 / p95 ms",
         f"{swarm['mlp_light']['p50_ms']} / {swarm['mlp_light']['p95_ms']}"),
        (f"moderate load ({MODERATE_CLIENTS} clients) p50 / p95 ms",
         f"{moderate['p50_ms']} / {moderate['p95_ms']}"),
        ("moderate p95 added over in-process (ms)", result["moderate_p95_added_ms"]),
    ]  # fmt: skip
    if "transformer" in swarm:
        t = swarm["transformer"]
        rows += [
            ("transformer rps", t["rps"]),
            ("transformer p50 / p95 ms", f"{t['p50_ms']} / {t['p95_ms']}"),
            ("transformer in-process p50 ms", t["inprocess_p50_ms"]),
        ]
    rows += [
        ("kill: requests / retried", f"{swarm['kill']['requests']} / {swarm['kill']['retried']}"),
        ("failed requests after the kill", swarm["failed_requests_after_kill"]),
    ]
    emit(result, args.json, rows, f"inference: {args.workers} workers, {args.clients} clients")


if __name__ == "__main__":
    main()
