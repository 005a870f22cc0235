"""What every format writer shares: the float tensors that stay, sharded safetensors, config.json."""
from __future__ import annotations

import copy
import json
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


def save_tensors(tensors: dict[str, torch.Tensor], out_dir: Path, *, max_shard_bytes: int = MAX_SHARD_BYTES) -> list[str]:
    """Write `model.safetensors`, or shards plus `model.safetensors.index.json` above `max_shard_bytes`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {"format": "pt"}
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    if total <= max_shard_bytes:
        save_file(tensors, out_dir / "model.safetensors", metadata=meta)
        return ["model.safetensors"]
    shards, cur, cur_bytes = [], {}, 0
    for key in sorted(tensors):
        t = tensors[key]
        size = t.numel() * t.element_size()
        if cur and cur_bytes + size > max_shard_bytes:
            shards.append(cur)
            cur, cur_bytes = {}, 0
        cur[key] = t
        cur_bytes += size
    shards.append(cur)
    names, weight_map = [], {}
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, out_dir / name, metadata=meta)
        names.append(name)
        weight_map.update({k: name for k in shard})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return names


def write_config(model: torch.nn.Module, out_dir: Path, quantization_config: dict, *, dtype: torch.dtype) -> None:
    """config.json of the base model with `quantization_config` added (the model's own config is untouched)."""
    config = copy.deepcopy(model.config)
    config.quantization_config = quantization_config
    data = config.to_dict()
    data["quantization_config"] = quantization_config
    data["dtype"] = str(dtype).removeprefix("torch.")
    data.pop("torch_dtype", None)
    (out_dir / "config.json").write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def torch_dtype_of(quantized: dict[str, QuantizedWeight], model: torch.nn.Module) -> torch.dtype:
    for qw in quantized.values():
        return qw.scale.dtype
    return next(p.dtype for p in model.parameters() if p.is_floating_point())
