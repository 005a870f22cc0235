"""Quantization methods: a small explicit registry keyed by the --method string.

Every method is a function with the signature of `MethodFn`:

    run(model, job: QuantJob) -> dict[str, QuantizedWeight]

It quantizes `model` in place (transforms such as AWQ/SmoothQuant scales are folded into the
float weights; every quantized Linear's weight is replaced by its dequantized value so the model
can be evaluated as is) and returns the quantized tensors keyed by Linear module name
(e.g. "model.layers.0.self_attn.q_proj"). Formats turn that dict into files.

A `MethodSpec` holds what the rest of hubquant knows about a method: its title and summary, its default (or
fixed) scheme and how user overrides change it, its options class, its algorithm version, when it reads
calibration text, the formats it can be written in and which architectures it supports. Method modules are
imported only when a method runs or its options are parsed (`hubquant --help` stays fast).
"""
from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass
from typing import Any

from hubquant.errors import UsageError
from hubquant.methods.base import MethodFn, QuantJob  # noqa: F401  (the methods' contract, re-exported)
from hubquant.methods.options import MethodOptions, option_strings, parse_options
from hubquant.schemes import ActivationScheme, QuantScheme, WeightScheme


def _resolve(target: str):
    mod, attr = target.split(":")
    return getattr(importlib.import_module(mod), attr)


# method options every method takes on mixture-of-experts models (hubquant.moe.RoutingPolicy reads them), and the
# model types whose experts hubquant.moe knows (hubquant.moe.EXPERT_LAYOUTS; kept here without importing torch)
MOE_OPTION_KEYS = ("calibrate_all_experts", "min_expert_tokens")


@dataclass(frozen=True, kw_only=True)
class MoeOptions(MethodOptions):
    """The mixture-of-experts options (checked with the method's own before any download; see docs/moe.md)."""

    calibrate_all_experts: bool = False
    min_expert_tokens: int = 16
MOE_MODEL_TYPES = ("qwen2_moe", "qwen3_moe", "deepseek_v2", "deepseek_v3", "glm4_moe", "olmoe", "mixtral", "minimax",
                   "gpt_oss")
# MoE model types whose expert layout hubquant.moe_arch derives from transformers' conversion mapping, tested end to
# end with every method (hubquant.moe_arch.TESTED); AWQ and SmoothQuant build each layer's scaling map from its
# structure and keep the moves checked exact on a float32 copy (hubquant.moe_scaling)
DERIVED_MOE_MODEL_TYPES = ("qwen3_next", "qwen3_5_moe", "qwen3_5_moe_text", "ernie4_5_moe", "hunyuan_v1_moe",
                           "minimax_m2", "exaone_moe", "dots1", "deepseek_v32", "glm4_moe_lite", "flex_olmo", "phimoe",
                           "glm4v_moe", "llama4_text", "llama4")
# MoE variants transformers 5.24 cannot load (hubquant.moe.checkpoint_scheme, preflight; docs/moe.md has the causes):
# its CompressedTensorsDequantize rebuilds each expert from weight_packed/weight_scale/weight_shape only, so NVFP4's
# weight_global_scale never reaches the compressor; bitsandbytes replaces nn.Linear modules only.
NVFP4_EXPERTS_REASON = ("transformers 5.24 drops NVFP4 experts' weight_global_scale when it fuses them (each expert "
                        "would load multiplied by its global scale)")
NVFP4_EXPERTS_HINT = "use --scheme MXFP4A16, W4A16 or FP8_DYNAMIC for mixture-of-experts models"
BNB_EXPERTS_REASON = ("transformers' bitsandbytes integration quantizes nn.Linear modules only: a mixture of "
                      "experts' fused experts would stay in float, and pre-quantized per-expert tensors do not load")

