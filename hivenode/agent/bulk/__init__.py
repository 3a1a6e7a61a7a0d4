"""Bulk tensor transfer between peers: an authenticated fast path beside libp2p.

`send_tensors` moves arrays to a peer; a `BulkReceiver` running on that peer hands them to a
callback as numpy views over one buffer. See docs/protocol.md for the channel's design.
"""

from hivenode.agent.bulk.errors import BulkError
from hivenode.agent.bulk.receiver import BulkReceiver, OnTensors
from hivenode.agent.bulk.sender import FrameFilter, TransferReport, send_tensors
from hivenode.agent.bulk.wire import BULK_PROTOCOL

__all__ = [
    "BULK_PROTOCOL",
    "BulkError",
    "BulkReceiver",
    "FrameFilter",
    "OnTensors",
    "TransferReport",
    "send_tensors",
]
