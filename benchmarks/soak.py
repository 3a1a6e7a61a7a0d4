"""A swarm that runs federated jobs back to back under churn for M minutes: does its
memory, its file descriptors or its trio tasks grow?

    python benchmarks/soak.py [--json] [--minutes 30] [--warmup-minutes 10] [--nodes 20]
                              [--seed 0] [--churn-every 15] [--strategy fedavg] [--tracemalloc]

N real libp2p nodes in this one process and trio loop (`hivenode.sim.chaos_swarm`, the
chaos scenarios' swarm): one aggregator and N-1 trainers, each with its slice of digits.
The aggregator runs small FedAvg jobs (an MLP, 5 rounds, 10 trainers a round) one after
the other; every `--churn-every` seconds (±50 %, seeded) a random trainer is stopped as
SIGKILL would stop it, stays down 5 s, and restarts with the same key and state directory.

The figures compare two moments taken between jobs, after a `gc.collect()`: *start*, once
a warm-up job has imported torch, loaded every dataset and filled the peer tables, and
*end*, after the last job; and, the steady state, from *after warm-up* (the first job to
end `--warmup-minutes` in, once caches with a TTL or a cap are full) to *end*. RSS and open
descriptors are this process's (psutil); tasks are the trio task tree's size under the
root task. Growth of Python objects (by type), of trio tasks (by name), of descriptors (by
kind) and of py-libp2p's pubsub containers (entries, all nodes) is listed to say *what*
grew; with `--tracemalloc` the allocation sites that grew most after the warm-up too
(slower: about 2x).
"""

from __future__ import annotations

import ctypes
import gc
import logging
import os
import random
import re
import shutil
import sys
import tempfile
import threading
import time
import tracemalloc
from collections import Counter, deque
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psutil
import trio
from _common import emit, machine, make_parser, progress

JOB_ROUNDS = 5
CLIENTS_PER_ROUND = 10
DOWN_S = 5.0
"""How long a churned trainer stays down: its peers notice, and its next advert is not
dropped as too soon after its last one (`MIN_ADVERT_SPACING`)."""
SERIES_EVERY_S = 30.0
WARMUP_MINUTES = 10.0
"""Until then what has a TTL or a cap is still filling (measured, 20 nodes: gossip's
equivocation store 4 minutes, its message cache 5 at the 60 s heartbeats py-libp2p's
adaptive gossip sets, each trainer's 64 job contexts about 120 jobs, 10 minutes): growth
is reported from the start and from here."""
TOP = 8


@dataclass(frozen=True)
class Sample:
    """One look at the process."""

    t_s: float
    jobs: int
    rss_mb: float
    fds: int
    tasks: int
    threads: int
    py_blocks: int
    """`sys.getallocatedblocks()`: pymalloc's live blocks, which RSS lags behind."""
    heap_in_use_mb: float | None
    """malloc's bytes in use (glibc `mallinfo2`): live memory, Python's and C's."""
    heap_free_mb: float | None
    """malloc's free bytes it has not returned: fragmentation, counted in RSS."""


def count_tasks(task: Any) -> int:
    return 1 + sum(count_tasks(c) for n in task.child_nurseries for c in n.child_tasks)


def task_names(task: Any, into: Counter[str]) -> Counter[str]:
    into[_short_name(task.name)] += 1
    for nursery in task.child_nurseries:
        for child in nursery.child_tasks:
            task_names(child, into)
    return into


def all_tasks(task: Any) -> list[Any]:
    return [task, *(t for n in task.child_nurseries for c in n.child_tasks for t in all_tasks(c))]


def await_chain(task: Any) -> list[str]:
    """Where a task is waiting: `file:line function` down its chain of awaits."""
    chain, coro = [], task.coro
    while coro is not None:
        frame = getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None)
        if frame is not None:
            code = frame.f_code
            chain.append(f"{Path(code.co_filename).name}:{frame.f_lineno} {code.co_name}")
        coro = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)
    return chain


def task_stacks(names: set[str]) -> dict[str, dict[str, int]]:
    """For each task name in `names`: where its tasks wait (the innermost awaits), counted.
    A leaked task shows as one wait that as many tasks share as there were restarts."""
    stacks: dict[str, Counter[str]] = {name: Counter() for name in names}
    for task in all_tasks(trio.lowlevel.current_root_task()):
        name = _short_name(task.name)
        if name in stacks:
            stacks[name][" > ".join(await_chain(task)[-5:])] += 1
    return {name: dict(counts) for name, counts in stacks.items()}


