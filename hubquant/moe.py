"""Mixture-of-experts: per-expert Linears, routing statistics, the low-token rule, checkpoint names.

transformers 5 keeps a sparse block's experts as two fused 3-D parameters (`experts.gate_up_proj`
[E, 2I, H], `experts.down_proj` [E, H, I]), which no method sees as Linears. `unfuse_experts(model)`
replaces each such module by `PerExpertLinears`, a ModuleList of per-expert MLPs whose `gate_proj`,
`up_proj` and `down_proj` (Mixtral: `w1`, `w3`, `w2`) are plain `nn.Linear` views of the fused weights,
with the same routing arithmetic as transformers' eager experts. Then:

- every method quantizes every expert's projections like any other Linear;
- a Linear's forward pre-hook fires only with the tokens the router sends to its expert, so calibrated
  methods collect per-expert statistics (Hessians, absmax) without further plumbing;
- `model.state_dict()` names the experts as the Hub's checkpoints do (`mlp.experts.{i}.gate_proj.weight`),
  which transformers' weight-conversion mappings fuse again when they load the variant.

Calibrated methods run under `RoutingPolicy` (`quantize_with_policy`): before a MoE layer's method work the
engine counts the calibration tokens routed to each expert (`prepare_layer`); experts under
`min_expert_tokens` are quantized with round-to-nearest instead (stated in the log and the card), unless
`calibrate_all_experts=true`, where every expert sees every calibration token for its statistics while
the layer's output still uses only the routed ones.
"""
from __future__ import annotations

import contextlib
import contextvars
import statistics
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from hubquant.errors import UnsupportedError, UsageError
from hubquant.modeling import FLOAT_PATTERNS, auto_class, is_float_module  # noqa: F401  (re-exported)
from hubquant.moe_arch import OVERRIDES as EXPERT_LAYOUTS  # noqa: F401  (re-exported)
from hubquant.moe_arch import ExpertLayout, expert_layout

# ------------------------------------------------------------------------------------------ architectures as data
# Where each architecture's experts are in its checkpoints: hubquant.moe_arch (transformers' conversion mapping,
# OVERRIDES for what it does not give, the unfuse check, routers).

# Model types whose variants plain transformers 5.24 cannot load (no per-expert conversion mapping): why.
NO_TRANSFORMERS_MAPPING = {
    "gpt_oss": "transformers 5.24 has no conversion mapping from per-expert gpt-oss tensors to its fused, "
               "transposed, interleaved experts",
}

PER_EXPERT_LOADING = ("llama4_text", "llama4")  # transformers loads their experts as Linears (int8 too): moe_llama4
# how the card words where the experts are, per format
STORED = {"compressed-tensors": "stored per expert (`experts.{i}.<projection>`), as vLLM's MoE loaders name them",
          "mxfp4": "stored as gpt-oss's MXFP4 blocks and E8M0 scales per sparse block (`experts.gate_up_proj_blocks`, "
                   "...), the layout of OpenAI's own gpt-oss checkpoints",
          "gguf": "stacked per layer into `blk.N.ffn_{gate,up,down}_exps` (one type per stack), "
                  "as llama.cpp reads them"}
# GGUF: an expert under the threshold gets no importance matrix (llama.cpp's plain weighting), not round-to-nearest
GGUF_LOW_TOKEN_RULE = "no importance matrix (llama.cpp's plain weighting) for experts under the threshold"

INT8_EXPERTS_REASON = ("plain transformers 5.24 cannot load W8A8 int8 experts (int8 `weight` tensors, the layout "
                       "vLLM's W8A8 MoE path reads: transformers' expert decompression takes packed and FP8 experts "
                       "only)")

# Fused experts hubquant refuses (none today; kept for architectures whose layout is not known yet).
UNSUPPORTED_EXPERTS: dict[str, str] = {}

FLOAT_REASONS = {
    "router": "routers and shared-expert gates decide which expert runs; kept in float (as vLLM expects)",
    "vision": "vision tower and projector of a vision-language model; only the language model is quantized",
    "indexer": "the sparse-attention indexer picks the tokens each query attends to (a top-k, like a router's); kept "
               "in float",
    "embedding": "embeddings and norms are not Linear layers; kept in float",
}


