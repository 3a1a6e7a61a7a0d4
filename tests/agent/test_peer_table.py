"""The peer table keeps the newest advert per origin and forgets peers after their TTL."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from hivenode.agent.peer_table import PeerTable, Update
from hivenode.protocol.advert import Advert

NOW = 1_800_000_000.0


def advert(origin: str, seq: int, timestamp: float = NOW, ttl: float = 30.0) -> Advert:
    return Advert(origin=origin, seq=seq, timestamp=timestamp, ttl=ttl)


def test_newer_sequence_replaces_older_and_replays_are_stale() -> None:
    table = PeerTable("me")
    assert table.offer(advert("a", 5), NOW) is Update.NEW
    assert table.offer(advert("a", 6), NOW) is Update.NEWER
    assert table.offer(advert("a", 6), NOW) is Update.STALE
    assert table.offer(advert("a", 4), NOW) is Update.STALE
    entry = table.get("a")
    assert entry is not None and entry.advert.seq == 6


def test_own_adverts_are_never_stored() -> None:
    table = PeerTable("me")
    assert table.offer(advert("me", 1), NOW) is Update.STALE
    assert "me" not in table


def test_expired_advert_is_refused_even_allowing_for_clock_skew() -> None:
    table = PeerTable("me")
    old = advert("a", 1, timestamp=NOW - 3600, ttl=30)
    assert table.offer(old, NOW) is Update.EXPIRED
    slightly_behind = advert("b", 1, timestamp=NOW - 60, ttl=30)  # a clock 1 min slow
    assert table.offer(slightly_behind, NOW) is Update.NEW


def test_peer_expires_ttl_after_local_arrival() -> None:
    table = PeerTable("me")
    table.offer(advert("a", 1, ttl=30), NOW)
    assert table.expire(NOW + 29) == []
    assert table.expire(NOW + 30) == ["a"]
    assert len(table) == 0


def test_rtt_survives_a_newer_advert() -> None:
    table = PeerTable("me")
    table.offer(advert("a", 1), NOW)
    table.set_rtt("a", 0.004)
    table.offer(advert("a", 2), NOW + 1)
    entry = table.get("a")
    assert entry is not None and entry.rtt_s == 0.004


@given(
    st.lists(
        st.tuples(st.sampled_from(["a", "b", "c"]), st.integers(min_value=0, max_value=50)),
        max_size=60,
    )
)
def test_any_delivery_order_keeps_the_maximum_sequence_per_origin(
    deliveries: list[tuple[str, int]],
) -> None:
    table = PeerTable("me")
    for origin, seq in deliveries:
        table.offer(advert(origin, seq), NOW)
    expected: dict[str, int] = {}
    for origin, seq in deliveries:
        expected[origin] = max(seq, expected.get(origin, -1))
    assert {e.peer_id: e.advert.seq for e in table.entries()} == expected


def test_a_relayed_advert_keeps_only_the_rest_of_its_ttl() -> None:
    table = PeerTable("me")
    table.offer(advert("a", 1, ttl=30), NOW, age_s=20)
    assert table.expire(NOW + 9) == []
    assert table.expire(NOW + 10) == ["a"]
    assert table.offer(advert("b", 1, ttl=30), NOW, age_s=45) is Update.EXPIRED


def test_a_relayer_lying_about_age_cannot_outlive_the_adverts_own_expiry() -> None:
    table = PeerTable("me")
    stale = advert("a", 1, timestamp=NOW - 200, ttl=30)  # expired 170 s ago by its own clock
    table.offer(stale, NOW, age_s=0)  # accepted: within the clock-skew allowance
    entry = table.get("a")
    assert entry is not None
    assert entry.expires_at() <= stale.expires_at() + 300
