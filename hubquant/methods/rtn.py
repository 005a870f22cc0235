"""Round-to-nearest: min-max ranges per group, no calibration. The baseline every method must beat."""
from __future__ import annotations

import torch
from tqdm.auto import tqdm

from hubquant.methods.base import QuantJob
from hubquant.modeling import decoder_layers, layers_prefix, quantizable_linears
from hubquant.quant import QuantizedWeight, rtn_quantize

ROWS = 256  # output rows quantized at a time: the float temporaries of one block, not of the whole weight


def quantize_linears(linears: dict[str, torch.nn.Linear], job: QuantJob) -> dict[str, QuantizedWeight]:
    """RTN-quantize each Linear in place (weight := dequantized value) and return the codes.

    Every output row has its own groups, so the weight is quantized `ROWS` rows at a time (the same values as
    one call on the whole weight, with a fraction of its float32 temporaries)."""
    out = {}
    for name, lin in linears.items():
        w = lin.weight.data
        deq = torch.empty_like(w)
        parts = []
        for r in range(0, w.shape[0], ROWS):
            qw = rtn_quantize(w[r: r + ROWS].to(job.device), job.scheme.weights, scale_dtype=w.dtype)
            deq[r: r + ROWS] = qw.dequantize(w.dtype).to(w.device)
            parts.append(_to_cpu(qw))
            del qw
        lin.weight.data = deq
        out[name] = _join(parts)
    return out


def _join(parts: list[QuantizedWeight]) -> QuantizedWeight:
    if len(parts) == 1:
        return parts[0]
    zps = [p.zero_point for p in parts]
    return QuantizedWeight(qweight=torch.cat([p.qweight for p in parts]), scale=torch.cat([p.scale for p in parts]),
                           zero_point=None if zps[0] is None else torch.cat(zps), scheme=parts[0].scheme)


def _to_cpu(qw: QuantizedWeight) -> QuantizedWeight:
    qw.qweight, qw.scale = qw.qweight.cpu(), qw.scale.cpu()
    if qw.zero_point is not None:
        qw.zero_point = qw.zero_point.cpu()
    return qw


@torch.no_grad()
def run(model: torch.nn.Module, job: QuantJob) -> dict[str, QuantizedWeight]:
    """Quantize every Linear except `job.ignore`, one decoder layer at a time (FP4 schemes: methods.fp4)."""
    if job.scheme.weights.type == "float" and job.scheme.weights.bits == 4:
        from hubquant.methods.fp4 import run_rtn

        return run_rtn(model, job)
    layers = decoder_layers(model)
    prefix = layers_prefix(model)
    result: dict[str, QuantizedWeight] = {}
    for i, layer in enumerate(tqdm(layers, desc="rtn: layers", disable=not job.progress)):
        result.update(quantize_linears(quantizable_linears(layer, job.ignore, f"{prefix}.{i}"), job))
    # Linears outside the decoder layers (lm_head unless ignored)
    rest = {n: m for n, m in quantizable_linears(model, job.ignore).items() if not n.startswith(prefix + ".")}
    result.update(quantize_linears(rest, job))
    return result
