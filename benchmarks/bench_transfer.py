"""Moving 256 MiB of float32 between two node processes on 127.0.0.1, four ways.

    python benchmarks/bench_transfer.py [--json] [--size-mib 256] [--repeats 3]
                                        [--ways default,stream,bulk,tcp]

The receiver is a child process running a real Node with a BulkReceiver, a stream handler
and a raw TCP sink, plus a plain py-libp2p host (`libp2p.new_host()` with its defaults, no
hivenode code) with the same stream handler; this process runs the sending Node and a plain
host of its own. Each way is timed from the first byte offered to the receiver's confirmation,
median of --repeats:

- default: one `write_message` (4 MiB writes) between the two plain hosts: py-libp2p exactly
  as it ships (Noise, `/yamux/1.0.0`, 64 KiB frames, 256 KiB initial window);
- stream: the same `write_message` between the two Nodes: hivenode's tuned yamux
  (`/hivenode/yamux/1.0.0`, ~1 MiB frames, 16 MiB window; see hivenode.agent.muxer), the
  fallback path when the bulk channel cannot be opened;
- bulk: `send_tensors` over the authenticated AES-GCM fast path (sha256 on both sides);
- tcp: the same bytes on a plain TCP socket, no crypto, no hash (the ceiling).

`<way>_cpu_s` is the sender's plus the receiver's CPU seconds (psutil) per transfer, `muxers`
the muxer each libp2p way negotiated (checked, so a figure cannot come from the wrong path).
Targets (issue 4): bulk ≥ 10 × default and ≥ 1000 MiB/s; stream ≥ 2 × default.
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
WAYS = ("default", "stream", "bulk", "tcp")
LOCALHOST = "/ip4/127.0.0.1/tcp/0"
TIMEOUT = 300.0
LENGTH = struct.Struct(">Q")


def make_node(base: Path) -> Any:
    from libp2p.crypto.ed25519 import create_new_key_pair

    from hivenode.agent.hardware import HardwareProbe
    from hivenode.agent.node import Node
    from hivenode.agent.settings import Settings

    settings = Settings(
        listen_addrs=[LOCALHOST],
        state_dir=base / "state",
        runtime_dir=base / "run",
        metrics_enabled=False,
        request_timeout=TIMEOUT,
    )
    return Node(settings, create_new_key_pair(), HardwareProbe(base))


def make_plain_host() -> Any:
    """A py-libp2p host with its defaults: what `default` measures."""
    from libp2p import new_host

    return new_host()


# --- the receiver (child process) ------------------------------------------------------------


async def receiver_main(base: Path) -> None:
    import multiaddr
    from libp2p.custom_types import TProtocol

    from hivenode.agent import rpc
    from hivenode.agent.bulk import BulkReceiver
    from hivenode.protocol.message import Message
    from hivenode.protocol.streams import read_message, write_message

    node = make_node(base)
    plain = make_plain_host()

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

    async with plain.run([multiaddr.Multiaddr(LOCALHOST)]), trio.open_nursery() as nursery:
        await nursery.start(node.run)
        bulk = BulkReceiver(node, ignore, max_total_bytes=8 * 1024**3)
        await nursery.start(bulk.run)
        node.swarm.host.set_stream_handler(TProtocol(STREAM_PROTOCOL), on_stream)
        plain.set_stream_handler(TProtocol(STREAM_PROTOCOL), on_stream)
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        nursery.start_soon(trio.serve_listeners, tcp_sink, listeners)
        ready = {
            "addr": node.swarm.listen_addrs()[0],
            "plain_addr": str(plain.get_addrs()[0]),
            "tcp_port": listeners[0].socket.getsockname()[1],
        }
        print(json.dumps(ready), flush=True)
        await trio.to_thread.run_sync(sys.stdin.read)  # until the parent closes our stdin
        node.stop()
        nursery.cancel_scope.cancel()


# --- the sender (this process) ---------------------------------------------------------------


async def send_message(host: Any, peer_id: Any, payload: np.ndarray) -> str:
    """One `write_message` of `payload` on a new stream, until the receiver's reply; the muxer
    the stream ran on."""
    from libp2p.custom_types import TProtocol

    from hivenode.agent import rpc
    from hivenode.agent.muxer import muxer_of
    from hivenode.protocol.message import Message
    from hivenode.protocol.streams import read_message, write_message

    stream = await host.new_stream(peer_id, [TProtocol(STREAM_PROTOCOL)])
    adapter = rpc.StreamAdapter(stream)
    await write_message(adapter, Message("put", 1, str(host.get_id()), {}, (payload,)))
    await read_message(adapter)
    await rpc.close_quietly(stream)
    return muxer_of(stream)


async def send_tcp(port: int, payload: np.ndarray) -> None:
    view = payload.reshape(-1).view(np.uint8).data
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(LENGTH.pack(len(view)))
        for start in range(0, len(view), 4 * 1024 * 1024):
            await stream.send_all(view[start : start + 4 * 1024 * 1024])
        assert await stream.receive_some(1) == b"k"


EXPECTED_MUXERS = {"default": "yamux", "stream": "hivenode-yamux"}


async def sender_main(
    size_mib: int, repeats: int, base: Path, ways: tuple[str, ...] = WAYS
) -> dict[str, Any]:
    import multiaddr
    from libp2p.peer.id import ID
    from libp2p.peer.peerinfo import info_from_p2p_addr

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
        plain = make_plain_host()
        me, them = psutil.Process(), psutil.Process(child.pid)
        rates: dict[str, list[float]] = {way: [] for way in WAYS}
        cpu: dict[str, list[float]] = {way: [] for way in WAYS}
        paths: set[str] = set()
        muxers: dict[str, set[str]] = {way: set() for way in EXPECTED_MUXERS if way in ways}
        plain_peer = info_from_p2p_addr(multiaddr.Multiaddr(ready["plain_addr"]))
        async with plain.run([multiaddr.Multiaddr(LOCALHOST)]), trio.open_nursery() as nursery:
            await nursery.start(node.run)
            peer_id = await node.connect(ready["addr"])
            await plain.connect(plain_peer)
            for round_ in range(repeats):
                for way in ways:
                    progress(f"round {round_ + 1}/{repeats}: {way}")
                    cpu_before = _cpu(me) + _cpu(them)
                    started = time.perf_counter()
                    with trio.fail_after(TIMEOUT):
                        if way == "default":
                            muxers[way].add(await send_message(plain, plain_peer.peer_id, payload))
                        elif way == "stream":
                            to = ID.from_base58(peer_id)
                            muxers[way].add(await send_message(node.swarm.host, to, payload))
                        elif way == "bulk":
                            report = await send_tensors(node, peer_id, [payload], timeout=TIMEOUT)
                            paths.add(report.path)
                        else:
                            await send_tcp(ready["tcp_port"], payload)
                    seconds = time.perf_counter() - started
                    rates[way].append(size_mib / seconds)
                    cpu[way].append(_cpu(me) + _cpu(them) - cpu_before)
                    progress(f"  {size_mib / seconds:.0f} MiB/s")
            node.stop()
            nursery.cancel_scope.cancel()
    finally:
        child.stdin.close()
        try:
            child.wait(15)
        except subprocess.TimeoutExpired:
            child.kill()
    for way, found in muxers.items():
        if found != {EXPECTED_MUXERS[way]}:  # a figure from another path than its name says
            raise RuntimeError(f"{way} ran on {sorted(found)}, not {EXPECTED_MUXERS[way]}")
    default, stream, bulk, tcp = (median(rates[w]) for w in WAYS)  # None: not measured
    bulk_met = bool(default and bulk and bulk >= 10 * default and bulk >= 1000)
    stream_met = bool(default and stream and stream >= 2 * default)
    return {
        "size_mib": size_mib,
        "repeats": repeats,
        "default_mib_s": rounded(default),
        "stream_mib_s": rounded(stream),
        "bulk_mib_s": rounded(bulk),
        "tcp_mib_s": rounded(tcp),
        **{f"{w}_cpu_s": rounded(median(cpu[w]), 3) for w in WAYS},
        "bulk_paths": sorted(paths),
        "muxers": {w: sorted(m) for w, m in muxers.items()},
        "bulk_vs_default": rounded(bulk / default if bulk and default else None, 1),
        "stream_vs_default": rounded(stream / default if stream and default else None, 2),
        "bulk_target_met": bulk_met,
        "stream_target_met": stream_met,
        "targets_met": bulk_met and stream_met,
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
    parser.add_argument(
        "--ways", default=",".join(WAYS), help="comma-separated subset of " + ",".join(WAYS)
    )
    args = parser.parse_args()
    ways = tuple(w for w in WAYS if w in args.ways.split(","))  # measured in this order
    if not ways or set(args.ways.split(",")) - set(WAYS):
        parser.error(f"--ways takes a comma-separated subset of {','.join(WAYS)}")
    with tempfile.TemporaryDirectory(prefix="hivenode-bench-transfer-") as tmp:
        result = trio.run(sender_main, args.size_mib, args.repeats, Path(tmp), ways)
    rows = [
        ("py-libp2p default stream (MiB/s)", result["default_mib_s"]),
        ("hivenode tuned stream (MiB/s)", result["stream_mib_s"]),
        ("bulk fast path (MiB/s)", result["bulk_mib_s"]),
        ("plain TCP (MiB/s)", result["tcp_mib_s"]),
        ("tuned stream / default", result["stream_vs_default"]),
        ("bulk CPU per transfer (s)", result["bulk_cpu_s"]),
        ("stream ≥ 2× default", result["stream_target_met"]),
        ("bulk ≥ 10× default and ≥ 1000 MiB/s", result["bulk_target_met"]),
    ]
    emit(result, args.json, rows, f"transfer of {args.size_mib} MiB, median of {args.repeats}")


if __name__ == "__main__":
    main()
