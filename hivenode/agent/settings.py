"""The node's configuration: one model, read from a TOML file, then `HIVENODE_*`, then flags."""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from hivenode.agent.errors import ConfigError
from hivenode.agent.paths import config_path
from hivenode.protocol.advert import Role


class GossipSettings(BaseModel):
    """GossipSub parameters. py-libp2p's defaults (120 s heartbeat, 10 msg/s per forwarder)
    silently stall or drop a swarm's adverts, so these are sized for our traffic."""

    model_config = ConfigDict(extra="forbid")

    degree: int = Field(6, ge=1)
    degree_low: int = Field(4, ge=1)
    degree_high: int = Field(
        64, ge=1, description="a bootstrap node meshes with up to this many peers before pruning"
    )
    heartbeat_interval: float = Field(1.0, gt=0)
    max_messages_per_topic_per_second: float = Field(
        1000.0,
        gt=0,
        description="per forwarding peer: a hub relays every origin's adverts, so this is "
        "high; per-origin limits are enforced on the records themselves",
    )


class FlowerAppAllowance(BaseModel):
    """A Flower app this node may run as a trainer: a local directory, pinned by the sha256
    of its files (`hivenode flower-app hash DIR` prints it)."""

    model_config = ConfigDict(extra="forbid")

    path: Path
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


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
    deploy_timeout: float = Field(
        300.0, gt=0, description="a deploy: fetching the blob, loading and warming the model"
    )
    route_timeout: float = Field(
        10.0, gt=0, description="a routed request's whole budget, its retry included"
    )
    streams_per_worker: int = Field(
        8, ge=1, description="requests the router keeps in flight to one worker at once"
    )
    latency_ewma_alpha: float = Field(0.2, gt=0, le=1)
    down_for: float = Field(
        5.0, ge=0, description="seconds the router avoids a worker that failed or timed out"
    )


class RequestRate(BaseModel):
    """A token bucket: `per_s` requests a second on average, `burst` at once."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    per_s: float = Field(gt=0)
    burst: int = Field(ge=1)


class RateLimitSettings(BaseModel):
    """Requests one peer may send on one protocol, by class of protocol (docs/protocol.md
    lists which protocol is in which class). The defaults sit far above what jobs send, so
    they only cut floods: an FL round is a message or two per trainer, a parallel job polls
    twice a second, the inference benchmark's router sends a few hundred a second."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = True
    control: RequestRate = Field(
        default_factory=lambda: RequestRate(per_s=50.0, burst=200),
        description="status, peer table, Q-table snapshot",
    )
    job: RequestRate = Field(
        default_factory=lambda: RequestRate(per_s=100.0, burst=400),
        description="FL messages, parallel job orders and polls, deploys",
    )
    data: RequestRate = Field(
        default_factory=lambda: RequestRate(per_s=2000.0, burst=4000),
        description="blob chunks, all-reduce, pipeline, inference, and any other protocol",
    )
    idle_s: float = Field(300.0, gt=0, description="a peer's bucket unused this long is forgotten")
    max_buckets: int = Field(
        65536, ge=1, description="buckets held at most; the least recently used go first"
    )


_PEER_ID = r"^[1-9A-HJ-NP-Za-km-z]{32,128}$"
"""A base58 libp2p peer id (`12D3KooW...`); checked by shape, libp2p is slow to import."""


