"""Scaling maps (AWQ, SmoothQuant) of mixture-of-experts architectures found from each layer's structure.

The model types whose expert layout hubquant.moe_arch derives from transformers' conversion mapping
(`DERIVED_MOE_MODEL_TYPES`) differ in ways no per-type table keeps up with: Qwen3-Next mixes linear-attention
and gated full-attention layers and scales its norms by (1 + weight), DeepSeek-V3.2's indexer reads the norms in
front of attention, some routers are plain `nn.Linear`. So `StructuralMap` builds each decoder layer's map from
the layer itself, with the layer's calibration inputs (the engine's `LayerWork`):

1. candidates: a norm whose output (traced on a forward pass with hooks) is read only by quantized Linears
   whose input width is the norm's width; `v_proj -> o_proj` in every module holding both; `up -> down` in
   every gated MLP (`gate_proj/up_proj/down_proj`, `w1/w3/w2`): each expert, shared expert and dense MLP;
2. every candidate is applied with random scales to a float32 copy and kept only if the output moves by less
   than `TOLERANCE` (relative): the layer for norms and attention (its routed experts replaced by small random
   stand-ins, `light_copy`), the MLP alone for up -> down (random inputs, so experts no calibration token reaches
   are checked too); a norm is tried as `x * w`, then as `x * (1 + w)`. Moves that fail are dropped and recorded
   (`record(model)`), never applied.

Layers of one structure (module names and classes) share one check; each keeps the moves whose Linears the method
quantizes in it.
"""
from __future__ import annotations

import copy
import weakref
from dataclasses import dataclass, field

import torch
from torch import nn

from hubquant import moe
from hubquant.methods.scaling import ScaleMapping, expand_kv, fold
from hubquant.moe_gptoss import GptOssExpertMLP

TOLERANCE = 1e-5  # relative change of the float32 layer output a kept move may cause
MLP_NAMES = (("gate_proj", "up_proj", "down_proj"), ("w1", "w3", "w2"))
NORM_OFFSETS = (0.0, 1.0)  # y = norm(x) * w (RMSNorm, LayerNorm) or norm(x) * (1 + w) (Gemma, Qwen3-Next)

_RECORDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> its StructuralMap


# listed mixture-of-experts types whose map is built from their structure too: gpt-oss's biased attention with sinks,
# and experts whose clamped `(up + 1)` product no scale crosses exactly (the check drops those moves)
STRUCTURAL_TYPES = ("gpt_oss",)


def applies(model: nn.Module) -> bool:
    """Whether `model`'s scaling map is built from its structure (a derived mixture-of-experts type, gpt-oss)."""
    from hubquant.methods import DERIVED_MOE_MODEL_TYPES

    mtype = moe.model_type(model)
    return (mtype in DERIVED_MOE_MODEL_TYPES or mtype in STRUCTURAL_TYPES) and bool(moe.expert_modules(model))


def scale_map(model: nn.Module, *, extra: bool = True):
    """The scaling map of a mixture-of-experts model: the hand-checked one (hubquant.moe.scale_mappings) as a
    tuple of ScaleMapping, a `StructuralMap` for the derived types, None for dense models."""
    if applies(model):
        smap = StructuralMap(extra=extra, head_dims=_head_dims(model))
        _RECORDS[model] = smap
        return smap
    listed = moe.scale_mappings(model, extra=extra)
    if listed is not None:
        return tuple(ScaleMapping(smooth=p, balance=c, extra=e) for p, c, e in listed)
    return None


def for_layer(mappings, work) -> tuple[ScaleMapping, ...]:
    """The mappings that apply to the layer of `work` (a plain tuple applies to every layer as is)."""
    return mappings.for_layer(work) if isinstance(mappings, StructuralMap) else tuple(mappings)


def record(model: nn.Module) -> StructuralMap | None:
    """The structural map a scaling method used on `model` (kept and dropped moves), if any."""
    return _RECORDS.get(model)


def _head_dims(model: nn.Module) -> tuple[int, int]:
    """(head_dim, num_key_value_heads) as SmoothQuant reads them (hubquant.methods.smoothing.head_dims)."""
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return head_dim, getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads


