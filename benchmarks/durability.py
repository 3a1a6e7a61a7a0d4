"""SIGKILL an aggregator while it writes its state, restart it, and check every state file.

    python benchmarks/durability.py [--json] [--kills 20] [--seed 0] [--rounds 8]

Three real `hivenode run` daemons on 127.0.0.1, each with a third of digits (`hivenode data
add`): the hub aggregates (and trains), two more train. The hub runs SCAFFOLD jobs back to
back (`hivenode jobs submit`): a checkpoint after every round (arrays, control variate,
index), `job.json` when a job starts and ends, the final model, its registry entry and a
Q-table update when it ends, the trainer state after every message. Beside it a script
adds a new model with `hivenode models add` and runs `hivenode qtable import`, in a loop,
on the same state directory.

Each kill (seeded): either as soon as a file is half written (an atomic write's temp file
appears or the registry's WAL changes; then 0-20 ms more; see MODES), or at a random
moment. The hub and the CLI command in flight get SIGKILL; the state directory is then
checked as the kill left it (`_state_check.check_state`: every checkpoint, job.json, the
registry's SQLite integrity and every blob's sha256, the Q-table, the identity, the
dataset catalog, the trainer state), before the restart could rewrite anything. The hub
restarts on the same state directory and port, and the job that was running must resume
from its checkpoint (never below the last round the daemon reported) and complete another
round (or finish).

`corrupt` counts kills after which a state file could not be read back; it must be 0.
The exit status is 1 when it is not, or when a round went backwards.
"""

from __future__ import annotations

import contextlib
import os
import random
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from _common import emit, machine, make_parser, progress
from _durability_swarm import IMPORT_ORIGIN, JobDriver, StableDaemon, WriterLoad, WriteTrigger, cli
from _state_check import StateReport, check_state

RESUME_TIMEOUT = 150.0
"""A restarted hub waits for its trainers' adverts, then runs a round: seconds on an idle
machine, a minute on a loaded one."""
WRITE_WAIT = 20.0
"""A kill that waits for a write falls back to 'now' after this long without one."""
MODES = ("daemon write", "registry write", "any write", "random")
"""Three in four kills wait for a write (a random moment mostly finds the node training):
one of the daemon's own files (checkpoints, job.json, model, trainer state), a registry
write (a blob coming in, the WAL changing: `models add`, or the daemon registering a job's
model), or any file, the Q-table included."""


def run(kills: int, seed: int, rounds: int) -> dict[str, Any]:
    rng = random.Random(seed)
    started = time.perf_counter()
    load_start = os.getloadavg()
    with contextlib.ExitStack() as stack:
        hub, trainers = _start_swarm(stack, seed)
        original_peer = hub.peer_id
        driver = JobDriver(
            hub, [hub.peer_id, *(t.peer_id for t in trainers)], rounds, seed, hub.base
        )
        writer = WriterLoad(
            hub.state_dir, Path(stack.enter_context(tempfile.TemporaryDirectory())), seed
        )
        threads = [threading.Thread(target=t.run, daemon=True) for t in (driver, writer)]
        for thread in threads:
            thread.start()
        stack.callback(_stop, driver, writer, threads)
        driver.alive.set()
        writer.running.set()
        _wait_first_round(driver)
        progress(f"durable-1 finished round 1 after {time.perf_counter() - started:.0f} s")
        trigger = WriteTrigger(hub.state_dir)
        per_kill: list[dict[str, Any]] = []
        for number in range(1, kills + 1):
            outcome = _one_kill(number, kills, rng, hub, driver, writer, trigger, original_peer)
            per_kill.append(outcome)
        # the last check: no CLI command in flight, and no new job; the running one may
        # still write, which its atomic writes make harmless to read beside
        driver.alive.clear()
        writer.pause()
        final = check_state(hub.state_dir, original_peer)
    return _summary(per_kill, final, driver, writer, started, load_start, seed, rounds)


def _start_swarm(stack: contextlib.ExitStack, seed: int) -> tuple[StableDaemon, list[StableDaemon]]:
    from hivenode.sim.fl_datasets import federated_dataset, save_partition

    progress("starting 3 daemons, each with a third of digits")
    hub, trainers = StableDaemon("hub"), [StableDaemon("t1"), StableDaemon("t2")]
    for daemon in (hub, *trainers):
        stack.callback(daemon.stop)  # SIGTERM (SIGKILL if it lingers), then its directories
    parts = federated_dataset("digits", 3, partition="iid", seed=seed)

    def add_data(daemon: StableDaemon, part: Any) -> None:
        path = daemon.base / "digits.npz"
        save_partition(part, path)
        added = cli("data", "add", "digits", path, "--state-dir", daemon.state_dir)
        if added.returncode != 0:
            raise RuntimeError(f"data add failed: {added.stderr.strip()}")

    with ThreadPoolExecutor() as pool:  # three CLI start-ups at once
        list(pool.map(add_data, [hub, *trainers], parts))
    hub.start().ready()
    for trainer in trainers:
        trainer.bootstrap = [hub.address()]
        trainer.start()
    for trainer in trainers:
        trainer.ready()
    # a restarted hub dials its trainers; their addresses do not change
    hub.bootstrap = [trainer.address() for trainer in trainers]
    progress(f"swarm up: hub {hub.peer_id[-8:]} on port {hub.port}")
    return hub, trainers


