"""`--streaming auto|on|off`: whether this conversion streams, and the pipeline's streamed quantize stage."""
from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from hubquant.formats.shards import Checkpoint
from hubquant.modeling import decoder_layers

STREAMED_METHODS = ("rtn", "gptq", "awq", "smoothquant", "w8a8", "fp8")
STREAMED_FORMATS = ("compressed-tensors", "gptq", "awq")


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
    return ""


def open_for(mode: str, *, method: str, fmt: str, path: Path, trust_remote_code: bool, log=print):
    """`--streaming MODE` for this conversion: the streamed model's `Weights`, or None for the in-memory path.

    auto streams when the model's weights exceed AUTO_FRACTION of the available memory and the method, the format
    and the checkpoint allow it (the files are the same bytes either way); it logs one line saying which path and
    why. on streams any size or raises UnsupportedError saying why it cannot; off loads the model in memory.
    """
    from transformers import AutoConfig

    from hubquant.errors import UnsupportedError, UsageError

    from hubquant.streaming.checkpoint import open_checkpoint

    if mode not in ("auto", "on", "off"):
        raise UsageError(f"--streaming {mode}", hint="use auto, on or off")
    if mode == "off":
        return None
    why = ""
    if method not in STREAMED_METHODS:
        why = f"--method {method} runs on the model in memory (streamed: {', '.join(STREAMED_METHODS)})"
    elif fmt not in STREAMED_FORMATS:
        why = f"--format {fmt} is written from the model in memory"
    weights = None
    if not why:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        why = _config_why(config, trust_remote_code=trust_remote_code)
    if not why and mode == "auto":
        size, free = model_bytes(path), available_bytes()
        if size < AUTO_FRACTION * free:
            log(f"loading the whole model in memory: its {size / 1e9:.2f} GB of weights fit in "
                f"{AUTO_FRACTION:.0%} of the {free / 1e9:.1f} GB available (--streaming on streams any size)")
            return None
    if not why:
        weights, why = open_checkpoint(path, trust_remote_code=trust_remote_code, dtype=config_dtype(config))
    if weights is None:
        if mode == "on":
            raise UnsupportedError(f"cannot stream this conversion: {why}", hint="use --streaming auto or off")
        log(f"loading the whole model in memory: {why}")
        return None
    return_freed_memory()
    log(f"streaming {len(decoder_layers(weights.model))} decoder layers from the checkpoint, one at a time "
        f"(--streaming {mode}: " + ("the model's weights exceed a quarter of the available memory; " if mode == "auto"
                                    else "") + "the output is the same bytes as loading the whole model)")
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


def run_streamed(run, job, out_dir: Path) -> None:
    """The pipeline's quantize stage for a streamed run (hubquant.stages.Run): quantize and write into `out_dir`,
    keeping the evaluation activations for the evaluate and leak-check stages."""
    from hubquant.streaming.activations import eval_streams
    from hubquant.streaming.session import quantize_and_write

    run.out_dir = out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    run.streams = eval_streams(run.weights, run.eval_set, run.leak_docs, run.tokenizer, run.device, run.opts.progress)
    done = quantize_and_write(run.weights, job, method=run.opts.method, fmt=run.plan.format, out_dir=out_dir,
                              streams=run.streams, method_options=run.opts.method_options, log=run.log)
    run.quantized, run.quant_config, run.routing = done.quantized, done.qc, done.routing


AUTO_FRACTION = 0.25  # --streaming auto streams models whose weights exceed this share of the available memory


def model_bytes(path: Path) -> int:
    return sum(e.nbytes for e in Checkpoint(path).entries.values())


def available_bytes() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62
