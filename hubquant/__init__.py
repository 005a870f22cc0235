"""hubquant: quantized variants of Hub models, in one command."""
from __future__ import annotations

import os as _os

__version__ = "0.1.0"


def _configure_hub_env() -> None:
    # A Hub that is not the public one (the local Hub, a mirror) does not speak Xet: make
    # huggingface_hub use the plain LFS protocol. Must happen before huggingface_hub is imported.
    endpoint = _os.environ.get("HF_ENDPOINT", "")
    if endpoint and "huggingface.co" not in endpoint:
        _os.environ.setdefault("HF_HUB_DISABLE_XET", "1")


_configure_hub_env()


def load(repo_or_path: str, *args, **kwargs):
    """Load any variant hubquant writes and run it with hubquant's kernels (see hubquant.runtime.loader.load)."""
    from hubquant.runtime.loader import load as _load

    return _load(repo_or_path, *args, **kwargs)
