"""Output formats: a small explicit registry keyed by the --format string.

A `FormatSpec` holds what the rest of hubquant knows about a format: the schemes it accepts, the pip packages
a user needs to load it, which engines load it, its writer, and its reader for `hubquant.load`. Each format
module provides the same functions, named by the spec (imported on use, so the CLI starts fast):

    check_scheme(scheme) -> None                         # UsageError naming the fix for schemes it cannot hold
    linear_tensors(name, qw, scheme, *, options) -> {tensor name: tensor}   # one quantized Linear's tensors
    quantization_config(scheme, *, options, ignored) -> dict                # config.json's quantization_config
    write(model, quantized, *, scheme, out_dir, method, options) -> dict    # the whole model at once

`write` is `linear_tensors` over every quantized Linear plus the float tensors, through
`hubquant.formats.common.write_model` (a `ShardWriter` that also accepts tensors one layer at a time), then
config.json (and side files, e.g. GPTQ's quantize_config.json). Tokenizer and generation files are copied by
the pipeline, not by writers. Calling a spec writes: ``get_format("gptq")(model, quantized, scheme=..., ...)``.

A format whose grids are its own (GGUF's block types) names a `quantize` function that runs in place of the
method's run (the scheme's group size is then not checked), and its module also provides:

    settings(opts) -> dict            # its own ConvertOptions (`FormatSpec.options`), checked, defaults filled in
    run_options(run) -> dict          # the options its quantize and write take (hubquant.stages.Run)
    card(run) -> dict                 # CardInputs fields it words itself (e.g. extra_markdown, its own section)
"""
from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from hubquant.errors import UsageError

if TYPE_CHECKING:
    from hubquant.schemes import QuantScheme


def _resolve(target: str):
    mod, attr = target.split(":")
    return getattr(importlib.import_module(mod), attr)


@dataclass(frozen=True, kw_only=True)
class FormatSpec:
    """One format's registry entry. `module` holds the functions listed in this package's docstring."""

    name: str
    title: str
    quant_method: str  # config.json's quantization_config.quant_method
    module: str  # "hubquant.formats.gptq"
    extras: tuple[str, ...] = ()  # pip packages a transformers user needs beside transformers (for the card)
    engines: tuple[tuple[str, str], ...] = ()  # (engine, exact command; {repo} = the variant) for the card's table
    loader_note: str = ""  # what the card says about the loader transformers needs for this format
    reader: str | None = None  # "module:function" building a runtime module per Linear for hubquant.load
    # "module:function" for formats whose grids are their own (GGUF's block types): it quantizes instead of the
    # method's run, as quantize(model, job, *, method, options, log) -> {module name: QuantizedWeight}
    quantize: str | None = None
    options: tuple[str, ...] = ()  # ConvertOptions fields only this format reads (refused with any other format)
    repo_suffix: str | None = None  # default target {model}-{suffix}: one repo per base holds every variant
    copy_base_files: bool = True  # the base's tokenizer files beside the weights (GGUF carries its own inside)

    def function(self, name: str):
        return _resolve(f"{self.module}:{name}")

    def check_scheme(self, scheme: QuantScheme) -> None:
        """Raise UsageError (with a fix) unless this format can hold `scheme`."""
        self.function("check_scheme")(scheme)

    def writer(self):
        return self.function("write")

    def linear_tensors(self, name: str, qw, scheme: QuantScheme, *, options: Any = None) -> dict:
        return self.function("linear_tensors")(name, qw, scheme, options=options)

    def quantization_config(self, scheme: QuantScheme, *, options: Any = None, ignored=()) -> dict:
        return self.function("quantization_config")(scheme, options=options, ignored=ignored)

    def quantizer(self):
        return _resolve(self.quantize) if self.quantize else None

    @property
    def own_grids(self) -> bool:
        """True when the format quantizes itself (the method's run and the scheme's group size do not apply)."""
        return self.quantize is not None

    def settings(self, opts) -> dict:
        """This format's own options as the settings hash sees them ({} for formats without any)."""
        return self.function("settings")(opts) if self.options else {}

    def run_options(self, run) -> dict:
        """The options a format with its own grids passes to its quantize and write."""
        return self.function("run_options")(run)

    def method_fn(self, method, run):
        """The quantize step as fn(model, job): the method's run, or this format's own quantizer."""
        if not self.own_grids:
            return method.load()
        return functools.partial(self.quantizer(), method=run.opts.method, options=self.run_options(run), log=run.log)

    def write_options(self, run, method_options: Any) -> Any:
        """What the writer takes: the method's parsed options, or a format with its own grids' run options."""
        return self.run_options(run) if self.own_grids else method_options

    def card_fields(self, run) -> dict:
        """CardInputs fields this format words itself ({} for formats that use the scheme's words)."""
        return self.function("card")(run) if self.own_grids else {}

    def load_reader(self):
        if self.reader is None:
            raise UsageError(f"hubquant.load cannot run --format {self.name}",
                             hint=f"load it with transformers (pip install {' '.join(self.extras)})")
        return _resolve(self.reader)

    def __call__(self, model, quantized, *, scheme: QuantScheme, out_dir, method: str, options: Any = None) -> dict:
        """Write the whole model (see the package docstring). Returns the quantization_config."""
        return self.writer()(model, quantized, scheme=scheme, out_dir=out_dir, method=method, options=options)


