"""gpt-oss experts as per-expert Linears, and gpt-oss checkpoints that are MXFP4 already.

transformers 5's `GptOssExperts` keeps, per sparse block, `gate_up_proj` [E, H, 2I] (transposed: the forward is
`x @ W`) whose columns interleave gate (even) and up (odd), `gate_up_proj_bias` [E, 2I], `down_proj` [E, I, H] and
`down_proj_bias` [E, H], and a clamped SwiGLU: `(clamp(up, -l, l) + 1) * g * sigmoid(alpha * g)` with
`g = clamp(gate, max=l)`. `experts(block)` turns it into one `GptOssExpertMLP` per expert whose `gate_proj`,
`up_proj` and `down_proj` are biased `nn.Linear`s ([I, H], [I, H], [H, I]), the names llm-compressor's gpt-oss
linearization writes. The biases stay float (they are not Linear weights).

The gpt-oss checkpoints on the Hub are MXFP4 already (`quantization_config.quant_method: mxfp4`: experts as
`*_blocks` / `*_scales`); `source_load_kwargs` has transformers dequantize them while loading
(`Mxfp4Config(dequantize=True)`, which runs on CPU without kernels), so conversion starts from float experts.
"""
from __future__ import annotations

import torch
from torch import nn

PROJ_NAMES = ("gate_proj", "up_proj", "down_proj")


class GptOssExpertMLP(nn.Module):
    """One gpt-oss expert: down((clamp(up) + 1) * glu(clamp(gate))), all three Linears biased."""

    def __init__(self, gate: nn.Linear, up: nn.Linear, down: nn.Linear, alpha: float, limit: float):
        super().__init__()
        self.names = PROJ_NAMES
        self.gate_proj, self.up_proj, self.down_proj = gate, up, down
        self.alpha, self.limit = alpha, limit

    def projections(self) -> tuple[nn.Linear, nn.Linear, nn.Linear]:
        return self.gate_proj, self.up_proj, self.down_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.gate_proj(x).clamp(min=None, max=self.limit)
        up = self.up_proj(x).clamp(min=-self.limit, max=self.limit)
        return self.down_proj((up + 1) * (gate * torch.sigmoid(gate * self.alpha)))


def _biased_linear(weight: torch.Tensor, bias: torch.Tensor) -> nn.Linear:
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=True, device="meta")
    lin.weight = nn.Parameter(weight, requires_grad=False)
    lin.bias = nn.Parameter(bias, requires_grad=False)
    return lin


@torch.no_grad()
def experts(mod: nn.Module) -> list[GptOssExpertMLP]:
    """Per-expert MLPs of a `GptOssExperts` module (contiguous copies: the fused weights are transposed and
    interleaved, so no view is an `nn.Linear` weight)."""
    gate_up, gate_up_b = mod.gate_up_proj.data, mod.gate_up_proj_bias.data
    down, down_b = mod.down_proj.data, mod.down_proj_bias.data
    out = []
    for e in range(gate_up.shape[0]):
        gate = _biased_linear(gate_up[e][:, ::2].t().contiguous(), gate_up_b[e][::2].contiguous())
        up = _biased_linear(gate_up[e][:, 1::2].t().contiguous(), gate_up_b[e][1::2].contiguous())
        dn = _biased_linear(down[e].t().contiguous(), down_b[e].clone())
        out.append(GptOssExpertMLP(gate, up, dn, float(mod.alpha), float(mod.limit)))
    return out


# ------------------------------------------------------------------------------------------ MXFP4 sources


def is_mxfp4_source(config) -> bool:
    """A gpt-oss config whose checkpoint is MXFP4 (`quant_method: mxfp4`), as a config object or a dict."""
    get = config.get if isinstance(config, dict) else lambda k: getattr(config, k, None)
    qc = get("quantization_config")
    qm = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
    return get("model_type") == "gpt_oss" and str(qm).lower() == "mxfp4"


def source_load_kwargs(config, arch: str = "") -> dict:
    """`from_pretrained` arguments for a source checkpoint: {} for a float one, transformers' dequantize-on-load
    for a gpt-oss MXFP4 one.

    Raises:
        UnsupportedError: any other quantized checkpoint (hubquant starts from float weights).
    """
    qc = getattr(config, "quantization_config", None)
    if not qc:
        return {}
    if not is_mxfp4_source(config):
        from hubquant.errors import UnsupportedError

        qm = qc.get("quant_method", "?") if isinstance(qc, dict) else getattr(qc, "quant_method", "?")
        raise UnsupportedError(f"{arch or config.model_type} checkpoint is already quantized ({qm})",
                               hint="start from the float (bf16/fp16/fp32) base model")
    from transformers import Mxfp4Config

    return {"quantization_config": Mxfp4Config(dequantize=True)}