def model_type(model: nn.Module) -> str:
    return getattr(getattr(model, "config", None), "model_type", "") or ""


# ------------------------------------------------------------------------------------------ per-expert Linears


class ExpertMLP(nn.Module):
    """One expert: down(act(gate(x)) * up(x)); the three Linears carry the checkpoint's names."""

    def __init__(self, names: tuple[str, str, str], gate: nn.Linear, up: nn.Linear, down: nn.Linear, act):
        super().__init__()
        self.names = names
        for n, lin in zip(names, (gate, up, down)):
            self.add_module(n, lin)
        self.act_fn = act

    def projections(self) -> tuple[nn.Linear, nn.Linear, nn.Linear]:
        return tuple(getattr(self, n) for n in self.names)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up, down = self.projections()
        return down(self.act_fn(gate(x)) * up(x))


class PerExpertLinears(nn.ModuleList):
    """Stand-in for transformers' fused experts module: same call (hidden [T, H], top_k_index [T, k],
    top_k_weights [T, k]) and the same arithmetic as the eager implementation, one `ExpertMLP` per expert."""

    def __init__(self, experts: list[ExpertMLP]):
        super().__init__(experts)
        self.num_experts = len(experts)
        self.calibrate_all = False  # statistics from every token, output from the routed ones
        self.on_route: Callable[[torch.Tensor], None] | None = None  # sees top_k_index (routing statistics)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        if self.on_route is not None:
            self.on_route(top_k_index)
        final = torch.zeros_like(hidden_states)
        with torch.no_grad():
            mask = nn.functional.one_hot(top_k_index, num_classes=self.num_experts + 1).permute(2, 1, 0)
            hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
        todo = range(self.num_experts) if self.calibrate_all else [int(e[0]) for e in hit]
        for e in todo:
            if e == self.num_experts:
                continue
            top_k_pos, token_idx = torch.where(mask[e])
            if self.calibrate_all:
                out = self[e](hidden_states)[token_idx]  # every token feeds the statistics hooks
            else:
                out = self[e](hidden_states[token_idx])
            if token_idx.numel() == 0:
                continue
            out = out * top_k_weights[token_idx, top_k_pos, None]
            final.index_add_(0, token_idx, out.to(final.dtype))
        return final


def _fused_experts(model: nn.Module) -> list[tuple[str, nn.Module]]:
    out = []
    for name, mod in model.named_modules():
        p = getattr(mod, "gate_up_proj", None)
        if isinstance(p, torch.Tensor) and p.dim() == 3 and isinstance(getattr(mod, "down_proj", None), torch.Tensor):
            out.append((name, mod))
    return out


def expert_linear(weight: torch.Tensor) -> nn.Linear:
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    lin.weight = nn.Parameter(weight, requires_grad=False)
    return lin


@torch.no_grad()
def unfuse_experts(model: nn.Module) -> int:
    """Replace every fused experts module of `model` by `PerExpertLinears` (weights are views, no copy).

    Returns the number of experts modules replaced (0 for dense models).

    Raises:
        UnsupportedError: fused experts of an architecture without a per-expert checkpoint layout.
    """
    from hubquant import moe_arch, moe_gptoss, moe_llama4

    fused = _fused_experts(model)
    if not fused:
        return 0
    mtype = model_type(model)
    if mtype in UNSUPPORTED_EXPERTS:
        raise moe_arch.refusal(mtype, f"cannot be converted: {UNSUPPORTED_EXPERTS[mtype]}")
    if mtype in PER_EXPERT_LOADING:  # the router's score scales the expert input: hubquant.moe_llama4
        return moe_llama4.unfuse(model)
    layout = expert_layout(model, fused[0][0])
    if layout is None:
        raise moe_arch.refusal(mtype, "have no known per-expert checkpoint layout (transformers' conversion mapping "
                                      "builds them from no per-expert tensors)")
    if mtype == "gpt_oss":
        def build(mod):
            return PerExpertLinears(moe_gptoss.experts(mod))
    else:
        def build(mod):
            gate_up, down = mod.gate_up_proj.data, mod.down_proj.data
            inter = gate_up.shape[1] // 2
            return PerExpertLinears([ExpertMLP(layout.proj_names, expert_linear(gate_up[e, :inter]),
                                               expert_linear(gate_up[e, inter:]), expert_linear(down[e]), mod.act_fn)
                                     for e in range(gate_up.shape[0])])
        moe_arch.check_unfused(fused[0][1], build, mtype)  # transformers' forward = per-expert Linears, or exit 5
    for name, mod in fused:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        moe_arch.mark_routers(parent, mod, mod.gate_up_proj.shape[0], mod.down_proj.shape[1])
        setattr(parent, child, build(mod))
    _LAYOUTS[model] = layout
    return len(fused)


