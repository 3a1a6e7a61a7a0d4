"""What a federated job is: the model, the data it trains on, the strategy and the schedule.

A job file is TOML; the same fields travel as JSON to the daemon that runs it. Unknown keys
are refused (a typo must not silently become a default).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from hivenode.models.training.backend import ModelSpec
from hivenode.protocol.compression import UPDATE_SCHEMES, UpdateCompression

ConfigValues = dict[
    str,
    int
    | float
    | str
    | bytes
    | bool
    | list[int]
    | list[float]
    | list[str]
    | list[bytes]
    | list[bool],
]
"""What a Flower ConfigRecord holds."""
TRAINER_DEADLINE_SHARE = 0.85
"""The part of a round's deadline a trainer may spend training."""
JOB_NAME_PATTERN = r"^[A-Za-z0-9._-]{1,64}$"
StrategyName = Literal[
    "fedavg", "fedprox", "scaffold", "fedmedian", "fedtrimmedavg", "krum", "multikrum"
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSection(_Strict):
    framework: Literal["torch", "keras", "sklearn", "hf"] = "torch"
    name: str = "mlp"
    options: dict[str, Any] = Field(default_factory=dict)

    def spec(self) -> ModelSpec:
        return ModelSpec(self.framework, self.name, self.options)


class StrategySection(_Strict):
    name: StrategyName = "fedavg"
    mu: float = Field(0.0, ge=0, description="FedProx's proximal μ")
    global_lr: float = Field(1.0, gt=0, description="SCAFFOLD's server learning rate η_g")
    beta: float = Field(0.2, ge=0, lt=0.5, description="FedTrimmedAvg: fraction cut per side")
    malicious: int = Field(0, ge=0, description="Krum/MultiKrum: attackers tolerated")


class TrainSection(_Strict):
    lr: float = Field(0.05, gt=0)
    local_epochs: int = Field(1, ge=1)
    batch_size: int = Field(32, ge=1)
    straggler_fraction: float = Field(
        0.0, ge=0, le=1, description="simulated stragglers: chance a trainer does fewer epochs"
    )


class ParallelSection(_Strict):
    """Train peer to peer instead of federated: `rounds` then counts optimizer steps, each
    one synchronous across the members (hivenode.parallel)."""

    mode: Literal["data", "pipeline", "model", "auto"] = Field(
        "data", description="auto: the swarm's Q-table chooses, federated included"
    )
    nodes: int | None = Field(
        None, ge=1, description="members to use (data: replicas, pipeline: stages); None: all"
    )
    micro_batches: int = Field(4, ge=1, description="pipeline: GPipe micro-batches per step")
    spares: int = Field(
        0, ge=0, description="pipeline/model: extra members a dead stage moves to (fail-over)"
    )
    momentum: float = Field(0.0, ge=0, lt=1)
    peer_timeout_s: float = Field(10.0, gt=0, description="a silent member is left out after")
    compression: Literal["none", "fp16", "int8"] = Field(
        "none", description="data: how the all-reduce sends gradients"
    )


class PrivacySection(_Strict):
    """Secure aggregation and differential privacy (hivenode.privacy, docs/privacy.md)."""

    secure_aggregation: bool = Field(
        False, description="SecAgg+: the aggregator sees masked updates and their sum only"
    )
    secagg_num_shares: int | float = Field(
        1.0,
        gt=0,
        description="SecAgg+: shares of each trainer's secrets (an int > 2), or a fraction"
        " of the round's trainers (1.0: all of them)",
    )
    secagg_reconstruction_threshold: int | float = Field(
        0.67,
        gt=0,
        description="SecAgg+: shares that rebuild a secret (an int < num_shares), or a"
        " fraction of num_shares; fewer survivors than this fail the round",
    )
    secagg_clipping_range: float = Field(
        8.0, gt=0, description="SecAgg+: weights are clipped to ±this before quantization"
    )
    secagg_quantization_range: int = Field(
        2**22, ge=2, description="SecAgg+: integer levels a weight is quantized to"
    )
    dp: Literal["none", "server-fixed", "client-fixed"] = Field(
        "none",
        description="central DP with fixed clipping (Flower's wrappers): the aggregator"
        " (server-fixed) or each trainer (client-fixed) clips the update to clipping_norm,"
        " the aggregator adds Gaussian noise to the mean",
    )
    noise_multiplier: float = Field(1.0, ge=0, description="DP: noise std ÷ clipping_norm")
    clipping_norm: float = Field(1.0, gt=0, description="DP: bound on ‖w_i − w_global‖")
    delta: float = Field(1e-5, gt=0, lt=1, description="DP: the δ that ε is reported for")

    @model_validator(mode="after")
    def _consistent(self) -> PrivacySection:
        shares, threshold = self.secagg_num_shares, self.secagg_reconstruction_threshold
        if isinstance(shares, int) and not isinstance(shares, bool) and shares <= 2:
            raise ValueError("privacy.secagg_num_shares: an int must be > 2 (or a fraction)")
        if isinstance(shares, float) and shares > 1:
            raise ValueError("privacy.secagg_num_shares: a fraction must be ≤ 1")
        if isinstance(threshold, float) and threshold > 1:
            raise ValueError("privacy.secagg_reconstruction_threshold: a fraction must be ≤ 1")
        if isinstance(threshold, int) and isinstance(shares, int) and threshold >= shares:
            raise ValueError(
                "privacy.secagg_reconstruction_threshold must be less than secagg_num_shares"
            )
        if self.secure_aggregation and self.dp == "server-fixed":
            raise ValueError(
                "privacy: secure aggregation hides the updates the server would clip;"
                ' use dp = "client-fixed"'
            )
        return self

    @property
    def enabled(self) -> bool:
        return self.secure_aggregation or self.dp != "none"


MEAN_STRATEGIES = ("fedavg", "fedprox")
"""The strategies whose update is a weighted mean of the trainers' arrays: the only ones
secure aggregation (it yields a sum) and DP noise calibrated to a mean apply to."""


class JobSpec(_Strict):
    name: str = Field(pattern=JOB_NAME_PATTERN)
    dataset: str = Field("", description="the dataset name trainers registered (hivenode data add)")
    rounds: int = Field(ge=1)
    flower_app: str | None = Field(
        None, description="a Flower app directory: run it unchanged instead of the built-in app"
    )
    run_config: str = Field("", description="a Flower app's run-config overrides, k=v ...")
    clients_per_round: int = Field(10, ge=1)
    min_clients: int = Field(1, ge=1, description="trainers that must be reachable to start")
    evaluate_fraction: float = Field(1.0, ge=0, le=1)
    deadline_s: float = Field(600.0, gt=0, description="a round's deadline")
    straggler_policy: Literal["drop", "partial"] = "partial"
    screen_updates: bool = Field(
        True,
        description="reject train updates that are not finite or far larger than the round's"
        " others before the strategy aggregates them",
    )
    update_norm_factor: float = Field(
        10.0,
        ge=0,
        description="the screen rejects an update whose norm ‖w_i − w_global‖ exceeds this ×"
        " the round's median (0: no norm bound, the finiteness check stays)",
    )
    compression: str = Field(
        "none",
        description=f"how trainers compress their updates: {UPDATE_SCHEMES}"
        " (hivenode.agent.update_codec)",
    )
    seed: int = 0
    target_accuracy: float = Field(
        0.9, gt=0, le=1, description="what the planner's reward counts as reaching the goal"
    )
    trainers: list[str] = Field(
        default_factory=list, description="peer ids; empty: every trainer with the dataset"
    )
    standby: list[str] | Literal["auto"] = Field(
        default_factory=list,
        description="peer ids of aggregators that hold every round's checkpoint and resume"
        ' the job if this one dies; "auto": one chosen among the connected aggregators'
        " (hivenode.aggregator.failover)",
    )
    plan: dict[str, Any] = Field(
        default_factory=dict, description="read by `hivenode plan`; the job runner ignores it"
    )
    tune: dict[str, Any] = Field(
        default_factory=dict, description="read by `hivenode tune`; the job runner ignores it"
    )
    model: ModelSection = Field(default_factory=ModelSection)
    strategy: StrategySection = Field(default_factory=StrategySection)
    train: TrainSection = Field(default_factory=TrainSection)
    parallel: ParallelSection | None = None
    privacy: PrivacySection = Field(default_factory=PrivacySection)

    @field_validator("compression")
    @classmethod
    def _known_compression(cls, value: str) -> str:
        return str(UpdateCompression.parse(value))  # canonical: trainers parse the same text

    @model_validator(mode="after")
    def _consistent(self) -> JobSpec:
        if self.min_clients > self.clients_per_round:
            raise ValueError("min_clients cannot exceed clients_per_round")
        if self.parallel is not None and (self.flower_app or self.model.framework != "torch"):
            raise ValueError("parallel: trains the built-in torch models only")
        if self.parallel is not None and self.parallel.spares and self.parallel.mode == "data":
            raise ValueError(
                "parallel.spares: data parallelism needs none (a dead replica is left out)"
            )
        if self.flower_app is None and not self.dataset:
            raise ValueError("dataset: a job of the built-in app names the data it trains on")
        if self.flower_app is not None and self.compression != "none":
            # a Flower app's own strategy writes the train config that would carry the scheme
            raise ValueError("compression: applies to jobs of the built-in app only")
        self._privacy_consistent()
        return self

    def _privacy_consistent(self) -> None:
        privacy = self.privacy
        if not privacy.enabled:
            return
        if self.flower_app is not None or self.parallel is not None:
            raise ValueError("privacy: applies to federated jobs of the built-in app only")
        what = "secure aggregation" if privacy.secure_aggregation else f"dp = {privacy.dp!r}"
        if self.strategy.name not in MEAN_STRATEGIES:
            raise ValueError(
                f"privacy: {what} needs a mean of the updates (fedavg, fedprox);"
                f" {self.strategy.name} needs each update"
            )
        if privacy.secure_aggregation and self.compression != "none":
            raise ValueError(
                "privacy: secure aggregation masks exact weights; compression must be none"
            )
        if privacy.dp == "client-fixed" and self.compression != "none":
            # a lossy code of a clipped update may exceed the clipping norm again
            raise ValueError('privacy: dp = "client-fixed" needs compression = "none"')
        if privacy.secure_aggregation and self.clients_per_round < 3:
            raise ValueError("privacy: secure aggregation needs clients_per_round ≥ 3")

    def train_config(self) -> ConfigValues:
        """What every trainer gets in the train messages' ConfigRecord."""
        return {
            "dataset": self.dataset,
            **self.model.spec().to_config(),
            "lr": self.train.lr,
            "local-epochs": self.train.local_epochs,
            "batch-size": self.train.batch_size,
            "seed": self.seed,
            "straggler-fraction": self.train.straggler_fraction,
            # trainers stop early enough for their reply to travel before the round closes
            "deadline-s": self.deadline_s * TRAINER_DEADLINE_SHARE,
            # absent unless asked: trainers that predate compression see the same config
            **({"compression": self.compression} if self.compression != "none" else {}),
        }

    def evaluate_config(self) -> ConfigValues:
        return {"dataset": self.dataset, **self.model.spec().to_config()}