def thread_names() -> Counter[str]:
    return Counter(re.sub(r"\d+", "N", t.name) for t in threading.enumerate())


def _short_name(name: str) -> str:
    """`hivenode.agent.node.Node.run.<locals>.x` → `Node.run.<locals>.x`."""
    return ".".join(name.split(" ")[0].split(".")[-3:])


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd",
            "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost",
        )
    ]  # fmt: skip


def malloc_heap_mb() -> tuple[float | None, float | None]:
    """(in use, free but kept) by glibc's malloc over all arenas; (None, None) elsewhere."""
    try:
        mallinfo2 = ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):  # not glibc, or older than 2.33
        return None, None
    mallinfo2.restype = _MallInfo2
    info = mallinfo2()
    in_use = (info.uordblks + info.hblkhd) / 1e6
    return round(in_use, 1), round(info.fordblks / 1e6, 1)


def take_sample(started: float, jobs: int) -> Sample:
    gc.collect()
    process = psutil.Process()
    heap_in_use, heap_free = malloc_heap_mb()
    return Sample(
        t_s=round(time.monotonic() - started, 1),
        jobs=jobs,
        rss_mb=round(process.memory_info().rss / 1e6, 1),
        fds=process.num_fds(),
        tasks=count_tasks(trio.lowlevel.current_root_task()),
        threads=threading.active_count(),
        py_blocks=sys.getallocatedblocks(),
        heap_in_use_mb=heap_in_use,
        heap_free_mb=heap_free,
    )


def fd_kinds() -> Counter[str]:
    """Open descriptors by what they are: socket, pipe, anon_inode:[eventpoll], a path."""
    kinds: Counter[str] = Counter()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        kinds[target.split(":[")[0] if ":[" in target else "file"] += 1
    return kinds


def type_counts() -> Counter[str]:
    return Counter(f"{type(o).__module__}.{type(o).__qualname__}" for o in gc.get_objects())


def libp2p_state(swarm: Any) -> Counter[str]:
    """Entries in every container that py-libp2p's pubsub stack keeps, summed over the
    running nodes (`GossipSub.mcache: 40`, `Pubsub.seen_messages.cache: 900`, ...): its
    caches are where a swarm's memory can grow without a Python type saying whose it is.
    `GossipSub.equivocation_detection.bytes` is the wire size of the messages it holds."""
    state: Counter[str] = Counter()
    nodes = [*swarm.aggregators, *(member.node for member in swarm.trainers)]
    for node in (n for n in nodes if n.running):
        router, pubsub = node.swarm.gossipsub, node.swarm.pubsub
        parts = {
            "GossipSub": router,
            "GossipSub.mcache": router.mcache,
            "GossipSub.scorer": router.scorer,
            "Pubsub": pubsub,
            "Pubsub.seen_messages": pubsub.seen_messages,
            "Pubsub.validation_cache": pubsub.validation_cache,
        }
        for owner, obj in parts.items():
            for attr, value in vars(obj).items():
                if isinstance(value, dict | list | set | deque):
                    state[f"{owner}.{attr}"] += _entries(value)
        state["GossipSub.equivocation_detection.bytes"] += sum(
            m.ByteSize() for m in router.equivocation_detection.values()
        )
        state["GossipSub.heartbeat_interval.max"] = max(
            state["GossipSub.heartbeat_interval.max"], int(router.heartbeat_interval)
        )
    return state


def _entries(container: Any) -> int:
    """Its length, plus its values' lengths where they are containers (a dict of lists)."""
    values = container.values() if isinstance(container, dict) else container
    return len(container) + sum(
        _entries(v) for v in values if isinstance(v, dict | list | set | deque)
    )


def growth(before: Counter[str], after: Counter[str]) -> dict[str, int]:
    """The TOP keys that grew most, with how much."""
    grown = {k: after[k] - before.get(k, 0) for k in after if after[k] > before.get(k, 0)}
    return dict(sorted(grown.items(), key=lambda kv: -kv[1])[:TOP])


