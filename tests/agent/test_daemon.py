"""`hivenode run` daemons as real processes on 127.0.0.1, asked through the `hivenode` command."""

from __future__ import annotations

import json
import os
import pickle
import re
import signal
import subprocess
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest

if TYPE_CHECKING:
    from conftest import Daemon, Daemons, Pair

STATUS_KEYS = {
    "peer_id",
    "addrs",
    "roles",
    "uptime_s",
    "peers",
    "connections",
    "hardware",
    "load",
    "health",
}
EXPIRY_SLACK = 3.0
"""Seconds past an advert's TTL by which its peer must be gone (the expiry sweep runs each
second; the rest is polling and a loaded 2-core machine)."""


def wait_for(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.2)
    return value


def error_lines(result: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.strip()]


def row_of(asker: Daemon, peer_id: str) -> dict[str, Any] | None:
    """`peer_id`'s row in `hivenode peers --json` of `asker`."""
    return next((r for r in asker.cli_json("peers") if r["peer_id"] == peer_id), None)


def ttl_of(row: dict[str, Any]) -> float:
    """The advert's TTL as the table applies it: received that long ago, expiring in that."""
    return float(row["last_seen_s"]) + float(row["expires_in_s"])


def unknown_peer_id() -> str:
    """A well-formed ed25519 peer id that no daemon here has: base58 of the identity
    multihash of the protobuf-encoded public key, as libp2p builds it."""
    key = bytes([0x08, 0x01, 0x12, 0x20]) + os.urandom(32)
    digest = bytes([0x00, len(key)]) + key
    alphabet = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
    number, text = int.from_bytes(digest, "big"), ""
    while number:
        number, rest = divmod(number, 58)
        text = alphabet[rest] + text
    return "1" * (len(digest) - len(digest.lstrip(b"\0"))) + text


# --- a pair of daemons, B joined through A -----------------------------------------------


def test_peers_list_each_other_with_roles_and_hardware(pair: Pair) -> None:
    pair.wait_until_acquainted(timeout=20)
    for asker, other in ((pair.a, pair.b), (pair.b, pair.a)):
        row = wait_for(
            lambda asker=asker, other=other: row_of(asker, other.peer_id),
            10,
            f"{other.name} in the peers --json of {asker.name}",
        )
        assert row["roles"] == other.status["roles"] and row["roles"]
        assert row["addrs"] == other.status["addrs"]
        assert row["hardware"]["cpu"]["logical_cores"] == os.cpu_count()
        assert row["hardware"]["memory"]["total_bytes"] > 0
        assert row["expires_in_s"] > 0


def test_status_json_reports_identity_swarm_and_health(pair: Pair) -> None:
    pair.wait_until_acquainted(timeout=20)
    status = wait_for(
        lambda: (s := pair.b.cli_json("status"))["peers"] >= 1 and s, 10, "B to count a peer"
    )

    assert status.keys() >= STATUS_KEYS
    assert status["peer_id"] == pair.b.peer_id
    assert all(addr.endswith(f"/p2p/{pair.b.peer_id}") for addr in status["addrs"])
    assert status["addrs"] and all(a.startswith("/ip4/127.0.0.1/tcp/") for a in status["addrs"])
    assert status["peers"] >= 1 and status["connections"] >= 1
    assert status["uptime_s"] > 0
    assert status["hardware"]["cpu"]["logical_cores"] == os.cpu_count()
    failing = [check for check in status["health"] if not check["ok"]]
    assert {c["check"] for c in status["health"]} >= {"swarm", "bootstrap"}
    assert failing == []


def test_status_of_a_remote_peer_comes_through_the_local_daemon(pair: Pair) -> None:
    pair.wait_until_acquainted(timeout=20)

    remote = pair.a.cli_json("status", "--peer", pair.b.peer_id)

    assert remote["peer_id"] == pair.b.peer_id
    assert remote["addrs"] == pair.b.status["addrs"]
    assert remote.keys() >= STATUS_KEYS


def test_status_of_an_unknown_peer_fails_with_one_line(pair: Pair) -> None:
    stranger = unknown_peer_id()
    assert stranger.startswith("12D3KooW") and len(stranger) == len(pair.b.peer_id)

    result = pair.a.cli("status", "--peer", stranger)

    assert result.returncode == 1
    lines = error_lines(result)
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("hivenode: error:") and stranger in lines[0]
    assert "Traceback" not in result.stderr


def test_status_and_peers_print_for_humans(pair: Pair) -> None:
    pair.wait_until_acquainted(timeout=20)

    status = pair.a.cli("status")
    assert status.returncode == 0, status.stderr
    assert pair.a.peer_id in status.stdout

    port = pair.b.addr.split("/tcp/")[1].split("/")[0]

    def table() -> str | None:
        result = pair.a.cli("peers")
        assert result.returncode == 0, result.stderr
        return result.stdout if pair.b.peer_id[-6:] in result.stdout else None

    shown = wait_for(table, 10, "B in A's peers table")
    assert f"127.0.0.1:{port}" in shown
    assert "{" not in shown  # a table, not JSON


