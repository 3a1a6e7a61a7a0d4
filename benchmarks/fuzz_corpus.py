"""Valid encodings the fuzzer starts from: what honest peers send and honest tools write.

Hypothesis mutates them, atheris and the mutation engine use them as their seed corpus, and
the structure-aware strategies alter their documents one field at a time.
"""

from __future__ import annotations

import bz2
import functools
import gzip
import hashlib
import io
import pickle
import time
import zipfile
from collections import OrderedDict
from typing import Any

import msgpack
import numpy as np

PEER_A = "12D3KooWGzBtXRfJ1oWbrLsnXRFzhdHFcsYRVDRNHDGvZzwqhnYo"
PEER_B = "12D3KooWQYhTNQdmr3ArTeUHRYzFg94BKyTkoWBDWez9kSCVe2Xo"


def wire_bytes(message: Any) -> bytes:
    from hivenode.protocol.message import encode_message

    return b"".join(bytes(part) for part in encode_message(message))


def sample_tensors() -> tuple[np.ndarray[Any, Any], ...]:
    return (
        np.arange(6, dtype=np.float32).reshape(2, 3),
        np.array([-1, 0, 2**40], dtype=np.int64),
        np.array([True, False]),
        np.zeros((0, 3), dtype=np.float16),
    )


@functools.cache
def message_corpus(infer: bool = False) -> list[bytes]:
    from hivenode.protocol.message import Message

    if infer:
        return [
            wire_bytes(
                Message(
                    "infer",
                    1,
                    PEER_A,
                    {"model": "mlp@2", "timeout_ms": 500},
                    (np.ones((2, 4), np.float32),),
                )
            ),
            wire_bytes(
                Message(
                    "ok", 1, PEER_A, {"model": "mlp@2", "queue": 3, "compute_ms": 1.5, "batch": 2}
                )
            ),
        ]
    return [
        wire_bytes(Message("status", 1, PEER_A, {})),
        wire_bytes(
            Message(
                "fl", 7, PEER_B, {"job": "j1", "nested": {"a": [1, 2.5, b"x"]}}, sample_tensors()
            )
        ),
        wire_bytes(
            Message("ok", 2**40, PEER_A, {"adverts": [{"signed": b"\x00" * 8, "age_s": 1.5}]})
        ),
    ]


def advert_docs() -> list[dict[str, Any]]:
    from hivenode.protocol.advert import Advert, DatasetInfo, GpuInfo, Hardware, Role

    advert = Advert(
        origin=PEER_A,
        seq=1_700_000_000_000,
        timestamp=time.time(),
        ttl=30.0,
        agent_version="0.1.0",
        roles=(Role.TRAINER, Role.INFERENCE),
        addrs=(f"/ip4/127.0.0.1/tcp/4001/p2p/{PEER_A}",),
        hardware=Hardware(gpus=(GpuInfo(name="H100", memory_total_bytes=80 * 2**30),)),
        datasets=(DatasetInfo(name="mnist", samples=60000, feature_shape=(28, 28)),),
        models=("mlp@2",),
    )
    return [advert.model_dump(mode="json")]


def advert_corpus() -> list[bytes]:
    return [msgpack.packb(doc, use_bin_type=True) for doc in advert_docs()]


def qdelta_docs() -> list[dict[str, Any]]:
    from hivenode.planner.crdt import SwarmTable

    table = SwarmTable(PEER_A)
    now = time.time()
    table.set_own((0, 0, 0, 0, 0), 3, 0.25, now)
    table.set_own((1, 1, 1, 1, 1), 1, -0.5, now + 1)
    return [delta.model_dump(mode="json") for delta in table.deltas(now=now)]


def qdelta_corpus() -> list[bytes]:
    return [msgpack.packb(doc, use_bin_type=True) for doc in qdelta_docs()]


def qtable_docs() -> list[dict[str, Any]]:
    from hivenode.planner.qtable import QTable
    from hivenode.planner.state import ACTIONS, State

    table = QTable(PEER_A, seed=0)
    table.update(State(0, 0, 0, 0), ACTIONS[0], 0.5, now=1_700_000_000.0)
    table.update(State(1, 0, 1, 0), ACTIONS[1], -0.25, now=1_700_000_001.0)
    return [table.to_json()]


