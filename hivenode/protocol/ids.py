"""Protocol ids, gossip topics and the wire version: the names peers agree on."""

from typing import Final

WIRE_VERSION: Final = 1
"""Major version of the envelope format; a peer rejects any other with a ProtocolError."""

STATUS_PROTOCOL: Final = "/hivenode/status/1.0.0"
PEER_TABLE_PROTOCOL: Final = "/hivenode/peers/1.0.0"

ADVERTS_TOPIC: Final = "hivenode/adverts/1"
QTABLE_TOPIC: Final = "hivenode/qtable/1"
JOBS_TOPIC: Final = "hivenode/jobs/1"
FL_PROTOCOL: Final = "/hivenode/fl/1.0.0"
"""A Flower Message to a trainer and its reply, carried as one request/response."""
QTABLE_PROTOCOL: Final = "/hivenode/qtable/1.0.0"
"""A peer's Q-table snapshot: the signed deltas that carry its cells, for a node that joins."""
BUILTIN_APP: Final = "builtin"
"""The app name of the built-in ClientApp in FL requests; Flower apps go by their key."""
ALLREDUCE_PROTOCOL: Final = "/hivenode/allreduce/1.0.0"
"""A data-parallel peer's share of a gradient to the peer reducing that part; the reply is the
part averaged over every contributor."""
DP_STATE_PROTOCOL: Final = "/hivenode/dp-state/1.0.0"
"""A late data-parallel replica asks a member to admit it; the reply is the state once admitted."""
PIPELINE_PROTOCOL: Final = "/hivenode/pipeline/1.0.0"
"""Activations to the next pipeline stage, gradients back to the previous one."""
INFER_PROTOCOL: Final = "/hivenode/infer/1.0.0"
"""An inference request (model name, input tensors) to a worker, answered with the outputs."""
DEPLOY_PROTOCOL: Final = "/hivenode/deploy/1.0.0"
"""Asks an inference worker to fetch a model blob by hash, verify and serve it (or stop)."""
PARALLEL_JOB_PROTOCOL: Final = "/hivenode/parallel-job/1.0.0"
"""A job's coordinator starts a member's part of a data- or pipeline-parallel job, then polls
its progress and, once done, fetches its weights."""
