"""The model on the meta device and where each of its tensors is in the checkpoint.

Model keys map to checkpoint keys through transformers' own loading rules for the model
(`get_model_conversion_mapping`): renamings give one checkpoint tensor per model tensor; a `WeightConverter`
(transformers 5 fuses a sparse block's per-expert `gate_proj`/`up_proj`/`down_proj` into the 3-D
`experts.gate_up_proj` [E, 2I, H] and `experts.down_proj` [E, H, I], and may concatenate, split or permute other
tensors) makes a model tensor from several checkpoint tensors. `Weights` runs those converters on just the keys of
the tensor it materializes, in transformers' loading order and dtype, so a decoder layer holds exactly the values
`from_pretrained` would give it. Experts already replaced by per-expert Linears (`hubquant.moe.unfuse_experts` on
the skeleton) read their own checkpoint tensors when the converters only stack and concatenate them (the values
the fused tensors would hold, without building them: a layer's experts are in memory once); otherwise they get
views of the fused tensors, as `unfuse_experts` makes them in memory.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from hubquant.formats.shards import DTYPES, Checkpoint
from hubquant.modeling import layers_prefix


@dataclass
class Converted:
    """Model tensors one transformers `WeightConverter` makes: a copy of the converter, its checkpoint sources in
    transformers' loading order ((source pattern, checkpoint key)), the dtype they are read in, and the model keys
    it produces."""

    converter: object
    first: str  # the model key transformers files the converter under
    dtype: torch.dtype
    sources: list[tuple[str, str]] = field(default_factory=list)
    targets: tuple[str, ...] = ()

    def run(self, read, model: nn.Module) -> dict[str, torch.Tensor]:
        """{model key: tensor} from the sources (`read(key)` -> tensor; meta tensors give the shapes)."""
        conv = self.converter
        for pattern, key in self.sources:
            conv.add_tensor(self.first, key, pattern, lambda key=key: read(key).to(self.dtype))
        return conv.convert(self.first, model=model, config=model.config)


@dataclass
class Weights:
    """A meta-device model and where each of its tensors is in the checkpoint (`mapping`: model key -> key;
    `converted`: model key -> the converter that makes it)."""

    model: nn.Module
    checkpoint: Checkpoint
    mapping: dict[str, str]
    converted: dict[str, Converted] = field(default_factory=dict)
    _spare: dict[str, torch.Tensor] = field(default_factory=dict)  # converter outputs not asked for yet

    def tensor(self, key: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The value of model tensor `key` as `from_pretrained` gives it (a fresh CPU tensor)."""
        if key in self.mapping:
            t = self.checkpoint.read(self.mapping[key])
            return t if dtype is None else t.to(dtype)
        if key not in self._spare:
            self._spare.update(self.converted[key].run(self.checkpoint.read, self.model))
        return self._spare.pop(key)

    def load(self, module: nn.Module, prefix: str = "", *, experts: bool = True) -> None:
        """Read every parameter and persistent buffer of `module` still on the meta device (per-expert Linears:
        views of their experts module's fused tensors). experts=False leaves the per-expert Linears that
        `load_expert_linear` reads one at a time (each from its own checkpoint tensor) on the meta device."""
        from hubquant import moe

        later = []
        for ename, mods in moe.expert_modules(module, prefix).items():
            lin = mods[0].projections()[0]
            if not lin.weight.is_meta:
                continue
            per_expert = self.expert_sources(ename, len(mods))
            if per_expert is not None and not experts:
                later.append(ename + ".")
            elif per_expert is not None:
                self._read_experts(mods, per_expert, ename)
            else:
                fill_experts(mods, self.tensor(f"{ename}.gate_up_proj"), self.tensor(f"{ename}.down_proj"), ename)
        for name, t in _tensors(module):
            full = f"{prefix}.{name}" if prefix else name
            if t.is_meta and not full.startswith(tuple(later)):
                _set(module, name, self.tensor(full, t.dtype))

    def load_expert_linear(self, mods, ename: str, index: int, proj: str) -> bool:
        """Read projection `proj` of expert `index` of the experts module `mods` (named `ename`) from its own
        checkpoint tensor, as `load` reads it; False (nothing read) when the experts are not stored per expert."""
        per_expert = self.expert_sources(ename, len(mods))
        if per_expert is None:
            return False
        mlp = mods[index]
        key, dtype = per_expert[index][mlp.names.index(proj)]
        self._read_linear(getattr(mlp, proj), key, dtype, f"{ename}.{index}")
        return True

    def expert_sources(self, ename: str, n: int) -> list[tuple[tuple[str, torch.dtype], ...]] | None:
        """Each expert's checkpoint tensors [(gate, up, down) as (key, dtype)] when transformers' converters only
        stack them (`MergeModulelist(dim=0)`) and put gate before up (`Concatenate(dim=1)`): the fused tensors
        would hold exactly these values, expert e being the e-th tensor of each source pattern in loading order.
        None for anything else (the converters run as transformers runs them)."""
        from hubquant.moe_arch import only_stacks

        gate_up, down = self.converted.get(f"{ename}.gate_up_proj"), self.converted.get(f"{ename}.down_proj")
        if gate_up is None or down is None or gate_up is down:
            return None
        if not (only_stacks(gate_up.converter, "gate_up_proj") and only_stacks(down.converter, "down_proj")):
            return None
        columns = []
        for conv, count in ((gate_up, 2), (down, 1)):
            patterns = list(conv.converter.source_patterns)
            if len(patterns) != count:
                return None
            for p in patterns:
                keys = [k for q, k in conv.sources if q == p]
                if len(keys) != n:
                    return None
                columns.append([(k, conv.dtype) for k in keys])
        return list(zip(*columns, strict=True))

    def _read_experts(self, experts, per_expert: list, name: str) -> None:
        """Per-expert Linear weights read straight from their checkpoint tensors (no fused copy: the layer's
        experts are in memory once), in the dtype transformers' converter gives them."""
        for e, (mlp, sources) in enumerate(zip(experts, per_expert, strict=True)):
            for lin, (key, dtype) in zip(mlp.projections(), sources, strict=True):
                self._read_linear(lin, key, dtype, f"{name}.{e}")

    def _read_linear(self, lin: nn.Linear, key: str, dtype: torch.dtype, where: str) -> None:
        w = self.checkpoint.read(key).to(dtype)
        if tuple(w.shape) != tuple(lin.weight.shape):
            raise RuntimeError(f"{where}: checkpoint tensor {key} {tuple(w.shape)} does not fit the "
                               f"model's {tuple(lin.weight.shape)}")
        lin._parameters["weight"] = nn.Parameter(w, requires_grad=False)

    def release(self, module: nn.Module) -> None:
        """Put every parameter and persistent buffer of `module` back on the meta device (frees the memory)."""
        for name, t in _tensors(module):
            _set(module, name, torch.empty(t.shape, dtype=t.dtype, device="meta"))

    def load_rest(self, *, head: bool = True) -> None:
        """The weights outside the decoder layers (embeddings, final norm and, with `head`, lm_head); re-ties
        tied ones."""
        prefix = layers_prefix(self.model)
        inside, body = prefix + ".", prefix.rpartition(".")[0] + "."
        for name, t in list(_tensors(self.model)):
            if t.is_meta and not name.startswith(inside) and (head or name.startswith(body)):
                _set(self.model, name, self.tensor(name, t.dtype))
        if hasattr(self.model, "tie_weights"):
            self.model.tie_weights()

    def release_rest(self) -> None:
        """The weights outside the decoder layers (tied ones too) back on the meta device (`load_rest` rereads)."""
        inside = layers_prefix(self.model) + "."
        for mod_name, mod in self.model.named_modules():
            if not (mod_name + ".").startswith(inside):
                for attr, t in [*mod._parameters.items(), *mod._buffers.items()]:
                    if t is not None and not t.is_meta and attr not in mod._non_persistent_buffers_set:
                        _set(mod, attr, torch.empty(t.shape, dtype=t.dtype, device="meta"))


