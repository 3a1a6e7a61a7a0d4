"""How the CLI shows status, peers and hardware to a person (rich); --json skips all this."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table


def human_bytes(value: float | None) -> str:
    if not value:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def human_duration(seconds: float) -> str:
    seconds = int(seconds)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes}m"
    return f"{minutes}m {secs}s" if minutes else f"{secs}s"


def hardware_summary(hardware: dict[str, Any] | None) -> str:
    if not hardware:
        return "-"
    cpu, memory = hardware.get("cpu", {}), hardware.get("memory", {})
    gpus = hardware.get("gpus", [])
    gpu_text = ", ".join(
        f"{g.get('name', 'gpu')} {human_bytes(g.get('memory_total_bytes'))}" for g in gpus
    )
    return (
        f"{cpu.get('affinity_cores') or cpu.get('logical_cores', '?')} cores, "
        f"{human_bytes(memory.get('total_bytes'))} RAM, " + (gpu_text or "no GPU")
    )


def show_status(console: Console, status: dict[str, Any]) -> None:
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold")
    table.add_column()
    table.add_row("peer id", status["peer_id"])
    table.add_row("version", status.get("agent_version", "?"))
    table.add_row("addresses", "\n".join(status.get("addrs", [])) or "-")
    table.add_row("roles", ", ".join(status.get("roles", [])) or "-")
    table.add_row("uptime", human_duration(status.get("uptime_s", 0)))
    table.add_row(
        "peers", f"{status.get('peers', 0)} known, {status.get('connections', 0)} connected"
    )
    table.add_row("hardware", hardware_summary(status.get("hardware")))
    load = status.get("load") or {}
    table.add_row(
        "load",
        f"CPU {load.get('cpu_percent', 0):.0f} %, load avg "
        + " ".join(f"{x:.2f}" for x in load.get("load_avg", [])),
    )
    console.print(table)
    for check in status.get("health", []):
        mark = "[green]ok[/]" if check.get("ok") else "[red]!![/]"
        console.print(f"{mark}  {check.get('check')}: {check.get('detail')}")


def show_peers(console: Console, peers: list[dict[str, Any]]) -> None:
    if not peers:
        console.print("no peers known yet")
        return
    table = Table(title=f"{len(peers)} peers", box=None, header_style="bold")
    for column in ("peer", "address", "roles", "hardware", "load", "RTT", "seen"):
        table.add_column(column, no_wrap=True)
    for peer in peers:
        addrs = peer.get("addrs") or ["-"]
        rtt = peer.get("rtt_ms")
        table.add_row(
            _short(peer["peer_id"]),
            _host_port(addrs[0]),
            ",".join(peer.get("roles", [])),
            _compact_hardware(peer.get("hardware")),
            f"{(peer.get('load') or {}).get('cpu_percent', 0):.0f}%",
            "-" if rtt is None else f"{rtt:.1f}ms",
            f"{peer.get('last_seen_s', 0):.0f}s",
        )
    console.print(table)


def show_hardware(console: Console, hardware: dict[str, Any]) -> None:
    cpu, memory = hardware.get("cpu", {}), hardware.get("memory", {})
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold")
    table.add_column()
    table.add_row("CPU", cpu.get("model") or "-")
    table.add_row(
        "cores",
        f"{cpu.get('physical_cores')} physical, {cpu.get('logical_cores')} logical, "
        f"{cpu.get('affinity_cores')} usable",
    )
    table.add_row(
        "memory",
        f"{human_bytes(memory.get('available_bytes'))} free of "
        f"{human_bytes(memory.get('total_bytes'))}",
    )
    table.add_row("disk free", human_bytes(hardware.get("disk_free_bytes")))
    gpus = hardware.get("gpus", [])
    table.add_row(
        "GPUs",
        "\n".join(
            f"#{g.get('index')} {g.get('name')} {human_bytes(g.get('memory_total_bytes'))} "
            f"({g.get('source')})"
            for g in gpus
        )
        or "none",
    )
    frameworks = hardware.get("frameworks", {})
    table.add_row(
        "frameworks", ", ".join(f"{k} {v}" for k, v in sorted(frameworks.items())) or "none"
    )
    table.add_row("platform", hardware.get("platform", "-"))
    console.print(table)


def _compact_hardware(hardware: dict[str, Any] | None) -> str:
    if not hardware:
        return "-"
    cpu, memory = hardware.get("cpu", {}), hardware.get("memory", {})
    gpus = hardware.get("gpus", [])
    cores = cpu.get("affinity_cores") or cpu.get("logical_cores", "?")
    ram = human_bytes(memory.get("total_bytes")).replace(" GiB", "G").replace(" MiB", "M")
    return f"{cores}c {ram}" + (f" {len(gpus)}GPU" if gpus else "")


def _host_port(multiaddr: str) -> str:
    """`/ip4/1.2.3.4/tcp/4001/p2p/…` → `1.2.3.4:4001` (other shapes shown as they are)."""
    parts = multiaddr.split("/")
    if len(parts) >= 5 and parts[1] in ("ip4", "ip6", "dns", "dns4", "dns6") and parts[3] == "tcp":
        return f"{parts[2]}:{parts[4]}"
    return multiaddr.split("/p2p/")[0]


def _short(peer_id: str) -> str:
    """The tail of a peer id: ed25519 ids all begin `12D3KooW`, so the end tells them apart."""
    return peer_id if len(peer_id) <= 12 else f"…{peer_id[-10:]}"
