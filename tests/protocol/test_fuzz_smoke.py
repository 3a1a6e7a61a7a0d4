"""The fuzz benchmark's harness on a tiny budget: every decoder and a real node's handlers
meet a few hundred hostile inputs without an undocumented exception or a hang.

benchmarks/fuzz.py runs the same harness for the real budget. Each bug it found is fixed and
kept here as a reproducer (`test_a_found_bug_stays_fixed`).
"""

from __future__ import annotations

import math
import struct
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import trio
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from fuzz_engines import Finding, Runner, judge, run_hypothesis
from fuzz_network import LIVENESS_EVERY, Swarm, alive, network_target
from fuzz_targets import TARGETS, Target

BUDGET_S = 0.2
"""Per target: 16 targets, the node and the harness's own checks stay within ~20 s."""
MIN_INPUTS = 20
"""Inputs each target gets however slow the box: the budget alone gave one none on CI."""
DEADLINE_S = 10.0
"""An input's time before it counts as a hang: the benchmark's 2 s is too tight for a CI box
that another job is loading (a hang here is a loop, not a slow moment)."""


def _npy(header: str) -> bytes:
    """A version-1 .npy buffer with this header text and no data."""
    raw = header.encode("latin-1") + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(raw)) + raw


def _wire(method: str, body: dict[str, object], tensors: tuple[object, ...] = ()) -> bytes:
    from hivenode.protocol.message import Message, encode_message

    message = Message(method, 1, "peer", body, tensors)  # type: ignore[arg-type]
    return b"".join(bytes(part) for part in encode_message(message))


def _reply(body: dict[str, object]) -> bytes:
    return _wire("ok", body)


def _flower_with_message_type() -> bytes:
    import fuzz_corpus

    body, tensors = fuzz_corpus.flower_bodies()[0]
    body = body | {"meta": body["meta"] | {"message_type": "meta"}}
    return _wire("fl", body, tuple(tensors))


JOBLIB_COMMA_DTYPE = (
    b"\x80\x04cjoblib.numpy_pickle\nNumpyArrayWrapper\n)\x81}(\x8c\x05shapeK\x01\x85"
    b"\x8c\x05dtypecnumpy\ndtype\n\x8c\x02,8\x85Rub."
)
"""A joblib array wrapper whose dtype is numpy.dtype(',8')."""

QTABLE_DOC = (
    '{"format": "hivenode-qtable", "version": 1, "shape": [4, 3, 4, 3, 5], "swarm": '
    '{"own_origin": "a", "origins": {"b": {"clock": 1, "cells": [[0, 0, 0, 0, 0, %s, 0.5, 1]]}}}}'
)

REPRODUCERS: dict[str, tuple[str, Callable[[], bytes]]] = {
    "npy_unclosed_header": ("flower_array", lambda: _npy("{'descr': '<f4', (")),
    "npy_comma_dtype": (
        "flower_array",
        lambda: _npy("{'descr': ',|u1', 'fortran_order': False, 'shape': (5,), }") + bytes(5),
    ),
    "npy_zero_itemsize": (
        "flower_array",
        lambda: _npy("{'descr': '|V0', 'fortran_order': False, 'shape': (1,), }"),
    ),
    "npy_unhashable_key": ("flower_array", lambda: _npy("{{}: 1}")),
    "npy_bytes_dtype": (
        "flower_array",
        lambda: _npy("{'descr': '|S1', 'fortran_order': False, 'shape': (1,), }") + b"x",
    ),
    "flower_bad_message_type": ("flower", _flower_with_message_type),
    "joblib_comma_dtype": ("pickle_scan", lambda: JOBLIB_COMMA_DTYPE),
    "infer_reply_queue_inf": ("infer", lambda: _reply({"queue": math.inf})),
    "infer_reply_batch_nan": ("infer", lambda: _reply({"batch": math.nan})),
    "tensor_json_shape_infinity": (
        "tensor_json",
        lambda: b'{"dtype": "float32", "shape": [Infinity], "b64": ""}',
    ),
    "tensor_json_shape_wraps": (
        "tensor_json",
        lambda: b'{"dtype": "uint8", "shape": [4611686018427387904, 4], "b64": ""}',
    ),
    "tensor_json_comma_dtype": ("tensor_json", lambda: b'{"dtype": ",8", "shape": [1], "b64": ""}'),
    "qtable_visits_infinity": ("qtable_file", lambda: (QTABLE_DOC % "Infinity").encode()),
}
"""Minimal inputs for the bugs benchmarks/fuzz.py found (all fixed): regression tests, written
out so that each names its cause."""