@dataclass
class StructuralMap:
    """Verified scale moves per layer structure. `kept`: {layer name: its mappings} and `dropped`: {layer name:
    ["smooth -> balance: why", ...]}, for the first layer of each structure."""

    extra: bool = True  # False: norms only (SmoothQuant smooth=norms)
    head_dims: tuple[int, int] = (0, 0)  # (head_dim, num_key_value_heads), as SmoothQuant ties GQA scales
    kept: dict[str, tuple[ScaleMapping, ...]] = field(default_factory=dict)
    dropped: dict[str, list[str]] = field(default_factory=dict)
    _cache: dict = field(default_factory=dict, repr=False)

    def for_layer(self, work) -> tuple[ScaleMapping, ...]:
        """The checked moves of `work.layer` whose Linears the method quantizes in this layer (experts the low-token
        rule rounds instead leave theirs out; the check itself sees every expert, so one check serves a structure)."""
        rel = frozenset(work.relative(n) for n in work.linears)
        experts = frozenset(moe.expert_linear_names(work.layer))
        checked = rel | experts
        key = (tuple((n, type(m).__name__) for n, m in work.layer.named_modules()), checked)
        if key not in self._cache:
            x, kw = work._to_device(work.inputs[0]), work.kwargs[0]
            kept, dropped = verified_mappings(work.layer, x, kw, checked, head_dims=self.head_dims)
            kept = tuple(m for m in kept if self.extra or not m.extra)
            self._cache[key] = kept
            self.kept[work.name] = kept
            self.dropped[work.name] = dropped

        def quantized_here(m: ScaleMapping) -> bool:
            norm = not isinstance(work.layer.get_submodule(m.smooth), nn.Linear)
            return (norm or m.smooth in rel) and all(b in rel for b in m.balance)

        return tuple(m for m in self._cache[key] if quantized_here(m))

    def summary(self) -> str:
        kept = sum(len(v) for v in self.kept.values())
        dropped = list(dict.fromkeys(d for v in self.dropped.values() for d in v))
        return (f"{kept} scale moves kept over {len(self.kept)} layer structure(s) (each checked exact on a float32 "
                f"copy); {len(dropped)} dropped" + (f": {'; '.join(dropped)}" if dropped else ""))


def _describe(m: ScaleMapping) -> str:
    return f"{m.smooth} -> {', '.join(m.balance)}"


# ---------------------------------------------------------------------------------------------- candidates
def _is_norm(module: nn.Module) -> bool:
    w = getattr(module, "weight", None)
    return (isinstance(w, torch.Tensor) and w.dim() == 1 and "norm" in type(module).__name__.lower()
            and not any(True for _ in module.children()))