def expert_modules(module: nn.Module, prefix: str = "") -> dict[str, PerExpertLinears]:
    """The `PerExpertLinears` inside `module`, keyed by full module name."""
    out = {}
    for name, mod in module.named_modules():
        if isinstance(mod, PerExpertLinears):
            out[f"{prefix}.{name}" if prefix and name else (prefix or name)] = mod
    return out


def expert_linear_names(module: nn.Module, prefix: str = "") -> dict[str, tuple[str, int]]:
    """{full Linear name: (experts module name, expert index)} for every expert projection in `module`."""
    out = {}
    for ename, experts in expert_modules(module, prefix).items():
        for i, mlp in enumerate(experts):
            for n in mlp.names:
                out[f"{ename}.{i}.{n}"] = (ename, i)
    return out


# ------------------------------------------------------------------------------------------ checkpoint names


_LAYOUTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> its layout (names are asked per tensor)


def _layout(model: nn.Module) -> ExpertLayout | None:
    """The layout of `model`'s per-expert Linears (None for a model without them)."""
    if model in _LAYOUTS:
        return _LAYOUTS[model]
    name = next(iter(expert_modules(model)), None)
    _LAYOUTS[model] = layout = None if name is None else expert_layout(model, name)
    return layout


def checkpoint_name(model: nn.Module, key: str) -> str:
    """The name a tensor or module of `model` gets in the checkpoint (Mixtral: `.mlp.` -> `.block_sparse_moe.`)."""
    layout = _layout(model)
    if layout is None or layout.block_rename is None:
        return key
    src, dst = layout.block_rename
    return key.replace(src, dst) if ".layers." in key else key


def float_module_names(model: nn.Module) -> list[str]:
    """Modules kept in float that a loader could otherwise take for quantized Linears (routers: vLLM builds
    them as Linear layers and reads the `ignore` list of the quantization config)."""
    return sorted(n for n, m in model.named_modules()
                  if n and (is_float_module(n) or getattr(m, "hubquant_float", False))
                  and not isinstance(m, (nn.ModuleList, nn.ModuleDict))
                  and any(True for _ in m.parameters(recurse=False)))


