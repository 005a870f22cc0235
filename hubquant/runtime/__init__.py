"""Run hubquant variants: `load(repo_or_path)` builds the model on hubquant's kernels (torch references on CPU)."""
from __future__ import annotations


def load(repo_or_path, *args, **kwargs):
    """See hubquant.runtime.loader.load (imported lazily: the CLI must not import torch to build its parser)."""
    from hubquant.runtime.loader import load as _load

    return _load(repo_or_path, *args, **kwargs)


__all__ = ["load"]