@dataclass(frozen=True, kw_only=True)
class MethodSpec:
    """One method's registry entry. `run` and `options` are "module:attribute" targets, imported on use."""

    name: str
    title: str  # for the card: "GPTQ", "LLM.int8 (bitsandbytes)"
    summary: str
    run: str  # "hubquant.methods.rtn:run"
    options: str = "hubquant.methods.options:MethodOptions"
    default_scheme: QuantScheme
    fixed_scheme: bool = False  # --bits/--group-size/--sym/--asym do not apply (bitsandbytes, FP8)
    calibrated: bool = False  # always reads calibration text
    algorithm_version: int | None = None  # bumped when the default algorithm changes the method's output
    formats: tuple[str, ...] = ("compressed-tensors",)
    scaling: bool = False  # moves scale along the architecture's mappings (hubquant.methods.scaling)
    unsupported_hint: str = "use --method gptq or --method rtn for this model"
    scheme_in_name: bool = True  # False: the method's name says the scheme (BNB-NF4)
    schemes: tuple[str, ...] = ()  # the --scheme presets (hubquant.presets) it produces

    # ------------------------------------------------------------------ what the pipeline calls
    def load(self) -> MethodFn:
        """The method's run function."""
        return _resolve(self.run)

    def options_class(self) -> type[MethodOptions]:
        return _resolve(self.options)

    def parse_options(self, raw: MethodOptions | dict[str, Any] | list[str] | None = None) -> MethodOptions:
        """The method's options object from a dict, ``key=value`` strings or an options object.

        Raises:
            UsageError: an unknown key (the hint lists the known ones) or a bad value.

        The mixture-of-experts keys (`MOE_OPTION_KEYS`) belong to every method; hubquant.moe reads them.
        """
        if isinstance(raw, (list, tuple)):
            raw = option_strings(raw)
        if isinstance(raw, dict):
            parse_options(MoeOptions, {k: v for k, v in raw.items() if k in MOE_OPTION_KEYS}, method=self.name)
            raw = {k: v for k, v in raw.items() if k not in MOE_OPTION_KEYS}
        return parse_options(self.options_class(), raw, method=self.name)

    def needs_calibration(self, scheme: QuantScheme | None = None, options: Any = None) -> bool:
        """Calibrated methods, static activation scales, and options that need data (e.g. FP8 smoothing)."""
        if self.calibrated:
            return True
        if scheme is not None and scheme.activations is not None and not scheme.activations.dynamic:
            return True
        return self.parse_options(options).needs_calibration()

    def resolve_scheme(self, *, bits: int | None = None, group_size: int | None = None,
                       symmetric: bool | None = None, activations: str | None = None,
                       preset: str | None = None) -> QuantScheme:
        """The default scheme (or the `preset`'s, hubquant.presets) with the user's overrides applied.

        Raises:
            UsageError: an override the method does not take (fixed schemes; W8A8 with other than 8 bits;
                activations for a weight-only method), a flag contradicting the preset, or a preset the method
                cannot produce (naming the methods that can).
        """
        if preset is not None:
            from hubquant.presets import check_overrides, get_preset

            scheme, key = get_preset(preset), preset.upper()
            check_overrides(key, scheme, bits=bits, group_size=group_size, symmetric=symmetric,
                            activations=activations)
            if key not in self.schemes:
                able = methods_for(key)
                raise UsageError(f"--method {self.name} cannot produce --scheme {key}",
                                 hint=f"use --method {' or '.join(able)}" if able else "no method produces it yet")
            return scheme
        base = self.default_scheme
        w = base.weights
        if self.fixed_scheme:
            if bits not in (None, w.bits) or group_size is not None or symmetric is not None:
                raise UsageError(f"--bits/--group-size/--sym/--asym do not apply to --method {self.name}",
                                 hint="drop them; this method has a fixed scheme")
            weights = w
        else:
            bits_ = bits or w.bits
            gs = group_size if group_size is not None else w.group_size
            if bits_ == 8 and group_size is None:
                gs = -1  # 8-bit defaults to per-channel
            sym = w.symmetric if symmetric is None else symmetric
            if base.activations is not None and bits_ != 8:
                raise UsageError(f"--method {self.name} quantizes weights and activations to 8 bits",
                                 hint="use --bits 8, or a weight-only method (rtn, gptq, awq) for 4 bits")
            if base.activations is not None and (gs != -1 or not sym):
                raise UsageError(f"--method {self.name} quantizes weights symmetric per output channel (W8A8): "
                                 f"{'--asym' if not sym else f'--group-size {gs}'} does not apply",
                                 hint="drop --group-size/--asym, or use a weight-only method (rtn, gptq, awq) "
                                      "for grouped weights")
            weights = WeightScheme(bits=bits_, group_size=gs, symmetric=sym)
        acts = base.activations
        if activations is not None:
            if acts is None:
                raise UsageError(f"--activations does not apply to weight-only --method {self.name}",
                                 hint="use --method smoothquant, w8a8 or fp8 for activation quantization")
            if activations not in ("dynamic", "static"):
                raise UsageError(f"--activations {activations}", hint="use dynamic or static")
            dyn = activations == "dynamic"
            acts = dataclasses.replace(acts, dynamic=dyn, strategy="token" if dyn else "tensor")
        return QuantScheme(weights=weights, activations=acts)

    def takes_scheme_overrides(self, bits: int | None) -> bool:
        """Whether `--bits bits` (with its group size) applies to this method, as resolve_scheme would accept."""
        if bits is None or self.fixed_scheme:
            return False
        return self.default_scheme.activations is None or bits == 8

    def check_architecture(self, config: Any, options: Any = None) -> None:
        """Raise UnsupportedError before any download when the method cannot handle `config`'s architecture."""
        mtype = getattr(config, "model_type", None)
        if mtype in MOE_MODEL_TYPES:
            return  # hubquant.moe builds the scaling map from the loaded model's experts
        if mtype in DERIVED_MOE_MODEL_TYPES:
            return  # hubquant.moe_scaling builds and checks each layer's scaling map from its structure
        if self.scaling and self.parse_options(options).uses_scaling():
            from hubquant.methods.scaling import mappings_for

            mappings_for(getattr(config, "model_type", None), method=self.title, hint=self.unsupported_hint)

    def variant_name(self, scheme: QuantScheme, fmt: str) -> str:
        """The default target repo's suffix: W4A16-G128-GPTQ, W4A16-G128-RTN-gptq (not the first format), BNB-NF4."""
        if not self.scheme_in_name:
            return self.name.upper()
        suffix = f"{scheme.name}-{self.name.upper()}"
        return suffix if fmt == self.formats[0] else f"{suffix}-{fmt}"

    def check_format(self, fmt: str) -> None:
        if fmt not in self.formats:
            raise UsageError(f"--method {self.name} cannot be written as --format {fmt}",
                             hint=f"choose one of: {', '.join(self.formats)}")


