"""The local Hub: a Hugging Face Hub-compatible server (Starlette) over durable storage (SQLite + blobs).

`LocalHub(root)` is the Python API (tokens, seeding, gating, publishing, a background server);
`create_app(root)` the ASGI app; `Store` the storage. See shared/HUB_API.md for the protocol.
"""
from __future__ import annotations

from hubquant.localhub.local import LocalHub
from hubquant.localhub.store import Store


def create_app(root):
    """The ASGI app serving the Hub stored at `root` (imports Starlette lazily)."""
    from hubquant.localhub.app import create_app as _create_app

    return _create_app(root)


__all__ = ["LocalHub", "Store", "create_app"]