def checkpoint_scheme(model: nn.Module, scheme, fmt: str, *, asym_requested: bool, log=print):
    """The scheme a MoE variant is written with, or why it cannot be written.

    transformers 5.24 fuses per-expert tensors again only through a dequantize step: compressed-tensors has one
    (packed int, MXFP4 and FP8 experts; no zero points, no NVFP4 global scale), bitsandbytes none. So MoE variants
    in compressed-tensors use symmetric int4 groups, NVFP4 and bitsandbytes variants are refused (their experts
    could not be loaded). docs/moe.md has the table.

    Raises:
        UsageError: --asym asked for a mixture-of-experts model written as compressed-tensors.
        UnsupportedError: a bitsandbytes or NVFP4 variant of a mixture-of-experts model.
    """
    import dataclasses

    # the reasons live in the torch-free registry, so preflight stops before any download with the same words
    from hubquant.methods import BNB_EXPERTS_REASON, NVFP4_EXPERTS_HINT, NVFP4_EXPERTS_REASON

    if not expert_modules(model):
        return scheme
    if scheme.weights.type == "int" and scheme.weights.bits == 8 and fmt == "compressed-tensors":
        if scheme.activations is not None and model_type(model) not in PER_EXPERT_LOADING:
            log(f"moe: {INT8_EXPERTS_REASON}; hubquant.load runs the variant (docs/moe.md)")
        elif scheme.activations is None:
            log("moe: weight-only int8 is written pack-quantized (the layout transformers and vLLM read for experts)")
    if model_type(model) in NO_TRANSFORMERS_MAPPING and fmt == "compressed-tensors":
        log(f"moe: the variant loads with hubquant.load; plain transformers cannot load its experts "
            f"({NO_TRANSFORMERS_MAPPING[model_type(model)]}); --format mxfp4 --scheme MXFP4A16 writes gpt-oss's own "
            "layout, which it loads")
    if fmt == "bitsandbytes":
        raise UnsupportedError(BNB_EXPERTS_REASON,
                               hint="use --method rtn, gptq, awq or fp8 (compressed-tensors) for mixture-of-experts")
    w = scheme.weights
    if w.type == "float" and w.bits == 4 and w.group_size == 16:
        raise UnsupportedError(NVFP4_EXPERTS_REASON, hint=NVFP4_EXPERTS_HINT)
    if fmt != "compressed-tensors" or w.symmetric or w.type == "float" or w.bits == 8:
        return scheme
    if asym_requested:
        raise UsageError("transformers cannot load asymmetric int4 experts from compressed-tensors (no zero points "
                         "in its expert decompression)", hint="drop --asym; experts are written symmetric")
    log("moe: experts are written with symmetric groups (transformers loads no zero points for experts)")
    return dataclasses.replace(scheme, weights=dataclasses.replace(w, symmetric=True))


def pack_weight_only_int8(model: nn.Module, quantized: dict, scheme) -> None:
    """Mark every quantized Linear of a weight-only int8 (W8A16) mixture-of-experts variant to be written
    `pack-quantized` (hubquant.quant.PACK_INT8), one format for the whole checkpoint:
    transformers 5.24 decompresses packed and FP8 experts only, and vLLM's MoE loader takes weight-only int8
    experts only packed (WNA16). W8A8 experts keep int8 `weight` tensors, which vLLM's W8A8 MoE path reads.
    Values of `quantized` that are not QuantizedWeights (names of Linears already written) are left alone."""
    from hubquant.quant import PACK_INT8

    w = scheme.weights
    if w.type != "int" or w.bits != 8 or scheme.activations is not None or not expert_modules(model):
        return
    for qw in quantized.values():
        if isinstance(getattr(qw, "extra", None), dict):
            qw.extra[PACK_INT8] = True


def model_name(model: nn.Module, key: str) -> str:
    """Inverse of `checkpoint_name`: the module path in transformers of a checkpoint name."""
    layout = _layout(model)
    if layout is None or layout.block_rename is None:
        return key
    src, dst = layout.block_rename
    return key.replace(dst, src) if ".layers." in key else key


# ------------------------------------------------------------------------------------------ scaling maps (data)

# (producer, consumers, extra) relative to a decoder layer: the producer's output feeds only the consumers,
# so scaling moves exactly between them (AWQ, SmoothQuant). Entries whose modules a layer lacks are skipped
# by the methods (dense first layers, MLA instead of q/k/v, GQA v/o). A sparse block's input also feeds the
# router, so no entry scales the norm in front of the experts: experts get their own up -> down pairs.
_ATTENTION_SCALING = (
    ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), False),
    ("input_layernorm", ("self_attn.q_a_proj", "self_attn.kv_a_proj_with_mqa"), False),  # MLA, q LoRA
    ("input_layernorm", ("self_attn.q_proj", "self_attn.kv_a_proj_with_mqa"), False),  # MLA, no q LoRA
    ("self_attn.q_a_layernorm", ("self_attn.q_b_proj",), False),
    ("self_attn.kv_a_layernorm", ("self_attn.kv_b_proj",), False),
    ("self_attn.v_proj", ("self_attn.o_proj",), True),
    ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), False),  # dense layers only
    ("mlp.up_proj", ("mlp.down_proj",), True),
    ("mlp.shared_expert.up_proj", ("mlp.shared_expert.down_proj",), True),
    ("mlp.shared_experts.up_proj", ("mlp.shared_experts.down_proj",), True),
)