_GENERATE = ("hubquant", 'hubquant generate {repo} --prompt "Hello"')
_VLLM, _SGLANG = ("vLLM", "vllm serve {repo}"), ("SGLang", "python -m sglang.launch_server --model-path {repo}")

FORMATS: dict[str, FormatSpec] = {f.name: f for f in (
    FormatSpec(
        name="compressed-tensors", title="compressed-tensors", quant_method="compressed-tensors",
        module="hubquant.formats.compressed_tensors", extras=("compressed-tensors",),
        engines=(("transformers", "pip install transformers compressed-tensors"), _VLLM, _SGLANG, _GENERATE),
        reader="hubquant.runtime.loader:build_compressed_tensors"),
    FormatSpec(
        name="gptq", title="GPTQ", quant_method="gptq", module="hubquant.formats.gptq",
        extras=("optimum", "gptqmodel"),
        engines=(("transformers", "pip install transformers optimum gptqmodel"), _VLLM, _SGLANG,
                 ("TGI", "text-generation-launcher --model-id {repo} --quantize gptq"), _GENERATE),
        loader_note="transformers loads GPTQ checkpoints through `gptqmodel` (and `optimum`): without them "
                    "`from_pretrained` stops with an ImportError.",
        reader="hubquant.runtime.loader:build_gptq"),
    FormatSpec(
        name="awq", title="AWQ (GEMM)", quant_method="awq", module="hubquant.formats.awq", extras=("gptqmodel",),
        engines=(("transformers", "pip install transformers gptqmodel"), _VLLM, _SGLANG, _GENERATE),
        loader_note="transformers 5 loads AWQ checkpoints through `gptqmodel` (AutoAWQ is no longer used): "
                    "without it `from_pretrained` stops with an ImportError.",
        reader="hubquant.runtime.loader:build_awq"),
    FormatSpec(
        name="bitsandbytes", title="bitsandbytes", quant_method="bitsandbytes", module="hubquant.formats.bnb",
        extras=("accelerate", "bitsandbytes"),
        engines=(("transformers", "pip install transformers accelerate bitsandbytes"),
                 ("vLLM", "vllm serve {repo} --quantization bitsandbytes"),
                 ("hubquant", 'pip install "hubquant[bnb]" && hubquant generate {repo} --prompt "Hello"')),
        loader_note="transformers runs these weights through `bitsandbytes` (CUDA GPUs, and its CPU backend); "
                    "the quantization settings come from config.json, pass no `BitsAndBytesConfig`."),
    FormatSpec(
        name="gguf", title="GGUF (llama.cpp)", quant_method="gguf", module="hubquant.formats.gguf.format",
        extras=("gguf",), quantize="hubquant.formats.gguf.method:quantize_for_format",
        options=("gguf_type", "gguf_split_size"), repo_suffix="GGUF", copy_base_files=False,
        engines=(("llama.cpp", 'llama-cli -hf {repo} -p "Hello"'), ("Ollama", "ollama run hf.co/{repo}"),
                 ("transformers", 'AutoModelForCausalLM.from_pretrained("{repo}", gguf_file=FILE)')),
        loader_note="transformers reads GGUF with the `gguf` package and dequantizes every tensor to float; "
                    "llama.cpp, Ollama and LM Studio run the quantized blocks."),
    FormatSpec(  # gpt-oss only (docs/moe.md): the layout of OpenAI's own gpt-oss checkpoints
        name="mxfp4", title="MXFP4 (gpt-oss layout)", quant_method="mxfp4", module="hubquant.formats.gptoss_mxfp4",
        engines=(("transformers", "pip install transformers"), _VLLM),
        loader_note="transformers runs the MXFP4 experts with its MXFP4 kernels where they are installed (`pip "
                    "install kernels`, CUDA) and otherwise dequantizes them to bf16 while loading; attention, "
                    "router and embeddings are float."),
)}


def get_format(name: str) -> FormatSpec:
    """The registry entry of `name` (callable: writes the whole model).

    Raises:
        UsageError: an unknown format, listing the known ones.
    """
    try:
        return FORMATS[name]
    except KeyError:
        raise UsageError(f"unknown format '{name}'", hint=f"choose one of: {', '.join(FORMATS)}") from None


def by_quant_method(quant_method: str | None) -> FormatSpec | None:
    """The format whose config.json says `quant_method`, or None."""
    return next((f for f in FORMATS.values() if f.quant_method == quant_method), None)


def resolve_format(method, name: str | None, scheme: QuantScheme) -> FormatSpec:
    """The format to write `method` (a MethodSpec) in: `name`, or the method's first format; checked.

    Raises:
        UsageError: the method cannot be written in that format, or the format cannot hold `scheme`.
    """
    fmt = name or method.formats[0]
    method.check_format(fmt)
    spec = get_format(fmt)
    spec.check_scheme(scheme)
    return spec
