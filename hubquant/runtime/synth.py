"""Write quantized checkpoints by hand, byte for byte as FORMATS.md describes them (for tests and benchmarks).

Each Linear weight is quantized with hubquant.quant's min-max RTN (the 4-bit compressed-tensors path through
hubquant_kernels' RTN quantize+pack kernel on GPU), then laid out as the format stores it. This is independent
of hubquant's format writers, so loader tests can check both against the same reference.
"""
from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch

from hubquant.errors import UsageError
from hubquant.quant import WeightScheme, dequantize, quantize, rtn_quantize
from hubquant_kernels.pack import pack_rows, rtn_pack

KINDS = ("bf16", "ct-w4a16", "ct-w4a16-asym", "ct-w8a8", "ct-fp8", "ct-fp8-static", "gptq", "gptq-actorder", "awq")
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
_SHIFTS = torch.arange(0, 32, 4, dtype=torch.int64)


def _args(num_bits, type_, strategy, symmetric, *, group_size=None, dynamic=False):
    return {"actorder": None, "block_structure": None, "dynamic": dynamic, "group_size": group_size,
            "num_bits": num_bits, "observer": None if dynamic else "minmax", "observer_kwargs": {},
            "scale_dtype": None, "strategy": strategy, "symmetric": symmetric, "type": type_,
            "zp_dtype": None if symmetric or type_ == "float" else "torch.int8"}


def quantization_config(kind: str, group_size: int, ignore: list[str]) -> dict | None:
    """config.json's quantization_config for `kind` (None for float)."""
    if kind == "bf16":
        return None
    if kind.startswith("gptq"):
        return {"quant_method": "gptq", "bits": 4, "group_size": group_size, "desc_act": kind == "gptq-actorder",
                "sym": True, "damp_percent": 0.01, "true_sequential": True, "checkpoint_format": "gptq",
                "format": "gptq", "meta": {"quantizer": ["hubquant-synth"]}}
    if kind == "awq":
        return {"quant_method": "awq", "zero_point": True, "group_size": group_size, "bits": 4, "version": "gemm",
                "modules_to_not_convert": None}
    acts = None
    if kind == "ct-w4a16" or kind == "ct-w4a16-asym":
        sym = kind == "ct-w4a16"
        g = group_size != -1
        weights = _args(4, "int", "group" if g else "channel", sym, group_size=group_size if g else None)
        fmt = "pack-quantized"
    elif kind == "ct-w8a8":
        weights, fmt = _args(8, "int", "channel", True), "int-quantized"
        acts = _args(8, "int", "token", True, dynamic=True)
    else:
        static = kind == "ct-fp8-static"
        weights, fmt = _args(8, "float", "tensor" if static else "channel", True), "float-quantized"
        acts = _args(8, "float", "tensor" if static else "token", True, dynamic=not static)
    return {"config_groups": {"group_0": {"format": fmt, "targets": ["Linear"], "weights": weights,
                                          "input_activations": acts, "output_activations": None}},
            "format": fmt, "global_compression_ratio": None, "ignore": sorted(ignore), "kv_cache_scheme": None,
            "quant_method": "compressed-tensors", "quantization_status": "compressed", "sparsity_config": {},
            "transform_config": {}, "version": "0.19.0"}