def signed_message(payload: bytes, topic: str, seqno: int = 1) -> bytes:
    """A pubsub message signed the way py-libp2p signs what it publishes."""
    from libp2p.crypto.ed25519 import create_new_key_pair
    from libp2p.peer.id import ID
    from libp2p.pubsub.pb import rpc_pb2
    from libp2p.pubsub.validators import PUBSUB_SIGNING_PREFIX

    keys = create_new_key_pair(b"\x01" * 32)
    message = rpc_pb2.Message(
        from_id=ID.from_pubkey(keys.public_key).to_bytes(),
        data=payload,
        seqno=seqno.to_bytes(8, "big"),
        topicIDs=[topic],
    )
    message.signature = keys.private_key.sign(
        PUBSUB_SIGNING_PREFIX.encode() + message.SerializeToString()
    )
    message.key = keys.public_key.serialize()
    return bytes(message.SerializeToString())


@functools.cache
def signed_corpus() -> list[bytes]:
    from hivenode.protocol.ids import ADVERTS_TOPIC, QTABLE_TOPIC

    return [
        signed_message(advert_corpus()[0], ADVERTS_TOPIC),
        signed_message(qdelta_corpus()[0], QTABLE_TOPIC, seqno=2),
    ]


def flower_messages() -> list[Any]:
    from flwr.app import (
        ArrayRecord,
        ConfigRecord,
        Error,
        Message,
        Metadata,
        MetricRecord,
        RecordDict,
    )

    content = RecordDict(
        {
            "arrays": ArrayRecord({"w": _flower_array(np.ones((2, 2), np.float32))}),
            "config": ConfigRecord({"lr": 0.1, "epochs": 2, "name": "x", "flags": [True, False]}),
            "metrics": MetricRecord({"loss": 0.5, "n": 10}),
        }
    )
    # built from Metadata, as the wire decoder does: Message(content, ...) needs a Flower run
    meta: dict[str, Any] = {
        "run_id": 7,
        "message_id": "m1",
        "src_node_id": 1,
        "dst_node_id": 5,
        "reply_to_message_id": "",
        "group_id": "1",
        "created_at": time.time(),
        "ttl": 60.0,
        "message_type": "train",
    }
    build: Any = Message
    train = build(metadata=Metadata(**meta), content=content)
    reply = meta | {"message_id": "m2", "reply_to_message_id": "m1"}
    failed = build(metadata=Metadata(**reply), error=Error(3, "no data"))
    return [train, failed]


def _flower_array(array: np.ndarray[Any, Any]) -> Any:
    from hivenode.models.flower_arrays import numpy_to_array

    return numpy_to_array(array)


def flower_bodies() -> list[tuple[dict[str, Any], list[np.ndarray[Any, Any]]]]:
    from hivenode.agent.flower_wire import encode_flower

    return [encode_flower(message) for message in flower_messages()]


@functools.cache
def flower_corpus() -> list[bytes]:
    from hivenode.protocol.message import Message

    return [
        wire_bytes(Message("fl", 1, PEER_A, body, tuple(tensors)))
        for body, tensors in flower_bodies()
    ]


@functools.cache
def npy_corpus() -> list[bytes]:
    arrays: list[np.ndarray[Any, Any]] = [
        np.arange(6, dtype=np.float32).reshape(2, 3),
        np.asfortranarray(np.arange(6, dtype=np.int16).reshape(3, 2)),
        np.array(2.5, dtype=np.float64),
        np.array([True, False, True]),
        np.zeros((0,), np.uint8),
    ]
    return [bytes(_flower_array(a).data) for a in arrays]


def order_bodies() -> list[dict[str, Any]]:
    from hivenode.protocol.parallel_job import JobOrder

    order = JobOrder(
        job="job-1",
        mode="data",
        members=(PEER_A, PEER_B),
        rank=1,
        dataset="mnist",
        model="mlp",
        options={"hidden": [64]},
        feature_shape=(28, 28),
        num_classes=10,
        seed=0,
        steps=100,
        batch_size=32,
        lr=0.01,
        momentum=0.9,
    )
    return [order.to_body()]


def order_corpus() -> list[bytes]:
    return [msgpack.packb(body, use_bin_type=True) for body in order_bodies()]


