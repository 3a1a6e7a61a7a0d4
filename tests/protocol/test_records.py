"""Gossip records: old and new agents read each other, garbage is one ProtocolError."""

from __future__ import annotations

import contextlib

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from hivenode.protocol.advert import Advert, GpuInfo, Hardware, MemoryInfo, Role
from hivenode.protocol.errors import ProtocolError
from hivenode.protocol.limits import MAX_GOSSIP_BYTES


def sample() -> Advert:
    return Advert(
        origin="12D3KooWpeer",
        seq=7,
        timestamp=1.0,
        ttl=90.0,
        roles=(Role.TRAINER, Role.AGGREGATOR),
        addrs=("/ip4/127.0.0.1/tcp/4001",),
        hardware=Hardware(
            memory=MemoryInfo(total_bytes=8 << 30, available_bytes=4 << 30),
            gpus=(GpuInfo(index=0, name="H100", memory_total_bytes=80 << 30),),
        ),
    )


def test_advert_round_trips_through_the_wire() -> None:
    original = sample()
    assert Advert.from_wire(original.to_wire()) == original


def test_unknown_fields_are_ignored_and_missing_ones_default() -> None:
    raw = msgpack.unpackb(sample().to_wire())
    raw["from_a_newer_agent"] = {"anything": [1, 2]}
    raw["hardware"]["cpu"]["new_counter"] = 3
    del raw["addrs"], raw["load"]
    decoded = Advert.from_mapping(raw)
    assert decoded.addrs == ()
    assert decoded.roles == (Role.TRAINER, Role.AGGREGATOR)


def test_wrong_types_name_the_field() -> None:
    raw = msgpack.unpackb(sample().to_wire())
    raw["seq"] = "seven"
    with pytest.raises(ProtocolError, match="seq"):
        Advert.from_mapping(raw)


def test_oversized_record_is_refused_on_both_sides() -> None:
    big = sample().model_copy(update={"addrs": ("/ip4/1.2.3.4/tcp/1",) * 5000})
    with pytest.raises(ProtocolError, match="gossip limit"):
        big.to_wire()
    with pytest.raises(ProtocolError, match="exceeds"):
        Advert.from_wire(b"\x80" * (MAX_GOSSIP_BYTES + 1))


def test_gauge_changes_do_not_count_as_new_content() -> None:
    first = sample()
    gauges = first.model_copy(
        update={
            "seq": 8,
            "hardware": first.hardware.model_copy(
                update={
                    "memory": MemoryInfo(total_bytes=8 << 30, available_bytes=1),
                    "disk_free_bytes": 5,
                }
            ),
        }
    )
    assert first.same_content(gauges)
    assert not first.same_content(first.model_copy(update={"roles": (Role.INFERENCE,)}))


@given(st.binary(max_size=2048))
def test_random_bytes_raise_only_protocol_error(data: bytes) -> None:
    with contextlib.suppress(ProtocolError):
        Advert.from_wire(data)


@given(st.integers(min_value=0, max_value=400))
def test_every_truncation_raises_only_protocol_error(cut: int) -> None:
    wire = sample().to_wire()
    with contextlib.suppress(ProtocolError):
        Advert.from_wire(wire[:cut])