def _pack_cols(u: torch.Tensor, order=tuple(range(8))) -> torch.Tensor:
    """Unsigned codes [R, C] -> int32 [R, C/8], column 8c + order[i] in nibble i."""
    r, c = u.shape
    g = u.to(torch.int64).reshape(r, c // 8, 8)[:, :, list(order)]
    v = (g << _SHIFTS.to(u.device)).sum(-1) & 0xFFFFFFFF
    return torch.where(v >= (1 << 31), v - (1 << 32), v).to(torch.int32)


def quantize_linear(name: str, w: torch.Tensor, kind: str, group_size: int, *, input_scale: float = 0.05,
                    dequantized: bool = True) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """The checkpoint tensors of one Linear (keys `name.<tensor>`) and the float32 weight they dequantize to
    (None when `dequantized` is False: big models)."""
    n, k = w.shape
    dt = w.dtype
    if kind in ("ct-w4a16", "ct-w4a16-asym"):
        sym = kind == "ct-w4a16"
        packed, scale, zp = rtn_pack(w, group_size, sym, dt)
        t = {"weight_packed": packed, "weight_scale": scale, "weight_shape": torch.tensor([n, k])}
        if zp is not None:
            t["weight_zero_point"] = pack_rows(zp.t().contiguous()).t().contiguous()
        from hubquant_kernels.pack import unpack_rows

        deq = dequantize(unpack_rows(packed, k), scale, zp, group_size) if dequantized else None
    elif kind == "ct-w8a8":
        qw = rtn_quantize(w, WeightScheme(bits=8, group_size=-1), scale_dtype=dt)
        t = {"weight": qw.qweight, "weight_scale": qw.scale}
        deq = qw.dequantize()
    elif kind in ("ct-fp8", "ct-fp8-static"):
        static = kind == "ct-fp8-static"
        amax = w.float().abs().amax(dim=1, keepdim=True)
        if static:
            amax = amax.amax().reshape(1, 1)
        s = torch.where(amax > 0, amax / 448.0, torch.full_like(amax, 1e-8)).to(dt)
        q = (w.float() / s.float()).clamp(-448, 448).to(torch.float8_e4m3fn)
        t = {"weight": q, "weight_scale": s.reshape(1) if static else s}
        if static:
            t["input_scale"] = torch.tensor([input_scale], dtype=dt)
        deq = q.float() * s.float()
    elif kind.startswith("gptq"):
        gs = k if group_size == -1 else group_size
        perm = torch.randperm(k, generator=torch.Generator().manual_seed(n * 7 + k)).to(w.device) \
            if kind == "gptq-actorder" else torch.arange(k, device=w.device)
        scheme = WeightScheme(bits=4, group_size=gs, symmetric=True)
        qw = rtn_quantize(w[:, perm], scheme, scale_dtype=torch.float16)
        q = torch.empty_like(qw.qweight)
        q[:, perm] = qw.qweight
        g_idx = torch.empty(k, dtype=torch.int32, device=w.device)
        g_idx[perm] = (torch.arange(k, device=w.device) // gs).to(torch.int32)
        u = (q.to(torch.int32) + 8).t().contiguous()  # [K, N]
        t = {"qweight": _pack_cols(u.t().contiguous()).t().contiguous(),  # packed along K
             "qzeros": torch.full((qw.scale.shape[1], n // 8), 0x77777777, dtype=torch.int32, device=w.device),
             "scales": qw.scale.t().contiguous(), "g_idx": g_idx}
        deq = torch.empty(n, k, device=w.device)
        deq[:, perm] = qw.dequantize()
    elif kind == "awq":
        scheme = WeightScheme(bits=4, group_size=group_size, symmetric=False)
        scale, zp = _minmax(w, scheme)
        q = quantize(w, scale, zp, scheme)
        u = (q.to(torch.int32) + 8).t().contiguous()  # [K, N]
        z = (zp.to(torch.int32) + 8).t().contiguous()  # [G, N]
        t = {"qweight": _pack_cols(u, AWQ_ORDER), "qzeros": _pack_cols(z, AWQ_ORDER), "scales": scale.t().contiguous()}
        deq = dequantize(q, scale, zp, group_size)
    else:
        raise UsageError(f"unknown synthetic kind {kind!r}", hint=f"use one of {', '.join(KINDS)}")
    return {f"{name}.{key}": v.contiguous() for key, v in t.items()}, (deq if dequantized else None)


def _minmax(w, scheme):
    from hubquant.quant import minmax_qparams

    return minmax_qparams(w, scheme, scale_dtype=torch.float16)


def write_variant(out_dir: Path, config: dict, tensors: Iterable[tuple[str, torch.Tensor]], linears: set[str],
                  kind: str, *, group_size: int = 128, ignore: tuple[str, ...] = ("lm_head",),
                  shard_bytes: int = 4 << 30, keep_dequantized: bool = True) -> dict[str, torch.Tensor]:
    """Write a checkpoint folder: quantized `linears` (module names) per `kind`, every other tensor as is.

    Args:
        out_dir: folder to create (config.json + model.safetensors, or shards + index past `shard_bytes`).
        config: the float model's config dict (quantization_config is added).
        tensors: (name, tensor) pairs of the float state dict; may be a generator (big models).
        linears: module names whose `.weight` is quantized (minus `ignore`).
        kind: one of KINDS. group_size: 4-bit group size (-1 per channel).

    Returns:
        {module name: float32 weight the quantized tensors dequantize to} for quantized Linears (on CPU).
    """
    from safetensors.torch import save_file

    if kind not in KINDS:
        raise UsageError(f"unknown synthetic kind {kind!r}", hint=f"use one of {', '.join(KINDS)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    shard: dict[str, torch.Tensor] = {}
    size, n_shard = 0, 0
    shard_keys: list[list[str]] = []
    deq_all: dict[str, torch.Tensor] = {}
    skipped = []

    def flush():
        nonlocal shard, size, n_shard
        if shard:
            save_file(shard, str(out_dir / f"shard-{n_shard}.tmp"), metadata={"format": "pt"})
            shard_keys.append(list(shard))
            n_shard += 1
            shard, size = {}, 0

    for key, v in tensors:
        mod = key[: -len(".weight")] if key.endswith(".weight") else None
        if kind != "bf16" and mod in linears and not any(mod == i or mod.endswith("." + i) for i in ignore):
            out, deq = quantize_linear(mod, v, kind, group_size, dequantized=keep_dequantized)
            if deq is not None:
                deq_all[mod] = deq.cpu()
        else:
            if mod in linears:
                skipped.append(mod)
            out = {key: v}
        for k2, v2 in out.items():
            shard[k2] = v2.detach().cpu().contiguous()
            size += v2.numel() * v2.element_size()
        if size >= shard_bytes:
            flush()
    flush()
    # the Hub's names: model.safetensors, or numbered shards + index (what transformers and vLLM look for)
    if n_shard == 1:
        (out_dir / "shard-0.tmp").rename(out_dir / "model.safetensors")
    else:
        weight_map = {}
        for i, keys in enumerate(shard_keys):
            name = f"model-{i + 1:05d}-of-{n_shard:05d}.safetensors"
            (out_dir / f"shard-{i}.tmp").rename(out_dir / name)
            weight_map.update({k: name for k in keys})
        (out_dir / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    cfg = dict(config)
    qc = quantization_config(kind, group_size, sorted(set(skipped)))
    if qc is not None:
        cfg["quantization_config"] = qc
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2, default=str))
    return deq_all


def write_model_variant(model: torch.nn.Module, out_dir: Path, kind: str, *, group_size: int = 128,
                        tokenizer=None) -> dict[str, torch.Tensor]:
    """`write_variant` for an in-memory transformers model (tests): returns the dequantized weights."""
    linears = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    seen: set[int] = set()
    state = []
    for key, v in model.state_dict().items():  # tied weights (embeddings / lm_head) are saved once
        if v.data_ptr() in seen:
            continue
        seen.add(v.data_ptr())
        state.append((key, v))
    deq = write_variant(out_dir, model.config.to_dict(), state, linears, kind, group_size=group_size)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    return deq
