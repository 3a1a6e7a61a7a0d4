"""sd_notify over a real datagram socket, the watchdog cadence, and journald-aware logging."""

from __future__ import annotations

import logging
import os
import re
import socket
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from hivenode.agent.systemd import SystemdNotifier, configure_logging, watchdog_interval

# sockaddr_un holds 108 bytes; a deep TMPDIR must not turn into a confusing bind() error
MAX_SOCKET_PATH = 100


@pytest.fixture
def receiver(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """A datagram socket standing in for systemd, announced in $NOTIFY_SOCKET."""
    path = tmp_path / "notify"
    short_dir = None
    if len(os.fsencode(path)) > MAX_SOCKET_PATH:
        short_dir = tempfile.TemporaryDirectory(prefix="hn-")
        path = Path(short_dir.name) / "notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(5)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    yield sock
    sock.close()
    if short_dir is not None:
        short_dir.cleanup()


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    libp2p = logging.getLogger("libp2p")
    handlers, level, libp2p_level = root.handlers[:], root.level, libp2p.level
    yield
    for handler in root.handlers[:]:
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)
    libp2p.setLevel(libp2p_level)


def test_state_changes_arrive_with_the_exact_payloads(receiver: socket.socket) -> None:
    notifier = SystemdNotifier()
    assert notifier.enabled
    assert notifier.ready()
    assert notifier.status("3 peers, 2 connections")
    assert notifier.watchdog()
    assert notifier.stopping()
    received = [receiver.recv(4096) for _ in range(4)]
    assert received == [
        b"READY=1",
        b"STATUS=3 peers, 2 connections",
        b"WATCHDOG=1",
        b"STOPPING=1",
    ]


def test_status_text_stays_one_assignment(receiver: socket.socket) -> None:
    SystemdNotifier().status("syncing\nREADY=1")
    assert receiver.recv(4096) == b"STATUS=syncing READY=1"


def test_reloading_carries_the_monotonic_clock(receiver: socket.socket) -> None:
    before = time.monotonic_ns() // 1000
    SystemdNotifier().reloading()
    after = time.monotonic_ns() // 1000
    match = re.fullmatch(rb"RELOADING=1\nMONOTONIC_USEC=(\d+)", receiver.recv(4096))
    assert match is not None
    assert before <= int(match[1]) <= after


