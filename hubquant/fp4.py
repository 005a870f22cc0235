"""FP4 (E2M1) weights with block scales: NVFP4 and MXFP4, numerics exactly as compressed-tensors computes them.

- NVFP4 (compressed-tensors ``tensor_group``, group 16): one fp32 global scale per tensor,
  ``g = 448 * 6 / amax(W)`` (computed in the weight's dtype, then fp32); per block of 16 inputs an FP8 e4m3 scale
  ``s = e4m3(g * (amax_block / 6))`` (``amax_block / 6`` in the weight's dtype); ``W ~ e2m1(W / (s / g)) * s / g``.
  Linears that vLLM fuses (q/k/v, gate/up) share the smallest of their global scales, as llm-compressor does.
- MXFP4 (``group``, group 32): per block an E8M0 exponent ``e = 127 + floor(log2(p2(amax_block))) - 2`` where
  ``p2`` rounds to a power of two as compressed-tensors' ``round_to_power_2`` does; ``W ~ e2m1(W / 2^(e-127)) *
  2^(e-127)``; stored as uint8 ``e``.
- E2M1 rounding is compressed-tensors' ``cast_to_fp4`` (ties to even: 0.25->0, 0.75->1, 1.25->1, 1.75->2, 2.5->2,
  3.5->4, 5->4); a code is ``s e1 e0 m`` with the sign in bit 3 (negative values that round to zero keep it); two
  codes per byte, input 2b in the low nibble of byte b (``pack_fp4_to_uint8``).

`Fp4Weight` is the `QuantizedWeight` of these schemes: ``qweight`` uint8 codes [out, in], ``scale`` float8_e4m3fn
(NVFP4) or uint8 exponents (MXFP4) [out, in / block], ``global_scale`` fp32 [1] (NVFP4), ``input_global_scale``
fp32 [1] for NVFP4 activations (W4A4).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from hubquant.errors import UsageError
from hubquant.quant import QuantizedWeight
from hubquant.schemes import QuantScheme, WeightScheme

E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
E2M1_MAX = 6.0
E4M3_MAX = 448.0
E4M3_EPS = 0.125  # compressed-tensors' replacement for a zero e4m3 scale
BLOCKS = {"nvfp4": 16, "mxfp4": 32}
MX_ELEM_OFFSET = 2  # floor(log2(6))
FUSED = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))  # Linears vLLM runs as one weight


def kind_of(scheme: WeightScheme | QuantScheme) -> str | None:
    """"nvfp4", "mxfp4" or None (not an FP4 scheme); compressed-tensors tells them apart by block size too."""
    w = scheme.weights if isinstance(scheme, QuantScheme) else scheme
    if w.type != "float" or w.bits != 4:
        return None
    for kind, block in BLOCKS.items():
        if w.group_size == block:
            return kind
    raise UsageError(f"FP4 weights need blocks of 16 (NVFP4) or 32 (MXFP4), not {w.group_size}",
                     hint="use --scheme NVFP4A16, NVFP4 or MXFP4A16")


def weight_scheme(kind: str) -> WeightScheme:
    return WeightScheme(bits=4, group_size=BLOCKS[kind], symmetric=True, type="float")


# ---------------------------------------------------------------- E2M1 codes
def e2m1_codes(x: torch.Tensor) -> torch.Tensor:
    """uint8 E2M1 codes (0..15) of float32 `x` (already divided by its scale): round as cast_to_fp4, sign bit 3."""
    a = x.abs()
    mag = ((a > 0.25).to(torch.uint8) + (a >= 0.75) + (a > 1.25) + (a >= 1.75) + (a > 2.5) + (a >= 3.5)
           + (a > 5.0)).to(torch.uint8)
    return mag | ((x < 0).to(torch.uint8) << 3)  # -0.0 rounds to +0 (torch.sign(-0.0) is 0)


def e2m1_values(codes: torch.Tensor) -> torch.Tensor:
    """float32 values of E2M1 codes."""
    table = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=codes.device)
    mag = table[(codes & 0x7).long()]
    return torch.where((codes & 0x8) != 0, -mag, mag)


def pack_codes(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes [N, K] -> bytes [N, K/2] (input 2b in the low nibble of byte b)."""
    c = codes.reshape(codes.shape[0], -1, 2)
    return (c[..., 0] | (c[..., 1] << 4)).contiguous()


