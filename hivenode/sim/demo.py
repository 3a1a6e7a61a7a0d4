"""`make demo`: a local swarm of real `hivenode run` daemons, and the CLI a newcomer would use."""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console

from hivenode.sim.swarm_processes import START_TIMEOUT, Daemon

FORM_TIMEOUT = 60.0


def run_demo(nodes: int) -> int:
    """Start `nodes` daemons, wait for the swarm to form, show status and peers; exit code."""
    console = Console()
    with tempfile.TemporaryDirectory(prefix="hivenode-demo-") as tmp:
        base = Path(tmp)
        daemons: list[Daemon] = []
        try:
            console.rule(f"[bold]hivenode demo: a swarm of {nodes} nodes on 127.0.0.1")
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
            remote = daemons[-1].ask("/v1/status")["peer_id"]
            _show(console, ["status", "--peer", remote, "--runtime-dir", runtime])
            console.rule("[bold]done")
            console.print(
                "Every node above is a real `hivenode run` process with its own identity, "
                "talking libp2p over 127.0.0.1.\nRun one yourself: `hivenode init` then "
                "`hivenode run`; see README.md."
            )
            return 0
        finally:
            with console.status("stopping the nodes (SIGTERM)…"):
                for daemon in daemons:
                    daemon.terminate()
                for daemon in daemons:
                    daemon.reap(timeout=15.0)


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


def _show(console: Console, args: list[str]) -> None:
    console.rule(f"[bold]$ hivenode {' '.join(_shorten(a) for a in args)}")
    hivenode = Path(sys.executable).parent / "hivenode"
    result = subprocess.run([str(hivenode), *args], capture_output=True, text=True, check=False)
    sys.stdout.write(result.stdout)
    if result.returncode != 0:
        console.print(f"[red]exit {result.returncode}[/] {result.stderr.strip()}")


def _shorten(arg: str) -> str:
    return arg if len(arg) < 40 else arg[:12] + "…" + arg[-8:]
