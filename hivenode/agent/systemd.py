"""Talking to systemd without libsystemd: sd_notify datagrams, the watchdog, journald logging."""

from __future__ import annotations

import logging
import os
import socket
import sys
import time
from collections.abc import Mapping
from typing import TextIO

logger = logging.getLogger(__name__)

HUMAN_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
JOURNAL_FORMAT = "%(name)s: %(message)s"
"""journald stamps time and unit itself; the `<N>` priority prefix is added per line."""

# Loggers whose INFO output drowns ours; they are shown only when the node runs at DEBUG.
CHATTY_LOGGERS = ("libp2p",)

_HANDLER_NAME = "hivenode.stderr"

# syslog(3) priorities of the standard levels, ascending by level
SYSLOG_PRIORITIES: tuple[tuple[int, int], ...] = (
    (logging.DEBUG, 7),
    (logging.INFO, 6),
    (logging.WARNING, 4),
    (logging.ERROR, 3),
    (logging.CRITICAL, 2),
)


class SystemdNotifier:
    """Sends sd_notify(3) state changes to the service manager.

    Reads `$NOTIFY_SOCKET` (a path, or an abstract socket name starting with `@`) when created;
    without it every call is a no-op, so the same code runs under systemd and in a terminal.
    Sending never raises and never blocks: a daemon must not die or stall because the service
    manager went away. Each method returns whether the datagram was handed to the kernel.
    """

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self._environ: dict[str, str] = dict(env)
        self._address = _socket_address(env.get("NOTIFY_SOCKET", ""))

    @property
    def enabled(self) -> bool:
        """Whether a service manager is listening (`$NOTIFY_SOCKET` was usable)."""
        return self._address is not None

    def ready(self) -> bool:
        """Start-up is complete: `Type=notify` units become active only after this."""
        return self.notify("READY=1")

    def status(self, text: str) -> bool:
        """A one-line state for `systemctl status`; newlines would end the assignment early."""
        return self.notify("STATUS=" + " ".join(text.splitlines()))

    def watchdog(self) -> bool:
        """Keep-alive ping; send at least every `watchdog_interval()` seconds."""
        return self.notify("WATCHDOG=1")

    def stopping(self) -> bool:
        """Shutdown has begun, so systemd shows `deactivating` instead of a hung service."""
        return self.notify("STOPPING=1")

    def reloading(self) -> bool:
        """A configuration reload has begun; call `ready()` again when it is done.

        `MONOTONIC_USEC` is required by `Type=notify-reload` and ignored by plain `notify`.
        """
        now_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.notify(f"RELOADING=1\nMONOTONIC_USEC={now_usec}")

    def watchdog_interval(self) -> float | None:
        """Seconds between watchdog pings, or None when nobody would receive them."""
        if not self.enabled:
            return None
        return watchdog_interval(self._environ)

    def notify(self, message: str) -> bool:
        """Send one raw sd_notify message (newline-separated `KEY=value` assignments)."""
        if self._address is None:
            return False
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.setblocking(False)
                sock.sendto(message.encode("utf-8"), self._address)
        except OSError as exc:
            logger.debug("sd_notify %r to %r failed: %s", message, self._address, exc)
            return False
        return True


def watchdog_interval(environ: Mapping[str, str] | None = None) -> float | None:
    """Half of systemd's `WatchdogSec=` in seconds (the cadence sd_watchdog_enabled(3)
    recommends), or None when the watchdog is off or meant for another process."""
    env = os.environ if environ is None else environ
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    if (pid := env.get("WATCHDOG_PID")) is not None:
        try:
            if int(pid) != os.getpid():
                return None
        except ValueError:
            return None
    return usec / 1_000_000 / 2