def scale_mappings(model: nn.Module, *, extra: bool = True) -> list[tuple[str, tuple[str, ...], bool]] | None:
    """The scaling map of a mixture-of-experts model as (smooth, balance, extra) triples (the fields of
    hubquant.methods.scaling.ScaleMapping), None for other models (dense: their architecture's table; derived
    mixture-of-experts types and gpt-oss: hubquant.moe_scaling builds each layer's map from its structure).
    `extra=False` keeps the norms only (SmoothQuant smooth=norms)."""
    from hubquant.methods import MOE_MODEL_TYPES  # the architectures whose scaling map is checked (docs/moe.md)
    from hubquant.moe_scaling import STRUCTURAL_TYPES  # gpt-oss: built and checked per layer like the derived types

    mods = expert_modules(model)
    if not mods or model_type(model) not in MOE_MODEL_TYPES or model_type(model) in STRUCTURAL_TYPES:
        return None
    _, up, down = _layout(model).proj_names
    n = max(m.num_experts for m in mods.values())
    groups = list(_ATTENTION_SCALING) + [(f"mlp.experts.{i}.{up}", (f"mlp.experts.{i}.{down}",), True)
                                         for i in range(n)]
    return [(p, c, e) for p, c, e in groups if extra or not e]


# ------------------------------------------------------------------------------------------ routing statistics


@dataclass
class RoutingPolicy:
    """What calibrated methods do with experts: the threshold, the rule below it, and the record."""

    min_expert_tokens: int = 16
    calibrate_all_experts: bool = False
    fallback: Callable[[dict[str, nn.Linear]], None] | None = None  # quantizes low-token experts' Linears
    counts: dict[str, list[int]] = field(default_factory=dict)  # experts module -> routed tokens per expert
    fallback_linears: list[str] = field(default_factory=list)

    @classmethod
    def from_options(cls, options: dict) -> RoutingPolicy:
        cal = options.get("calibrate_all_experts", False)
        if isinstance(cal, str):
            if cal.lower() not in ("true", "false", "1", "0"):
                raise UsageError(f"calibrate_all_experts={cal}", hint="use calibrate_all_experts=true or false")
            cal = cal.lower() in ("true", "1")
        try:
            n = int(options.get("min_expert_tokens", 16))
        except (TypeError, ValueError):
            raise UsageError(f"min_expert_tokens={options['min_expert_tokens']}", hint="use an integer >= 0") from None
        if n < 0:
            raise UsageError(f"min_expert_tokens={n}", hint="use an integer >= 0")
        return cls(min_expert_tokens=n, calibrate_all_experts=bool(cal))

    def summary(self) -> dict:
        """min / median / max routed tokens per expert over all MoE layers, and how many fell under the threshold."""
        flat = [c for cs in self.counts.values() for c in cs]
        if not flat:
            return {}
        low = sum(c < self.min_expert_tokens for c in flat)
        return {"experts": len(flat), "layers": len(self.counts), "min": min(flat), "median": statistics.median(flat),
                "max": max(flat), "threshold": self.min_expert_tokens, "below_threshold": low,
                "calibrate_all_experts": self.calibrate_all_experts,
                "rule": ("all calibration tokens feed every expert's statistics" if self.calibrate_all_experts
                         else "round-to-nearest for experts under the threshold"),
                "fallback_linears": len(self.fallback_linears)}


_POLICY: contextvars.ContextVar[RoutingPolicy | None] = contextvars.ContextVar("hubquant_moe_policy", default=None)


@contextlib.contextmanager
def policy_in_force(policy: RoutingPolicy):
    """The engine applies `policy` to every MoE layer while this context is open."""
    token = _POLICY.set(policy)
    try:
        yield policy
    finally:
        _POLICY.reset(token)


def current_policy() -> RoutingPolicy | None:
    """The policy in force (`policy_in_force`), if any."""
    return _POLICY.get()