class SecuritySettings(BaseModel):
    """Who may make this node work, and how fast any peer may ask it things."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    accept_public_work: bool = Field(
        True,
        description="false: only job_submitters may send FL messages, parallel job orders "
        "and model deploys; everyone else is answered not_allowed",
    )
    job_submitters: list[str] = Field(
        default_factory=list, description="peer ids allowed to submit jobs to this node"
    )
    rate_limits: RateLimitSettings = Field(default_factory=RateLimitSettings)

    @field_validator("job_submitters")
    @classmethod
    def _peer_ids(cls, value: list[str]) -> list[str]:
        for peer in value:
            if not re.fullmatch(_PEER_ID, peer):
                raise ValueError(f"{peer!r} is not a peer id (base58, like 12D3KooW...)")
        return value


class Settings(BaseSettings):
    """Everything a node can be told. Field names are the TOML keys."""

    model_config = SettingsConfigDict(
        env_prefix="HIVENODE_", env_nested_delimiter="__", extra="forbid", validate_default=True
    )

    state_dir: Path | None = Field(None, description="keys, registry, checkpoints")
    runtime_dir: Path | None = Field(None, description="the control socket")
    listen_addrs: list[str] = Field(default_factory=lambda: ["/ip4/0.0.0.0/tcp/4001"])
    bootstrap_peers: list[str] = Field(default_factory=list)
    mdns: bool = False
    psk: str | None = Field(None, description="64 hex chars: join only a private swarm")
    roles: list[Role] = Field(
        default_factory=lambda: [Role.TRAINER, Role.AGGREGATOR, Role.INFERENCE]
    )
    advert_period: float = Field(30.0, ge=1, description="minimum seconds between adverts")
    advert_deliveries_per_s: float = Field(
        2.0,
        gt=0,
        description="adverts a node should receive per second from the whole swarm; the "
        "period stretches to peers / this, so gossip cost stays flat as the swarm grows",
    )
    advert_ttl_periods: float = Field(3.0, ge=1.5, description="advert TTL in periods")
    ping_period: float = Field(15.0, gt=0)
    request_timeout: float = Field(10.0, gt=0)
    shutdown_timeout: float = Field(8.0, gt=0)
    metrics_enabled: bool = True
    metrics_host: str = "127.0.0.1"
    metrics_port: int = Field(9464, ge=0, le=65535)
    log_level: str = "INFO"
    gossip: GossipSettings = Field(default_factory=GossipSettings)
    inference: InferenceSettings = Field(default_factory=InferenceSettings)
    security: SecuritySettings = Field(default_factory=SecuritySettings)
    flower_apps: list[FlowerAppAllowance] = Field(
        default_factory=list, description="Flower apps whose ClientApp this node may run"
    )

    @field_validator("psk")
    @classmethod
    def _psk_is_hex(cls, value: str | None) -> str | None:
        if value is not None and (len(value) != 64 or not _is_hex(value)):
            raise ValueError("must be 64 hexadecimal characters (a 32-byte key)")
        return value

    @field_validator("log_level")
    @classmethod
    def _known_level(cls, value: str) -> str:
        if value.upper() not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
            raise ValueError("must be DEBUG, INFO, WARNING or ERROR")
        return value.upper()


def load_settings(path: Path | None = None, **flags: Any) -> Settings:
    """Read the file (if any), the environment and the flags; raise ConfigError naming the key."""
    source = config_path(path)
    file_values: dict[str, Any] = {}
    if source is not None:
        try:
            file_values = tomllib.loads(source.read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise ConfigError(f"config file not found: {source}") from exc
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read {source}: {exc}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{source}: invalid TOML: {exc}") from exc
    given = {k: v for k, v in flags.items() if v is not None}
    try:
        return _with_file_below_env(file_values)(**given)
    except ValidationError as exc:
        first = exc.errors()[0]
        key = ".".join(str(p) for p in first["loc"])
        where = _origin_of(key, given, source)
        raise ConfigError(f"invalid config value for '{key}' ({where}): {first['msg']}") from exc


def _with_file_below_env(file_values: dict[str, Any]) -> type[Settings]:
    """A Settings subclass whose lowest-priority source is the TOML file's values."""
    from pydantic_settings import InitSettingsSource

    class FileBackedSettings(Settings):
        @classmethod
        def settings_customise_sources(
            cls,
            settings_cls: type[BaseSettings],
            init_settings: PydanticBaseSettingsSource,
            env_settings: PydanticBaseSettingsSource,
            dotenv_settings: PydanticBaseSettingsSource,
            file_secret_settings: PydanticBaseSettingsSource,
        ) -> tuple[PydanticBaseSettingsSource, ...]:
            return (init_settings, env_settings, InitSettingsSource(settings_cls, file_values))

    return FileBackedSettings


def _origin_of(key: str, flags: dict[str, Any], source: Path | None) -> str:
    top = key.split(".")[0]
    if top in flags:
        return "command-line flag"
    env = "HIVENODE_" + key.replace(".", "__").upper()
    if env in os.environ or f"HIVENODE_{top.upper()}" in os.environ:
        return f"environment {env}"
    return f"file {source}" if source else "default"


def _is_hex(value: str) -> bool:
    try:
        bytes.fromhex(value)
    except ValueError:
        return False
    return True


def config_template() -> str:
    """The commented example config that `hivenode init` writes (also deploy/'s example)."""
    return Path(__file__).with_name("config.example.toml").read_text(encoding="utf-8")
