"""The `gguf` entry of the format registry: GGUF files for llama.cpp, Ollama and LM Studio.

GGUF's block types carry their own grids, so `hubquant.formats.gguf.method` quantizes (in place of the
method's run) and `writer.write` writes the file(s); the scheme flags (--bits, --group-size) do not apply:
`--gguf-type` picks the llama.cpp preset.
"""
from __future__ import annotations

from hubquant.errors import UsageError
from hubquant.formats.gguf.writer import write  # noqa: F401  (the registry's writer)


def check_scheme(scheme) -> None:
    """Any scheme: GGUF ignores it (the preset decides every tensor's type)."""


def linear_tensors(name, qw, scheme, *, options=None) -> dict:
    raise UsageError("GGUF tensors are written as a whole file, not per Linear", hint="call write()")


def quantization_config(scheme, *, options=None, ignored=()) -> dict:
    opts = dict(options or {})
    return {"quant_method": "gguf", "gguf_type": opts.get("gguf_type", "Q4_K_M")}
