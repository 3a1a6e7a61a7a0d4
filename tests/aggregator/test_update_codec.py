"""Compressed updates: schemes, codecs by round trip, error feedback, and hostile replies."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.supercore.task_identity import TaskIdentity
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from hivenode.agent.flower_wire import decode_flower, encode_flower
from hivenode.agent.trainer import Trainer
from hivenode.agent.update_codec import (
    MANIFEST,
    PARTS,
    RESIDUAL_PREFIX,
    decode_update,
    encode_update,
)
from hivenode.aggregator.job_spec import JobSpec
from hivenode.models.flower_arrays import arrayrecord_to_numpy, numpy_to_array
from hivenode.protocol.compression import (
    INT8_BLOCK,
    CompressionError,
    UpdateCompression,
    decode_topk,
    encode_topk,
    topk_count,
)
from hivenode.protocol.errors import ProtocolError
from hivenode.protocol.message import Message as WireMessage

NDArray = np.ndarray[Any, Any]
SHAPES = {"w": (40, 30), "b": (30,)}


@pytest.fixture(autouse=True)
def task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    # Flower's Message() reads its sender from this process-global identity
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)


def model(seed: int, extra: dict[str, NDArray] | None = None) -> dict[str, NDArray]:
    rng = np.random.default_rng(seed)
    arrays = {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}
    return {**arrays, **(extra or {})}


def record(arrays: dict[str, NDArray]) -> ArrayRecord:
    return ArrayRecord({k: numpy_to_array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def request(
    arrays: dict[str, NDArray], scheme: str = "none", kind: str = MessageType.TRAIN
) -> Message:
    config: dict[str, Any] = {"server-round": 1}
    if scheme != "none":
        config["compression"] = scheme
    content = RecordDict({"arrays": record(arrays), "config": ConfigRecord(config)})
    return Message(content, 7, kind)


def reply(to: Message, arrays: dict[str, NDArray], name: str = "arrays") -> Message:
    metrics = MetricRecord({"num-examples": 12, "train-loss": 0.5})
    return Message(RecordDict({name: record(arrays), "metrics": metrics}), reply_to=to)


def moved(base: dict[str, NDArray], seed: int, step: float = 0.01) -> dict[str, NDArray]:
    rng = np.random.default_rng(seed)
    return {
        k: (v + step * rng.normal(size=v.shape)).astype(v.dtype) if v.dtype.kind == "f" else v + 1
        for k, v in base.items()
    }


def over_the_wire(message: Message) -> Message:
    """What the other side decodes: the real wire encoding, not the object itself."""
    body, tensors = encode_flower(message)
    return decode_flower(body, tensors)


def arrays_of(message: Message, name: str = "arrays") -> dict[str, NDArray]:
    return arrayrecord_to_numpy(message.content.array_records[name])


def trip(scheme: str, local: dict[str, NDArray], base: dict[str, NDArray]) -> Message:
    """Trainer encodes, the wire carries, the aggregator decodes against what it sent."""
    sent = request(base, scheme)
    trainer_side = over_the_wire(sent)
    encoded = over_the_wire(encode_update(trainer_side, reply(trainer_side, local), RecordDict()))
    return decode_update(sent, encoded)


# --- schemes ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "canonical"),
    [
        ("none", "none"),
        (" FP16 ", "fp16"),
        ("int8", "int8"),
        ("topk:0.1", "topk:0.1"),
        ("topk:.25", "topk:0.25"),
        ("topk:1", "topk:1.0"),
        ("topk:0.1:no-feedback", "topk:0.1:no-feedback"),
    ],
)
def test_schemes_parse_to_their_canonical_text(text: str, canonical: str) -> None:
    assert str(UpdateCompression.parse(text)) == canonical


@settings(max_examples=100, deadline=None)
@given(st.floats(min_value=1e-9, max_value=1.0), st.booleans())
def test_the_canonical_text_parses_back_to_the_same_scheme(fraction: float, feedback: bool) -> None:
    scheme = UpdateCompression("topk", fraction, feedback)
    assert UpdateCompression.parse(str(scheme)) == scheme


@pytest.mark.parametrize(
    "text", ["zip", "topk", "topk:", "topk:0", "topk:1.5", "topk:nan", "topk:0.1:maybe", "fp16:2"]
)
def test_unknown_schemes_are_refused_naming_the_valid_ones(text: str) -> None:
    with pytest.raises(CompressionError, match=r"is not one of none \| fp16 \| int8 \| topk:F"):
        UpdateCompression.parse(text)


def spec(**values: Any) -> JobSpec:
    return JobSpec.model_validate({"name": "j", "dataset": "d", "rounds": 1, **values})


def test_a_job_names_its_scheme_in_the_train_config_only_when_it_has_one() -> None:
    assert "compression" not in spec().train_config()
    assert spec(compression="TopK:0.10").train_config()["compression"] == "topk:0.1"
    assert "compression" not in spec(compression="int8").evaluate_config()


def test_a_job_with_an_unknown_scheme_is_refused() -> None:
    with pytest.raises(ValidationError, match="compression 'topk:2' is not one of"):
        spec(compression="topk:2")
    with pytest.raises(ValidationError, match="built-in app only"):
        JobSpec.model_validate(
            {"name": "j", "rounds": 1, "flower_app": "/apps/x", "compression": "fp16"}
        )


def test_sim_fl_refuses_an_unknown_scheme_in_one_line(cli: Callable[..., Any]) -> None:
    done = cli("sim", "fl", "--compression", "topk:0")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "hivenode: error: compression 'topk:0' is not one of none | fp16 | int8 | topk:F"
        " (0 < F ≤ 1) | topk:F:no-feedback"
    ]


# --- the top-k codec -------------------------------------------------------------------------


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.floats(-1e6, 1e6, width=32), min_size=1, max_size=500),
    st.floats(min_value=0.001, max_value=1.0),
)
def test_topk_keeps_exactly_the_largest_magnitudes(values: list[float], fraction: float) -> None:
    vector = np.array(values, dtype=np.float32)
    count = topk_count(vector.size, fraction)
    decoded = decode_topk(encode_topk(vector, count), vector.size, count)
    kept = np.zeros(vector.size, dtype=bool)
    kept[encode_topk(vector, count)[0]] = True
    assert kept.sum() == count == max(1, int(np.ceil(fraction * vector.size - 1e-9)))
    assert (decoded[kept] == vector[kept]).all() and (decoded[~kept] == 0).all()
    if count < vector.size:  # nothing dropped is larger than anything kept
        assert np.abs(vector[~kept]).max() <= np.abs(vector[kept]).min()


def test_topk_refuses_indices_that_would_write_outside_or_twice() -> None:
    indices, values = encode_topk(np.arange(10, dtype=np.float32), 3)
    assert indices.tolist() == [7, 8, 9]
    for bad in ([7, 8, 10], [-1, 8, 9], [7, 7, 9], [9, 8, 7]):
        with pytest.raises(ProtocolError, match="strictly ascending within"):
            decode_topk((np.array(bad, np.int32), values), 10, 3)
    with pytest.raises(ProtocolError, match="expected 3 <i4 indices"):
        decode_topk((indices[:2], values[:2]), 10, 3)
    with pytest.raises(ProtocolError, match="expected 3 <i4 indices"):
        decode_topk((indices.astype(np.int64), values), 10, 3)


# --- compressed replies ----------------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(
    st.sampled_from(["fp16", "int8", "topk:1", "topk:0.3"]),
    st.integers(0, 2**16),
    st.floats(1e-4, 10.0),
)
def test_compressed_replies_round_trip_within_their_precision(
    scheme: str, seed: int, step: float
) -> None:
    base = model(seed, {"steps": np.array([3, 4], np.int64)})
    local = moved(base, seed + 1, step)
    rebuilt = trip(scheme, local, base)
    assert set(rebuilt.content) == {"arrays", "metrics"}
    assert dict(rebuilt.content["metrics"]) == {"num-examples": 12, "train-loss": 0.5}
    got = arrays_of(rebuilt)
    assert list(got) == list(local)
    assert (got["steps"] == local["steps"]).all() and got["steps"].dtype == np.int64
    for key in SHAPES:
        assert got[key].dtype == np.float32 and got[key].shape == local[key].shape
        delta = local[key].astype(np.float64) - base[key]
        error = np.abs(got[key] - local[key].astype(np.float64))
        rounding = 2**-22 * np.abs(local[key]).max()  # float32 base + decoded delta
        if scheme == "fp16":
            assert (error <= np.abs(delta) * 2**-10 + 2**-24 + rounding).all()
        elif scheme == "int8":
            for start in range(0, delta.size, INT8_BLOCK):
                block = delta.ravel()[start : start + INT8_BLOCK]
                half_step = (block.max() - block.min()) / 255 / 2
                assert (
                    error.ravel()[start : start + INT8_BLOCK].max() <= half_step * 1.01 + rounding
                )
        elif scheme == "topk:1":
            assert error.max() <= rounding
        else:  # the kept 30 % are exact, the rest is the model as it was sent
            exact = error <= rounding
            assert exact.sum() >= topk_count(delta.size, 0.3)
            assert np.allclose(got[key][~exact], base[key][~exact])


def test_float64_weights_come_back_float64_within_float32_of_their_update() -> None:
    base = {"w": np.random.default_rng(0).normal(size=(50,))}
    local = {"w": base["w"] + 1e-3}
    got = arrays_of(trip("fp16", local, base))["w"]
    assert got.dtype == np.float64
    assert np.abs(got - local["w"]).max() <= 1e-3 * 2**-10


def test_what_is_compressed_is_the_update_not_the_weights() -> None:
    base = model(3)
    local = moved(base, 4)
    sent = request(base, "topk:0.1")
    encoded = encode_update(sent, reply(sent, local), RecordDict())
    w_indices = arrayrecord_to_numpy(encoded.content.array_records[PARTS])["0"]
    delta = (local["w"] - base["w"]).ravel()
    assert set(w_indices.tolist()) == set(np.argsort(-np.abs(delta))[: w_indices.size].tolist())


def test_the_reply_on_the_wire_is_parts_and_a_manifest_and_smaller() -> None:
    base = model(5)
    sent = request(base, "int8")
    plain = reply(sent, moved(base, 6))
    plain_bytes = sum(t.nbytes for t in encode_flower(plain)[1])
    encoded = encode_update(sent, reply(sent, moved(base, 6)), RecordDict())
    assert set(encoded.content) == {PARTS, MANIFEST, "metrics"}
    assert dict(encoded.content[MANIFEST]) == {
        "scheme": "int8",
        "records": ["arrays"],
        "like": ["arrays"],
    }
    assert sum(t.nbytes for t in encode_flower(encoded)[1]) < plain_bytes / 3.9


def test_scaffold_updates_are_compressed_as_they_are_shaped_like_the_model() -> None:
    base = model(7)
    sent = request(base, "fp16")
    delta_y = {k: v * 0.01 for k, v in moved(base, 8).items()}
    answer = Message(
        RecordDict({"delta_y": record(delta_y), "metrics": MetricRecord({"num-examples": 3})}),
        reply_to=sent,
    )
    encoded = over_the_wire(encode_update(sent, answer, RecordDict()))
    assert list(encoded.content[MANIFEST]["like"]) == ["arrays"]  # type: ignore[arg-type]
    got = arrays_of(decode_update(sent, encoded), "delta_y")
    for key, value in delta_y.items():
        assert np.abs(got[key] - value).max() <= np.abs(value).max() * 2**-10


@pytest.mark.parametrize("scheme", ["none", "fp16", "topk:0.1"])
def test_evaluate_error_and_uncompressed_replies_pass_unchanged(scheme: str) -> None:
    base = model(9)
    evaluate = request(base, scheme, MessageType.EVALUATE)
    answer = reply(evaluate, base)
    assert encode_update(evaluate, answer, RecordDict()) is answer
    assert set(answer.content) == {"arrays", "metrics"}
    train = request(base, scheme)
    failed = Message(Error(3, "boom"), reply_to=train)
    assert encode_update(train, failed, RecordDict()) is failed
    plain = reply(train, base)  # an older trainer, or one that sends what it has
    assert decode_update(train, plain) is plain


def test_a_trainer_asked_for_an_unknown_scheme_sends_its_update_uncompressed() -> None:
    base = model(10)
    sent = request(base, "zstd:9")
    answer = reply(sent, base)
    assert encode_update(sent, answer, RecordDict()) is answer


# --- error feedback --------------------------------------------------------------------------


def test_error_feedback_carries_what_was_not_sent_into_later_rounds() -> None:
    """Σ sent updates + the residual = Σ true updates, round after round."""
    state = RecordDict()
    base = model(11)
    true_total = {k: np.zeros(v.size) for k, v in base.items()}
    sent_total = {k: np.zeros(v.size) for k, v in base.items()}
    for round_number in range(6):
        local = moved(base, 100 + round_number, step=0.05)
        sent = request(base, "topk:0.05")
        encoded = over_the_wire(encode_update(sent, reply(sent, local), state))
        got = arrays_of(decode_update(sent, encoded))
        residual = arrayrecord_to_numpy(state.array_records[RESIDUAL_PREFIX + "arrays"])
        for key in base:
            true_total[key] += (local[key].astype(np.float64) - base[key]).ravel()
            sent_total[key] += (got[key].astype(np.float64) - base[key]).ravel()
            assert np.allclose(
                sent_total[key] + residual[key].ravel(), true_total[key], atol=1e-5
            ), f"round {round_number}, {key}"
            assert np.abs(residual[key]).max() > 0  # 95 % of each update was held back
        base = got  # the next round starts from the model this update made


def test_without_feedback_nothing_is_kept_and_a_stale_residual_is_dropped() -> None:
    base = model(12)
    state = RecordDict()
    sent = request(base, "topk:0.1")
    encode_update(sent, reply(sent, moved(base, 13)), state)
    assert RESIDUAL_PREFIX + "arrays" in state
    sent = request(base, "topk:0.1:no-feedback")
    encode_update(sent, reply(sent, moved(base, 14)), state)
    assert RESIDUAL_PREFIX + "arrays" not in state


def test_a_residual_kept_for_another_model_is_not_added() -> None:
    base = model(15)
    state = RecordDict({RESIDUAL_PREFIX + "arrays": record({"w": np.ones((2, 2), np.float32)})})
    sent = request(base, "topk:1")
    local = moved(base, 16)
    got = arrays_of(decode_update(sent, encode_update(sent, reply(sent, local), state)))
    assert np.allclose(got["w"], local["w"], atol=1e-6)


async def test_the_residual_survives_a_trainer_restart(tmp_path: Path) -> None:
    """The residual is job state: a restarted trainer sends what its predecessor held back."""
    base = model(17)
    local = moved(base, 18, step=0.1)

    def app(message: Message, _: Context) -> Message:
        return reply(message, local)

    def ask(trainer: Trainer, scheme: str) -> Any:
        body, tensors = encode_flower(request(base, scheme))
        wire = WireMessage(
            "fl",
            0,
            "",
            {"job": "j", "app": "a", "node_config": {}, "run_config": {}, "message": body},
            tuple(tensors),
        )
        return trainer.handle(wire, "aggregator")

    await ask(Trainer(tmp_path, "peer", {"a": app}), "topk:0.1")
    restarted = Trainer(tmp_path, "peer", {"a": app})
    answer = await ask(restarted, "topk:0.1")
    got = arrays_of(
        decode_update(request(base, "topk:0.1"), decode_flower(answer.body, answer.tensors))
    )
    for key in SHAPES:  # the same Δ twice: round 2 sends the top 10 % of Δ + round 1's residual
        delta = np.subtract(local[key], base[key], dtype=np.float32).ravel()
        count = topk_count(delta.size, 0.1)
        residual = delta.copy()
        residual[np.argsort(-np.abs(delta))[:count]] = 0
        corrected = delta + residual
        expected = np.zeros_like(delta)
        top = np.argsort(-np.abs(corrected))[:count]
        expected[top] = corrected[top]
        assert np.allclose((got[key] - base[key]).ravel(), expected, atol=1e-6)


# --- hostile replies -------------------------------------------------------------------------

Tamper = Callable[[dict[str, NDArray]], dict[str, NDArray]]


def with_part(index: str, value: Callable[[NDArray], NDArray]) -> Tamper:
    return lambda parts: {**parts, index: value(parts[index])}


def last_index_beyond(indices: NDArray) -> NDArray:
    out = indices.copy()
    out[-1] = np.iinfo(out.dtype).max
    return out


def nan_scale(scales: NDArray) -> NDArray:
    out = scales.copy()
    out[0, 1] = np.nan
    return out


HOSTILE: dict[str, tuple[str, Tamper, str]] = {
    "index out of range": ("topk:0.1", with_part("0", last_index_beyond), "strictly ascending"),
    "values one short": ("topk:0.1", with_part("1", lambda v: v[:-1]), "float32 values"),
    "indices as int64": ("topk:0.1", with_part("0", lambda i: i.astype(np.int64)), "<i4 indices"),
    "NaN block scale": ("int8", with_part("1", nan_scale), "scales must be finite"),
    "fp16 as float32": ("fp16", with_part("0", lambda v: v.astype(np.float32)), "expected one <f2"),
    "a part missing": ("fp16", lambda p: {k: v for k, v in p.items() if k != "1"}, "too few"),
    "a part too many": ("fp16", lambda p: {**p, "2": p["0"]}, "its records use 2"),
    "parts out of order": ("fp16", lambda p: {"1": p["1"], "0": p["0"]}, "0, 1, ... in order"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_a_hostile_compressed_reply_is_refused_not_decoded(case: str) -> None:
    scheme, tamper, reason = HOSTILE[case]
    base = model(19)
    sent = request(base, scheme)
    encoded = encode_update(sent, reply(sent, moved(base, 20)), RecordDict())
    parts = arrayrecord_to_numpy(encoded.content.array_records[PARTS])
    encoded.content[PARTS] = record(tamper(parts))
    with pytest.raises(ProtocolError, match=reason):
        decode_update(sent, over_the_wire(encoded))


MANIFESTS: dict[str, tuple[dict[str, Any], str]] = {
    "another scheme": ({"scheme": "topk:0.5"}, "compressed with 'topk:0.5', the job asked fp16"),
    "no records": ({"records": [], "like": []}, "must list records"),
    "unequal lists": ({"like": ["arrays", "arrays"]}, "must list records"),
    "shaped like nothing sent": ({"like": ["weights"]}, "not shaped like a sent record"),
    "a model shaped like another": ({"records": ["arrays"], "like": ["other"]}, "not shaped"),
    "a record also sent plainly": ({"records": ["metrics"], "like": ["arrays"]}, "also sent"),
}


@pytest.mark.parametrize("case", list(MANIFESTS))
def test_a_manifest_that_does_not_fit_what_was_sent_is_refused(case: str) -> None:
    change, reason = MANIFESTS[case]
    base = model(21)
    sent = request(base, "fp16")
    sent.content["other"] = record(base)
    encoded = encode_update(sent, reply(sent, moved(base, 22)), RecordDict())
    encoded.content[MANIFEST] = ConfigRecord({**dict(encoded.content[MANIFEST]), **change})
    with pytest.raises(ProtocolError, match=reason):
        decode_update(sent, over_the_wire(encoded))


def test_a_compressed_reply_to_a_job_without_compression_is_refused() -> None:
    base = model(23)
    asked = request(base, "int8")
    encoded = encode_update(asked, reply(asked, moved(base, 24)), RecordDict())
    with pytest.raises(ProtocolError, match="the job asked for none"):
        decode_update(request(base), over_the_wire(encoded))
    half = Message(RecordDict({PARTS: record(base)}), reply_to=asked)
    with pytest.raises(ProtocolError, match="needs ConfigRecord"):
        decode_update(asked, half)
