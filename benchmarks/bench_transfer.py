"""Moving 256 MiB of float32 between two node processes on 127.0.0.1, three ways.

    python benchmarks/bench_transfer.py [--json] [--size-mib 256] [--repeats 3]

The receiver is a child process running a real Node with a BulkReceiver, a plain libp2p
stream handler and a raw TCP sink; this process runs the sending Node. Each way is timed
from the first byte offered to the receiver's confirmation, median of --repeats:

- default: one `write_message` on a py-libp2p stream with its defaults (Noise + yamux);
- bulk: `send_tensors` over the authenticated AES-GCM fast path (sha256 on both sides);
- tcp: the same bytes on a plain TCP socket, no crypto, no hash (the ceiling).

`bulk_cpu_s` is the sender's plus the receiver's CPU seconds (psutil) per bulk transfer.
Targets (issue 4): bulk ≥ 10 × default and ≥ 1000 MiB/s.
"""

from __future__ import annotations

import json
import struct
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

STREAM_PROTOCOL = "/hivenode/bench-stream/1.0.0"
TIMEOUT = 300.0
LENGTH = struct.Struct(">Q")


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


# --- the receiver (child process) ------------------------------------------------------------


async def receiver_main(base: Path) -> None:
    from libp2p.custom_types import TProtocol

    from hivenode.agent import rpc
    from hivenode.agent.bulk import BulkReceiver
    from hivenode.protocol.message import Message
    from hivenode.protocol.streams import read_message, write_message

    node = make_node(base)

    async def ignore(sender: str, meta: Any, tensors: Any) -> None:
        return None

    async def on_stream(stream: Any) -> None:
        adapter = rpc.StreamAdapter(stream)
        message = await read_message(adapter)
        await write_message(adapter, Message(rpc.OK, message.request_id, node.peer_id, {}))
        await rpc.close_quietly(stream)

    async def tcp_sink(stream: trio.SocketStream) -> None:
        header = await stream.receive_some(LENGTH.size)
        (size,) = LENGTH.unpack(header)
        buffer = memoryview(bytearray(size))
        got = 0
        while got < size:
            got += await stream.socket.recv_into(buffer[got:])
        await stream.send_all(b"k")
        await stream.aclose()

    async with trio.open_nursery() as nursery:
        await nursery.start(node.run)
        bulk = BulkReceiver(node, ignore, max_total_bytes=8 * 1024**3)
        await nursery.start(bulk.run)
        node.swarm.host.set_stream_handler(TProtocol(STREAM_PROTOCOL), on_stream)
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        nursery.start_soon(trio.serve_listeners, tcp_sink, listeners)
        ready = {
            "addr": node.swarm.listen_addrs()[0],
            "tcp_port": listeners[0].socket.getsockname()[1],
        }
        print(json.dumps(ready), flush=True)
        await trio.to_thread.run_sync(sys.stdin.read)  # until the parent closes our stdin
        node.stop()
        nursery.cancel_scope.cancel()


# --- the sender (this process) ---------------------------------------------------------------


async def send_default(node: Any, peer_id: str, payload: np.ndarray) -> None:
    from libp2p.custom_types import TProtocol
    from libp2p.peer.id import ID

    from hivenode.agent import rpc
    from hivenode.protocol.message import Message
    from hivenode.protocol.streams import read_message, write_message

    stream = await node.swarm.host.new_stream(ID.from_base58(peer_id), [TProtocol(STREAM_PROTOCOL)])
    adapter = rpc.StreamAdapter(stream)
    await write_message(adapter, Message("put", 1, node.peer_id, {}, (payload,)))
    await read_message(adapter)
    await rpc.close_quietly(stream)


async def send_tcp(port: int, payload: np.ndarray) -> None:
    view = payload.reshape(-1).view(np.uint8).data
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(LENGTH.pack(len(view)))
        for start in range(0, len(view), 4 * 1024 * 1024):
            await stream.send_all(view[start : start + 4 * 1024 * 1024])
        assert await stream.receive_some(1) == b"k"


async def sender_main(size_mib: int, repeats: int, base: Path) -> dict[str, Any]:
    from hivenode.agent.bulk import send_tensors

    payload = np.random.default_rng(0).standard_normal(size_mib * 2**18).astype(np.float32)
    child = subprocess.Popen(  # noqa: ASYNC220 (spawning returns at once; no wait here)
        [sys.executable, __file__, "--receiver", str(base / "receiver")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=clean_env(),
    )
    assert child.stdout is not None and child.stdin is not None
    try:
        ready = json.loads(await trio.to_thread.run_sync(child.stdout.readline))
        node = make_node(base / "sender")
        me, them = psutil.Process(), psutil.Process(child.pid)
        rates: dict[str, list[float]] = {"default": [], "bulk": [], "tcp": []}
        cpu: list[float] = []
        paths: set[str] = set()
        async with trio.open_nursery() as nursery:
            await nursery.start(node.run)
            peer_id = await node.connect(ready["addr"])
            for round_ in range(repeats):
                for way in ("default", "bulk", "tcp"):
                    progress(f"round {round_ + 1}/{repeats}: {way}")
                    cpu_before = _cpu(me) + _cpu(them)
                    started = time.perf_counter()
                    with trio.fail_after(TIMEOUT):
                        if way == "default":
                            await send_default(node, peer_id, payload)
                        elif way == "bulk":
                            report = await send_tensors(node, peer_id, [payload], timeout=TIMEOUT)
                            paths.add(report.path)
                        else:
                            await send_tcp(ready["tcp_port"], payload)
                    seconds = time.perf_counter() - started
                    rates[way].append(size_mib / seconds)
                    if way == "bulk":
                        cpu.append(_cpu(me) + _cpu(them) - cpu_before)
                    progress(f"  {size_mib / seconds:.0f} MiB/s")
            node.stop()
            nursery.cancel_scope.cancel()
    finally:
        child.stdin.close()
        try:
            child.wait(15)
        except subprocess.TimeoutExpired:
            child.kill()
    default, bulk, tcp = (median(rates[w]) or 0.0 for w in ("default", "bulk", "tcp"))
    return {
        "size_mib": size_mib,
        "repeats": repeats,
        "default_mib_s": rounded(default),
        "bulk_mib_s": rounded(bulk),
        "tcp_mib_s": rounded(tcp),
        "bulk_cpu_s": rounded(median(cpu), 3),
        "bulk_paths": sorted(paths),
        "bulk_vs_default": rounded(bulk / default if default else None, 1),
        "targets_met": bool(default and bulk >= 10 * default and bulk >= 1000),
        "samples_mib_s": {w: [round(r, 1) for r in v] for w, v in rates.items()},
        "machine": machine(),
    }


def _cpu(process: psutil.Process) -> float:
    times = process.cpu_times()
    return float(times.user + times.system)


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--receiver":
        trio.run(receiver_main, Path(sys.argv[2]))
        return
    parser = make_parser(__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="hivenode-bench-transfer-") as tmp:
        result = trio.run(sender_main, args.size_mib, args.repeats, Path(tmp))
    rows = [
        ("libp2p default stream (MiB/s)", result["default_mib_s"]),
        ("bulk fast path (MiB/s)", result["bulk_mib_s"]),
        ("plain TCP (MiB/s)", result["tcp_mib_s"]),
        ("bulk CPU per transfer (s)", result["bulk_cpu_s"]),
        ("bulk ≥ 10× default and ≥ 1000 MiB/s", result["targets_met"]),
    ]
    emit(result, args.json, rows, f"transfer of {args.size_mib} MiB, median of {args.repeats}")


if __name__ == "__main__":
    main()