def unpack_codes(packed: torch.Tensor) -> torch.Tensor:
    """bytes [N, K/2] -> uint8 codes [N, K]."""
    return torch.stack((packed & 0xF, packed >> 4), dim=-1).reshape(packed.shape[0], -1)


# ---------------------------------------------------------------- scales
def _amax(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """compressed-tensors' max(|min(lo, 0)|, max(hi, 0)), in the input dtype."""
    return torch.max(torch.min(lo, torch.zeros_like(lo)).abs(), torch.max(hi, torch.zeros_like(hi)))


def global_scale(w: torch.Tensor) -> torch.Tensor:
    """NVFP4 per-tensor scale fp32 [1]: 448 * 6 / amax(w) in w's dtype (generate_gparam)."""
    amax = _amax(w.amin(), w.amax())
    amax = torch.clamp(amax, min=torch.finfo(amax.dtype).tiny)
    g = E4M3_MAX * E2M1_MAX / amax
    return torch.nan_to_num(g, nan=1.0, posinf=1.0, neginf=1.0).to(torch.float32).reshape(1)


def activation_global_scale(amax: torch.Tensor) -> torch.Tensor:
    """NVFP4 input global scale fp32 [1] from the calibration amax (static_minmax observer)."""
    a = amax.float().max().clamp(min=torch.finfo(torch.float32).tiny)
    return torch.nan_to_num(E4M3_MAX * E2M1_MAX / a, nan=1.0, posinf=1.0, neginf=1.0).reshape(1)


def _blocks(w: torch.Tensor, block: int) -> torch.Tensor:
    out_f, in_f = w.shape
    if in_f % block:
        raise UsageError(f"input size {in_f} is not a multiple of the FP4 block size {block}",
                         hint="add this Linear to --ignore, or use an integer scheme")
    return w.reshape(out_f, in_f // block, block)


def nvfp4_block_scales(w: torch.Tensor, gscale: torch.Tensor) -> torch.Tensor:
    """float8_e4m3fn [out, in/16]: e4m3(g * amax_block / 6), zeros replaced by 0.125 (calculate_qparams)."""
    g = _blocks(w, 16)
    amax = _amax(g.amin(-1), g.amax(-1))
    s = amax / torch.tensor(E2M1_MAX, dtype=torch.float32).to(amax.dtype)
    s = gscale.to(torch.float32) * s
    s = s.clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).to(torch.float32)
    s = torch.where(s == 0, torch.tensor(E4M3_EPS, dtype=s.dtype), s)
    return s.to(torch.float8_e4m3fn)


def _round_to_power_2(x: torch.Tensor) -> torch.Tensor:
    """compressed-tensors' round_to_power_2 for E2M1 (one mantissa bit), in x's dtype."""
    bits = {torch.bfloat16: (torch.int16, 7, 8), torch.float16: (torch.int16, 10, 5),
            torch.float32: (torch.int32, 23, 8)}
    if x.dtype not in bits:
        x = x.float()
    int_dtype, mantissa, exponent = bits[x.dtype]
    i = x.view(int_dtype).to(torch.int32)
    add = 1 << (mantissa - 1 - 1)
    mask = ((1 << (exponent + 1)) - 1) << mantissa
    out = torch.bitwise_and(i + add, mask)
    return out.to(int_dtype).view(x.dtype)


def mxfp4_exponents(w: torch.Tensor) -> torch.Tensor:
    """uint8 E8M0 exponents [out, in/32] (generate_mx_scales, then rounded and clamped to uint8)."""
    g = _blocks(w, 32)
    amax = _amax(g.amin(-1), g.amax(-1))
    e = 127 + torch.floor(torch.log2(_round_to_power_2(amax))) - MX_ELEM_OFFSET
    return torch.round(torch.clamp(e, 0, 255)).to(torch.uint8)


def column_scales(scale: torch.Tensor, gscale: torch.Tensor | None, kind: str) -> torch.Tensor:
    """float32 [out, in/block] step sizes: s / g (NVFP4) or 2^(e - 127) (MXFP4)."""
    if kind == "mxfp4":
        return torch.pow(2.0, scale.to(torch.int32).float() - 127.0)
    return scale.to(torch.float32) / gscale.to(torch.float32)


# ---------------------------------------------------------------- weights
@dataclass
class Fp4Weight(QuantizedWeight):
    """A FP4 weight (see the module docstring); `dequantize` gives W as compressed-tensors decompresses it."""

    global_scale: torch.Tensor | None = None
    input_global_scale: torch.Tensor | None = None

    @property
    def kind(self) -> str:
        return kind_of(self.scheme)

    def steps(self) -> torch.Tensor:
        return column_scales(self.scale, self.global_scale, self.kind)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        block = BLOCKS[self.kind]
        vals = e2m1_values(self.qweight)
        return (vals * self.steps().repeat_interleave(block, dim=1)).to(dtype)


def quantize(w: torch.Tensor, kind: str, *, gscale: torch.Tensor | None = None) -> Fp4Weight:
    """Round-to-nearest FP4 of `w` [out, in] (its own global scale unless `gscale` is given, NVFP4)."""
    scheme = weight_scheme(kind)
    if kind == "nvfp4":
        gscale = global_scale(w) if gscale is None else gscale
        scale = nvfp4_block_scales(w, gscale)
    else:
        gscale, scale = None, mxfp4_exponents(w)
    steps = column_scales(scale, gscale, kind).repeat_interleave(BLOCKS[kind], dim=1)
    codes = e2m1_codes((w.float() / steps).clamp(-E2M1_MAX, E2M1_MAX))
    return Fp4Weight(qweight=codes, scale=scale, zero_point=None, scheme=scheme, global_scale=gscale)


def fused_global_scales(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """NVFP4 global scale per Linear name, q/k/v and gate/up of one parent sharing the smallest of theirs."""
    own = {n: global_scale(w) for n, w in weights.items()}
    out = dict(own)
    parents: dict[tuple[str, tuple[str, ...]], list[str]] = {}
    for name in weights:
        parent, _, leaf = name.rpartition(".")
        for group in FUSED:
            if leaf in group:
                parents.setdefault((parent, group), []).append(name)
    for (parent, group), names in parents.items():
        if len(names) == len(group):  # every member quantized (an ignored one keeps the others apart)
            shared = torch.min(torch.cat([own[n] for n in names])).reshape(1)
            out.update({n: shared for n in names})
    return out


# ---------------------------------------------------------------- activations (NVFP4 W4A4)
def fake_quant_activations(x: torch.Tensor, input_gscale: torch.Tensor) -> torch.Tensor:
    """NVFP4 activations: dynamic e4m3 scales per 16 inputs under the static global scale, quantize -> dequantize."""
    shape = x.shape
    flat = x.reshape(-1, shape[-1])
    if shape[-1] % 16:
        return x
    scale = nvfp4_block_scales(flat, input_gscale.to(flat.device))
    steps = column_scales(scale, input_gscale.to(flat.device), "nvfp4").repeat_interleave(16, dim=1)
    codes = e2m1_codes((flat.float() / steps).clamp(-E2M1_MAX, E2M1_MAX))
    return (e2m1_values(codes) * steps).to(x.dtype).reshape(shape)