def journald_logging_prefix_enabled(
    stream: TextIO | None = None, environ: Mapping[str, str] | None = None
) -> bool:
    """Whether `stream` (default stderr) is connected to journald.

    `$JOURNAL_STREAM` holds the `device:inode` of the stream systemd connected; the
    systemd.exec manual asks programs to compare it with their own stderr, because the
    variable is inherited by children and shells whose stderr goes elsewhere (a terminal
    would show raw `<6>` prefixes).
    """
    env = os.environ if environ is None else environ
    value = env.get("JOURNAL_STREAM")
    if not value:
        return False
    out = sys.stderr if stream is None else stream
    try:
        device, inode = (int(part) for part in value.split(":", 1))
        stat = os.fstat(out.fileno())
    except (ValueError, OSError, AttributeError):
        # not "dev:ino", or a stream without a file descriptor (captured, redirected in-process)
        return False
    return (stat.st_dev, stat.st_ino) == (device, inode)


class JournaldFormatter(logging.Formatter):
    """Prefixes every line with its syslog priority `<N>`, so journald records the level of a
    message and of each line of its traceback (journald splits entries at newlines)."""

    def __init__(self) -> None:
        super().__init__(JOURNAL_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{syslog_priority(record.levelno)}>"
        lines = super().format(record).splitlines() or [""]
        return "\n".join(prefix + line for line in lines)


def syslog_priority(levelno: int) -> int:
    """The syslog priority of a logging level; a custom level takes the next standard one up."""
    for level, priority in SYSLOG_PRIORITIES:
        if levelno <= level:
            return priority
    return SYSLOG_PRIORITIES[-1][1]


def configure_logging(level: str, stream: TextIO | None = None) -> logging.Handler:
    """Send the root logger to `stream` (default stderr) at `level` and return the handler.

    Under journald lines carry `<N>` priority prefixes; elsewhere they read
    `time LEVEL logger: message`. Calling it again replaces the handler it installed before.
    """
    numeric = logging.getLevelNamesMapping().get(level.upper())
    if numeric is None:
        raise ValueError(f"unknown log level {level!r}: use DEBUG, INFO, WARNING or ERROR")
    out = sys.stderr if stream is None else stream
    handler = logging.StreamHandler(out)
    handler.set_name(_HANDLER_NAME)
    if journald_logging_prefix_enabled(out):
        handler.setFormatter(JournaldFormatter())
    else:
        handler.setFormatter(logging.Formatter(HUMAN_FORMAT))
    root = logging.getLogger()
    for previous in [h for h in root.handlers if h.get_name() == _HANDLER_NAME]:
        root.removeHandler(previous)
        previous.close()
    root.addHandler(handler)
    root.setLevel(numeric)
    logging.getLogger("hivenode").setLevel(logging.NOTSET)  # ours follow `level`, as asked
    chatty_level = logging.NOTSET if numeric <= logging.DEBUG else logging.WARNING
    for name in CHATTY_LOGGERS:
        route_library_logger(name, chatty_level)
    return handler


def route_library_logger(name: str, level: int) -> None:
    """Send a library's logger through our handler at `level`.

    `import libp2p` detaches its logger (propagate=False, handlers cleared, WARNING) unless
    LIBP2P_DEBUG is set; its records then reach only Python's last-resort handler, raw and
    without journald priorities. Importing it first makes that reset happen before ours.
    """
    import importlib

    importlib.import_module(name)
    logger = logging.getLogger(name)
    logger.propagate = True
    logger.setLevel(level)
    # a module that sets its own level (py-libp2p's auto_connector: INFO, a line per dial
    # round) would log past ours; imported now, it inherits ours instead
    if name == "libp2p":
        importlib.import_module("libp2p.network.auto_connector")
    for child, child_logger in list(logging.root.manager.loggerDict.items()):
        if child.startswith(name + ".") and isinstance(child_logger, logging.Logger):
            child_logger.setLevel(logging.NOTSET)


def _socket_address(value: str) -> str | None:
    """`$NOTIFY_SOCKET` as a socket address: a path, or `@name` for the abstract namespace."""
    if value.startswith("/"):
        return value
    if value.startswith("@") and len(value) > 1:
        return "\0" + value[1:]
    if value:
        # e.g. systemd 254's "vsock:" addresses, which a service on the host never receives
        logger.debug("ignoring unsupported NOTIFY_SOCKET %r", value)
    return None
