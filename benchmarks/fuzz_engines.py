"""The fuzzing engines and the verdict on one input: ok, refused (an accepted error), crash
(any other exception) or hang (longer than the per-input deadline, measured).

Engines: hypothesis (`given` over the target's strategies, re-seeded batch after batch until
the budget is spent, shrinking each new crash), a mutation fuzzer over the valid corpus (the
fallback where atheris is missing), and atheris (libFuzzer, coverage-guided; it owns its
process, see `run_atheris`). Every engine records findings in a `Tally` and keeps going, so
one bug does not end a run.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import random
import signal
import struct
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from fuzz_strategies import mutate, random_ops
from fuzz_targets import Target

DEADLINE_S = 2.0
HYPOTHESIS_BATCH = 200
"""Examples per hypothesis run; each run has its own seed, so the budget is spent in slices."""
SHRINK_GRACE_S = 30.0
"""How long past the budget hypothesis may go on shrinking a crash it found."""
MINIMIZE_S = 5.0
INFLIGHT_BYTES = 1024 * 1024


class Deadline(BaseException):
    """Raised into an input that ran past the deadline. A BaseException: a decoder's own
    `except Exception` (identify() has one) must not swallow it."""

    def __init__(self, message: str = "", where: str | None = None) -> None:
        super().__init__(message)
        self.where = where


@dataclass
class Finding:
    kind: str
    """"crash", "hang" or "masked" (an accepted error that wraps an unexpected one)."""
    target: str
    engine: str
    error: str
    location: str
    traceback: str
    data: bytes
    seconds: float
    count: int = 1
    saved: str | None = None

    def signature(self) -> tuple[str, str, str]:
        return self.kind, self.error.split(":")[0], self.location

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "target": self.target,
            "engine": self.engine,
            "error": self.error[:300],
            "location": self.location,
            "seconds": round(self.seconds, 4),
            "count": self.count,
            "input_bytes": len(self.data),
            "input_hex": self.data[:256].hex(),
            "saved": self.saved,
            "traceback": self.traceback[-4000:],
        }


@dataclass
class Tally:
    """What one engine did to one target."""

    target: str
    engine: str
    inputs: int = 0
    refused: int = 0
    """Inputs the decoder refused with its documented error: the expected outcome of garbage."""
    slowest_s: float = 0.0
    slowest_input: bytes = b""
    findings: dict[tuple[str, str, str], Finding] = field(default_factory=dict)
    elapsed_s: float = 0.0
    notes: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def count(self, kind: str) -> int:
        return sum(1 for f in self.findings.values() if f.kind == kind)

    def add(self, finding: Finding) -> bool:
        """Record a finding; False when one with its signature was already held."""
        held = self.findings.get(finding.signature())
        if held is not None:
            held.count += 1
            if len(finding.data) < len(held.data):  # keep the smallest example
                held.data, held.traceback = finding.data, finding.traceback
            return False
        self.findings[finding.signature()] = finding
        return True

    def to_json(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "engine": self.engine,
            "inputs": self.inputs,
            "refused": self.refused,
            "crashes": self.count("crash"),
            "hangs": self.count("hang"),
            "masked": self.count("masked"),
            "slowest_s": round(self.slowest_s, 4),
            "slowest_input_hex": self.slowest_input[:128].hex(),
            "elapsed_s": round(self.elapsed_s, 1),
            "findings": [f.to_json() for f in self.findings.values()],
            "notes": self.notes,
            **self.extra,
        }


# --- one input --------------------------------------------------------------------------------


class Inflight:
    """The input being run, in a shared memory map: when a worker dies in C code (a
    segfault, a hang the watchdog cannot reach), its parent still knows what killed it."""

    def __init__(self, path: Path | None) -> None:
        self._map: mmap.mmap | None = None
        if path is not None:
            with path.open("wb+") as handle:
                handle.truncate(8 + INFLIGHT_BYTES)
                self._map = mmap.mmap(handle.fileno(), 8 + INFLIGHT_BYTES)

    def set(self, data: bytes) -> None:
        if self._map is not None:
            piece = data[:INFLIGHT_BYTES]
            self._map[:8] = struct.pack("<Q", len(piece))
            self._map[8 : 8 + len(piece)] = piece

    @staticmethod
    def read(path: Path) -> bytes:
        raw = path.read_bytes()
        (length,) = struct.unpack_from("<Q", raw)
        return raw[8 : 8 + length]


@contextlib.contextmanager
def watchdog(deadline: float) -> Iterator[None]:
    """Raise Deadline in the main thread once the input has used `deadline` s of CPU.

    ITIMER_PROF (CPU time), not SIGALRM: pytest-timeout and libFuzzer own SIGALRM. A loop
    burns CPU, so it is caught; a blocked call is judged by its measured wall time instead.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: Any) -> None:
        raise Deadline()

    previous = signal.signal(signal.SIGPROF, interrupt)
    signal.setitimer(signal.ITIMER_PROF, deadline)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_PROF, 0)
        signal.signal(signal.SIGPROF, previous)


