"""What every format writer shares: the float tensors that stay, sharded safetensors, config.json."""
from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file

from hubquant.quant import QuantizedWeight

MAX_SHARD_BYTES = 5 * 1024**3


def dense_tensors(model: torch.nn.Module, quantized: dict[str, QuantizedWeight]) -> dict[str, torch.Tensor]:
    """Every parameter and persistent buffer of `model` except the weights of quantized Linears.

    A tied lm_head (tie_word_embeddings) is left out, as transformers' save_pretrained does.
    """
    state = model.state_dict()
    skip = {f"{name}.weight" for name in quantized}
    config = getattr(model, "config", None)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    out = {}
    for key, tensor in state.items():
        if key in skip or (tied and key == "lm_head.weight" and "lm_head" not in quantized):
            continue
        if "rotary_emb" in key:  # recomputed at load, never saved
            continue
        out[key] = tensor.detach().cpu().contiguous()
    return out


class ShardWriter:
    """Safetensors shards written as tensors arrive (one decoder layer at a time, or the whole model at once).

    Tensors are buffered until the next one would push the shard past `max_shard_bytes`; then the shard is
    written. :meth:`close` names the files: one shard is `model.safetensors`; more are
    `model-0000i-of-0000N.safetensors` plus `model.safetensors.index.json`. Within one :meth:`add` call
    tensors are taken in name order, so one call with every tensor shards exactly as :func:`save_tensors`.
    """

    def __init__(self, out_dir: Path, *, max_shard_bytes: int = MAX_SHARD_BYTES):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.max_shard_bytes = max_shard_bytes
        self._cur: dict[str, torch.Tensor] = {}
        self._cur_bytes = 0
        self._written: list[tuple[Path, list[str]]] = []  # temporary file, its tensor names
        self.total_bytes = 0

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        for key in sorted(tensors):
            t = tensors[key]
            size = t.numel() * t.element_size()
            if self._cur and self._cur_bytes + size > self.max_shard_bytes:
                self._flush()
            self._cur[key] = t
            self._cur_bytes += size
            self.total_bytes += size

    def _flush(self) -> None:
        tmp = self.out_dir / f".shard-{len(self._written):05d}.safetensors.partial"
        save_file(self._cur, tmp, metadata={"format": "pt"})
        self._written.append((tmp, list(self._cur)))
        self._cur, self._cur_bytes = {}, 0

    def close(self) -> list[str]:
        """Write what is buffered, name the shards, write the index (more than one shard). Returns file names."""
        if self._cur or not self._written:
            self._flush()
        n = len(self._written)
        if n == 1:
            self._written[0][0].replace(self.out_dir / "model.safetensors")
            return ["model.safetensors"]
        names, weight_map = [], {}
        for i, (tmp, keys) in enumerate(self._written, 1):
            name = f"model-{i:05d}-of-{n:05d}.safetensors"
            tmp.replace(self.out_dir / name)
            names.append(name)
            weight_map.update({k: name for k in keys})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        return names


def save_tensors(tensors: dict[str, torch.Tensor], out_dir: Path, *,
                 max_shard_bytes: int = MAX_SHARD_BYTES) -> list[str]:
    """Write `model.safetensors`, or shards plus `model.safetensors.index.json` above `max_shard_bytes`."""
    writer = ShardWriter(out_dir, max_shard_bytes=max_shard_bytes)
    writer.add(tensors)
    return writer.close()


def write_config(model: torch.nn.Module, out_dir: Path, quantization_config: dict, *, dtype: torch.dtype) -> None:
    """config.json of the base model with `quantization_config` added (the model's own config is untouched)."""
    config = copy.deepcopy(model.config)
    config.quantization_config = quantization_config
    data = config.to_dict()
    data["quantization_config"] = quantization_config
    data["dtype"] = str(dtype).removeprefix("torch.")
    data.pop("torch_dtype", None)
    (out_dir / "config.json").write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def ignored_linears(model: torch.nn.Module, quantized: dict[str, QuantizedWeight]) -> list[str]:
    """Linears of `model` left in float (not in `quantized`), in module order, then the float routers a loader
    would otherwise build as quantized Linears; checkpoint names (hubquant.moe.checkpoint_name)."""
    from hubquant import moe

    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    names = [n for n in linears if n not in quantized]
    names += [n for n in moe.float_module_names(model) if n not in names]
    out = [moe.checkpoint_name(model, n) for n in names]
    # a float Linear whose checkpoint name differs (Phi-MoE's router under block_sparse_moe) is also listed under its
    # module name: transformers' compressed-tensors integration matches the loaded model's names
    return out + [n for n, c in zip(names, out) if c != n and n in linears]


def method_options(method: str, options):
    """`options` as the method's options object (a dict or None is parsed; unknown methods keep the dict)."""
    from hubquant.methods import METHODS

    spec = METHODS.get(method)
    return spec.parse_options(options) if spec is not None else (options or {})


def write_model(model: torch.nn.Module, quantized: dict[str, QuantizedWeight], out_dir: Path, qc: dict, *,
                dtype: torch.dtype, linear_tensors: Callable[[str, QuantizedWeight], dict[str, torch.Tensor]],
                max_shard_bytes: int = MAX_SHARD_BYTES) -> list[str]:
    """The whole-model write every format shares: float tensors + each quantized Linear's tensors (as the
    format names them), sharded safetensors, config.json with `qc`. Returns the safetensors file names."""
    from hubquant import moe

    tensors = dense_tensors(model, quantized)
    for name, qw in quantized.items():
        tensors.update(linear_tensors(name, qw))
    tensors = {moe.checkpoint_name(model, k): v for k, v in tensors.items()}  # Mixtral: block_sparse_moe
    names = save_tensors(tensors, out_dir, max_shard_bytes=max_shard_bytes)
    write_config(model, out_dir, qc, dtype=dtype)
    return names
