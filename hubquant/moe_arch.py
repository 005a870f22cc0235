"""Mixture-of-experts architectures: where each one's experts are in its Hub checkpoints, found in transformers' own
weight-conversion mapping, the check that per-expert Linears compute what the fused experts compute, and which
modules of a sparse block are routers.

transformers 5 loads per-expert checkpoint tensors into fused 3-D experts through `WeightConverter`s: one builds
`...experts.gate_up_proj` [E, 2I, H] from `experts.*.<gate>.weight` and `experts.*.<up>.weight`
(`MergeModulelist(dim=0)`, then `Concatenate(dim=1)`: gate rows first), one builds `...experts.down_proj` [E, H, I]
from `experts.*.<down>.weight` (`MergeModulelist(dim=0)`), and a `WeightRenaming` may move the sparse block
(Mixtral's `.block_sparse_moe.` -> `.mlp.`). `expert_layout(model)` reads those converters from
`transformers.conversion_mapping.get_model_conversion_mapping` (what `from_pretrained` runs), so every architecture
transformers maps this way converts, and its variant loads with plain `from_pretrained`. `OVERRIDES` holds the
layouts that cannot be derived (gpt-oss: transformers has no per-expert mapping for it).

Nothing is trusted blindly: `check_unfused` runs a sparse block's fused experts (transformers' own forward) and the
per-expert Linears hubquant builds from them on random tokens and routings in fp32 and stops the conversion (exit 5)
unless they agree to float rounding.
"""
from __future__ import annotations

import copy
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from hubquant.errors import UnsupportedError


@dataclass(frozen=True, kw_only=True)
class ExpertLayout:
    """How one architecture names its experts in Hub checkpoints.

    proj_names: the gate, up and down Linears of one expert, as checkpoints (and vLLM's loaders) name them.
    block_rename: (module path in transformers 5, path in checkpoints) of the sparse block, when they differ.
    """

    proj_names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
    block_rename: tuple[str, str] | None = None


# Layouts transformers' conversion mapping does not give. gpt-oss: biased, clamped-SwiGLU experts
# (hubquant.moe_gptoss), written per expert as llm-compressor names them; transformers has no per-expert mapping
# for them, so hubquant.load reads the variant (docs/moe.md). Llama 4: transposed experts whose router score scales
# their input (hubquant.moe_llama4), per expert as transformers' compressed-tensors loading names them.
OVERRIDES: dict[str, ExpertLayout] = dict.fromkeys(("gpt_oss", "llama4_text", "llama4"), ExpertLayout())

# Architectures converted end to end in the tests (tests/test_moe.py, tests/test_moe_arch.py): the hint of a refusal
# names them. Others whose experts transformers maps the same way convert too, after the same check.
TESTED = ("qwen2_moe", "qwen3_moe", "qwen3_next", "qwen3_5_moe", "mixtral", "minimax", "minimax_m2", "phimoe",
          "deepseek_v2", "deepseek_v3", "deepseek_v32", "glm4_moe", "glm4_moe_lite", "glm4v_moe", "olmoe",
          "flex_olmo", "ernie4_5_moe", "hunyuan_v1_moe", "exaone_moe", "dots1", "gpt_oss", "llama4_text")

FLOAT_ATTR = "hubquant_float"  # set on the router modules `mark_routers` finds (hubquant.modeling skips them)

_EXPERT_SOURCE = re.compile(r"^(?P<block>.*?)experts\.\*\.(?P<proj>[A-Za-z_]\w*)\.weight$")
_LITERAL = re.compile(r"^[\w.]+$")


def _unescape(pattern: str) -> str | None:
    """A regex pattern that matches one literal string (`\\.` escapes only), as that string; None otherwise."""
    s = pattern.replace("\\.", ".")
    return s if _LITERAL.match(s) else None


# What a converter does when it only stacks per-expert tensors into a fused one (gate rows before up rows)
_STACK_OPS = {"gate_up_proj": [("MergeModulelist", 0), ("Concatenate", 1)], "down_proj": [("MergeModulelist", 0)]}


def only_stacks(conv, target: str) -> bool:
    """Whether transformers' converter `conv` builds `experts.<target>` ("gate_up_proj" or "down_proj") by stacking
    per-expert tensors and nothing else, so that expert e of the fused tensor is the e-th source tensor."""
    ops = [(type(op).__name__, getattr(op, "dim", None)) for op in getattr(conv, "operations", [])]
    return ops == _STACK_OPS[target]


