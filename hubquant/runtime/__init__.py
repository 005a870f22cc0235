"""Run hubquant variants: `load(repo_or_path)` builds the model on hubquant's kernels (torch references on CPU)."""
from __future__ import annotations

from hubquant.runtime.loader import load

__all__ = ["load"]
