"""A node that does not accept public work takes jobs only from its allow-listed peers."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import trio
from flower_messages import task_identity  # noqa: F401 (autouse fixture)
from flwr.app import Context, Message, RecordDict
from flwr.common import MessageType
from swarm_helpers import local_swarm

from hivenode.agent import rpc
from hivenode.agent.errors import RpcError
from hivenode.agent.flower_wire import encode_flower
from hivenode.agent.node import Node
from hivenode.agent.settings import load_settings
from hivenode.agent.trainer import Trainer
from hivenode.agent.wire_guard import JOB_PROTOCOLS, NOT_ALLOWED
from hivenode.protocol.ids import (
    DEPLOY_PROTOCOL,
    FL_PROTOCOL,
    INFER_PROTOCOL,
    PARALLEL_JOB_PROTOCOL,
)
from hivenode.protocol.message import Message as WireMessage
from hivenode.protocol.message import encode_message
from hivenode.protocol.streams import read_message

ECHO_APP = "echo"


def echo_app(message: Message, context: Context) -> Message:
    return Message(RecordDict(), reply_to=message)


def echo_trainer(state_dir: Path, peer_id: str) -> Trainer:
    return Trainer(state_dir, peer_id, {ECHO_APP: echo_app})


async def train_request(aggregator: Node, trainer: Node) -> WireMessage:
    """One train message as an aggregator's grid sends it."""
    body, tensors = encode_flower(Message(RecordDict(), 1, MessageType.TRAIN))
    request_body = {
        "job": "job1",
        "app": ECHO_APP,
        "node_config": {},
        "run_config": {},
        "message": body,
    }
    return await rpc.request(
        aggregator.swarm.host,
        trainer.peer_id,
        FL_PROTOCOL,
        "fl",
        request_body,
        timeout=5,
        tensors=tuple(tensors),
    )


async def dialled(server: Node, *clients: Node) -> Node:
    """`server`, with a connection from each client (no gossip mesh to wait for)."""
    for client in clients:
        await client.connect(server.swarm.listen_addrs()[0])
    return server


def private(*submitters: Node) -> dict[str, Any]:
    return {
        "security": {
            "accept_public_work": False,
            "job_submitters": [n.peer_id for n in submitters],
        }
    }


async def test_only_an_allow_listed_aggregator_gets_its_train_request_served(
    tmp_path: Path,
) -> None:
    async with local_swarm(tmp_path) as start:
        allowed = await start("allowed")
        stranger = await start("stranger")
        trainer = await start("trainer", make_trainer=echo_trainer, **private(allowed))
        await dialled(trainer, allowed, stranger)

        reply = await train_request(allowed, trainer)
        assert reply.type == "ok"
        with pytest.raises(RpcError) as refused:
            await train_request(stranger, trainer)
        assert refused.value.code == NOT_ALLOWED
        assert stranger.peer_id in refused.value.message
        assert "job_submitters" in refused.value.message
        assert trainer.trainer is not None and trainer.trainer.messages_handled == 1
        assert rejected(trainer, FL_PROTOCOL, NOT_ALLOWED) == 1
        # public requests stay public
        status = await stranger.remote_status(trainer.peer_id)
        assert status["peer_id"] == trainer.peer_id


async def test_a_node_that_accepts_public_work_serves_any_aggregator(tmp_path: Path) -> None:
    async with local_swarm(tmp_path) as start:
        stranger = await start("stranger")
        trainer = await dialled(await start("trainer", make_trainer=echo_trainer), stranger)
        assert (await train_request(stranger, trainer)).type == "ok"


@pytest.mark.parametrize("protocol_id", [PARALLEL_JOB_PROTOCOL, DEPLOY_PROTOCOL, INFER_PROTOCOL])
async def test_job_orders_and_deploys_are_gated_and_inference_is_not(
    tmp_path: Path, protocol_id: str
) -> None:
    async def handler(request: WireMessage, caller: str) -> Mapping[str, Any]:
        return {"served": caller}

    async with local_swarm(tmp_path) as start:
        allowed = await start("allowed")
        stranger = await start("stranger")
        worker = await start(
            "worker", setup=lambda n: n.add_handler(protocol_id, handler), **private(allowed)
        )
        await dialled(worker, allowed, stranger)
        reply = await rpc.request(allowed.swarm.host, worker.peer_id, protocol_id, "x", timeout=5)
        assert reply.body == {"served": allowed.peer_id}
        if protocol_id in JOB_PROTOCOLS:
            with pytest.raises(RpcError) as refused:
                await rpc.request(stranger.swarm.host, worker.peer_id, protocol_id, "x", timeout=5)
            assert refused.value.code == NOT_ALLOWED
            assert rejected(worker, protocol_id, NOT_ALLOWED) == 1
        else:  # a deployed model answers anyone: see docs/protocol.md
            reply = await rpc.request(
                stranger.swarm.host, worker.peer_id, protocol_id, "x", timeout=5
            )
            assert reply.body == {"served": stranger.peer_id}


async def test_a_refusal_comes_from_the_header_before_any_tensor_is_read(
    tmp_path: Path,
) -> None:
    """The stranger sends the header of a request declaring 64 MiB of tensors, and not one
    of their bytes: the refusal answers it at once (reading them first would wait for bytes
    that never come, or take 64 MiB in from anyone who sends them)."""
    from libp2p.custom_types import TProtocol
    from libp2p.peer.id import ID

    async with local_swarm(tmp_path) as start:
        allowed = await start("allowed")
        stranger = await start("stranger")
        trainer = await start("trainer", make_trainer=echo_trainer, **private(allowed))
        await dialled(trainer, stranger)
        big = np.zeros(16 * 1024**2, dtype=np.float32)
        header = bytes(encode_message(WireMessage("fl", 7, "x", {}, (big,)))[0])
        stream = await stranger.swarm.host.new_stream(
            ID.from_base58(trainer.peer_id), [TProtocol(FL_PROTOCOL)]
        )
        with trio.fail_after(3):
            await stream.write(header)
            reply = await read_message(rpc.StreamAdapter(stream))
        await rpc.close_quietly(stream)
        assert (reply.type, reply.request_id) == ("error", 7)
        assert reply.body["code"] == NOT_ALLOWED


def test_job_submitters_must_be_peer_ids(tmp_path: Path) -> None:
    from hivenode.agent.errors import ConfigError

    config = tmp_path / "config.toml"
    config.write_text('[security]\naccept_public_work = false\njob_submitters = ["alice"]\n')
    with pytest.raises(ConfigError, match=r"security\.job_submitters"):
        load_settings(config)
    peer = "12D3KooWGzBbJ4ZtZ2V6ouqUNg7d8xS4DYGQwcPZ4p8cJEFmYxBU"
    config.write_text(f'[security]\naccept_public_work = false\njob_submitters = ["{peer}"]\n')
    settings = load_settings(config)
    assert not settings.security.accept_public_work
    assert settings.security.job_submitters == [peer]


def rejected(node: Node, where: str, reason: str) -> float:
    return node.metrics.value("hivenode_messages_rejected_total", where=where, reason=reason)