_W4 = WeightScheme(bits=4, group_size=128, symmetric=True)
_W8 = WeightScheme(bits=8, group_size=-1)
_INT8_DYN = ActivationScheme(bits=8, type="int", dynamic=True, strategy="token")
_FP8_DYN = ActivationScheme(bits=8, type="float", dynamic=True, strategy="token")
_W8A8_HINT = "use --method w8a8 (no smoothing) or --method fp8 for this model"

METHODS: dict[str, MethodSpec] = {m.name: m for m in (
    MethodSpec(
        name="rtn", title="RTN", summary="round-to-nearest, min-max ranges (baseline)",
        run="hubquant.methods.rtn:run", default_scheme=QuantScheme(weights=_W4),
        formats=("compressed-tensors", "gptq", "awq", "gguf", "mxfp4"),
        schemes=("W4A16", "W4A16_ASYM", "W8A16", "NVFP4A16", "MXFP4A16", "NVFP4")),
    MethodSpec(
        name="gptq", title="GPTQ", summary="Hessian-based error compensation (W4A16)",
        run="hubquant.methods.gptq:run", options="hubquant.methods.gptq:GptqOptions", calibrated=True,
        algorithm_version=2, default_scheme=QuantScheme(weights=_W4),
        formats=("compressed-tensors", "gptq", "gguf", "mxfp4"), schemes=("W4A16", "W4A16_ASYM", "W8A16", "NVFP4A16",
                                                                          "MXFP4A16")),
    MethodSpec(
        name="imatrix", title="importance matrix (imatrix)",
        summary="GGUF block scales and mins searched under per-column activation energy (llama.cpp's imatrix)",
        run="hubquant.formats.gguf.method:run_imatrix", calibrated=True, default_scheme=QuantScheme(weights=_W4),
        formats=("gguf",), scheme_in_name=False),
    MethodSpec(
        name="awq", title="AWQ", summary="activation-aware per-channel scaling (W4A16 asym)",
        run="hubquant.methods.awq:run", options="hubquant.methods.awq:AwqOptions", calibrated=True, scaling=True,
        default_scheme=QuantScheme(weights=WeightScheme(bits=4, group_size=128, symmetric=False)),
        formats=("compressed-tensors", "awq"), schemes=("W4A16_ASYM", "W4A16")),
    MethodSpec(
        name="smoothquant", title="SmoothQuant", summary="outlier migration into weights, then W8A8 int8",
        run="hubquant.methods.smoothquant:run", options="hubquant.methods.smoothing:SmoothConfig",
        calibrated=True, algorithm_version=2, scaling=True, unsupported_hint=_W8A8_HINT,
        default_scheme=QuantScheme(weights=_W8, activations=_INT8_DYN), schemes=("W8A8",)),
    MethodSpec(
        name="w8a8", title="W8A8", summary="naive W8A8 int8 (no smoothing), the SmoothQuant baseline",
        run="hubquant.methods.smoothquant:run_naive", options="hubquant.methods.smoothing:W8A8Options",
        default_scheme=QuantScheme(weights=_W8, activations=_INT8_DYN), schemes=("W8A8",)),
    MethodSpec(
        name="fp8", title="FP8", summary="FP8 e4m3 weights and activations",
        run="hubquant.methods.fp8:run", options="hubquant.methods.smoothing:Fp8Options", fixed_scheme=True,
        scaling=True, unsupported_hint="drop the smoothing options (alpha, smooth) for this model",
        default_scheme=QuantScheme(weights=WeightScheme(bits=8, group_size=-1, type="float"),
                                   activations=_FP8_DYN), schemes=("FP8_DYNAMIC", "FP8")),
    MethodSpec(
        name="bnb-int8", title="LLM.int8 (bitsandbytes)", summary="LLM.int8 (bitsandbytes), outliers kept in fp16",
        run="hubquant.methods.bnb:run_int8", options="hubquant.methods.bnb:BnbConfig", fixed_scheme=True,
        scheme_in_name=False, default_scheme=QuantScheme(weights=_W8), formats=("bitsandbytes",)),
    MethodSpec(
        name="bnb-nf4", title="NF4 (bitsandbytes)", summary="NF4 with double quantization (bitsandbytes)",
        run="hubquant.methods.bnb:run_nf4", options="hubquant.methods.bnb:BnbConfig", fixed_scheme=True,
        scheme_in_name=False, default_scheme=QuantScheme(weights=WeightScheme(bits=4, group_size=64)),
        formats=("bitsandbytes",)),
)}


def methods_for(preset: str) -> list[str]:
    """The methods that produce `--scheme preset` (their entries' `schemes`)."""
    return [m.name for m in METHODS.values() if preset.upper() in m.schemes]


def get_method(name: str) -> MethodSpec:
    try:
        return METHODS[name]
    except KeyError:
        raise UsageError(f"unknown method '{name}'", hint=f"choose one of: {', '.join(METHODS)}") from None