class Soak:
    def __init__(
        self, nodes: int, seed: int, churn_every: float, strategy: str, base: Path
    ) -> None:
        self.nodes = nodes
        self.strategy = strategy
        self.seed = seed
        self.churn_every = churn_every
        self.base = base
        self.rng = random.Random(seed)
        self.jobs_completed = 0
        self.job_failures: list[str] = []
        self.restarts = 0
        self.started = time.monotonic()
        self.series: list[Sample] = []
        self.libp2p_series: list[dict[str, int]] = []
        self.traced: tracemalloc.Snapshot | None = None

    def job(self, number: int) -> Any:
        from hivenode.aggregator.job_spec import JobSpec
        from hivenode.sim.fl import SIM_DATASET

        return JobSpec.model_validate(
            {
                "name": f"soak-{number}",
                "dataset": SIM_DATASET,
                "rounds": JOB_ROUNDS,
                "clients_per_round": CLIENTS_PER_ROUND,
                "min_clients": CLIENTS_PER_ROUND // 2,  # a round survives a churned trainer
                "deadline_s": 20.0,
                "seed": number,
                "model": {"framework": "torch", "name": "mlp", "options": {"hidden": [32]}},
                "strategy": {"name": self.strategy},
                "train": {"lr": 0.3, "local_epochs": 1, "batch_size": 16},
            }
        )

    async def run_one(self, hub: Any, number: int) -> None:
        from hivenode.aggregator.runner import JobError, run_job

        job_dir = self.base / "jobs" / f"soak-{number}"
        try:
            result = await run_job(hub, self.job(number), job_dir, trainer_wait_s=60.0)
            self.jobs_completed += 1
            final = result.final
            accuracy = final.eval_accuracy if final else None
            progress(f"job {number}: {len(result.history)} rounds, accuracy {accuracy}")
        except JobError as exc:
            self.job_failures.append(f"soak-{number}: {exc}")
            progress(f"job {number} failed: {exc}")
        # checkpoints are disk, not what this measures: keep the disk flat too
        await trio.to_thread.run_sync(shutil.rmtree, job_dir, True)

    async def churn(self, swarm: Any, stop: trio.Event) -> None:
        """Stop a random trainer now and then and bring it back DOWN_S later."""
        while self.churn_every > 0:
            with trio.move_on_after(self.churn_every * self.rng.uniform(0.5, 1.5)):
                await stop.wait()
            if stop.is_set():
                return
            index = self.rng.randrange(len(swarm.trainers))
            await swarm.kill(swarm.trainers[index].node)
            await trio.sleep(DOWN_S)
            await swarm.restart(index)
            self.restarts += 1

    async def record_series(self, swarm: Any, stop: trio.Event) -> None:
        while not stop.is_set():
            with trio.move_on_after(SERIES_EVERY_S):
                await stop.wait()
            self.series.append(take_sample(self.started, self.jobs_completed))
            self.libp2p_series.append(dict(sorted(libp2p_state(swarm).items())))
            last = self.series[-1]
            progress(
                f"{last.t_s:.0f} s: {last.jobs} jobs, RSS {last.rss_mb} MB "
                f"(malloc: {last.heap_in_use_mb} MB in use, {last.heap_free_mb} MB free), "
                f"{last.fds} fds, {last.tasks} tasks, {self.restarts} restarts"
            )


