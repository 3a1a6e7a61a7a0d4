"""`make demo`: a local swarm of real `hivenode run` daemons training digits together with
FedProx, driven by the same CLI commands a newcomer would type."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console

from hivenode.sim.swarm_processes import START_TIMEOUT, Daemon

FORM_TIMEOUT = 60.0
JOB_NAME = "digits-fedprox"
JOB_FILE = f"""\
name = "{JOB_NAME}"
dataset = "digits"          # what each trainer registered with `hivenode data add`
rounds = 15
clients_per_round = 5
deadline_s = 60

[model]
framework = "torch"
name = "mlp"

[strategy]
name = "fedprox"
mu = 0.01

[train]
lr = 0.1
local_epochs = 1
batch_size = 10
"""
PARALLEL_JOB_FILE = """\
name = "digits-data-parallel"
dataset = "digits"
rounds = 100                # optimizer steps, each synchronous across the replicas
[model]
framework = "torch"
name = "mlp"
options = { hidden = [64, 64] }
[train]
lr = 0.2
batch_size = 32
[parallel]
mode = "data"               # gradients averaged peer to peer by an all-reduce every step
nodes = 3
momentum = 0.5
"""
PLOT_NAME = "hivenode-demo.png"


def run_demo(nodes: int, out_dir: Path | None = None) -> int:
    """Start `nodes` daemons, each with its own slice of digits, run a FedProx job; exit code."""
    console = Console()
    plot_path = (out_dir or Path.cwd()) / PLOT_NAME
    with tempfile.TemporaryDirectory(prefix="hivenode-demo-") as tmp:
        base = Path(tmp)
        daemons: list[Daemon] = []
        try:
            console.rule(f"[bold]hivenode demo: {nodes} nodes on 127.0.0.1 learn digits together")
            _give_each_node_its_data(console, base, nodes)
            with console.status("starting the first node (the others join through it)…"):
                hub = Daemon(base, 0, [])
                daemons.append(hub)
                hub_addr = hub.wait_ready(time.monotonic() + START_TIMEOUT)["addrs"][0]
            console.print(f"node 0 listens on [cyan]{hub_addr}[/]")
            with console.status(f"starting {nodes - 1} more nodes with --bootstrap …"):
                daemons += [Daemon(base, i, [hub_addr]) for i in range(1, nodes)]
                for daemon in daemons[1:]:
                    daemon.wait_ready(time.monotonic() + START_TIMEOUT)
            if not _wait_formed(console, daemons):
                console.print("[red]the swarm did not form in time[/]; logs under", str(base))
                return 1
            runtime = str(hub.socket.parent)
            _show(console, ["status", "--runtime-dir", runtime])
            _show(console, ["peers", "--runtime-dir", runtime])
            job_file = base / "job.toml"
            job_file.write_text(JOB_FILE)
            console.rule("[bold]job.toml")
            console.print(JOB_FILE, highlight=False, markup=False)
            code = _run(
                console, ["jobs", "submit", str(job_file), "--watch", "--runtime-dir", runtime]
            )
            _show(console, ["jobs", "show", JOB_NAME, "--runtime-dir", runtime])
            if code != 0:
                console.print("[red]the job failed[/]; node logs under", str(base))
                return 1
            _plot(hub, plot_path)
            if not _run_parallel_job(console, base, runtime):
                return 1
            console.rule("[bold]done")
            console.print(
                f"Loss and accuracy per round: [cyan]{plot_path}[/]\n"
                "Every node above is a real `hivenode run` process with its own identity and "
                "its own data, talking libp2p over 127.0.0.1; no data left any node.\n"
                "Run one yourself: `hivenode init`, `hivenode data add`, `hivenode run`; "
                "see README.md."
            )
            return 0
        finally:
            with console.status("stopping the nodes (SIGTERM)…"):
                for daemon in daemons:
                    daemon.terminate()
                for daemon in daemons:
                    daemon.reap(timeout=15.0)


def _run_parallel_job(console: Console, base: Path, runtime: str) -> bool:
    """The same swarm trains the same data peer to peer: three replicas whose gradients an
    all-reduce averages every step (node 0 coordinates)."""
    job_file = base / "parallel.toml"
    job_file.write_text(PARALLEL_JOB_FILE)
    console.rule("[bold]parallel.toml: data parallel on 3 nodes")
    console.print(PARALLEL_JOB_FILE, highlight=False, markup=False)
    code = _run(console, ["jobs", "submit", str(job_file), "--watch", "--runtime-dir", runtime])
    _show(console, ["jobs", "list", "--runtime-dir", runtime])
    if code != 0:
        console.print("[red]the parallel job failed[/]; node logs under", str(base))
    return code == 0


def _give_each_node_its_data(console: Console, base: Path, nodes: int) -> None:
    """Split scikit-learn's digits across the nodes (label-skewed, as real users' data is)."""
    from hivenode.sim.fl_datasets import federated_dataset, save_partition

    parts = federated_dataset("digits", nodes, partition="dirichlet:1.0", seed=0)
    for index, part in enumerate(parts):
        node_dir = base / f"node{index}"
        node_dir.mkdir(parents=True)
        save_partition(part, node_dir / "digits.npz")
        args = ["data", "add", "digits", str(node_dir / "digits.npz")]
        args += ["--state-dir", str(node_dir / "state")]
        if index == 0:
            _show(console, args)
        elif _quiet(args) != 0:
            raise RuntimeError(f"`hivenode {' '.join(args)}` failed")
    console.print(f"… and the same on the other {nodes - 1} nodes, each with its own slice")


def _wait_formed(console: Console, daemons: list[Daemon]) -> bool:
    want = len(daemons) - 1
    started = time.monotonic()
    with console.status("waiting for every node to see every other…") as status:
        while time.monotonic() - started < FORM_TIMEOUT:
            counts = [d.peer_count() for d in daemons]
            status.update(f"peer tables: {counts} (each wants {want})")
            if all(c == want for c in counts):
                console.print(
                    f"[green]swarm formed[/] in {time.monotonic() - started:.1f} s: "
                    f"every node knows the other {want}"
                )
                return True
            time.sleep(0.3)
    return False


def _plot(hub: Daemon, path: Path) -> None:
    from hivenode.sim.fl import plot_histories

    job = hub.ask(f"/v1/jobs/{JOB_NAME}")
    rows = [
        {
            "round": r["round"],
            "loss": r["global_train_loss"] or r["train_loss"],
            "accuracy": r["eval_accuracy"],
        }
        for r in job["history"]
    ]
    plot_histories({"fedprox μ=0.01": rows}, path, "digits on 5 hivenode daemons")
    (path.with_suffix(".json")).write_text(json.dumps(job, indent=2))


def _hivenode() -> str:
    return str(Path(sys.executable).parent / "hivenode")


def _show(console: Console, args: list[str]) -> None:
    console.rule(f"[bold]$ hivenode {' '.join(_shorten(a) for a in args)}")
    result = subprocess.run([_hivenode(), *args], capture_output=True, text=True, check=False)
    sys.stdout.write(result.stdout)
    if result.returncode != 0:
        console.print(f"[red]exit {result.returncode}[/] {result.stderr.strip()}")


def _run(console: Console, args: list[str]) -> int:
    """Like `_show`, but the command draws on the terminal itself (a live progress bar)."""
    console.rule(f"[bold]$ hivenode {' '.join(_shorten(a) for a in args)}")
    return subprocess.run([_hivenode(), *args], check=False).returncode


def _quiet(args: list[str]) -> int:
    return subprocess.run([_hivenode(), *args], capture_output=True, check=False).returncode


def _shorten(arg: str) -> str:
    return arg if len(arg) < 40 else arg[:12] + "…" + arg[-8:]
