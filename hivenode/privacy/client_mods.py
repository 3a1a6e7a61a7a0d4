"""The trainer's side of a private job: Flower's own client mods, applied only when asked.

- Secure aggregation runs Flower's `secaggplus_mod` unchanged. It expects a legacy FitRes
  from the app, so `_masked_update` hands it the round's *update* (w_i − w_global, in the
  request's key order) as `fitres.parameters`: an update is small and centred on zero, so
  the protocol's clipping to ±clipping_range before quantization loses nothing of it, where
  the weights themselves could exceed it. The reply keeps the app's metrics and no arrays;
  the masked vector travels as tensors (`MASKED_RECORD`), not as bytes inside a header.
- Client-side DP clipping is Flower's `fixedclipping_mod`, on the plain train message.

Flower's mods refuse messages not meant for them (secaggplus_mod fails on a train message
without its configs, fixedclipping_mod on one without a clipping norm), so each is gated on
what the aggregator sent; a job without privacy reaches the app exactly as before.
"""

from __future__ import annotations

from typing import Any, cast

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.app.message_type import MessageType
from flwr.client.mod.secure_aggregation.secaggplus_mod import secaggplus_mod
from flwr.clientapp.mod import fixedclipping_mod
from flwr.common import bytes_to_ndarray
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from hivenode.models.flower_arrays import arrayrecord_to_numpy, numpy_to_array

App = Any  # Callable[[Message, Context], Message]; Flower's mods type it loosely
MASKED_RECORD = "hivenode.secagg-masked"
"""The reply ArrayRecord holding the masked vector ("0", "1", ... in order)."""
UNIFORM_WEIGHT = "hivenode.uniform-weight"
"""In the secagg configs: weigh every trainer 1 (DP's noise is calibrated to a plain mean)."""
WEIGHT_KEY = "num-examples"
"""The built-in app's FedAvg weight, in its reply's MetricRecord "metrics"."""


def with_privacy_mods(app: App) -> App:
    """`app` behind the gated SecAgg+ and client-side clipping mods (SecAgg+ outermost: the
    update is clipped before it is masked)."""

    def clipped(msg: Message, context: Context) -> Message:
        if not _asks_clipping(msg):
            return cast(Message, app(msg, context))
        return fixedclipping_mod(msg, context, app)

    def private(msg: Message, context: Context) -> Message:
        if msg.metadata.message_type != MessageType.TRAIN or not _asks_secagg(msg):
            return clipped(msg, context)
        reply = secaggplus_mod(msg, context, lambda m, c: _masked_update(m, c, clipped))
        return _masked_vector_as_tensors(msg, reply)

    return private


def _asks_secagg(msg: Message) -> bool:
    return RECORD_KEY_CONFIGS in msg.content.config_records


def _asks_clipping(msg: Message) -> bool:
    return msg.metadata.message_type == MessageType.TRAIN and any(
        KEY_CLIPPING_NORM in record for record in msg.content.config_records.values()
    )


def _masked_update(msg: Message, context: Context, app: App) -> Message:
    """Run the app on the train message without the SecAgg+ record, and answer what
    `secaggplus_mod` reads: the update as a FitRes, beside the app's own metrics."""
    # the app and the clipping mod expect the plain train message: one ConfigRecord
    content = msg.content
    configs = content.config_records[RECORD_KEY_CONFIGS]
    msg.content = RecordDict({k: r for k, r in content.items() if k != RECORD_KEY_CONFIGS})
    try:
        reply = cast(Message, app(msg, context))
    finally:
        msg.content = content
    if reply.has_error():
        # secaggplus_mod cannot pass an error on; raising makes it the trainer's error reply
        raise RuntimeError(f"training failed: {reply.error.reason}")
    sent = arrayrecord_to_numpy(msg.content.array_records["arrays"])
    trained = arrayrecord_to_numpy(reply.content.array_records["arrays"])
    update = ArrayRecord(
        {
            key: numpy_to_array(trained[key].astype(np.float64) - value)
            for key, value in sent.items()
        }
    )
    metrics = reply.content.metric_records["metrics"]
    weight = 1 if configs.get(UNIFORM_WEIGHT) else int(cast(int, metrics[WEIGHT_KEY]))
    fitres = RecordDict(
        {
            "metrics": metrics,
            "fitres.parameters": update,
            "fitres.num_examples": MetricRecord({"num_examples": weight}),
            "fitres.metrics": ConfigRecord(),
            "fitres.status": ConfigRecord({"code": 0, "message": "Success"}),
        }
    )
    return Message(fitres, reply_to=msg)


def _masked_vector_as_tensors(msg: Message, reply: Message) -> Message:
    """Move the mod's masked vector (a list of .npy bytes in a ConfigRecord) into tensors, and
    drop the FitRes scaffolding: only the app's metrics and the protocol's answer go back."""
    if reply.has_error():
        return reply
    content = reply.content
    configs = content.config_records[RECORD_KEY_CONFIGS]
    out = RecordDict({RECORD_KEY_CONFIGS: configs})
    if "metrics" in content.metric_records:
        out["metrics"] = content.metric_records["metrics"]
    masked = configs.get(Key.MASKED_PARAMETERS)
    if isinstance(masked, list):
        del configs[Key.MASKED_PARAMETERS]
        arrays = [bytes_to_ndarray(cast(bytes, raw)) for raw in masked]
        out[MASKED_RECORD] = ArrayRecord(
            {str(i): numpy_to_array(np.ascontiguousarray(a)) for i, a in enumerate(arrays)}
        )
    return Message(out, reply_to=msg)