def _ptr(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def _tensors(obj):
    if torch.is_tensor(obj):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for o in obj:
            yield from _tensors(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _tensors(o)


@torch.no_grad()
def norm_consumers(layer: nn.Module, x: torch.Tensor, kw: dict) -> dict[str, list[str]]:
    """{norm: [leaf modules that read its output]} from one forward pass of `layer`, in call order. A module reads
    a norm's output when one of its tensor inputs shares the output's storage (views and reshapes included)."""
    norms = {n for n, m in layer.named_modules() if _is_norm(m)}
    live: dict[int, str] = {}  # storage of a norm output seen so far -> that norm
    keep: list[torch.Tensor] = []  # norm outputs stay alive: no later tensor reuses their storage
    out: dict[str, list[str]] = {}
    handles = []

    def on_norm(name):
        def hook(mod, args, y):
            for t in _tensors(y):
                keep.append(t)
                live[_ptr(t)] = name
                out.setdefault(name, [])
        return hook

    def on_leaf(name):
        def hook(mod, args, kwargs):
            for t in _tensors((args, kwargs)):
                norm = live.get(_ptr(t))
                if norm is not None and norm != name and name not in out[norm]:
                    out[norm].append(name)
        return hook

    try:
        for name, mod in layer.named_modules():
            if name in norms:
                handles.append(mod.register_forward_hook(on_norm(name)))
            if name and not any(True for _ in mod.children()):
                handles.append(mod.register_forward_pre_hook(on_leaf(name), with_kwargs=True))
        layer(x, **kw)
    finally:
        for h in handles:
            h.remove()
    return out


def candidates(layer: nn.Module, x: torch.Tensor, kw: dict, linears: frozenset[str]):
    """(norm mappings, Linear-to-Linear mappings, rejected norms with why) of one layer, before any check."""
    norms, rejected = [], []
    for norm, readers in norm_consumers(layer, x, kw).items():
        width = layer.get_submodule(norm).weight.numel()
        if not readers:
            continue
        other = [r for r in readers if r not in linears]
        wide = [r for r in readers if r in linears and layer.get_submodule(r).in_features != width]
        if other or wide:
            why = (f"{', '.join(other)} also read(s) it (not a quantized Linear)" if other else
                   f"{', '.join(wide)} read(s) it reshaped ({width} norm channels)")
            rejected.append(f"{norm} -> {', '.join(readers)}: {why}")
            continue
        norms.append(ScaleMapping(smooth=norm, balance=tuple(readers)))
    pairs = []
    for name, mod in layer.named_modules():
        pre = f"{name}." if name else ""
        kids = dict(mod.named_children())
        if isinstance(kids.get("v_proj"), nn.Linear) and isinstance(kids.get("o_proj"), nn.Linear):
            pairs.append(ScaleMapping(smooth=f"{pre}v_proj", balance=(f"{pre}o_proj",), extra=True))
        for triple in MLP_NAMES + ((mod.names,) if isinstance(mod, moe.ExpertMLP) else ()):
            gate, up, down = triple
            if all(isinstance(kids.get(k), nn.Linear) for k in triple):
                pairs.append(ScaleMapping(smooth=f"{pre}{up}", balance=(f"{pre}{down}",), extra=True))
    pairs = list(dict.fromkeys(pairs))
    pairs = [p for p in pairs if all(b in linears for b in p.balance) and p.smooth in linears]
    return norms, pairs, rejected


# ---------------------------------------------------------------------------------------------- the checks
def _f32(obj):
    if torch.is_tensor(obj):
        return obj.float() if obj.is_floating_point() else obj
    if isinstance(obj, tuple):
        return tuple(_f32(o) for o in obj)
    if isinstance(obj, list):
        return [_f32(o) for o in obj]
    if isinstance(obj, dict):
        return {k: _f32(v) for k, v in obj.items()}
    return obj


def _first(obj, b: int):
    """Keep the first sequence in every tensor whose first dimension is the batch `b`."""
    if torch.is_tensor(obj):
        return obj[:1] if obj.dim() and obj.shape[0] == b and b > 1 else obj
    if isinstance(obj, (tuple, list)):
        return type(obj)(_first(o, b) for o in obj)
    if isinstance(obj, dict):
        return {k: _first(v, b) for k, v in obj.items()}
    return obj


def _out(y) -> torch.Tensor:
    return y[0] if isinstance(y, (tuple, list)) else y


def _rel(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y - ref).norm() / ref.norm().clamp(min=1e-30))


def _random_scales(n: int, gen: torch.Generator, device) -> torch.Tensor:
    return torch.exp(torch.empty(n).uniform_(-0.7, 0.7, generator=gen)).to(device)  # in [0.5, 2]


@torch.no_grad()
def _moved_error(module: nn.Module, mapping: ScaleMapping, run, ref: torch.Tensor, gen, head_dims) -> float:
    """Relative change of `run()` after moving random scales along `mapping` in `module` (restored after)."""
    smooth = module.get_submodule(mapping.smooth)
    balance = [module.get_submodule(b) for b in mapping.balance]
    saved = [(p, p.data.clone()) for m in (smooth, *balance) for p in m.parameters(recurse=False)]
    dev = balance[0].weight.device
    s_smooth = None
    if isinstance(smooth, nn.Linear) and smooth.out_features != balance[0].in_features:
        head_dim = head_dims[0]
        n_rep = balance[0].in_features // smooth.out_features
        if smooth.out_features != head_dim * head_dims[1] or n_rep * smooth.out_features != balance[0].in_features:
            return float("inf")  # not the grouped-query layout SmoothQuant ties scales for
        s_smooth = _random_scales(smooth.out_features, gen, dev)
        s = expand_kv(s_smooth, smooth.out_features // head_dim, n_rep, head_dim)
    else:
        s = _random_scales(balance[0].in_features, gen, dev)
    try:
        fold(module, mapping, s, s_smooth=s_smooth, dtype=torch.float32)
        return _rel(run(), ref)
    except (RuntimeError, ValueError):
        return float("inf")
    finally:
        for p, data in saved:
            p.data = data


STAND_IN_WIDTH = 8  # intermediate size of the stand-in experts of the layer-level check


def _random_linear(n_in: int, n_out: int, gen: torch.Generator, device) -> nn.Linear:
    lin = nn.Linear(n_in, n_out, bias=False, device="meta")
    lin.weight = nn.Parameter((torch.randn(n_out, n_in, generator=gen) / n_in ** 0.5).to(device),
                              requires_grad=False)
    return lin


def _stand_in(expert: nn.Module, gen: torch.Generator) -> nn.Module:
    """A random expert of the same class as `expert` (an ExpertMLP or GptOssExpertMLP), of intermediate size
    STAND_IN_WIDTH."""
    gate, _, _ = expert.projections()
    h, dev, w = gate.in_features, gate.weight.device, STAND_IN_WIDTH
    lins = [_random_linear(h, w, gen, dev), _random_linear(h, w, gen, dev), _random_linear(w, h, gen, dev)]
    if isinstance(expert, GptOssExpertMLP):  # biased Linears, the clamped SwiGLU
        for lin in lins:
            lin.bias = nn.Parameter(torch.randn(lin.out_features, generator=gen).to(dev) * 0.1, requires_grad=False)
        return GptOssExpertMLP(*lins, expert.alpha, expert.limit)
    return moe.ExpertMLP(expert.names, *lins, expert.act_fn)


def light_copy(layer: nn.Module, gen: torch.Generator) -> nn.Module:
    """A float32 copy of `layer` whose routed experts are random stand-ins of intermediate size STAND_IN_WIDTH (same
    class, so the same call and routing: Llama 4's take the router scores; same input width; a nonlinear function of
    their input): the layer-level checks only need the experts to see their input change, and a copy of every expert
    would cost twice the layer's bytes."""
    memo = {}
    for mod in layer.modules():
        if isinstance(mod, moe.PerExpertLinears) and all(isinstance(e, (moe.ExpertMLP, GptOssExpertMLP)) for e in mod):
            memo[id(mod)] = type(mod)([_stand_in(e, gen) for e in mod])
    return copy.deepcopy(layer, memo).float()


@torch.no_grad()
def verified_mappings(layer: nn.Module, x: torch.Tensor, kw: dict, linears: frozenset[str], *,
                      head_dims: tuple[int, int]) -> tuple[list[ScaleMapping], list[str]]:
    """The scale moves of `layer` that leave its float32 function unchanged (< TOLERANCE relative), and the
    moves dropped with the reason. `linears`: the layer's quantized Linears (relative names)."""
    gen = torch.Generator().manual_seed(0)
    work = light_copy(layer, gen)
    x32, kw32 = _f32(x[:1]), _f32(_first(kw, x.shape[0]))

    def run_layer():
        return _out(work(x32, **kw32)) - x32  # the layer's update: the residual stream would hide small changes

    ref = run_layer()
    norms, pairs, dropped = candidates(work, x32, kw32, linears)
    kept = []
    for m in norms:
        for offset in NORM_OFFSETS:
            cand = ScaleMapping(smooth=m.smooth, balance=m.balance, norm_offset=offset)
            err = _moved_error(work, cand, run_layer, ref, gen, head_dims)
            if err < TOLERANCE:
                kept.append(cand)
                break
        else:
            dropped.append(f"{_describe(m)}: the layer output moves by {err:.1e} (relative)")
    for m in pairs:
        owner, _, _ = m.smooth.rpartition(".")
        if m.smooth.endswith("v_proj"):
            module, local, run, want = work, m, run_layer, ref
        else:  # a gated MLP alone, on random inputs (experts no calibration token reaches are checked too)
            module = copy.deepcopy(layer.get_submodule(owner) if owner else layer).float()
            local = ScaleMapping(smooth=m.smooth.rpartition(".")[2], balance=(m.balance[0].rpartition(".")[2],),
                                 extra=True)
            inp = torch.randn(8, module.get_submodule(local.smooth).in_features, generator=gen).to(x32.device)
            run = lambda module=module, inp=inp: _out(module(inp))  # noqa: E731
            want = run()
        err = _moved_error(module, local, run, want, gen, head_dims)
        if err < TOLERANCE:
            kept.append(m)
        else:
            dropped.append(f"{_describe(m)}: the output moves by {err:.1e} (relative)")
    return kept, dropped