async def soak(
    minutes: float,
    warmup_minutes: float,
    nodes: int,
    seed: int,
    churn_every: float,
    strategy: str,
    trace: bool,
) -> Any:
    from hivenode.sim.chaos_swarm import chaos_swarm, honest_trainer, training_threads
    from hivenode.sim.fl_datasets import federated_dataset
    from hivenode.sim.swarm import quiet_libp2p

    quiet_libp2p()
    logging.getLogger("flwr").setLevel(logging.WARNING)  # its per-job summary, 40 lines each
    devices = federated_dataset("digits", nodes - 1, partition="iid", seed=seed)
    with tempfile.TemporaryDirectory(prefix="hn-soak-") as tmp:
        state = Soak(nodes, seed, churn_every, strategy, Path(tmp))
        progress(f"starting {nodes} nodes in this process")
        async with chaos_swarm(Path(tmp), devices, honest_trainer(training_threads())) as swarm:
            (hub,) = swarm.aggregators
            boot = take_sample(state.started, 0)
            progress("warm-up job")
            await state.run_one(hub, 0)
            state.jobs_completed = 0  # the warm-up does not count
            if trace:
                tracemalloc.start(10)
            start = take_sample(state.started, 0)
            types_start, tasks_start, fds_start = type_counts(), _names(), fd_kinds()
            threads_start = thread_names()
            progress(f"start: RSS {start.rss_mb} MB, {start.fds} fds, {start.tasks} tasks")
            libp2p_start = libp2p_state(swarm)
            began = time.monotonic()
            deadline, warmed_up = began + minutes * 60, began + warmup_minutes * 60
            steady: Sample | None = None
            libp2p_steady: Counter[str] = Counter()
            types_steady, tasks_steady = types_start, tasks_start
            stop = trio.Event()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(state.churn, swarm, stop)
                nursery.start_soon(state.record_series, swarm, stop)
                number = 1
                while time.monotonic() < deadline:
                    await state.run_one(hub, number)
                    number += 1
                    if steady is None and time.monotonic() >= warmed_up:
                        steady = take_sample(state.started, state.jobs_completed)
                        libp2p_steady = libp2p_state(swarm)
                        types_steady, tasks_steady = type_counts(), _names()
                        if tracemalloc.is_tracing():
                            # what merely turns over (adverts, caches with a TTL) has been
                            # reallocated by now, and cancels out of the diff at the end
                            state.traced = tracemalloc.take_snapshot()
                        progress(f"warmed up: RSS {steady.rss_mb} MB, {steady.fds} fds")
                stop.set()  # the churn brings a stopped trainer back before it returns
            end = take_sample(state.started, state.jobs_completed)
            libp2p_end = libp2p_state(swarm)
            types_end, tasks_end, fds_end = type_counts(), _names(), fd_kinds()
            threads_end = thread_names()
            stacks = task_stacks(set(growth(tasks_start, tasks_end)))
            sites = _grown_sites(state.traced) if state.traced is not None else []
    return _report(
        state, minutes, warmup_minutes, boot, start, steady, end,
        {
            "libp2p_state": {
                "start": dict(sorted(libp2p_start.items())),
                "after_warmup": dict(sorted(libp2p_steady.items())),
                "end": dict(sorted(libp2p_end.items())),
            },
            "py_types": growth(types_start, types_end),
            "py_types_after_warmup": growth(types_steady, types_end),
            "task_names_after_warmup": growth(tasks_steady, tasks_end),
            "task_names": growth(tasks_start, tasks_end),
            "task_names_shrunk": growth(tasks_end, tasks_start),
            "task_stacks": stacks,
            "thread_names": {"start": dict(threads_start), "end": dict(threads_end)},
            "fd_kinds": {"start": dict(fds_start), "end": dict(fds_end)},
            "tracemalloc_top": sites,
        },
    )  # fmt: skip


def _names() -> Counter[str]:
    return task_names(trio.lowlevel.current_root_task(), Counter())


def _grown_sites(before: tracemalloc.Snapshot) -> list[str]:
    after = tracemalloc.take_snapshot()
    stats = after.compare_to(before, "traceback")
    return [
        f"{stat.size_diff / 1e3:+.0f} kB in {stat.count_diff:+d} blocks at "
        + " > ".join(f"{Path(f.filename).name}:{f.lineno}" for f in list(stat.traceback)[-5:])
        for stat in stats[:TOP]
    ]


def _report(
    state: Soak,
    minutes: float,
    warmup_minutes: float,
    boot: Sample,
    start: Sample,
    steady: Sample | None,
    end: Sample,
    grew: dict[str, Any],
) -> dict[str, Any]:
    return {
        "minutes": minutes,
        "warmup_minutes": warmup_minutes,
        "nodes": state.nodes,
        "mode": "in-process: one trio loop, real libp2p hosts on 127.0.0.1",
        "jobs_completed": state.jobs_completed,
        "job_failures": state.job_failures,
        "restarts": state.restarts,
        "rss_boot_mb": boot.rss_mb,
        "rss_start_mb": start.rss_mb,
        "rss_end_mb": end.rss_mb,
        "rss_growth": round(end.rss_mb / start.rss_mb - 1, 4),
        "after_warmup": _from_steady(steady, end),
        "fds_start": start.fds,
        "fds_end": end.fds,
        "tasks_start": start.tasks,
        "tasks_end": end.tasks,
        "threads_start": start.threads,
        "threads_end": end.threads,
        "py_blocks_start": start.py_blocks,
        "py_blocks_end": end.py_blocks,
        "heap_in_use_mb": [start.heap_in_use_mb, end.heap_in_use_mb],
        "heap_free_mb": [start.heap_free_mb, end.heap_free_mb],
        "grew": grew,
        "series": [asdict(s) for s in [start, *state.series, end]],
        "libp2p_series": state.libp2p_series,
        "seed": state.seed,
        "strategy": state.strategy,
        "churn_every_s": state.churn_every,
        "load": [round(x, 2) for x in os.getloadavg()],
        "machine": machine(),
    }


