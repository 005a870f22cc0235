"""hubquant: quantized variants of Hub models, in one command.

Python API (heavy modules load on first use):
    hubquant.convert(repo_id, method="gptq", bits=4, push=True, ...)  -> ConvertResult (keywords as the CLI flags)
    hubquant.load(repo_or_path, device=None, dtype=None, *, revision=None, progress=True, log=None)
"""
from __future__ import annotations

import os as _os

__version__ = "0.1.0"
__all__ = ["__version__", "convert", "load"]


def _configure_hub_env() -> None:
    # A Hub that is not the public one (the local Hub, a mirror) does not speak Xet: make
    # huggingface_hub use the plain LFS protocol. Must happen before huggingface_hub is imported.
    endpoint = _os.environ.get("HF_ENDPOINT", "")
    if endpoint and "huggingface.co" not in endpoint:
        _os.environ.setdefault("HF_HUB_DISABLE_XET", "1")


_configure_hub_env()


def __getattr__(name: str):
    # `hubquant.load` is the loader itself (its signature and docstring show in help()); `hubquant.convert` is
    # the hubquant.convert module, which is callable: hubquant.convert("org/model", method="gptq", ...).
    if name == "load":
        from hubquant.runtime.loader import load

        return load
    if name == "convert":
        import importlib

        return importlib.import_module("hubquant.convert")
    raise AttributeError(f"module 'hubquant' has no attribute {name!r}")
