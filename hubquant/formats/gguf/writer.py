"""Write a GGUF file (or gguf-split shards) from a model whose tensors `method.run` quantized.

One file `NAME-PRESET.gguf`; above the size limit, shards named as `gguf-split` names them
(`NAME-PRESET-00001-of-00003.gguf`, with split.no / split.count / split.tensors.count in each and the
metadata in the first), which llama.cpp and Ollama load by the first shard's name.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

from hubquant.errors import UsageError
from hubquant.formats.gguf import mix
from hubquant.formats.gguf.arch import (
    TensorEntry,
    add_hparams,
    add_tokenizer,
    arch_of,
    float_tensor,
    permute_rows,
    tensor_entries,
)
from hubquant.quant import QuantizedWeight

DEFAULT_SPLIT = "48G"  # the Hub takes files up to 50 GB


def parse_size(text: str | int | None) -> int:
    """'48G', '500M', '2000000' -> bytes; 0 or None: no split."""
    if text in (None, "", 0, "0"):
        return 0
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([KMGT]?)B?", str(text).strip().upper())
    if not m:
        raise UsageError(f"--gguf-split-size {text}", hint="use a size such as 48G, 500M or 0 (no split)")
    return int(float(m.group(1)) * 1000 ** "_KMGT".index(m.group(2) or "_"))


def file_stem(model, options: dict) -> str:
    name = options.get("name") or Path(str(getattr(model, "name_or_path", "") or "model")).name or "model"
    return f"{name}-{options.get('gguf_type', mix.DEFAULT_PRESET)}"


def tensor_data(e: TensorEntry, quantized: dict[str, QuantizedWeight], state: dict,
                spec) -> tuple[np.ndarray, str | None]:
    """One tensor's stored array and GGUF type (None: a float array, F32 or F16): a quantized weight's packed
    blocks (rows permuted for llama.cpp's rotary layout where needed), experts' blocks stacked in expert
    order, or the float tensor."""
    parts = e.experts or (e.module,)
    qws = [quantized.get(m) for m in parts] if e.quantizable else [None]
    if all(q is not None for q in qws):
        qtypes = {q.extra["gguf_type"] for q in qws}
        if len(qtypes) != 1:
            raise UsageError(f"{e.gguf}: experts quantized to different types {sorted(qtypes)}",
                             hint="a stacked experts tensor has one GGUF type; report the model")
        blocks = [q.extra["gguf_bytes"].numpy() for q in qws]
        data = np.stack(blocks) if e.experts else blocks[0]
        if e.permute_heads:
            data = permute_rows(data, e.permute_heads)
        return np.ascontiguousarray(data), qtypes.pop()
    if e.experts:
        a = np.stack([state[f"{m}.weight"].detach().float().cpu().numpy() for m in parts])
    else:
        a = float_tensor(e, state[e.param], spec)
    if e.quantizable:  # a weight kept unquantized (ignored, or rows no block divides): F16
        a = a.astype(np.float16)
    return np.ascontiguousarray(a, dtype=a.dtype), None


def open_writer(model, out_dir: Path, options: dict, *, n_imatrix: int):
    """A GGUFWriter with every metadata key (name, file type, architecture, tokenizer, imatrix record), no
    tensors yet. Returns (writer, path of the first file, preset, extra F32 tensors the rope variant needs)."""
    import gguf

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = model.config
    spec = arch_of(config)
    preset = mix.check_preset(options.get("gguf_type", mix.DEFAULT_PRESET))
    path = out_dir / f"{file_stem(model, {**options, 'gguf_type': preset})}.gguf"
    w = gguf.GGUFWriter(path, spec.gguf_arch, split_max_size=parse_size(options.get("split_size", DEFAULT_SPLIT)))
    w.add_name(options.get("name") or Path(str(model.name_or_path)).name)
    w.add_file_type(mix.PRESETS[preset][1])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    extra = add_hparams(w, config, spec)
    add_tokenizer(w, Path(options.get("tokenizer_dir") or model.name_or_path), config)
    if n_imatrix:
        w.add_string("quantize.imatrix.dataset", options.get("imatrix_dataset", "calibration text"))
        w.add_uint32("quantize.imatrix.entries_count", n_imatrix)
    return w, path, preset, extra


def write(model: torch.nn.Module, quantized: dict[str, QuantizedWeight], *, scheme=None, out_dir: Path,
          method: str = "rtn", options: dict | None = None) -> dict:
    """Write the GGUF file(s) into `out_dir`; returns the summary recorded as the variant's quantization config.

    options: gguf_type (preset), split_size ('48G', 0 = never split), tokenizer_dir (default: the model's
    name_or_path), name (file stem), imatrix_dataset (description of the calibration text).
    """
    import gguf

    options = dict(options or {})
    n_imatrix = sum(1 for q in quantized.values() if q.extra.get("imatrix"))
    w, path, preset, extra = open_writer(model, out_dir, options, n_imatrix=n_imatrix)
    spec = arch_of(model.config)
    state = model.state_dict()
    types: dict[str, int] = {}
    stacks: dict[str, int] = {}
    experts = plain = 0
    for e in tensor_entries(model):
        data, qtype = tensor_data(e, quantized, state, spec)
        if e.experts:
            stacks[qtype or "F16"] = stacks.get(qtype or "F16", 0) + 1
            experts += len(e.experts)
            plain += sum(1 for m in e.experts if m in quantized and not quantized[m].extra.get("imatrix"))
        if qtype is None:
            w.add_tensor(e.gguf, data)
            name = "F16" if data.dtype == np.float16 else "F32"
        else:
            w.add_tensor(e.gguf, data, raw_dtype=getattr(gguf.GGMLQuantizationType, qtype))
            name = qtype
        types[name] = types.get(name, 0) + 1
    for name, a in extra.items():
        w.add_tensor(name, a)
    w.write_header_to_file(path)
    w.write_kv_data_to_file()
    w.write_tensors_to_file(progress=False)
    w.close()
    files = sorted(p.name for p in path.parent.glob(f"{path.stem}*.gguf"))
    out = {"quant_method": "gguf", "gguf_type": preset, "files": files, "tensor_types": types,
           "imatrix": bool(n_imatrix), "method": method}
    if stacks:  # mixture of experts: stacked expert tensors by type, expert projections without importance
        out["experts"] = {"stacked_types": stacks, "projections": experts,
                          "without_imatrix": plain if n_imatrix else experts}
    return out