def main() -> int:
    parser = make_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=30.0, help="how long jobs keep coming")
    parser.add_argument(
        "--warmup-minutes",
        type=float,
        default=None,
        help=f"growth is also measured from here (default {WARMUP_MINUTES:g}, at most half)",
    )
    parser.add_argument("--nodes", type=int, default=20, help="1 aggregator + N-1 trainers")
    parser.add_argument("--seed", type=int, default=0, help="which trainer churns when")
    parser.add_argument("--churn-every", type=float, default=15.0, help="seconds ±50 %%; 0: none")
    parser.add_argument("--strategy", default="fedavg", help="fedavg; scaffold keeps state")
    parser.add_argument("--tracemalloc", action="store_true", help="list growing allocations")
    args = parser.parse_args()
    if args.nodes < CLIENTS_PER_ROUND + 1:
        parser.error(f"--nodes must be at least {CLIENTS_PER_ROUND + 1}")
    load_start = [round(x, 2) for x in os.getloadavg()]
    warmup = args.warmup_minutes
    if warmup is None:
        warmup = min(WARMUP_MINUTES, args.minutes / 2)
    result = trio.run(
        soak,
        args.minutes,
        warmup,
        args.nodes,
        args.seed,
        args.churn_every,
        args.strategy,
        args.tracemalloc,
    )
    result["load"] = {"start": load_start, "end": result["load"]}
    rows = [
        ("mode", result["mode"]),
        ("jobs completed", f"{result['jobs_completed']} ({len(result['job_failures'])} failed)"),
        ("trainer restarts", result["restarts"]),
        ("RSS start → end", f"{result['rss_start_mb']} → {result['rss_end_mb']} MB"),
        ("RSS growth (target ≤ 10 %)", f"{100 * result['rss_growth']:.1f} %"),
        ("after warm-up", _after_warmup_row(result)),
        ("fds start → end", f"{result['fds_start']} → {result['fds_end']}"),
        ("trio tasks start → end", f"{result['tasks_start']} → {result['tasks_end']}"),
        ("threads start → end", f"{result['threads_start']} → {result['threads_end']}"),
        ("malloc in use start → end", " → ".join(f"{x} MB" for x in result["heap_in_use_mb"])),
        ("malloc free start → end", " → ".join(f"{x} MB" for x in result["heap_free_mb"])),
        ("Python types that grew", result["grew"]["py_types"]),
        ("... after warm-up", result["grew"]["py_types_after_warmup"]),
        ("trio tasks that grew after warm-up", result["grew"]["task_names_after_warmup"]),
        ("libp2p state that grew", _libp2p_growth(result["grew"]["libp2p_state"])),
        ("load (1/5/15 min) start, end", f"{result['load']['start']}, {result['load']['end']}"),
    ]
    title = f"soak: {result['nodes']} nodes, {result['minutes']:g} minutes"
    emit(result, args.json, rows, title)
    return 0


def _from_steady(steady: Sample | None, end: Sample) -> dict[str, Any] | None:
    """The figures measured from the end of the warm-up, None if the run ended first."""
    if steady is None:
        return None
    return {
        "t_s": steady.t_s,
        "jobs": steady.jobs,
        "rss_mb": steady.rss_mb,
        "rss_growth": round(end.rss_mb / steady.rss_mb - 1, 4),
        "rss_mb_per_hour": round(
            (end.rss_mb - steady.rss_mb) / max(end.t_s - steady.t_s, 1.0) * 3600, 1
        ),
        "fds": steady.fds,
        "tasks": steady.tasks,
        "threads": steady.threads,
        "heap_in_use_mb": steady.heap_in_use_mb,
    }


def _after_warmup_row(result: dict[str, Any]) -> str:
    steady = result["after_warmup"]
    if steady is None:
        return "not reached (the run ended first)"
    return (
        f"from {steady['t_s'] / 60:.1f} min: {steady['rss_mb']} → {result['rss_end_mb']} MB "
        f"({100 * steady['rss_growth']:+.1f} %, {steady['rss_mb_per_hour']:+} MB/h), "
        f"fds {steady['fds']} → {result['fds_end']}, tasks {steady['tasks']} → "
        f"{result['tasks_end']}, threads {steady['threads']} → {result['threads_end']}"
    )


def _libp2p_growth(state: dict[str, dict[str, int]]) -> dict[str, str]:
    """Containers whose size at the end differs from after warm-up: `start → warm → end`."""
    start, steady, end = state["start"], state["after_warmup"] or state["start"], state["end"]
    return {
        key: f"{start.get(key, 0)} → {steady.get(key, 0)} → {end[key]}"
        for key in end
        if end[key] > steady.get(key, 0) and end[key] > 0
    }


if __name__ == "__main__":
    raise SystemExit(main())
