"""The Flower Message-API strategy a job names, built with the job's schedule."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypedDict

from flwr.app import ArrayRecord, MetricRecord, RecordDict
from flwr.serverapp.strategy import (
    FedAvg,
    FedMedian,
    FedTrimmedAvg,
    Krum,
    MultiKrum,
)

from hivenode.aggregator.job_spec import JobSpec
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