def fill_experts(experts, gate_up: torch.Tensor, down: torch.Tensor, name: str) -> None:
    """Per-expert Linear weights as views of the fused [E, 2I, H] and [E, H, I] tensors (hubquant.moe.unfuse_experts'
    split: gate rows first, then up)."""
    if getattr(experts, "transposed", False):  # Llama 4: [E, H, 2I] and [E, I, H] (hubquant.moe_llama4.experts)
        gate_up, down = gate_up.transpose(1, 2), down.transpose(1, 2)
    inter = gate_up.shape[1] // 2
    for e, mlp in enumerate(experts):
        for lin, w in zip(mlp.projections(), (gate_up[e, :inter], gate_up[e, inter:], down[e]), strict=True):
            w = w if w.is_contiguous() else w.contiguous()  # as unfusing in memory copies transposed experts
            if tuple(w.shape) != tuple(lin.weight.shape):
                raise RuntimeError(f"{name}.{e}: checkpoint experts {tuple(w.shape)} do not fit the model's "
                                   f"{tuple(lin.weight.shape)}")
            lin._parameters["weight"] = nn.Parameter(w, requires_grad=False)


def unstreamable_experts(model: nn.Module) -> str:
    """Why the fused experts of `model` cannot be split as `fill_experts` splits them ("" when they can): only the
    plain layout (gate_up_proj [E, 2I, H] with gate rows first, down_proj [E, H, I], no biases) is split per layer;
    others (gpt-oss: transposed, interleaved, biased) are unfused in memory by hubquant.moe."""
    for name, mod in model.named_modules():
        gate_up, down = getattr(mod, "gate_up_proj", None), getattr(mod, "down_proj", None)
        if not (isinstance(gate_up, torch.Tensor) and gate_up.dim() == 3 and isinstance(down, torch.Tensor)):
            continue
        e, two_i, h = gate_up.shape
        plain = set(dict(mod.named_parameters())) == {"gate_up_proj", "down_proj"}
        if plain and type(mod).__name__ == "Llama4TextExperts" and tuple(down.shape) == (e, h // 2, two_i):
            continue  # transposed [E, H, 2I] / [E, I, H]: fill_experts splits them as hubquant.moe_llama4 does
        if not plain or tuple(down.shape) != (e, h, two_i // 2):
            return f"the experts of {name} ({type(mod).__name__}) are not in the plain fused layout"
    return ""


def _tensors(module: nn.Module):
    seen = set()
    for name, p in module.named_parameters():
        seen.add(name)
        yield name, p
    for mod_name, mod in module.named_modules():
        for b, t in mod._buffers.items():
            if t is not None and b not in mod._non_persistent_buffers_set:
                yield (f"{mod_name}.{b}" if mod_name else b), t


def _set(module: nn.Module, dotted: str, value: torch.Tensor) -> None:
    owner_name, _, attr = dotted.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    if attr in owner._parameters:
        owner._parameters[attr] = nn.Parameter(value, requires_grad=False)
    else:
        owner._buffers[attr] = value


def load_skeleton(path: Path, *, trust_remote_code: bool, dtype: torch.dtype) -> nn.Module:
    """The causal LM of `path` with every parameter on the meta device (non-persistent buffers such as rotary
    frequencies computed on the CPU, as transformers' own loading does)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    owners = {}
    for name, buf in list(model.named_buffers()):
        mod_name, _, attr = name.rpartition(".")
        mod = model.get_submodule(mod_name)
        if buf.is_meta and attr in mod._non_persistent_buffers_set:
            mod._buffers[attr] = torch.empty_like(buf, device="cpu")
            owners[id(mod)] = mod
    for mod in owners.values():
        if isinstance(getattr(mod, "original_inv_freq", None), torch.Tensor) and mod.original_inv_freq.is_meta:
            mod.original_inv_freq = torch.empty_like(mod.original_inv_freq, device="cpu")
        model._init_weights(mod)
    model.requires_grad_(False)
    return model.eval()


def key_mapping(model: nn.Module, checkpoint: Checkpoint):
    """(mapping, converted, why): model key -> checkpoint key through transformers' renaming rules for this model,
    model key -> `Converted` for tensors its WeightConverters make, and why not ("" when every model tensor has a
    source whose shape fits)."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, dot_natural_key, rename_source_key

    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if not isinstance(t, WeightConverter)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    by_pattern = {p: c for c in converters for p in c.source_patterns}
    state = model.state_dict()
    prefix = getattr(model, "base_model_prefix", None)
    mapping: dict[str, str] = {}
    converted: dict[str, Converted] = {}
    for key in sorted(checkpoint.keys(), key=dot_natural_key):  # transformers' loading order
        new, pattern = rename_source_key(key, renamings, converters, prefix, state)
        if new not in state and key in state:
            new, pattern = rename_source_key(key, [], [], prefix, state)
        if new not in state:
            continue  # not a model tensor (transformers skips it too)
        if pattern is not None:
            conv = converted.setdefault(new, Converted(copy.deepcopy(by_pattern[pattern]), new, state[new].dtype))
            conv.sources.append((pattern, key))
        elif new in mapping:
            return None, None, f"checkpoint tensors {mapping[new]} and {key} both map to {new}"
        else:
            mapping[new] = key
    made, why = _converted_targets(model, checkpoint, converted, state)
    if why:
        return None, None, why
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    for target, source in tied.items():
        if target not in mapping and source in mapping:
            mapping[target] = mapping[source]
    missing = [k for k in state if k not in mapping and k not in made and "rotary_emb" not in k]
    if missing:
        return None, None, f"{len(missing)} model tensors are not in the checkpoint (e.g. {missing[0]})"
    return mapping, made, ""


def _converted_targets(model, checkpoint: Checkpoint, converted: dict[str, Converted], state):
    """Each converter run on meta tensors of its sources' shapes: which model keys it makes, with fitting shapes."""
    def meta(key):
        e = checkpoint.entries[key]
        return torch.empty(e.shape, dtype=DTYPES[e.dtype], device="meta")

    made: dict[str, Converted] = {}
    for first, conv in converted.items():
        try:
            out = conv.run(meta, model)
        except Exception as e:  # an operation transformers cannot run on shapes alone
            return None, f"checkpoint tensors for {first} are converted by {type(conv.converter).__name__} ({e})"
        for key, t in out.items():
            if key not in state or tuple(state[key].shape) != tuple(t.shape):
                return None, f"{first}: transformers' conversion makes {key} {tuple(t.shape)}, which the model lacks"
            made[key] = conv
        conv.targets = tuple(out)
    return made, ""


def open_checkpoint(path: Path, *, trust_remote_code: bool, dtype: torch.dtype):
    """Weights for a streamed conversion of the folder `path`, or (None, why not)."""
    checkpoint = Checkpoint(path)
    if not checkpoint.entries:
        return None, "no safetensors weights"
    model = load_skeleton(path, trust_remote_code=trust_remote_code, dtype=dtype)
    why = unstreamable_experts(model)
    if why:
        return None, why
    mapping, converted, why = key_mapping(model, checkpoint)
    if mapping is None:
        return None, why
    return Weights(model=model, checkpoint=checkpoint, mapping=mapping, converted=converted), ""