def test_abstract_socket_name_is_reached(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"hivenode-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert SystemdNotifier().ready()
        assert sock.recv(4096) == b"READY=1"


def test_without_notify_socket_every_call_is_a_noop(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    notifier = SystemdNotifier()
    assert not notifier.enabled
    calls = [notifier.ready, notifier.watchdog, notifier.stopping, notifier.reloading]
    assert [call() for call in calls] == [False] * len(calls)
    assert notifier.status("x") is False
    # nobody would receive the pings, so the daemon should not schedule them
    assert notifier.watchdog_interval() is None


def test_vanished_socket_does_not_raise(
    receiver: socket.socket, caplog: pytest.LogCaptureFixture
) -> None:
    notifier = SystemdNotifier()
    path = receiver.getsockname()
    receiver.close()
    os.unlink(path)
    with caplog.at_level(logging.DEBUG, logger="hivenode.agent.systemd"):
        assert notifier.watchdog() is False
        assert notifier.stopping() is False
    assert any(r.levelno == logging.DEBUG and "WATCHDOG=1" in r.message for r in caplog.records)


def test_full_receive_queue_does_not_block(receiver: socket.socket) -> None:
    """A stalled service manager must not stall the daemon: sends fail instead of waiting."""
    notifier = SystemdNotifier()
    started = time.monotonic()
    results = [notifier.watchdog() for _ in range(5000)]
    assert results[0] is True
    assert False in results
    assert time.monotonic() - started < 10


def test_watchdog_interval_is_half_the_timeout(
    receiver: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert watchdog_interval() == 15.0
    assert SystemdNotifier().watchdog_interval() == 15.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert SystemdNotifier().watchdog_interval() == 15.0


@pytest.mark.parametrize(
    ("usec", "pid"),
    [
        ("30000000", "wrong-pid"),  # the watchdog is meant for another process
        ("30000000", "not-a-number"),
        (None, None),  # WatchdogSec= not set
        ("0", None),
        ("soon", None),
    ],
)
def test_watchdog_interval_is_none_when_not_ours(
    receiver: socket.socket, monkeypatch: pytest.MonkeyPatch, usec: str | None, pid: str | None
) -> None:
    for key, value in (("WATCHDOG_USEC", usec), ("WATCHDOG_PID", pid)):
        if value is None:
            monkeypatch.delenv(key, raising=False)
        else:
            monkeypatch.setenv(key, str(os.getpid() + 1) if value == "wrong-pid" else value)
    assert watchdog_interval() is None
    assert SystemdNotifier().watchdog_interval() is None


def _journal_is_stderr(monkeypatch: pytest.MonkeyPatch) -> None:
    """What systemd does: JOURNAL_STREAM names the device and inode of the service's stderr."""
    stat = os.fstat(sys.stderr.fileno())
    monkeypatch.setenv("JOURNAL_STREAM", f"{stat.st_dev}:{stat.st_ino}")


@pytest.mark.usefixtures("restore_logging")
def test_journald_lines_carry_syslog_priorities(
    capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    _journal_is_stderr(monkeypatch)
    configure_logging("INFO")
    log = logging.getLogger("hivenode.test")
    log.debug("hidden")
    log.info("listening on %s", "/ip4/127.0.0.1/tcp/4001")
    log.warning("peer slow")
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        log.exception("round failed")
    lines = capfd.readouterr().err.splitlines()
    assert lines[0] == "<6>hivenode.test: listening on /ip4/127.0.0.1/tcp/4001"
    assert lines[1] == "<4>hivenode.test: peer slow"
    assert lines[2] == "<3>hivenode.test: round failed"
    # journald splits at newlines: each traceback line must keep the error priority
    assert len(lines) > 4
    assert all(line.startswith("<3>") for line in lines[2:])
    assert lines[-1] == "<3>RuntimeError: boom"
    assert "hidden" not in "\n".join(lines)


@pytest.mark.usefixtures("restore_logging")
def test_terminal_lines_are_human_readable(
    capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    configure_logging("info")
    logging.getLogger("hivenode.test").info("hello")
    err = capfd.readouterr().err
    timestamp = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}"
    assert re.fullmatch(timestamp + r" INFO hivenode\.test: hello\n", err), err


@pytest.mark.usefixtures("restore_logging")
def test_inherited_journal_stream_of_another_file_is_ignored(
    capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A shell started from a service inherits JOURNAL_STREAM while its stderr is a terminal."""
    stat = os.fstat(sys.stderr.fileno())
    monkeypatch.setenv("JOURNAL_STREAM", f"{stat.st_dev}:{stat.st_ino + 1}")
    configure_logging("INFO")
    logging.getLogger("hivenode.test").info("hello")
    err = capfd.readouterr().err
    assert not err.startswith("<")
    assert err.endswith(" INFO hivenode.test: hello\n")


@pytest.mark.usefixtures("restore_logging")
def test_libp2p_is_quiet_unless_debugging(
    capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    configure_logging("INFO")
    logging.getLogger("libp2p.pubsub.gossipsub").info("heartbeat")
    logging.getLogger("libp2p.pubsub.gossipsub").warning("mesh underfull")
    err = capfd.readouterr().err
    assert "heartbeat" not in err
    assert "mesh underfull" in err
    configure_logging("DEBUG")
    logging.getLogger("libp2p.pubsub.gossipsub").debug("heartbeat")
    assert "heartbeat" in capfd.readouterr().err


@pytest.mark.usefixtures("restore_logging")
def test_configuring_twice_keeps_one_handler(
    capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    configure_logging("INFO")
    configure_logging("WARNING")
    log = logging.getLogger("hivenode.test")
    log.info("quiet")
    log.warning("once")
    err = capfd.readouterr().err
    assert "quiet" not in err
    assert err.count("once") == 1


def test_unknown_level_is_refused() -> None:
    with pytest.raises(ValueError, match="VERBOSE"):
        configure_logging("VERBOSE")