def _stop(driver: JobDriver, writer: WriterLoad, threads: list[threading.Thread]) -> None:
    driver.stopped.set()
    writer.stopped.set()
    writer.kill()
    for thread in threads:
        thread.join(timeout=30)


def _wait_first_round(driver: JobDriver) -> None:
    deadline = time.monotonic() + RESUME_TIMEOUT
    while time.monotonic() < deadline:
        with driver.lock:
            if any(driver.reported.values()):
                return
        time.sleep(0.2)
    raise RuntimeError(f"no round completed within {RESUME_TIMEOUT:g} s: see the hub's log")


def _one_kill(
    number: int,
    kills: int,
    rng: random.Random,
    hub: StableDaemon,
    driver: JobDriver,
    writer: WriterLoad,
    trigger: WriteTrigger,
    peer_id: str,
) -> dict[str, Any]:
    mode = rng.choice(MODES)
    time.sleep(rng.uniform(0.3, 1.5))  # let this incarnation get back to work first
    scope = mode.split()[0]
    writing = [] if mode == "random" else trigger.wait(WRITE_WAIT, rng, scope)
    if mode == "random":
        time.sleep(rng.uniform(0.0, 3.0))
    driver.alive.clear()
    hub.kill()
    cli_killed = writer.kill()
    with driver.lock:
        reported = dict(driver.reported)
    report = check_state(hub.state_dir, peer_id)
    regressions = [
        f"{job}: checkpoint holds round {report.checkpoint_rounds.get(job, 0)}, "
        f"the daemon had reported {done}"
        for job, done in reported.items()
        if report.checkpoint_rounds.get(job, 0) < done
    ]
    running = sorted(job for job, state in report.job_states.items() if state == "running")
    hub.start().ready()
    resumed = {job: _resume(hub, job, report.checkpoint_rounds.get(job, 0)) for job in running}
    driver.alive.set()
    writer.running.set()
    outcome = {
        "kill": number,
        "mode": mode,
        "writing": writing,
        "cli_killed": cli_killed,
        "checked": len(report.checked),
        "problems": report.problems,
        "strays": report.strays,
        "regressions": regressions,
        "checkpoint_rounds": {job: report.checkpoint_rounds.get(job, 0) for job in running},
        "resumed": resumed,
        "import_kept": IMPORT_ORIGIN in report.qtable_origins,
    }
    progress(_kill_line(outcome, kills))
    return outcome


def _resume(hub: StableDaemon, job: str, checkpoint_round: int) -> dict[str, Any]:
    """Wait until the restarted hub runs `job` past its checkpoint (or finishes it)."""
    from hivenode.agent.control_client import ControlError

    started = time.monotonic()
    lowest: int | None = None
    detail: dict[str, Any] = {}
    while time.monotonic() - started < RESUME_TIMEOUT:
        try:
            detail = hub.api(f"/v1/jobs/{job}")
        except ControlError:
            time.sleep(0.2)
            continue
        lowest = int(detail["round"]) if lowest is None else min(lowest, int(detail["round"]))
        moved_on = int(detail["round"]) > checkpoint_round or detail["state"] == "finished"
        if moved_on and detail["resumed_from"] == checkpoint_round:
            return {
                "ok": True,
                "from": checkpoint_round,
                "lowest": lowest,
                "round": detail["round"],
                "s": round(time.monotonic() - started, 1),
            }
        if detail["state"] == "failed":
            break
        time.sleep(0.2)
    return {
        "ok": False,
        "from": checkpoint_round,
        "lowest": lowest,
        "state": detail.get("state"),
        "error": detail.get("error"),
    }