def _report(findings: list[Finding]) -> str:
    return "\n\n".join(f"{f.kind}: {f.error} at {f.location}\n{f.traceback}" for f in findings)


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_decoder_survives_a_short_fuzz(name: str) -> None:
    runner = Runner(TARGETS[name], "hypothesis", DEADLINE_S, None)
    tally = run_hypothesis(runner, BUDGET_S, 0, shrink=False, min_inputs=MIN_INPUTS)
    assert tally.inputs >= MIN_INPUTS  # a slow start must not leave a target untried
    bad = [f for f in tally.findings.values() if f.kind != "masked"]
    assert bad == [], _report(bad)


@pytest.mark.parametrize("name, make", list(REPRODUCERS.values()), ids=list(REPRODUCERS))
def test_a_found_bug_stays_fixed(name: str, make: Callable[[], bytes]) -> None:
    outcome, finding = judge(TARGETS[name], make(), DEADLINE_S, "test")
    assert outcome not in ("crash", "hang"), finding.error if finding else outcome


def _target(
    feed: Callable[[bytes], object], accepted: tuple[type[BaseException], ...] = (ValueError,)
) -> Target:
    return Target(
        "probe", "a stand-in decoder", feed, lambda: accepted, lambda: st.binary(), lambda: [b"x"]
    )


def test_an_undocumented_exception_is_a_crash_shrunk_to_its_smallest_input() -> None:
    def feed(data: bytes) -> None:
        if len(data) >= 3:
            raise KeyError(data)

    tally = run_hypothesis(
        Runner(_target(feed), "hypothesis", DEADLINE_S, None), 0.5, 0, min_inputs=MIN_INPUTS
    )
    [finding] = tally.findings.values()
    assert finding.kind == "crash" and finding.error.startswith("KeyError")
    assert len(finding.data) == 3


def test_a_documented_error_is_a_refusal_not_a_crash() -> None:
    def feed(data: bytes) -> None:
        raise ValueError("refused")

    tally = run_hypothesis(
        Runner(_target(feed), "hypothesis", DEADLINE_S, None), 0.2, 0, min_inputs=MIN_INPUTS
    )
    assert tally.findings == {} and tally.refused == tally.inputs > 0


def test_an_input_that_loops_is_interrupted_and_counted_as_a_hang() -> None:
    def feed(data: bytes) -> None:
        while data:
            pass

    outcome, finding = judge(_target(feed), b"\x01", 0.2, "test")
    assert outcome == "hang" and finding is not None and finding.seconds < 5


def test_a_catch_all_that_hides_an_error_is_reported_as_masked() -> None:
    import fuzz_corpus

    torch_zip = bytearray(fuzz_corpus.model_file_corpus("any")[0])
    torch_zip[torch_zip.index(b"collections")] ^= 1  # data.pkl no longer matches its CRC
    outcome, finding = judge(TARGETS["identify"], bytes(torch_zip), DEADLINE_S, "test")
    assert outcome == "masked" and finding is not None
    assert finding.error.startswith("BadZipFile")  # what identify()'s catch-all turned into
    assert "identify_torch" in finding.location  # ModelError, and where it was raised


@pytest.mark.filterwarnings("ignore::hypothesis.errors.HypothesisDeprecationWarning")
async def test_a_real_node_keeps_serving_fuzzed_requests(tmp_path: Path) -> None:
    from hivenode.protocol.ids import PARALLEL_JOB_PROTOCOL

    async with trio.open_nursery() as nursery:
        swarm = Swarm(tmp_path)
        await swarm.start(nursery)
        try:
            # a valid parallel_start begins a torch training run: the benchmark's business
            swarm.protocols = [p for p in swarm.protocols if p[0] != PARALLEL_JOB_PROTOCOL]
            token = trio.lowlevel.current_trio_token()
            target, outcomes = network_target(swarm, DEADLINE_S, token)
            runner = Runner(target, "hypothesis", DEADLINE_S, None)
            tally = await trio.to_thread.run_sync(
                run_hypothesis, runner, 1.5, 0, False, False, LIVENESS_EVERY
            )
            assert tally.inputs >= LIVENESS_EVERY  # so the node's status was checked
            bad = [f for f in tally.findings.values() if f.kind != "masked"]
            assert bad == [], _report(bad)
            assert any(key.endswith(" ok") for key in outcomes)  # valid requests got through
            assert await alive(swarm, DEADLINE_S)
        finally:
            swarm.stop()
            nursery.cancel_scope.cancel()