class _Routed(Exception):
    """Stops a layer once its router has chosen the experts (the routing pass needs nothing after that)."""


@torch.no_grad()
def routed_counts(layer: nn.Module, inputs: list, kwargs: list, *,
                  to_device: Callable[[torch.Tensor], torch.Tensor] = lambda x: x) -> dict[str, list[int]]:
    """Calibration tokens the router of each experts module in `layer` sends to each expert (one cheap pass:
    attention and router only). Keys are names relative to `layer`; `to_device` moves a batch where the layer is
    (inputs that wait on the host)."""
    mods = expert_modules(layer)
    counts = {n: torch.zeros(m.num_experts, dtype=torch.long) for n, m in mods.items()}
    pending: set[str] = set()

    def make(name, mod):
        def on_route(idx):
            counts[name] += torch.bincount(idx.reshape(-1).cpu(), minlength=mod.num_experts)[: mod.num_experts]
            pending.discard(name)
            if not pending:
                raise _Routed
        return on_route

    for n, m in mods.items():
        m.on_route = make(n, m)
    try:
        for x, kw in zip(inputs, kwargs):
            pending.update(mods)
            try:
                layer(to_device(x), **kw)
            except _Routed:
                pass
    finally:
        for m in mods.values():
            m.on_route = None
    return {n: c.tolist() for n, c in counts.items()}


def prepare_layer(work) -> None:
    """Engine hook before a layer's method work: count the routing and apply the low-token rule.

    Under a `RoutingPolicy`, experts whose routed token count is under the threshold leave `work.linears`
    (they go to `work.scratch['moe_fallback']` and are quantized by the policy's fallback after the method's
    work); with `calibrate_all_experts` every expert sees every token instead."""
    policy = _POLICY.get()
    mods = expert_modules(work.layer)
    if policy is None or not mods:
        return
    counts = routed_counts(work.layer, work.inputs, work.kwargs, to_device=getattr(work, "_to_device", lambda x: x))
    fallback = {}
    for rel, per_expert in counts.items():
        full = f"{work.name}.{rel}"
        policy.counts[full] = per_expert
        mods[rel].calibrate_all = policy.calibrate_all_experts
        if policy.calibrate_all_experts:
            continue
        for i, c in enumerate(per_expert):
            if c < policy.min_expert_tokens:
                for n in mods[rel][i].names:
                    lin_name = f"{full}.{i}.{n}"
                    if lin_name in work.linears:
                        fallback[lin_name] = work.linears.pop(lin_name)
    work.scratch["moe_fallback"] = fallback


def finish_layer(work) -> None:
    """Engine hook after a layer's method work: quantize the low-token experts by the stated rule."""
    policy = _POLICY.get()
    for m in expert_modules(work.layer).values():
        m.calibrate_all = False
    fallback = work.scratch.pop("moe_fallback", None)
    if policy is None or not fallback:
        return
    policy.fallback_linears.extend(fallback)
    if policy.fallback is not None:
        policy.fallback(fallback)


# ------------------------------------------------------------------------------------------ report and card


def _float_kinds(model: nn.Module) -> dict[str, list[str]]:
    kinds: dict[str, list[str]] = {"router": [], "vision": [], "indexer": []}
    for n in float_module_names(model):
        kind = "vision" if any(v in n for v in ("vis", "projector")) else "indexer" if ".indexer." in n else "router"
        kinds[kind].append(checkpoint_name(model, n))
    return {k: v for k, v in kinds.items() if v}


def report(model: nn.Module, quantized: dict, policy: RoutingPolicy | None) -> dict | None:
    """What provenance records about experts and float modules (None for a dense text model)."""
    experts = expert_linear_names(model)
    kinds = _float_kinds(model)
    if not experts and not kinds:
        return None
    out: dict = {"float_modules": {k: len(v) for k, v in kinds.items()},
                 "float_reasons": {k: FLOAT_REASONS[k] for k in kinds}}
    if experts:
        out.update(expert_linears=len(experts), expert_linears_quantized=sum(n in quantized for n in experts),
                   experts_modules=len(expert_modules(model)))
    if policy is not None and policy.counts:
        out["routing"] = policy.summary()
        out["routed_tokens"] = {checkpoint_name(model, k): v for k, v in policy.counts.items()}
    return out