def _kill_line(outcome: dict[str, Any], kills: int) -> str:
    what = ", ".join(outcome["writing"]) or "no write in flight"
    cli_part = f"; killed `hivenode {outcome['cli_killed']}`" if outcome["cli_killed"] else ""
    resumed = "; ".join(
        f"{job} {'resumed' if r['ok'] else 'NOT resumed'} from round {r['from']}"
        + (f", at round {r['round']} after {r['s']} s" if r["ok"] else f" ({r.get('error')})")
        for job, r in outcome["resumed"].items()
    )
    return (
        f"kill {outcome['kill']}/{kills} [{outcome['mode']}] during {what}{cli_part}: "
        f"{outcome['checked']} files checked, {len(outcome['problems'])} damaged "
        f"{outcome['problems'] or ''}, {len(outcome['strays'])} temp files left; "
        f"{resumed or 'no job running'}"
    )


def _target(temp: str) -> str:
    """What a temp file is the future of: `.checkpoint.json.x1y2.tmp` → checkpoint.json."""
    name = Path(temp).name
    if name.startswith(".incoming-"):
        return "blob"
    if name == "registry.sqlite-wal":
        return "registry (WAL)"
    return name[1:].removesuffix(".tmp").rsplit(".", 1)[0]


def _summary(
    per_kill: list[dict[str, Any]],
    final: StateReport,
    driver: JobDriver,
    writer: WriterLoad,
    started: float,
    load_start: tuple[float, float, float],
    seed: int,
    rounds: int,
) -> dict[str, Any]:
    resumes = [r for outcome in per_kill for r in outcome["resumed"].values()]
    hit = Counter(_target(t) for outcome in per_kill for t in outcome["writing"])
    duplicates = {
        name: versions
        for name, versions in final.registry_versions.items()
        if name.startswith("durable-") and len(versions) > 1
    }
    return {
        "kills": len(per_kill),
        "corrupt": sum(1 for outcome in per_kill if outcome["problems"]) + int(final.corrupt),
        "problems": [p for outcome in per_kill for p in outcome["problems"]] + final.problems,
        "resumed": sum(1 for r in resumes if r["ok"]),
        "resume_expected": len(resumes),
        "round_regressions": sum(len(outcome["regressions"]) for outcome in per_kill)
        + sum(1 for r in resumes if r["lowest"] is not None and r["lowest"] < r["from"]),
        "checked_files": sum(outcome["checked"] for outcome in per_kill) + len(final.checked),
        "kills_during_write": sum(1 for outcome in per_kill if outcome["writing"]),
        "writes_hit": dict(hit),
        "cli_killed": dict(writer.killed),
        "cli_completed": dict(writer.done),
        "jobs_finished": len(driver.finished),
        "job_failures": driver.failures,
        "registry_versions": {k: len(v) for k, v in final.registry_versions.items()},
        "duplicate_registrations": duplicates,
        "stray_temp_files": final.strays,
        "qtable_cells": final.qtable_cells,
        # did the cell `hivenode qtable import` merged survive the daemon's own saves?
        "qtable_import_kept": {
            "after_kills": sum(1 for outcome in per_kill if outcome["import_kept"]),
            "at_end": IMPORT_ORIGIN in final.qtable_origins,
            "imports_done": writer.done["qtable import"],
        },
        "wall_s": round(time.perf_counter() - started, 1),
        "seed": seed,
        "rounds_per_job": rounds,
        "load": {
            "start": [round(x, 2) for x in load_start],
            "end": [round(x, 2) for x in os.getloadavg()],
        },
        "machine": machine(),
        "per_kill": per_kill,
    }


def main() -> int:
    parser = make_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=20, help="SIGKILLs of the aggregator")
    parser.add_argument("--seed", type=int, default=0, help="when and how each kill strikes")
    parser.add_argument("--rounds", type=int, default=8, help="rounds of each job")
    args = parser.parse_args()
    result = run(args.kills, args.seed, args.rounds)
    rows = [
        ("kills", result["kills"]),
        ("kills during a write", result["kills_during_write"]),
        ("writes hit", ", ".join(f"{k} {v}" for k, v in sorted(result["writes_hit"].items()))),
        ("CLI commands killed", ", ".join(f"{k} {v}" for k, v in result["cli_killed"].items())),
        ("corrupt (must be 0)", result["corrupt"]),
        ("round regressions (must be 0)", result["round_regressions"]),
        ("jobs resumed", f"{result['resumed']} of {result['resume_expected']}"),
        ("state files checked", result["checked_files"]),
        ("jobs finished", result["jobs_finished"]),
        ("temp files left behind", len(result["stray_temp_files"])),
        ("wall", f"{result['wall_s']} s"),
        ("load (1/5/15 min) at start, end", f"{result['load']['start']}, {result['load']['end']}"),
    ]
    emit(result, args.json, rows, f"durability: {result['kills']} SIGKILLs, seed {result['seed']}")
    return 1 if result["corrupt"] or result["round_regressions"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