def manifest_docs() -> list[dict[str, Any]]:
    from hivenode.protocol.message import TensorSpec

    tensors = sample_tensors()
    payload = b"".join(t.tobytes() for t in tensors)
    return [
        {
            "tensors": [TensorSpec.of(t).to_wire() for t in tensors],
            "total_bytes": len(payload),
            "sha256": hashlib.sha256(payload).hexdigest(),
            "meta": {"round": 3},
            "frame_bytes": 1024 * 1024,
        }
    ]


def manifest_corpus() -> list[bytes]:
    return [msgpack.packb(doc, use_bin_type=True) for doc in manifest_docs()]


# --- model files ------------------------------------------------------------------------------


def _zip(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, content in members.items():
            archive.writestr(name, content)
    return buffer.getvalue()


def _joblib_bytes() -> bytes | None:
    try:
        import joblib  # type: ignore[import-untyped]
    except ImportError:
        return None
    buffer = io.BytesIO()
    joblib.dump({"coef_": np.ones((2, 3)), "classes_": np.array([0, 1])}, buffer)
    return buffer.getvalue()


def _onnx_bytes() -> bytes | None:
    try:
        from onnx import TensorProto, helper, numpy_helper
    except ImportError:
        return None
    weight = numpy_helper.from_array(np.ones((4, 3), np.float32), name="fc.weight")
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "fc.weight"], ["y"], transB=1)],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 4])],
        [weight],
    )
    model: bytes = helper.make_model(graph).SerializeToString()
    return model


def _safetensors_bytes() -> bytes:
    from safetensors.numpy import save

    return bytes(
        save(
            {"fc.weight": np.ones((4, 3), np.float32), "fc.bias": np.zeros(4, np.float32)},
            metadata={"format": "pt"},
        )
    )


def _torch_zip() -> bytes:
    """The layout torch.save writes (archive/data.pkl + storages), without importing torch."""
    program = (
        b"\x80\x02ccollections\nOrderedDict\nq\x00)Rq\x01X\x06\x00\x00\x00weightq\x02"
        b"ctorch._utils\n_rebuild_tensor_v2\nq\x03((X\x07\x00\x00\x00storageq\x04"
        b"ctorch\nFloatStorage\nq\x05X\x01\x00\x00\x000q\x06X\x03\x00\x00\x00cpuq\x07K\x06tq\x08"
        b"QK\x00K\x02K\x03\x86q\tK\x03K\x01\x86q\n\x89h\x01)Rq\x0btq\x0cRq\rs."
    )
    return _zip(
        {"archive/data.pkl": program, "archive/version": b"3\n", "archive/data/0": bytes(24)}
    )


def _keras_zip() -> bytes:
    config = (
        b'{"class_name": "Sequential", "config": {"layers": [{"class_name": "Dense", '
        b'"config": {"units": 4, "activation": "softmax"}}]}}'
    )
    return _zip({"config.json": config, "metadata.json": b'{"keras_version": "3.0"}'})


@functools.cache
def model_file_corpus(kind: str) -> list[bytes]:
    """Valid files of `kind` ("pickle", "protobuf", "safetensors" or "any"); for "any" each
    is prefixed with the byte that picks its suffix (see fuzz_targets.IDENTIFY_SUFFIXES)."""
    pickles = [
        pickle.dumps(OrderedDict(w=[1.0, 2.0], b=(3, "x")), protocol=2),
        pickle.dumps({"classes": np.array([1, 2]), "n": 3}, protocol=4),
        pickle.dumps([b"bytes", {1, 2}, frozenset({3})], protocol=0),
    ]
    joblib_file = _joblib_bytes()
    if joblib_file is not None:
        pickles.append(joblib_file)
    onnx_file = _onnx_bytes()
    if kind == "pickle":
        return pickles
    if kind == "protobuf":
        return [onnx_file] if onnx_file is not None else [b"\x08\x07\x3a\x00"]
    if kind == "safetensors":
        return [_safetensors_bytes()]
    files: list[tuple[int, bytes]] = [
        (0, _torch_zip()),
        (5, _keras_zip()),
        (4, _safetensors_bytes()),
    ]
    files += [(1, p) for p in pickles]
    files += [(2, gzip.compress(pickles[0])), (2, bz2.compress(pickles[1]))]
    if onnx_file is not None:
        files.append((3, onnx_file))
    files.append((6, b"\x89HDF\r\n\x1a\n" + bytes(64)))  # not HDF5 inside: h5py refuses it
    return [bytes([suffix]) + content for suffix, content in files]
