"""`--streaming auto|on|off`: whether this conversion streams."""
from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from hubquant.modeling import auto_class, decoder_layers

STREAMED_METHODS = ("rtn", "gptq", "awq", "smoothquant", "w8a8", "fp8")
STREAMED_FORMATS = ("compressed-tensors", "gptq", "awq", "gguf")
# formats that quantize and write a streamed run themselves: format -> (methods, "module:run_streamed(run, job, out)")
OWN_STREAMED = {"gguf": (("rtn", "imatrix"), "hubquant.formats.gguf.streamed:run_streamed")}


def config_dtype(config) -> torch.dtype:
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def _config_why(config, *, trust_remote_code: bool) -> str:
    """Why the in-memory loader must handle this config (it also raises the errors for unsupported ones)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if getattr(config, "quantization_config", None):
        return "the checkpoint is already quantized"
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and not trust_remote_code:
        return f"model_type {config.model_type} is not a causal language model transformers knows"
    if trust_remote_code:
        return "--trust-remote-code models load through their own code"
    from transformers import AutoModelForCausalLM

    arch = (getattr(config, "architectures", None) or [""])[0]
    if auto_class(config) is not AutoModelForCausalLM and MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[config.model_type] != arch:
        # the causal LM class would drop the vision tower (Qwen3.5-MoE: Qwen3_5MoeForCausalLM)
        return f"{config.model_type} is a vision-language model whose causal LM class has no vision tower"
    return ""


def open_for(mode: str, *, method: str, fmt: str, path: Path, trust_remote_code: bool, log=print):
    """`--streaming MODE` for this conversion: the streamed model's `Weights`, or None for the in-memory path.

    auto streams whenever the method, the format and the checkpoint allow it (the files are the same bytes either
    way, the quality numbers the same up to float summation order) and logs one line saying which path and why; on
    streams or raises UnsupportedError saying why it cannot; off loads the model in memory.
    """
    from transformers import AutoConfig

    from hubquant.errors import UnsupportedError, UsageError
    from hubquant.streaming.checkpoint import open_checkpoint

    if mode not in ("auto", "on", "off"):
        raise UsageError(f"--streaming {mode}", hint="use auto, on or off")
    if mode == "off":
        return None
    why = ""
    methods = OWN_STREAMED[fmt][0] if fmt in OWN_STREAMED else STREAMED_METHODS
    if method not in methods:
        why = f"--method {method} runs on the model in memory (streamed: {', '.join(methods)})"
    elif fmt not in STREAMED_FORMATS:
        why = f"--format {fmt} is written from the model in memory"
    weights = None
    if not why:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        why = _config_why(config, trust_remote_code=trust_remote_code)
    if not why:
        weights, why = open_checkpoint(path, trust_remote_code=trust_remote_code, dtype=config_dtype(config))
    if weights is None:
        if mode == "on":
            raise UnsupportedError(f"cannot stream this conversion: {why}", hint="use --streaming auto or off")
        log(f"loading the whole model in memory: {why}")
        return None
    return_freed_memory()
    cap_kernel_caches()
    log(f"streaming {len(decoder_layers(weights.model))} decoder layers from the checkpoint, one at a time "
        f"(--streaming {mode}: the output is the same bytes as loading the whole model)")
    return weights


def return_freed_memory() -> None:
    """Have glibc give large freed blocks back to the OS at once (its adaptive mmap threshold otherwise keeps
    freed layer-sized blocks on the heap, and the process's resident size grows layer after layer)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD: blocks >= 1 MiB are mmapped and unmapped on free
    libc.mallopt(-1, 1 << 20)  # M_TRIM_THRESHOLD


KERNEL_CACHE_ENTRIES = 64


def cap_kernel_caches(entries: int = KERNEL_CACHE_ENTRIES) -> None:
    """Bound oneDNN's primitive cache and ideep's (torch's CPU bf16/fp16 matmuls) to `entries` kernels each,
    unless the user set them. Each caches a JIT kernel per GEMM shape, 1024 by default, about 0.3 MB each: routed
    experts see a different token count in every layer, so with the defaults a mixture-of-experts conversion grew
    by about 0.07 GB per layer up to 0.6 GB. The kernels and their results are the same; a shape that left the
    cache is compiled again (a fraction of a millisecond). Read by torch when it first runs such a matmul."""
    import os

    for var in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY"):
        os.environ.setdefault(var, str(entries))


def trim_heap() -> None:
    """Give the free pages inside glibc's heap back to the OS (malloc_trim): the small blocks of each layer's work
    (Python objects, tensors under 1 MiB) leave holes that the heap keeps resident, and with GPTQ's churn they
    grew the resident size by about 0.1 GB over 50 layers. Called after each streamed layer (a few ms)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
