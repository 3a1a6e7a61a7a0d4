"""The hardware advert a node gossips on `hivenode/adverts/1`: who it is, what it has, how busy."""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from pydantic import Field

from hivenode.protocol.records import Record, WireModel


class Role(StrEnum):
    TRAINER = "trainer"
    AGGREGATOR = "aggregator"
    INFERENCE = "inference"


class CpuInfo(WireModel):
    physical_cores: int = 0
    logical_cores: int = 0
    affinity_cores: int = 0
    """Cores this process may run on (cgroups/taskset), what work should be sized to."""
    model: str = ""
    max_freq_mhz: float = 0.0


class MemoryInfo(WireModel):
    total_bytes: int = 0
    available_bytes: int = 0


class GpuInfo(WireModel):
    index: int = 0
    name: str = ""
    vendor: str = "nvidia"
    memory_total_bytes: int = 0
    memory_free_bytes: int = 0
    compute_capability: str = ""
    source: str = ""
    """Which probe found it: `nvml` or `torch`."""


class Hardware(WireModel):
    cpu: CpuInfo = CpuInfo()
    memory: MemoryInfo = MemoryInfo()
    disk_free_bytes: int = 0
    gpus: tuple[GpuInfo, ...] = ()
    frameworks: dict[str, str] = Field(default_factory=dict)
    """Installed ML frameworks by distribution name → version, read from package metadata."""
    platform: str = ""


class Load(WireModel):
    cpu_percent: float = 0.0
    load_avg: tuple[float, float, float] = (0.0, 0.0, 0.0)
    memory_percent: float = 0.0
    running_tasks: int = 0
    inference_queue: int = 0
    """Inference requests waiting at this worker, all models together."""


class DatasetInfo(WireModel):
    name: str
    samples: int = 0
    feature_shape: tuple[int, ...] = ()
    size_bytes: int = 0
    num_classes: int = 0


class Advert(Record):
    agent_version: str = ""
    roles: tuple[Role, ...] = ()
    addrs: tuple[str, ...] = ()
    hardware: Hardware = Hardware()
    load: Load = Load()
    datasets: tuple[DatasetInfo, ...] = ()
    models: tuple[str, ...] = ()
    """Names of the models this node serves for inference."""
    apps: tuple[str, ...] = ()
    """Keys of the Flower apps this node trains with (`flower:<name>@<sha256>`)."""

    def same_content(self, other: Advert) -> bool:
        """True when only gauges changed (load, free memory, free disk): such changes wait
        for the next periodic advert instead of going out at once."""
        return self._identity() == other._identity()

    def _identity(self) -> dict[str, Any]:
        gauges: dict[str, Any] = {
            "seq": True,
            "timestamp": True,
            "ttl": True,
            "load": True,
            "hardware": {
                "memory": {"available_bytes"},
                "disk_free_bytes": True,
                "gpus": {"__all__": {"memory_free_bytes"}},
            },
        }
        return self.model_dump(exclude=gauges)
