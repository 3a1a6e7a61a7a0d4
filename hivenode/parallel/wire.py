"""Protocol ids and request-body checks shared by the data- and pipeline-parallel protocols.

Every request names its job (`body["job"]`), so one handler per protocol serves all the jobs
a node takes part in (see `router.py`).
"""

from __future__ import annotations

from typing import Final

from hivenode.protocol.fields import field as field
from hivenode.protocol.fields import number as number
from hivenode.protocol.fields import peer_list as peer_list
from hivenode.protocol.ids import ALLREDUCE_PROTOCOL, DP_STATE_PROTOCOL, PIPELINE_PROTOCOL

PROTOCOLS: Final = (ALLREDUCE_PROTOCOL, DP_STATE_PROTOCOL, PIPELINE_PROTOCOL)