def card_section(model: nn.Module, quantized: dict, policy: RoutingPolicy | None, *,
                 fmt: str = "compressed-tensors") -> str:
    """Markdown for the model card: expert coverage, routing statistics, what stayed float and why, what loads it
    (`fmt`: the checkpoint format; "mxfp4" is gpt-oss's own layout, which plain transformers loads)."""
    from hubquant.quant import PACK_INT8

    rep = report(model, quantized, policy)
    if rep is None:
        return ""
    lines = ["", "## Mixture of experts and modules kept in float" if "expert_linears" in rep
             else "## Modules kept in float", ""]
    if "expert_linears" in rep:
        stored = STORED.get(fmt, STORED["compressed-tensors"])
        lines.append(f"- Experts: {rep['expert_linears_quantized']} of {rep['expert_linears']} expert projections "
                     f"quantized, in {rep['experts_modules']} sparse blocks, {stored}.")
    r = rep.get("routing")
    if r:
        rule = GGUF_LOW_TOKEN_RULE if fmt == "gguf" and not r["calibrate_all_experts"] else r["rule"]
        lines.append(f"- Calibration tokens routed to each expert: min {r['min']}, median {r['median']:g}, "
                     f"max {r['max']}; {r['below_threshold']} of {r['experts']} experts got fewer than "
                     f"{r['threshold']}. Rule: {rule} ({r['fallback_linears']} projections by that rule).")
    elif "expert_linears" in rep:
        lines.append("- No calibration: every expert is quantized from its own weights.")
    first = next((quantized[n] for n in expert_linear_names(model) if n in quantized), None)
    ws = getattr(first, "scheme", None)
    per_expert = model_type(model) in PER_EXPERT_LOADING
    packed = bool(getattr(first, "extra", {}).get(PACK_INT8)) or per_expert  # weight-only int8 packed, Llama 4: load
    int8 = ws is not None and ws.type == "int" and ws.bits == 8 and not packed
    if fmt == "gguf":
        pass  # the GGUF section lists the llama.cpp / Ollama commands
    elif fmt == "mxfp4":
        lines.append("- Loading: plain `AutoModelForCausalLM.from_pretrained` (gpt-oss's own MXFP4 layout) or vLLM. "
                     "Offline or without a GPU, pass `quantization_config=Mxfp4Config(dequantize=True)` (transformers "
                     "5.25 and later otherwise fetch gpt-oss's MXFP4 kernels from the Hub).")
    elif int8 and model_type(model) not in NO_TRANSFORMERS_MAPPING:
        lines.append(f"- Loading: `hubquant.load(path)` runs this variant. {INT8_EXPERTS_REASON}.")
    elif ws is not None and model_type(model) not in NO_TRANSFORMERS_MAPPING:
        how = "reads Llama 4's experts per expert" if per_expert else "fuses the experts again"
        lines.append(f"- Loading: plain `{auto_class(model.config).__name__}.from_pretrained` (transformers {how}) "
                     "or `hubquant.load(path)`.")
    if model_type(model) in NO_TRANSFORMERS_MAPPING and fmt == "compressed-tensors":
        lines.append(f"- Loading: `hubquant.load(path)` runs this variant. plain transformers cannot load its experts "
                     f"({NO_TRANSFORMERS_MAPPING[model_type(model)]}): `from_pretrained` would leave them "
                     "uninitialized.")
    for kind, names in _float_kinds(model).items():
        shown = ", ".join(f"`{n}`" for n in names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
        lines.append(f"- Float: {shown}. Why: {FLOAT_REASONS[kind]}.")
    if fmt == "gguf":
        lines.append("- Float: norms (F32). The token embeddings are quantized with the type llama.cpp's mix "
                     "gives them.")
    else:
        lines.append(f"- Float: embeddings and norms. Why: {FLOAT_REASONS['embedding']}.")
    return "\n".join(lines) + "\n"


