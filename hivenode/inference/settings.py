"""How a node serves and routes inference: the `[inference]` section of the config.

Its home is the settings model (agent/settings.py, which cannot import this part): until the
lead moves it there as `Settings.inference`, the service reads it from there when present
and falls back to these defaults.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class InferenceSettings(BaseModel):
    """The inference worker's and the router's knobs. Field names are the TOML keys."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    serve: list[str] = Field(
        default_factory=list, description="models (NAME[@VERSION]) this worker loads at start"
    )
    max_batch: int = Field(32, ge=1, description="samples one batch computes at most")
    max_batch_wait: float = Field(
        0.002, ge=0, description="seconds the oldest waiting request may wait for a batch to fill"
    )
    max_queue: int = Field(
        64, ge=1, description="requests waiting per model; beyond, the worker answers busy"
    )
    concurrency: int = Field(2, ge=1, description="batches computing at once, all models")
    request_timeout: float = Field(
        10.0, gt=0, description="longest a request waits and computes at a worker"
    )
    memory_reserve_bytes: int = Field(
        256 * 1024**2, ge=0, description="RAM a model load must leave free"
    )
    warmup: bool = True
    route_timeout: float = Field(
        10.0, gt=0, description="a routed request's whole budget, its retry included"
    )
    streams_per_worker: int = Field(
        8, ge=1, description="requests the router keeps in flight to one worker at once"
    )
    latency_ewma_alpha: float = Field(0.2, gt=0, le=1)
    down_for: float = Field(
        5.0, ge=0, description="seconds the router avoids a worker it could not reach"
    )
