"""Per-tensor GGUF types of llama.cpp's presets (llama-quantize's `llama_tensor_get_type`), for the presets
hubquant writes: Q8_0, Q6_K, Q5_K_M, Q4_K_M, Q4_0, Q3_K_M, Q2_K.

The `_M` presets give sensitive tensors more bits: the output (and tied token embeddings) Q6_K, attn_v and
ffn_down of the first and last eighth of the layers and every third layer between Q6_K (Q4_K_M, Q5_K_M),
and so on. A row length the chosen type's block does not divide falls back as llama.cpp does:
Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0, Q2_K/Q3_K -> Q4_0 (K-quants need rows of 256).

A fused attn_qkv (Phi-3) follows the attn_v rules, as llama.cpp's tensor categories put it with attn_v.

Mixtures of experts: the stacked experts (`ffn_*_exps`) and shared experts (`ffn_*_shexp`) follow the ffn
rules of their layer (the layer read from the name, as llama.cpp does with experts); DeepSeek's `attn_kv_b`
counts as an attn_v tensor; with exactly 8 experts (Mixtral-style) attn_v and attn_k are Q8_0 and attn_output
Q5_K in the Q2_K, Q3_K_M and Q4_K_M presets.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from hubquant.errors import UsageError
from hubquant.formats.gguf.blocks import TYPES

# preset -> (default tensor type, general.file_type value of gguf.LlamaFileType)
PRESETS: dict[str, tuple[str, int]] = {
    "Q8_0": ("Q8_0", 7),
    "Q6_K": ("Q6_K", 18),
    "Q5_K_M": ("Q5_K", 17),
    "Q4_K_M": ("Q4_K", 15),
    "Q4_0": ("Q4_0", 2),
    "Q3_K_M": ("Q3_K", 12),
    "Q2_K": ("Q2_K", 10),
}
DEFAULT_PRESET = "Q4_K_M"
FALLBACK = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0", "Q2_K": "Q4_0", "Q3_K": "Q4_0"}


def check_preset(name: str) -> str:
    key = name.upper()
    if key not in PRESETS:
        raise UsageError(f"unknown --gguf-type {name}", hint=f"use one of {', '.join(PRESETS)}")
    return key


@dataclass(frozen=True)
class ModelShape:
    n_layer: int
    n_gqa: int  # query heads per key/value head
    tied_embeddings: bool
    n_expert: int = 0


def _use_more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def _category(name: str) -> str:
    if name == "output.weight":
        return "output"
    if name == "token_embd.weight":
        return "token_embd"
    # llama.cpp's tensor_get_category: attention tensors by their full name, ffn ones by substring
    for cat, key in (("attn_qkv", "attn_qkv.weight"), ("attn_v", "attn_kv_b.weight"), ("attn_v", "attn_v.weight"),
                     ("attn_k", "attn_k.weight"), ("attn_q", "attn_q.weight"), ("attn_output", "attn_output.weight"),
                     ("ffn_up", "ffn_up"), ("ffn_gate", "ffn_gate"), ("ffn_down", "ffn_down")):
        if key in name:
            return cat
    return "other"


def _layer(name: str) -> int:
    m = re.match(r"blk\.(\d+)\.", name)
    return int(m.group(1)) if m else 0


def _preset_type(preset: str, base: str, name: str, cols: int, shape: ModelShape, state: dict,
                 has_imatrix: bool) -> str:
    """llama.cpp's choice for one tensor before the shape fallback (`state` counts attn_v tensors seen)."""
    cat = _category(name)
    n = shape.n_layer
    if cat == "output" or (shape.tied_embeddings and cat == "token_embd"):
        if cols % TYPES[base].block:
            return "Q8_0"
        return base if base == "Q8_0" else "Q6_K"
    if cat in ("attn_v", "attn_qkv"):
        i = state["attn_v"]
        state["attn_v"] += 1
        if shape.n_expert == 8:  # llama.cpp: "for the 8-expert model, bumping this to Q8_0 trades just ~128MB"
            return "Q8_0"
        if preset == "Q2_K":
            return "Q4_K" if shape.n_gqa >= 4 else "Q3_K"
        if preset == "Q3_K_M":
            return "Q5_K" if i < 2 else "Q4_K"
        if preset in ("Q4_K_M", "Q5_K_M") and _use_more_bits(i, state["n_attn_v"]):
            return "Q6_K"
        return base
    if cat == "attn_k" and shape.n_expert == 8:
        return "Q8_0"
    if cat == "ffn_down":
        i = _layer(name)
        if preset == "Q2_K":
            return "Q3_K"
        if preset == "Q3_K_M":
            return "Q5_K" if i < n // 16 else "Q4_K"
        if preset in ("Q4_K_M", "Q5_K_M") and _use_more_bits(i, n):
            return "Q6_K"
        if preset == "Q4_0" and has_imatrix and i < n // 8:
            return "Q4_1"
        return base
    if cat == "attn_output":
        if shape.n_expert == 8:
            return "Q5_K" if preset in ("Q2_K", "Q3_K_M", "Q4_K_M") else base
        return {"Q2_K": "Q3_K", "Q3_K_M": "Q4_K"}.get(preset, base)
    return base


def plan(tensors: list[tuple[str, int]], preset: str, shape: ModelShape, *,
         has_imatrix: bool = False) -> dict[str, str]:
    """GGUF type of every quantized tensor: `tensors` is [(gguf name, row length)] in file order."""
    preset = check_preset(preset)
    base = PRESETS[preset][0]
    state = {"attn_v": 0, "n_attn_v": sum(_category(n) in ("attn_v", "attn_qkv") for n, _ in tensors)}
    out = {}
    for name, cols in tensors:
        t = _preset_type(preset, base, name, cols, shape, state, has_imatrix)
        if cols % TYPES[t].block:
            t = FALLBACK.get(t, t)
        if cols % TYPES[t].block:
            t = "F16"
        out[name] = t
    return out
