"""The peer table: the newest advert per peer, its measured RTT, and expiry after its TTL."""

from __future__ import annotations

import time
from dataclasses import dataclass
from enum import StrEnum

from hivenode.protocol.advert import Advert


class Update(StrEnum):
    NEW = "new"
    NEWER = "newer"
    STALE = "stale"
    EXPIRED = "expired"


@dataclass(frozen=True)
class PeerEntry:
    advert: Advert
    received_at: float
    """Local wall-clock time the advert was published, as far as we can tell: arrival time
    for gossip, arrival minus the age the relaying peer reported for a pulled table."""
    rtt_s: float | None = None

    @property
    def peer_id(self) -> str:
        return self.advert.origin

    def expires_at(self) -> float:
        """TTL counted from local arrival (other clocks may be off), but never more than the
        skew allowance past the advert's own expiry: a relaying peer that lies about an
        advert's age cannot keep a dead peer alive for long."""
        by_arrival = self.received_at + self.advert.ttl
        return min(by_arrival, self.advert.expires_at() + _CLOCK_SKEW_ALLOWANCE_S)


class PeerTable:
    """Newest advert per origin. Expiry uses the advert's TTL from the local arrival time, so
    a peer whose clock is off still expires on time here."""

    def __init__(self, own_peer_id: str) -> None:
        self.own_peer_id = own_peer_id
        self._entries: dict[str, PeerEntry] = {}

    def offer(self, advert: Advert, now: float | None = None, age_s: float = 0.0) -> Update:
        """Keep `advert` if it is newer than what we hold for its origin.

        `age_s`: how long ago the advert was heard where it came from (0 for gossip); a
        relayed advert keeps the rest of its TTL, not a fresh one.
        """
        now = time.time() if now is None else now
        if advert.origin == self.own_peer_id:
            return Update.STALE
        if advert.is_expired(now - _CLOCK_SKEW_ALLOWANCE_S):
            return Update.EXPIRED
        held = self._entries.get(advert.origin)
        if held is not None and held.advert.seq >= advert.seq:
            return Update.STALE
        heard_at = now - min(max(age_s, 0.0), advert.ttl)
        if heard_at + advert.ttl <= now:
            return Update.EXPIRED
        rtt = held.rtt_s if held else None
        self._entries[advert.origin] = PeerEntry(advert, heard_at, rtt)
        return Update.NEW if held is None else Update.NEWER

    def set_rtt(self, peer_id: str, rtt_s: float) -> None:
        if held := self._entries.get(peer_id):
            self._entries[peer_id] = PeerEntry(held.advert, held.received_at, rtt_s)

    def expire(self, now: float | None = None) -> list[str]:
        """Drop peers whose advert outlived its TTL; returns their ids."""
        now = time.time() if now is None else now
        gone = [p for p, e in self._entries.items() if e.expires_at() <= now]
        for peer_id in gone:
            del self._entries[peer_id]
        return gone

    def get(self, peer_id: str) -> PeerEntry | None:
        return self._entries.get(peer_id)

    def entries(self) -> list[PeerEntry]:
        return sorted(self._entries.values(), key=lambda e: e.peer_id)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, peer_id: object) -> bool:
        return peer_id in self._entries


_CLOCK_SKEW_ALLOWANCE_S = 300.0
"""An advert is refused as expired only when even 5 min of clock skew cannot save it."""
