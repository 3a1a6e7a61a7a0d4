"""Bulk tensor transfer between peers: an authenticated fast path beside libp2p.

`send_tensors` moves arrays to a peer, resuming after a broken channel; a `BulkReceiver`
running on that peer hands them to a callback as numpy views over one buffer, and optionally
each tensor as soon as it is authenticated. See docs/protocol.md for the channel's design.
"""

from hivenode.agent.bulk.channel import ChannelFault, FrameFilter
from hivenode.agent.bulk.errors import BulkError
from hivenode.agent.bulk.inbound import OnAbandoned, OnTensor, TensorArrival
from hivenode.agent.bulk.receiver import BulkReceiver, OnTensors
from hivenode.agent.bulk.sender import TransferReport, Upload, send_tensors
from hivenode.agent.bulk.wire import BULK_PROTOCOL

__all__ = [
    "BULK_PROTOCOL",
    "BulkError",
    "BulkReceiver",
    "ChannelFault",
    "FrameFilter",
    "OnAbandoned",
    "OnTensor",
    "OnTensors",
    "TensorArrival",
    "TransferReport",
    "Upload",
    "send_tensors",
]
