"""Fan-in: several trainers send an update to one aggregator at once over the bulk path.

    python benchmarks/bench_transfer_fanin.py [--json] [--senders 8] [--size-mib 32]
                                              [--repeats 3] [--accumulate]

One receiver process runs a real Node with a BulkReceiver; each sender is its own process
with its own Node (real processes, as on a swarm: every one has its own event loop and GIL),
all on 127.0.0.1. The senders connect first, then all start `send_tensors` on one signal;
a round lasts from that signal to the last sender's confirmation, repeated --repeats times
with the same processes.

- `fanin_mib_s`: all senders' bytes over the round's wall time (median of the rounds);
- per-sender medians: seconds and MiB/s of one `send_tensors`, over all senders and rounds;
- paths the transfers took ("bulk" direct TCP, "stream" libp2p fallback), resumes;
- CPU seconds per round: the receiver's, and all senders' together (psutil), and the
  machine's 1-minute load average before and after (other work on the box skews the rates);
- with --accumulate the receiver sums every tensor into one float32 buffer as it arrives
  (`on_tensor`, in a worker thread), as an aggregator would.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import trio
from _common import clean_env, emit, machine, make_parser, median, progress, rounded

TIMEOUT = 300.0


def make_node(base: Path) -> Any:
    from libp2p.crypto.ed25519 import create_new_key_pair

    from hivenode.agent.hardware import HardwareProbe
    from hivenode.agent.node import Node
    from hivenode.agent.settings import Settings

    settings = Settings(
        listen_addrs=["/ip4/127.0.0.1/tcp/0"],
        state_dir=base / "state",
        runtime_dir=base / "run",
        metrics_enabled=False,
        request_timeout=TIMEOUT,
    )
    return Node(settings, create_new_key_pair(), HardwareProbe(base))


def say(record: dict[str, Any]) -> None:
    print(json.dumps(record), flush=True)


async def read_line() -> str:
    return await trio.to_thread.run_sync(sys.stdin.readline)


# --- the receiver (child process) ------------------------------------------------------------


async def receiver_main(base: Path, accumulate_floats: int) -> None:
    from hivenode.agent.bulk import BulkReceiver, TensorArrival

    node = make_node(base)
    received = 0
    total = np.zeros(accumulate_floats, np.float32)
    lock = trio.Lock()

    async def taken(sender: str, meta: Any, tensors: Any) -> None:
        nonlocal received
        received += 1

    async def add(arrival: TensorArrival) -> None:
        async with lock:  # one worker thread at a time writes the sum
            await trio.to_thread.run_sync(np.add, total, arrival.array, total)

    async with trio.open_nursery() as nursery:
        await nursery.start(node.run)
        bulk = BulkReceiver(
            node,
            taken,
            on_tensor=add if accumulate_floats else None,
            max_total_bytes=16 * 1024**3,
            max_pending=256,
            max_transfer_timeout=TIMEOUT,
        )
        await nursery.start(bulk.run)
        say({"addr": node.swarm.listen_addrs()[0]})
        await read_line()  # until the parent closes our stdin
        say({"received": received, "rejections": bulk.rejections})
        node.stop()
        nursery.cancel_scope.cancel()


# --- a sender (child process) ----------------------------------------------------------------


async def sender_main(base: Path, addr: str, size_mib: int, seed: int) -> None:
    from hivenode.agent.bulk import send_tensors

    payload = np.random.default_rng(seed).standard_normal(size_mib * 2**18).astype(np.float32)
    node = make_node(base)
    async with trio.open_nursery() as nursery:
        await nursery.start(node.run)
        peer_id = await node.connect(addr)
        say({"ready": True})
        while (await read_line()).strip() == "go":
            started = time.perf_counter()
            report = await send_tensors(node, peer_id, [payload], timeout=TIMEOUT)
            seconds = time.perf_counter() - started
            say({"seconds": seconds, "path": report.path, "resumes": report.resumes})
        node.stop()
        nursery.cancel_scope.cancel()


# --- the parent ------------------------------------------------------------------------------


class Child:
    def __init__(self, args: list[str]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, __file__, *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=clean_env(),
        )
        self.ps = psutil.Process(self.proc.pid)

    def read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"child {self.proc.args} ended early")
        record: dict[str, Any] = json.loads(line)
        return record

    def write(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()

    def cpu(self) -> float:
        times = self.ps.cpu_times()
        return float(times.user + times.system)

    def close(self) -> None:
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            self.proc.stdin.close()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def run(senders: int, size_mib: int, repeats: int, accumulate: bool, base: Path) -> dict[str, Any]:
    floats = size_mib * 2**18 if accumulate else 0
    load_before = os.getloadavg()[0]
    receiver = Child(["--receiver", str(base / "receiver"), str(floats)])
    children: list[Child] = []
    rounds: list[dict[str, Any]] = []
    try:
        addr = receiver.read()["addr"]
        progress(f"receiver up; starting {senders} sender processes")
        for index in range(senders):
            children.append(
                Child(["--sender", str(base / f"sender{index}"), addr, str(size_mib), str(index)])
            )
        for child in children:
            child.read()  # connected, payload ready
        for round_ in range(repeats):
            cpu_receiver, cpu_senders = receiver.cpu(), sum(c.cpu() for c in children)
            started = time.perf_counter()
            for child in children:
                child.write("go")
            reports = [child.read() for child in children]
            wall = time.perf_counter() - started
            rounds.append(
                {
                    "wall_s": wall,
                    "fanin_mib_s": senders * size_mib / wall,
                    "reports": reports,
                    "receiver_cpu_s": receiver.cpu() - cpu_receiver,
                    "senders_cpu_s": sum(c.cpu() for c in children) - cpu_senders,
                }
            )
            progress(f"round {round_ + 1}/{repeats}: {senders * size_mib / wall:.0f} MiB/s in")
        for child in children:
            child.close()
        assert receiver.proc.stdin is not None
        receiver.proc.stdin.close()  # the receiver reports what it took, then stops
        final = receiver.read()
    finally:
        for child in [*children, receiver]:
            child.close()
    reports = [r for round_ in rounds for r in round_["reports"]]
    seconds = [r["seconds"] for r in reports]
    return {
        "senders": senders,
        "size_mib": size_mib,
        "repeats": repeats,
        "accumulate": accumulate,
        "processes": "one receiver process and one process per sender",
        "fanin_mib_s": rounded(median([r["fanin_mib_s"] for r in rounds])),
        "fanin_samples_mib_s": [round(r["fanin_mib_s"], 1) for r in rounds],
        "round_wall_s": rounded(median([r["wall_s"] for r in rounds]), 3),
        "sender_median_s": rounded(median(seconds), 3),
        "sender_median_mib_s": rounded(median([size_mib / s for s in seconds])),
        "sender_slowest_s": rounded(max(seconds), 3),
        "paths": sorted({r["path"] for r in reports}),
        "resumes": sum(r["resumes"] for r in reports),
        "receiver_cpu_s": rounded(median([r["receiver_cpu_s"] for r in rounds]), 2),
        "senders_cpu_s": rounded(median([r["senders_cpu_s"] for r in rounds]), 2),
        "load_avg_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "transfers_received": final["received"],
        "receiver_rejections": final["rejections"],
        "machine": machine(),
    }


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--receiver":
        trio.run(receiver_main, Path(sys.argv[2]), int(sys.argv[3]))
        return
    if len(sys.argv) == 6 and sys.argv[1] == "--sender":
        _, _, base, addr, size, seed = sys.argv
        trio.run(sender_main, Path(base), addr, int(size), int(seed))
        return
    parser = make_parser(__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--senders", type=int, default=8)
    parser.add_argument("--size-mib", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--accumulate", action="store_true", help="sum every tensor as it arrives (on_tensor)"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="hivenode-bench-fanin-") as tmp:
        result = run(args.senders, args.size_mib, args.repeats, args.accumulate, Path(tmp))
    rows = [
        ("aggregate receive rate (MiB/s)", result["fanin_mib_s"]),
        ("round wall time (s)", result["round_wall_s"]),
        ("per sender, median (s)", result["sender_median_s"]),
        ("per sender, median (MiB/s)", result["sender_median_mib_s"]),
        ("slowest sender (s)", result["sender_slowest_s"]),
        ("paths", ", ".join(result["paths"])),
        ("resumes", result["resumes"]),
        ("receiver CPU per round (s)", result["receiver_cpu_s"]),
        ("senders' CPU per round (s)", result["senders_cpu_s"]),
        ("1-minute load before, after", result["load_avg_1m"]),
    ]
    title = f"fan-in: {args.senders} senders × {args.size_mib} MiB, median of {args.repeats}"
    emit(result, args.json, rows, title)


if __name__ == "__main__":
    main()
