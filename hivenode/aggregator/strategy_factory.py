"""The Flower Message-API strategy a job names, built with the job's schedule."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TypedDict

from flwr.app import ArrayRecord, MetricRecord, RecordDict
from flwr.serverapp.strategy import (
    FedAvg,
    FedMedian,
    FedTrimmedAvg,
    Krum,
    MultiKrum,
    Strategy,
)

from hivenode.aggregator.job_spec import JobSpec
from hivenode.privacy.accountant import GaussianAccountant
from hivenode.privacy.dp_strategy import UNIFORM_WEIGHT_KEY, ClientSideDP, ServerSideDP
from hivenode.privacy.secagg_strategy import SecAggPlus
from hivenode.strategies.fast import FastFedAvg, FastFedProx
from hivenode.strategies.scaffold import Scaffold

MetricsAggregator = Callable[[list[RecordDict], str], MetricRecord]


class _Common(TypedDict):
    fraction_train: float
    fraction_evaluate: float
    min_train_nodes: int
    min_evaluate_nodes: int
    min_available_nodes: int
    train_metrics_aggr_fn: MetricsAggregator
    evaluate_metrics_aggr_fn: MetricsAggregator


@dataclass(frozen=True)
class JobStrategy:
    """The strategy `Strategy.start` runs, and the privacy layers the job reports from."""

    strategy: Strategy
    accountant: GaussianAccountant | None = None
    secagg: SecAggPlus | None = None


def build_job_strategy(
    job: JobSpec,
    trainers: int,
    train_metrics: MetricsAggregator,
    evaluate_metrics: MetricsAggregator,
    initial_control: ArrayRecord | None = None,
    max_weight: float = 1000.0,
) -> JobStrategy:
    """`build_strategy`'s strategy inside the job's privacy layers: SecAgg+ sums the updates,
    Flower's DP wrapper (outermost) clips and noises that mean. `max_weight` bounds a
    trainer's number of examples (SecAgg+ quantizes weights relative to it)."""
    privacy = job.privacy
    inner = build_strategy(job, trainers, train_metrics, evaluate_metrics, initial_control)
    if not privacy.enabled:
        return JobStrategy(inner)
    dp = privacy.dp != "none"
    if dp:
        inner.weighted_by_key = UNIFORM_WEIGHT_KEY
    strategy: Strategy = inner
    secagg = None
    if privacy.secure_aggregation:
        secagg = SecAggPlus(
            inner,
            num_shares=privacy.secagg_num_shares,
            reconstruction_threshold=privacy.secagg_reconstruction_threshold,
            max_weight=max_weight,
            clipping_range=privacy.secagg_clipping_range,
            quantization_range=privacy.secagg_quantization_range,
            timeout=job.deadline_s,
            uniform_weights=dp,
        )
        strategy = secagg
    if not dp:
        return JobStrategy(strategy, secagg=secagg)
    accountant = GaussianAccountant(
        privacy.noise_multiplier, privacy.clipping_norm, privacy.delta, privacy.dp
    )
    sampled = min(job.clients_per_round, trainers)
    wrapper = ServerSideDP if privacy.dp == "server-fixed" else ClientSideDP
    return JobStrategy(wrapper(strategy, accountant, sampled), accountant, secagg)


def build_strategy(
    job: JobSpec,
    trainers: int,
    train_metrics: MetricsAggregator,
    evaluate_metrics: MetricsAggregator,
    initial_control: ArrayRecord | None = None,
) -> FedAvg:
    """The job's strategy sampling `clients_per_round` of `trainers` nodes each round.

    Flower samples int(available × fraction) nodes; the half added here keeps float
    rounding from turning 10 of 30 into 9.
    """
    fraction = min(1.0, (job.clients_per_round + 0.5) / trainers)
    common: _Common = {
        "fraction_train": fraction,
        "fraction_evaluate": job.evaluate_fraction,
        "min_train_nodes": job.min_clients,
        "min_evaluate_nodes": 1 if job.evaluate_fraction > 0 else 0,
        "min_available_nodes": job.min_clients,
        "train_metrics_aggr_fn": train_metrics,
        "evaluate_metrics_aggr_fn": evaluate_metrics,
    }
    options = job.strategy
    match options.name:
        case "fedavg":
            return FastFedAvg(**common)
        case "fedprox":
            return FastFedProx(**common, proximal_mu=options.mu)
        case "scaffold":
            return Scaffold(
                trainers,
                global_lr=options.global_lr,
                initial_control=initial_control,
                **common,
            )
        case "fedmedian":
            return FedMedian(**common)
        case "fedtrimmedavg":
            return FedTrimmedAvg(**common, beta=options.beta)
        case "krum":
            return Krum(**common, num_malicious_nodes=options.malicious)
        case "multikrum":
            # Flower's default keeps 1 update, i.e. Krum; keep the ones not flagged malicious
            keep = max(1, job.clients_per_round - options.malicious)
            return MultiKrum(
                **common, num_malicious_nodes=options.malicious, num_nodes_to_select=keep
            )
    raise AssertionError(f"unhandled strategy {options.name}")