def _expert_sources(conv, target: str, n: int) -> list[re.Match] | None:
    """The per-expert source patterns of `conv` when it builds `...experts.<target>` from `n` of them."""
    targets = list(getattr(conv, "target_patterns", []))
    sources = list(getattr(conv, "source_patterns", []))
    if len(targets) != 1 or not targets[0].endswith(f"experts.{target}") or len(sources) != n:
        return None
    found = [_EXPERT_SOURCE.match(s) for s in sources]
    if not all(found) or len({m["block"] for m in found}) != 1:
        return None
    if found[0]["block"] != targets[0][: -len(f"experts.{target}")]:
        return None  # the converter would also move the experts to another block
    return found


def derive_layout(transforms: list, experts_name: str) -> ExpertLayout | None:
    """The layout that transformers' conversion `transforms` load into the fused experts module `experts_name`
    (e.g. "model.layers.0.mlp.experts"), or None when they do not build it from per-expert tensors."""
    gate_up = down = None
    for t in transforms:
        if type(t).__name__ != "WeightConverter":
            continue
        pair = _expert_sources(t, "gate_up_proj", 2)
        if pair and only_stacks(t, "gate_up_proj"):
            gate_up = gate_up or pair
        one = _expert_sources(t, "down_proj", 1)
        if one and only_stacks(t, "down_proj"):
            down = down or one
    if gate_up is None or down is None:
        return None
    names = (gate_up[0]["proj"], gate_up[1]["proj"], down[0]["proj"])
    if len(set(names)) != 3:
        return None
    rename = None
    path = f".{experts_name}."
    for t in transforms:  # a renaming that moves the sparse block: its target is part of the experts' path
        if type(t).__name__ != "WeightRenaming" or len(t.source_patterns) != 1 or len(t.target_patterns) != 1:
            continue
        src, dst = _unescape(t.source_patterns[0]), _unescape(t.target_patterns[0])
        if src and dst and dst.startswith(".") and dst.endswith(".") and dst in path:
            rename = (dst, src)
    return ExpertLayout(proj_names=names, block_rename=rename)


def _transforms(model: nn.Module) -> list:
    """transformers' weight conversions for `model`, as `from_pretrained` collects them ([] when unavailable)."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping

        return list(get_model_conversion_mapping(model, add_legacy=False))
    except Exception:  # an older or newer transformers without this function: fall back to the model type's list
        try:
            from transformers.conversion_mapping import get_checkpoint_conversion_mapping

            mtype = getattr(getattr(model, "config", None), "model_type", None)
            return list(get_checkpoint_conversion_mapping(mtype) or [])
        except Exception:
            return []


_CACHE: dict[tuple[type, str, str], ExpertLayout | None] = {}


def expert_layout(model: nn.Module, experts_name: str | None = None) -> ExpertLayout | None:
    """The checkpoint layout of `model`'s experts: `OVERRIDES`, else derived from transformers' conversion mapping;
    None when neither knows it. `experts_name`: a fused (or unfused) experts module's path, found when omitted."""
    mtype = getattr(getattr(model, "config", None), "model_type", "") or ""
    if mtype in OVERRIDES:
        return OVERRIDES[mtype]
    if experts_name is None:
        experts_name = next((n for n, m in model.named_modules() if n.endswith(".experts")
                             and (hasattr(m, "gate_up_proj") or isinstance(m, nn.ModuleList))), None)
        if experts_name is None:
            return None
    key = (type(model), mtype, re.sub(r"\.\d+\.", ".N.", experts_name))
    if key not in _CACHE:
        _CACHE[key] = derive_layout(_transforms(model), experts_name)
    return _CACHE[key]


def refusal(mtype: str, why: str) -> UnsupportedError:
    return UnsupportedError(f"fused experts of model_type '{mtype}' {why}",
                            hint=f"mixture-of-experts models hubquant converts: {', '.join(TESTED)}, and others "
                                 "whose per-expert checkpoint layout transformers' conversion mapping gives")


# ------------------------------------------------------------------------------------------ the unfuse check

