"""What every method receives: the job (scheme, ignore patterns, calibration tokens, parsed options, device)."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from hubquant.methods.options import MethodOptions, parse_options
from hubquant.schemes import QuantScheme

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True, kw_only=True)
class QuantJob:
    """Everything a method needs. `calib` is a LongTensor [n_samples, seq_len] of token ids or None.

    `options` is the method's options object (a dict of its keys is parsed on use, for callers and tests).
    """

    scheme: QuantScheme
    ignore: tuple[str, ...] = ("lm_head",)
    calib: torch.Tensor | None = None
    options: MethodOptions | dict[str, Any] | None = None
    device: str = "cpu"
    progress: bool = True

    def options_as(self, cls: type, method: str):
        """The job's options as `cls` (parsed when given as a dict). Raises UsageError for unknown/bad keys."""
        return parse_options(cls, self.options, method=method)


MethodFn = Callable[["torch.nn.Module", QuantJob], dict]