def location(exc: BaseException) -> str:
    """The innermost hivenode frame of the traceback (where the bug is), else the innermost;
    an exception that carries `where` (a crash seen in a node's log) says it itself."""
    where = getattr(exc, "where", None)
    if isinstance(where, str):
        return where
    frames = traceback.extract_tb(exc.__traceback__)
    ours = [f for f in frames if "/hivenode/" in f.filename and "/benchmarks/" not in f.filename]
    if not (ours or frames):
        return "?"
    frame = (ours or frames)[-1]
    path = frame.filename
    for package in ("/hivenode/", "/benchmarks/"):  # named from the repository's root
        if package in path:
            path = package.strip("/") + "/" + path.split(package, 1)[-1]
            break
    return f"{path}:{frame.lineno} ({frame.name})"


def judge(target: Target, data: bytes, deadline: float, engine: str) -> tuple[str, Finding | None]:
    """Run one input: ("ok" | "refused" | "crash" | "hang" | "masked", the finding if any)."""
    accepted = target.accepted()
    outcome, finding = "ok", None
    started = time.perf_counter()
    try:
        try:
            with watchdog(deadline):
                target.feed(data)
        except accepted as exc:
            outcome = "refused"
            if target.masks is not None and target.masks(exc):
                # the catch-all raised `from None`; the exception it hid is its __context__
                hidden = exc.__context__ or exc
                outcome, finding = "masked", _finding("masked", target, engine, hidden, data, 0.0)
    except Deadline as exc:
        outcome, finding = "hang", _finding("hang", target, engine, exc, data, deadline)
        finding.error = f"Deadline: {exc or f'interrupted after {deadline:g} s of CPU'}"
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # anything else, RecursionError and MemoryError included
        outcome, finding = "crash", _finding("crash", target, engine, exc, data, 0.0)
    elapsed = time.perf_counter() - started
    if finding is not None:
        finding.seconds = max(finding.seconds, elapsed)
    if outcome in ("ok", "refused", "masked") and elapsed > deadline:
        # it finished, but past the deadline: a peer can hold a handler that long per message
        finding = Finding(
            "hang",
            target.name,
            engine,
            f"Slow: {elapsed:.2f} s",
            "(whole input)",
            "",
            data,
            elapsed,
        )
        outcome = "hang"
    return outcome, finding


def _finding(
    kind: str, target: Target, engine: str, exc: BaseException, data: bytes, seconds: float
) -> Finding:
    text = "".join(traceback.format_exception(exc))
    error = f"{type(exc).__name__}: {exc}".strip()
    return Finding(kind, target.name, engine, error, location(exc), text, data, seconds)