def test_metrics_endpoint_serves_only_hivenode_series(pair: Pair) -> None:
    pair.wait_until_acquainted(timeout=20)
    url = f"http://127.0.0.1:{pair.a.metrics_port}/metrics"

    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.status == 200
        text = response.read().decode()

    names = set(re.findall(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)", text, re.MULTILINE))
    for wanted in (
        "hivenode_peers",
        "hivenode_adverts_sent_total",
        "hivenode_uptime_seconds",
        "hivenode_build_info",
    ):
        assert wanted in names
    # py-libp2p's series (gossipsub_*, swarm_*) and the default registry's process_* and
    # python_* live elsewhere: this endpoint serves our registry alone
    assert {n for n in names if not n.startswith("hivenode_")} == set()
    assert not any("libp2p" in n or "gossipsub" in n for n in names)
    samples = dict(re.findall(r"^(hivenode_\w+) (\S+)$", text, re.MULTILINE))
    assert float(samples["hivenode_adverts_sent_total"]) >= 1
    assert float(samples["hivenode_uptime_seconds"]) > 0


# --- shutdown ----------------------------------------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_stops_a_connected_daemon_and_removes_its_socket(
    signum: signal.Signals, daemons: Daemons, pair: Pair
) -> None:
    node = daemons.start("leaver", bootstrap=pair.a)
    wait_for(lambda: pair.a.peer_id in node.peer_ids(), 20, "the leaver to know A")
    assert node.api("/v1/status")["connections"] >= 1
    assert node.socket_path.exists()

    node.signal(signum)

    assert node.wait_exit(timeout=10) == 0, node.log()
    assert not node.socket_path.exists()
    assert "Traceback" not in node.log()


# --- expiry ------------------------------------------------------------------------------


def test_killed_peer_leaves_the_table_within_its_ttl(daemons: Daemons) -> None:
    a = daemons.start("a", short_adverts=True)
    b = daemons.start("b", bootstrap=a, short_adverts=True)
    row = wait_for(lambda: row_of(a, b.peer_id), 20, "A to list B")
    ttl = ttl_of(row)

    b.process.kill()
    killed_at = time.monotonic()
    b.process.wait()

    wait_for(lambda: row_of(a, b.peer_id) is None, ttl + EXPIRY_SLACK, "B to leave A's table")
    assert time.monotonic() - killed_at <= ttl + EXPIRY_SLACK


def test_live_peer_stays_listed_between_its_adverts(pair: Pair) -> None:
    pair.wait_until_acquainted(timeout=20)
    a, b = pair.a, pair.b
    ttl = ttl_of(wait_for(lambda: row_of(a, b.peer_id), 10, "A to list B"))

    # B is alive and advertising: at no moment of two TTLs may A have let it expire
    absent_at = []
    start = time.monotonic()
    while (elapsed := time.monotonic() - start) < 2 * ttl:
        if b.peer_id not in a.peer_ids():
            absent_at.append(round(elapsed, 1))
        time.sleep(0.1)

    assert b.process.poll() is None
    assert absent_at == [], f"B (TTL {ttl:.1f} s) was missing from A's table at {absent_at} s"


def test_a_joiner_keeps_a_dead_peers_advert_no_longer_than_its_source(daemons: Daemons) -> None:
    # TTL of 5 periods: the victim's advert outlives everything below by a wide margin
    adverts = {"HIVENODE_ADVERT_PERIOD": "2", "HIVENODE_ADVERT_TTL_PERIODS": "5"}
    a = daemons.start("a", env=adverts)
    victim = daemons.start("victim", bootstrap=a, env=adverts)
    wait_for(
        lambda: (row := row_of(a, victim.peer_id)) and row["last_seen_s"] < 1.0,
        15,
        "a fresh advert of the victim at A",
    )
    victim.process.kill()
    victim.process.wait()
    wait_for(
        lambda: (row := row_of(a, victim.peer_id)) is None or row["last_seen_s"] >= 2.5,
        10,
        "the advert to age",
    )

    joiner = daemons.start("joiner", bootstrap=a, env=adverts)
    relayed = wait_for(lambda: row_of(joiner, victim.peer_id), 10, "the joiner to learn of it")
    source = row_of(a, victim.peer_id)

    # the joiner got the very advert A holds, from A's table: read later, A's copy can only
    # be closer to expiry; the joiner must not have granted the dead peer a fresh TTL
    assert source is not None
    assert relayed["expires_in_s"] <= source["expires_in_s"] + 1.0, (
        f"the joiner expires the dead peer in {relayed['expires_in_s']} s, "
        f"A (its source) in {source['expires_in_s']} s"
    )


def test_a_qtable_imported_into_a_running_daemon_is_kept_and_gossiped(
    daemons: Daemons, tmp_path: Path
) -> None:
    a = daemons.start("a", short_adverts=True)
    b = daemons.start("b", bootstrap=a, short_adverts=True)
    values = np.zeros((4, 3, 4, 3, 5))
    values[1, 2, 1, 0, 2] = 0.8
    legacy = tmp_path / "q_table.pkl"
    legacy.write_bytes(pickle.dumps(values))
    imported = a.cli("qtable", "import", str(legacy), "--json")
    assert imported.returncode == 0, imported.stderr
    assert json.loads(imported.stdout)["imported_cells"] == 1  # into the live table

    def cell_of(daemon: Daemon) -> float | None:
        shown = daemon.cli_offline("qtable", "show", "--state-dir", str(daemon.state_dir), "--json")
        states = json.loads(shown.stdout)["states"] if shown.returncode == 0 else []
        return next(
            (s["q"]["pipeline_parallel"] for s in states if s["state"] == [1, 2, 1, 0]), None
        )

    # saved by the daemon itself (a file written behind its back was lost at its next save),
    # and gossiped: B learns the cell too
    assert wait_for(lambda: cell_of(a), 10, "A to save the imported cell") == 0.8
    assert wait_for(lambda: cell_of(b), 20, "B to receive the imported cell") == 0.8
    refused = a.cli("qtable", "import", str(tmp_path / "missing.pkl"))
    assert refused.returncode == 2 and "cannot read" in refused.stderr
