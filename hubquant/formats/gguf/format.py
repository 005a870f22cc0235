"""The `gguf` entry of the format registry: GGUF files for llama.cpp, Ollama and LM Studio.

GGUF's block types carry their own grids, so `hubquant.formats.gguf.method` quantizes (in place of the
method's run) and `writer.write` writes the file(s); the scheme flags (--bits, --group-size) do not apply:
`--gguf-type` picks the llama.cpp preset. `settings`, `run_options` and `card` are the pipeline's hooks for a
format with grids of its own (see hubquant.formats).
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


def settings(opts) -> dict:
    """--gguf-type (checked, default Q4_K_M) and --gguf-split-size, as the settings hash sees them."""
    from hubquant.formats.gguf.mix import DEFAULT_PRESET, check_preset

    return {"gguf_type": check_preset(opts.gguf_type or DEFAULT_PRESET), "gguf_split_size": opts.gguf_split_size}


def run_options(run) -> dict:
    """What `method.quantize_for_format` and `writer.write` take from a pipeline run (hubquant.stages.Run)."""
    opts = run.opts
    out = {"gguf_type": opts.gguf_type, "split_size": opts.gguf_split_size, "tokenizer_dir": str(run.path),
           "name": run.plan.base.name, "imatrix_dataset": run.calib.description if run.calib is not None else None}
    return {k: v for k, v in out.items() if v is not None}


def card(run) -> dict:
    """The card in GGUF's words: the type mix, and the section with files per memory budget and commands."""
    from hubquant.formats.gguf.card import card_section, describe
    from hubquant.formats.gguf.writer import DEFAULT_SPLIT, parse_size
    from hubquant.plan import default_target

    plan = run.plan
    repo = plan.target or default_target(plan.base.name, "local", plan.scheme, run.opts.method, plan.format)
    split = parse_size(run.opts.gguf_split_size if run.opts.gguf_split_size is not None else DEFAULT_SPLIT)
    return {"weights_desc": describe(run.quant_config), "hardware_key": "gguf",
            "scheme_name": f"GGUF {run.quant_config.get('gguf_type', 'Q4_K_M')}",
            "acts_desc": "not quantized (llama.cpp computes in its own float types)",
            "extra_markdown": card_section(run.model, run.quant_config, run.metrics, repo, split_size=split)}
