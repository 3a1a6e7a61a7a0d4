"""Job files with a [privacy] section: what is accepted, and what is refused in one line."""

from __future__ import annotations

import tomllib
from typing import Any

import pytest
from pydantic import ValidationError

from hivenode.aggregator.job_spec import JobSpec


def spec(privacy: dict[str, Any], **fields: Any) -> JobSpec:
    values: dict[str, Any] = {
        "name": "p",
        "dataset": "d",
        "rounds": 1,
        "clients_per_round": 5,
        "privacy": privacy,
    }
    values.update(fields)
    return JobSpec.model_validate(values)


def test_a_job_file_with_secure_aggregation_and_client_side_dp_is_read() -> None:
    text = """
    name = "private"
    dataset = "digits"
    rounds = 3
    [privacy]
    secure_aggregation = true
    secagg_num_shares = 5
    secagg_reconstruction_threshold = 3
    dp = "client-fixed"
    noise_multiplier = 1.2
    clipping_norm = 0.5
    delta = 1e-6
    """
    job = JobSpec.model_validate(tomllib.loads(text))
    assert job.privacy.secure_aggregation and job.privacy.dp == "client-fixed"
    assert job.privacy.secagg_num_shares == 5 and job.privacy.delta == 1e-6
    assert not JobSpec(name="plain", dataset="d", rounds=1).privacy.enabled


@pytest.mark.parametrize(
    ("privacy", "fields", "reason"),
    [
        ({"secure_aggregation": True}, {"strategy": {"name": "krum"}}, "krum needs each update"),
        ({"secure_aggregation": True}, {"strategy": {"name": "fedmedian"}}, "fedmedian needs"),
        ({"dp": "server-fixed"}, {"strategy": {"name": "scaffold"}}, "scaffold needs each"),
        ({"secure_aggregation": True}, {"compression": "int8"}, "compression must be none"),
        ({"dp": "client-fixed"}, {"compression": "fp16"}, "needs compression"),
        ({"secure_aggregation": True, "dp": "server-fixed"}, {}, 'use dp = "client-fixed"'),
        ({"secure_aggregation": True}, {"clients_per_round": 2}, "clients_per_round ≥ 3"),
        ({"secagg_num_shares": 2}, {}, "must be > 2"),
        ({"secagg_num_shares": 5, "secagg_reconstruction_threshold": 5}, {}, "less than"),
        ({"dp": "laplace"}, {}, "dp"),
        ({"dp": "server-fixed"}, {"flower_app": "/apps/x", "dataset": ""}, "built-in app"),
    ],
)
def test_invalid_privacy_is_refused(
    privacy: dict[str, Any], fields: dict[str, Any], reason: str
) -> None:
    with pytest.raises(ValidationError, match=reason):
        spec(privacy, **fields)
