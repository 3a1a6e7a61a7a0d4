"""The Flower apps a trainer serves: local copies its operator allowed, pinned by content hash.

An operator allows an app as (directory, sha256). At startup each copy is hashed; one whose
files no longer match the pin is refused with a logged error and never imported, so a
trainer runs only the code its operator looked at. A served app's key is
`flower:<name>@<sha256>` (`hivenode.models.flower_app.app_key`): the aggregator's requests
name that key, so a trainer whose copy differs answers `unknown_app` instead of running
something else under the same name.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

from hivenode.agent.trainer import ClientAppLike
from hivenode.models.flower_app import (
    FlowerAppError,
    app_key,
    content_hash,
    load_client_app,
    read_flower_app,
)

log = logging.getLogger(__name__)


def allowed_client_apps(entries: Iterable[tuple[Path, str]]) -> dict[str, ClientAppLike]:
    """The ClientApps of the allowed `(app dir, expected sha256)` entries that verify, by key.

    Blocking (hashing, importing): call it off the event loop.
    """
    apps: dict[str, ClientAppLike] = {}
    for root, expected in entries:
        try:
            key, client_app = _verified_client_app(root, expected)
        except FlowerAppError as exc:
            log.error("not serving the Flower app in %s: %s", root, exc)
            continue
        apps[key] = client_app
        log.info("serving Flower app %s from %s", key, root)
    return apps


def _verified_client_app(root: Path, expected: str) -> tuple[str, ClientAppLike]:
    app = read_flower_app(root)
    digest = content_hash(app.root)
    if digest != expected.strip().lower():
        raise FlowerAppError(
            f"its files hash to {digest}, not to the allowed {expected or '(none)'}: the copy "
            "changed since it was allowed; check it, then allow the new hash"
        )
    return app_key(app, digest), load_client_app(app, digest)
