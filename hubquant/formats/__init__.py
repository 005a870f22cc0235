"""Output formats: each writer decides bytes and names for the tensors a method produced.

A writer has the signature of `FormatFn`:

    write(model, quantized: dict[str, QuantizedWeight], *, scheme: QuantScheme, out_dir: Path,
          method: str, options: dict) -> dict   # the quantization_config written to config.json

It writes the weights (every non-quantized parameter of `model` as is, each quantized Linear in
the format's tensors) as safetensors into `out_dir`, plus config.json with `quantization_config`
(and any side file the format's loaders expect, e.g. quantize_config.json). Tokenizer and
generation files are copied by the pipeline, not by writers.
"""
from __future__ import annotations

import importlib
from typing import Callable

from hubquant.errors import UsageError

FORMATS: dict[str, str] = {
    "compressed-tensors": "hubquant.formats.compressed_tensors:write",
    "gptq": "hubquant.formats.gptq:write",
    "awq": "hubquant.formats.awq:write",
    "bitsandbytes": "hubquant.formats.bnb:write",
}

FormatFn = Callable[..., dict]


def get_format(name: str) -> FormatFn:
    try:
        target = FORMATS[name]
    except KeyError:
        raise UsageError(f"unknown format '{name}'", hint=f"choose one of: {', '.join(FORMATS)}") from None
    mod, fn = target.split(":")
    return getattr(importlib.import_module(mod), fn)