class Runner:
    """Feeds inputs to one target and keeps its tally."""

    def __init__(self, target: Target, engine: str, deadline: float, inflight: Path | None) -> None:
        self.target = target
        self.tally = Tally(target.name, engine)
        self.deadline = deadline
        self._inflight = Inflight(inflight)

    def run(self, data: bytes) -> tuple[str, Finding | None]:
        self._inflight.set(data)
        started = time.perf_counter()
        outcome, finding = judge(self.target, data, self.deadline, self.tally.engine)
        elapsed = time.perf_counter() - started
        self.tally.inputs += 1
        self.tally.refused += outcome == "refused"
        if elapsed > self.tally.slowest_s:
            self.tally.slowest_s, self.tally.slowest_input = elapsed, data
        return outcome, finding

    def warm(self) -> None:
        for data in self.target.corpus():
            judge(self.target, data, self.deadline, self.tally.engine)

    def minimize(self, finding: Finding, budget_s: float = MINIMIZE_S) -> Finding:
        """Delete chunks of the input while the same bug (signature) still happens."""
        best = finding
        chunk = max(1, len(best.data) // 2)
        stop = time.monotonic() + budget_s
        while chunk >= 1 and time.monotonic() < stop:
            index, progressed = 0, False
            while index < len(best.data) and time.monotonic() < stop:
                candidate = best.data[:index] + best.data[index + chunk :]
                _, again = judge(self.target, candidate, self.deadline, best.engine)
                if again is not None and again.signature() == best.signature():
                    best, progressed = again, True
                else:
                    index += chunk
            if not progressed:
                chunk //= 2
        best.count = finding.count
        return best


# --- engines ----------------------------------------------------------------------------------


def run_hypothesis(
    runner: Runner,
    seconds: float,
    seed: int,
    warm: bool = True,
    shrink: bool = True,
    min_inputs: int = 0,
) -> Tally:
    """`given(strategy)` in seeded batches of HYPOTHESIS_BATCH until `seconds` are spent
    and at least `min_inputs` inputs were run (a slow machine still does the work a test needs).

    `warm`: run the valid corpus once first, unjudged, so that the imports a decoder does
    on first use (flwr, h5py) are not timed as a hang of whatever input comes first.
    `shrink`: minimise each new crash (what a report needs; a smoke test can skip it)."""
    strategy = runner.target.strategy()
    if warm:
        runner.warm()
    started = time.monotonic()
    stop = started + seconds
    batch = 0
    while time.monotonic() < stop or runner.tally.inputs < min_inputs:
        if time.monotonic() >= stop:  # budget spent but short of inputs: one more slice
            stop = time.monotonic() + 0.5
        _hypothesis_batch(runner, strategy, seed * 1_000_003 + batch, stop, shrink)
        batch += 1
    runner.tally.elapsed_s = time.monotonic() - started
    runner.tally.extra["batches"] = batch
    return runner.tally


def _hypothesis_batch(
    runner: Runner, strategy: Any, batch_seed: int, stop: float, shrink: bool
) -> None:
    """One `given` run; a new crash is shrunk by hypothesis, then recorded at its smallest."""
    from hypothesis import HealthCheck, Phase, Verbosity, given, settings
    from hypothesis import seed as with_seed

    tally = runner.tally
    shrinking: list[Finding] = []

    @with_seed(batch_seed)
    @settings(
        max_examples=HYPOTHESIS_BATCH,
        deadline=None,  # judged by our own measured deadline
        database=None,
        suppress_health_check=list(HealthCheck),
        phases=(Phase.generate, Phase.shrink) if shrink else (Phase.generate,),
        report_multiple_bugs=False,
        verbosity=Verbosity.quiet,
        print_blob=False,
    )
    @given(strategy)
    def one(data: bytes) -> None:
        if time.monotonic() > stop + (SHRINK_GRACE_S if shrinking else 0.0):
            return  # budget spent: the batch's remaining examples pass unrun
        _, finding = runner.run(data)
        if finding is None:
            return
        new = finding.signature() not in tally.findings
        first = shrinking[0].signature() if shrinking else None
        if finding.kind == "crash" and new and first in (None, finding.signature()):
            shrinking.append(finding)
            raise _Shrink()  # hypothesis shrinks towards the smallest input doing this
        tally.add(finding)

    try:
        one()
    except Exception:  # _Shrink after shrinking, or Flaky when it no longer reproduces
        if not shrinking:
            raise
    if shrinking:
        tally.add(shrinking[-1])  # hypothesis replays the minimal example last


class _Shrink(Exception):
    """Tells hypothesis an input crashed, so that it shrinks it."""


def run_mutation(runner: Runner, seconds: float, seed: int) -> Tally:
    """Random byte mutations of the valid corpus; without coverage feedback, inputs the
    decoder accepted become seeds too (they went further than the refused ones)."""
    rng = random.Random(seed)
    pool = list(runner.target.corpus()) or [b""]
    runner.warm()
    started = time.monotonic()
    while time.monotonic() < started + seconds:
        base = rng.choice(pool)
        if rng.random() < 0.1:
            other = rng.choice(pool)
            base = base[: rng.randrange(len(base) + 1)] + other[rng.randrange(len(other) + 1) :]
        data = mutate(base, random_ops(rng, rng.randint(1, 8)))
        outcome, finding = runner.run(data)
        if finding is not None:
            if finding.kind == "crash" and finding.signature() not in runner.tally.findings:
                finding = runner.minimize(finding)
            runner.tally.add(finding)
        elif outcome == "ok" and len(pool) < 512:
            pool.append(data)
    runner.tally.elapsed_s = time.monotonic() - started
    return runner.tally


def atheris_version() -> str | None:
    try:
        import atheris  # type: ignore[import-untyped]  # noqa: F401
    except ImportError:
        return None
    from importlib.metadata import version

    return version("atheris")


def run_atheris(
    runner: Runner, seconds: float, seed: int, workdir: Path, write: Callable[[], None]
) -> NoReturn:
    """libFuzzer over the target, seeded with the valid corpus; hivenode is instrumented for
    coverage (msgpack's C extension is not). libFuzzer ends the process itself: the tally is
    written after each new finding and twice a second, and the parent reads libFuzzer's own
    final count of runs from its output."""
    import sys

    import atheris

    corpus_dir = workdir / "atheris-corpus"
    corpus_dir.mkdir(parents=True, exist_ok=True)
    with atheris.instrument_imports(include=["hivenode"]):
        seeds = runner.target.corpus()  # imports the code under test, instrumented
        for data in seeds:
            judge(runner.target, data, runner.deadline, "atheris")
    for index, data in enumerate(seeds):
        (corpus_dir / f"seed-{index}").write_bytes(data)
    last_write = [0.0]

    def one(data: bytes) -> None:
        _, finding = runner.run(data)
        if finding is not None:
            if finding.kind == "crash" and finding.signature() not in runner.tally.findings:
                finding = runner.minimize(finding)
            if runner.tally.add(finding):
                write()
        if time.monotonic() - last_write[0] > 0.5:
            runner.tally.elapsed_s = time.monotonic() - started
            write()
            last_write[0] = time.monotonic()

    started = time.monotonic()
    argv = [
        sys.argv[0],
        f"-max_total_time={int(seconds)}",
        f"-timeout={int(runner.deadline * 5) + 1}",  # backstop; our watchdog judges first
        f"-seed={seed + 1}",  # 0 would mean "random"
        "-rss_limit_mb=3072",
        "-print_final_stats=1",
        str(corpus_dir),
    ]
    atheris.Setup(argv, one)
    atheris.Fuzz()
    raise SystemExit(0)  # not reached: libFuzzer exits the process


def tally_json(tally: Tally) -> str:
    return json.dumps(tally.to_json(), sort_keys=True)