# attributes transformers' `use_experts_implementation` sets on fused experts: a layout other than concatenated
# [gate; up] rows without biases is not what per-expert Linears split
_STANDARD = {"is_transposed": False, "has_bias": False, "is_concatenated": True, "has_gate": True,
             "has_post_expert_norm": False}


def _probe_copy(fused: nn.Module, idx: list[int]) -> nn.Module:
    """A fp32 copy of `fused` holding experts `idx` only (their real weights; random ones on the meta device)."""
    small = copy.copy(fused)
    small._parameters, small._buffers, small._modules = (dict(fused._parameters), dict(fused._buffers),
                                                     dict(fused._modules))
    g = torch.Generator().manual_seed(0)
    for name in ("gate_up_proj", "down_proj"):
        p = getattr(fused, name)
        if p.is_meta:
            w = torch.randn((len(idx), *p.shape[1:]), generator=g) / p.shape[-1] ** 0.5
        else:
            w = p.detach()[idx].to("cpu", torch.float32)
        small._parameters[name] = nn.Parameter(w, requires_grad=False)
    small.num_experts = len(idx)
    return small


@torch.no_grad()
def check_unfused(fused: nn.Module, build: Callable[[nn.Module], nn.Module], mtype: str, *,
                  tokens: int = 16, top_k: int = 2, rtol: float = 1e-5) -> float:
    """Run transformers' fused experts and the per-expert Linears `build(fused)` makes on random tokens and
    routings (fp32, the first, middle and last expert) and return the relative error of the per-expert output.

    Raises:
        UnsupportedError: the layout is not concatenated gate/up rows, the fused module cannot be run, or the
            outputs differ by more than float rounding (`rtol` of the output's norm).
    """
    for attr, want in _STANDARD.items():
        if getattr(fused, attr, want) != want:
            raise refusal(mtype, f"have {attr}={getattr(fused, attr)}, a layout per-expert Linears do not split")
    n = fused.gate_up_proj.shape[0]
    idx = sorted({0, n // 2, n - 1})
    small = _probe_copy(fused, idx)
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(tokens, small.gate_up_proj.shape[-1], generator=g)
    k = min(top_k, len(idx))
    index = torch.stack([torch.randperm(len(idx), generator=g)[:k] for _ in range(tokens)])
    weights = torch.rand(tokens, k, generator=g)
    if hasattr(small, "config"):  # the eager forward (other implementations run the same math on other kernels)
        small.config = copy.copy(small.config)
        small.config._experts_implementation = "eager"
    try:
        ref = small(hidden, index, weights)
        out = build(small)(hidden, index, weights)
    except Exception as e:  # a forward with another signature: not the layout per-expert Linears reproduce
        raise refusal(mtype, f"could not be checked against per-expert Linears ({type(e).__name__}: {e})") from None
    err = float((out - ref).norm() / ref.norm().clamp_min(1e-30))
    if not torch.isfinite(out).all() or err > rtol:
        raise refusal(mtype, f"do not match hubquant's per-expert Linears (relative error {err:.2e}): their "
                             "checkpoint layout is not the one transformers' conversion mapping gives")
    return err


# ------------------------------------------------------------------------------------------ routers stay float


def router_modules(block: nn.Module, experts: nn.Module, num_experts: int, hidden: int) -> list[str]:
    """Names (relative to the sparse `block`) of its routers: modules outside the experts holding a weight
    [num_experts, hidden], shared-expert gates (Linears from hidden to one output), and holders of score-correction
    biases."""
    inside = {id(m) for m in experts.modules()}
    out = []
    for name, mod in block.named_modules():
        if not name or id(mod) in inside:
            continue
        w = mod._parameters.get("weight")
        own = {**mod._parameters, **mod._buffers}
        if (isinstance(w, torch.Tensor) and tuple(w.shape) == (num_experts, hidden)) \
                or (isinstance(mod, nn.Linear) and (mod.out_features, mod.in_features) == (1, hidden)) \
                or any("e_score_correction_bias" in k for k in own):
            out.append(name)
    return out


def mark_routers(block: nn.Module, experts: nn.Module, num_experts: int, hidden: int) -> list[str]:
    """Mark the routers of `block` float (`FLOAT_ATTR`: never quantized, in the `ignore` list and the card)."""
    names = router_modules(block, experts, num_experts, hidden)
    for n in names:
        setattr(block.get_submodule(n), FLOAT_ATTR, True)
    return names
