"""Larger-than-memory conversion: one decoder layer in memory at a time.

    skeleton on the meta device (no weights) -> embeddings, final norm and lm_head from the checkpoint ->
    for each decoder layer: read its tensors from the safetensors shards, run the base model's evaluation
    activations through it, quantize it (RTN here; GPTQ through hubquant.engine.run_layers), run the variant's
    evaluation activations through it, append its output tensors to the variant's shards, free it ->
    perplexity, agreement, KL and the calibration-leak rates from the kept last-layer activations.

Peak memory is one decoder layer, the non-layer weights and the activations (calibration, evaluation), not
the model. The files are byte-identical to the in-memory path's (`hubquant.formats.shards.ShardWriter` lays
them out as `save_tensors` does; the format writers make every tensor). Checkpoints whose tensors transformers
has to convert on load (e.g. per-expert MoE tensors fused into 3-D parameters) are not streamed:
`open_checkpoint` says why and the pipeline loads the model in memory instead.
"""
from __future__ import annotations

import ctypes
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from hubquant import fp4
from hubquant.engine import _clean_kwargs, _Passthrough, _to, layer_attention_types, layer_hooks
from hubquant.formats.shards import Checkpoint, ShardWriter
from hubquant.modeling import decoder_layers, layers_prefix, quantizable_linears

STREAMED_METHODS = ("rtn", "gptq")
STREAMED_FORMATS = ("compressed-tensors", "gptq", "awq", "gguf")
# formats that quantize and write a streamed run themselves: format -> (methods, "module:run_streamed(run, job, out)")
OWN_STREAMED = {"gguf": (("rtn", "imatrix"), "hubquant.formats.gguf.streamed:run_streamed")}


@dataclass
class Weights:
    """A meta-device model and where each of its tensors is in the checkpoint (`mapping`: model key -> key)."""

    model: nn.Module
    checkpoint: Checkpoint
    mapping: dict[str, str]

    def load(self, module: nn.Module, prefix: str = "") -> None:
        """Read every parameter and persistent buffer of `module` still on the meta device."""
        for name, t in _tensors(module):
            if t.is_meta:
                full = f"{prefix}.{name}" if prefix else name
                _set(module, name, self.checkpoint.read(self.mapping[full]).to(t.dtype))

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
                _set(self.model, name, self.checkpoint.read(self.mapping[name]).to(t.dtype))
        if hasattr(self.model, "tie_weights"):
            self.model.tie_weights()


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


def load_skeleton(path: Path, *, trust_remote_code: bool, dtype: torch.dtype):
    """The causal LM of `path` with every parameter on the meta device (non-persistent buffers such as rotary
    frequencies computed on the CPU, as transformers' own loading does), and its tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

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
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    return model.eval(), tokenizer


def key_mapping(model: nn.Module, checkpoint: Checkpoint) -> tuple[dict[str, str] | None, str]:
    """Model key -> checkpoint key through transformers' own renaming rules for this model, or (None, why)
    when a checkpoint tensor needs more than a new name (a WeightConverter: fusing, splitting, permuting)."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, rename_source_key

    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if not isinstance(t, WeightConverter)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    state = model.state_dict()
    prefix = getattr(model, "base_model_prefix", None)
    mapping: dict[str, str] = {}
    for key in checkpoint.keys():
        new, pattern = rename_source_key(key, renamings, converters, prefix, state)
        if pattern is not None:
            return None, f"checkpoint tensor {key} is converted on load ({pattern} -> {new})"
        if new in state:
            if new in mapping:
                return None, f"checkpoint tensors {mapping[new]} and {key} both map to {new}"
            mapping[new] = key
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    for target, source in tied.items():
        if target not in mapping and source in mapping:
            mapping[target] = mapping[source]
    missing = [k for k in state if k not in mapping and "rotary_emb" not in k]
    if missing:
        return None, f"{len(missing)} model tensors are not in the checkpoint (e.g. {missing[0]})"
    return mapping, ""


def open_checkpoint(path: Path, *, trust_remote_code: bool, dtype: torch.dtype):
    """(Weights, tokenizer) for a streamed conversion of the folder `path`, or (None, why not)."""
    checkpoint = Checkpoint(path)
    if not checkpoint.entries:
        return None, "no safetensors weights"
    model, tokenizer = load_skeleton(path, trust_remote_code=trust_remote_code, dtype=dtype)
    mapping, why = key_mapping(model, checkpoint)
    if mapping is None:
        return None, why
    return Weights(model=model, checkpoint=checkpoint, mapping=mapping), tokenizer


def return_freed_memory() -> None:
    """Have glibc give large freed blocks back to the OS at once (its adaptive mmap threshold otherwise keeps
    freed layer-sized blocks on the heap, and the process's resident size grows layer after layer)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD: blocks >= 1 MiB are mmapped and unmapped on free
    libc.mallopt(-1, 1 << 20)  # M_TRIM_THRESHOLD


# ------------------------------------------------------------------------------------------- activations


class Stream:
    """Hidden states of token batches on their way through the decoder layers, advanced one layer at a time
    (kept on the CPU; each batch visits the layer's device)."""

    def __init__(self, model: nn.Module, ids: torch.Tensor | None, batch_size: int, device: torch.device):
        from hubquant.engine import capture_inputs, kwargs_by_attention_type

        self.hidden: list[torch.Tensor] = []
        self.kwargs: list[dict] = []
        self.by_type: dict = {}
        if ids is None:
            return
        inputs, kwargs = capture_inputs(model, ids, device=device, batch_size=batch_size)
        by_type = kwargs_by_attention_type(model, ids, kwargs, device=device, batch_size=batch_size)
        _non_layers_to(model, "cpu")
        self.hidden = [x.cpu() for x in inputs]
        self.kwargs = [_to(kw, "cpu") for kw in kwargs]
        self.by_type = {t: [_to(kw, "cpu") for kw in kws] for t, kws in by_type.items()}
        self.types = layer_attention_types(model)

    def copy(self) -> Stream:
        other = Stream.__new__(Stream)
        other.hidden, other.kwargs, other.by_type = list(self.hidden), self.kwargs, self.by_type
        other.types = getattr(self, "types", None)
        return other

    @torch.no_grad()
    def advance(self, index: int, layer: nn.Module, device: torch.device) -> None:
        kws = self.by_type.get(self.types[index], self.kwargs) if self.hidden else []
        for b, (x, kw) in enumerate(zip(self.hidden, kws)):
            y = layer(x.to(device), **_to(_clean_kwargs(kw), device))
            self.hidden[b] = (y[0] if isinstance(y, (tuple, list)) else y).cpu()


def _non_layers_to(model: nn.Module, device) -> None:
    layers = decoder_layers(model)
    parent = next(m for m in model.modules() if any(c is layers for c in m.children()))
    for child in parent.children():
        if child is not layers:
            child.to(device)


class _Replay(nn.Module):
    """Stands in for the last decoder layer: returns the stored final hidden states, batch after batch."""

    def __init__(self, layer: nn.Module, queue: deque):
        super().__init__()
        self.attention_type = getattr(layer, "attention_type", None)
        self.queue = queue

    def forward(self, *args, **kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        h = self.queue.popleft()
        if h.shape != x.shape:
            raise RuntimeError(f"replayed activations {tuple(h.shape)} do not match the batch {tuple(x.shape)}")
        return h.to(x.device)


class replay:
    """Context: `model(ids)` computes logits from stored last-layer activations (embeddings, final norm and
    lm_head run as usual; the decoder layers are skipped). Feed batches in the order the streams held them."""

    def __init__(self, model: nn.Module, *streams: Stream):
        self.model = model
        self.queue = deque(h for s in streams for h in s.hidden)

    def __enter__(self):
        layers = decoder_layers(self.model)
        self.saved = list(layers)
        for i, layer in enumerate(self.saved):
            layers[i] = _Passthrough(layer) if i < len(self.saved) - 1 else _Replay(layer, self.queue)
        return self.model

    def __exit__(self, *exc):
        layers = decoder_layers(self.model)
        for i, layer in enumerate(self.saved):
            layers[i] = layer
        return False


# ------------------------------------------------------------------------------------------- the run


@dataclass
class EvalStreams:
    """The base's and the variant's activations for perplexity/agreement/KL and the calibration-leak check."""

    base: list[Stream] = field(default_factory=list)
    variant: list[Stream] = field(default_factory=list)
    eval_set: object = None
    leak_docs: tuple | None = None
    tokenizer: object = None
    progress: bool = False
    reference: object = None  # evaluate.Reference of the base
    compare: object = None  # evaluate.Comparison of the variant
    leak_rates: list = field(default_factory=list)  # leakcheck.Rates of the base, then of the variant


class Session:
    """The layer hooks of a streamed conversion (see hubquant.engine.layer_hooks): materialize, evaluate,
    write, release. `results` is the dict the method fills with each layer's QuantizedWeights."""

    def __init__(self, weights: Weights, writer: ShardWriter, fmt, *, scheme, method: str, options,
                 device: torch.device, streams: EvalStreams):
        self.weights, self.writer, self.fmt = weights, writer, fmt
        self.scheme, self.method, self.options = scheme, method, options
        self.device, self.streams = device, streams
        self.results: dict = {}
        self.names: set[str] = set()  # every quantized Linear, once its layer is written
        self.witness: tuple | None = None  # one written QuantizedWeight, for the final config call
        self.tmp = writer.out_dir / ".hubquant-final"  # the format's own writer writes the config files here

    def before(self, index: int, name: str, layer: nn.Module) -> None:
        self.weights.load(layer, name)
        self._advance(self.streams.base, index, layer)

    def after(self, index: int, name: str, layer: nn.Module) -> None:
        self._advance(self.streams.variant, index, layer)
        quantized = {n: self.results.pop(n) for n in list(self.results) if n.startswith(name + ".")}
        state = {f"{name}.{k}": v for k, v in layer.state_dict().items()}
        modules = [(f"{name}.{n}" if n else name, m) for n, m in layer.named_modules()]
        self.write_part(state, quantized, modules)
        self.weights.release(layer)

    def layers_done(self) -> None:
        """Every decoder layer is quantized: the base's numbers, before a Linear outside the layers changes."""
        if self.streams.base and self.streams.reference is None:
            evaluate_streams(self.weights, self.streams, variant=False)

    def _advance(self, streams: list[Stream], index: int, layer: nn.Module) -> None:
        if not any(s.hidden for s in streams):
            return
        home = next(layer.parameters()).device
        layer.to(self.device)
        for s in streams:
            s.advance(index, layer, self.device)
        layer.to(home)

    def write_part(self, state: dict, quantized: dict, modules: list) -> None:
        """One decoder layer's tensors into the shards: its float tensors, and each quantized Linear's tensors as
        the format names them (FormatSpec.linear_tensors), as the format's whole-model writer makes them."""
        from hubquant.formats.common import dense_tensors, method_options

        config = self.weights.model.config
        for key, t in dense_tensors(_View(config, state, modules), quantized).items():
            self.writer.add(key, t)
        options = method_options(self.method, self.options)
        for name, qw in quantized.items():
            for key, t in self.fmt.linear_tensors(name, qw, self.scheme, options=options).items():
                self.writer.add(key, t)
        self.names.update(quantized)
        if self.witness is None and quantized:
            self.witness = next(iter(quantized.items()))

    def finish(self, out_dir: Path) -> dict:
        """Non-layer tensors, config.json and side files; lays the shards out. Returns the quantization_config."""
        from hubquant.formats.common import dense_tensors

        model, config = self.weights.model, self.weights.model.config
        rest = dict(self.results)  # Linears outside the decoder layers that the method quantized (lm_head)
        self.names.update(rest)
        prefix = layers_prefix(model) + "."
        skip = {f"{n}.weight" for n in self.names}
        for key, t in model.state_dict().items():
            if key.startswith(prefix) or key in skip:
                continue
            if not dense_tensors(_View(config, {key: torch.empty(0)}, []), self.names):
                continue  # left out by the writers' rules (tied lm_head, rotary buffers)
            value = t if not t.is_meta else self.weights.checkpoint.read(self.weights.mapping[key]).to(t.dtype)
            for k, v in dense_tensors(_View(config, {key: value}, []), self.names).items():
                self.writer.add(k, v)
        final = dict(rest)
        if self.witness is not None:
            final.setdefault(*self.witness)
        modules = [(n, m) for n, m in model.named_modules()
                   if not (isinstance(m, nn.Linear) and n in self.names and n not in final)]
        self.tmp.mkdir(exist_ok=True)
        qc = self.fmt(_View(config, {}, modules), final, scheme=self.scheme, out_dir=self.tmp, method=self.method,
                      options=self.options)
        for f in sorted(self.tmp.iterdir()):
            if f.name.endswith(".safetensors"):
                self.writer.add_file(f, skip=set(self.writer.records))
            elif not f.name.endswith(".index.json"):
                f.replace(out_dir / f.name)
        self.writer.finish()
        _rmtree(self.tmp)
        return qc


class _View:
    """What a format writer reads of a model, limited to one part of it: config, state_dict, named_modules."""

    def __init__(self, config, state: dict, modules: list):
        self.config, self._state, self._modules = config, state, modules

    def state_dict(self) -> dict:
        return self._state

    def named_modules(self):
        return iter(self._modules)

    def parameters(self):
        return iter(self._state.values())


def _rmtree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


@dataclass
class StreamedResult:
    quantized: dict  # quantized Linear name -> None (the tensors are in the files)
    qc: dict
    streams: EvalStreams
    seconds: float


def quantize_and_write(weights: Weights, job, *, method: str, fmt: str, out_dir: Path, streams: EvalStreams,
                       log=print) -> StreamedResult:
    """Quantize the model layer by layer from its checkpoint and write the variant into `out_dir`.

    Every stream in `streams.base` goes through each float layer, every one in `streams.variant` through each
    quantized layer (for the evaluation afterwards, see `evaluate_streams`).
    """
    from hubquant.formats import get_format
    from hubquant.methods import get_method

    t0 = time.time()
    model = weights.model
    device = torch.device(job.device)
    writer = ShardWriter(out_dir)
    session = Session(weights, writer, get_format(fmt), scheme=job.scheme, method=method,
                      options=job.options, device=device, streams=streams)
    if job.calib is not None:
        weights.load_rest(head=False)  # the embeddings make the calibration activations
    try:
        with layer_hooks(session):
            if method == "rtn" and (job.scheme.activations is None or not fp4.kind_of(job.scheme)):
                _rtn(model, job, session)  # NVFP4 W4A4 calibrates: the method's own layer loop
            else:
                get_method(method).load()(model, job)
        session.layers_done()
        qc = session.finish(out_dir)
        if streams.base:
            evaluate_streams(weights, streams, variant=True)
    except BaseException:
        writer.abort()
        _rmtree(session.tmp)
        raise
    names = dict.fromkeys(sorted(session.names))
    return StreamedResult(quantized=names, qc=qc, streams=streams, seconds=time.time() - t0)


@torch.no_grad()
def _rtn(model: nn.Module, job, session: Session) -> None:
    """RTN, one decoder layer at a time (then the Linears outside the layers, e.g. an lm_head not ignored)."""
    from tqdm.auto import tqdm

    from hubquant.methods.fp4 import rtn_linears
    from hubquant.methods.rtn import quantize_linears

    kind = fp4.kind_of(job.scheme)  # FP4 presets round to the FP4 grid

    def quantize(linears: dict) -> dict:
        return rtn_linears(linears, kind) if kind else quantize_linears(linears, job)

    layers = decoder_layers(model)
    prefix = layers_prefix(model)
    for i, layer in enumerate(tqdm(layers, desc="rtn: layers", disable=not job.progress)):
        name = f"{prefix}.{i}"
        session.before(i, name, layer)
        session.results.update(quantize(quantizable_linears(layer, job.ignore, name)))
        session.after(i, name, layer)
    session.layers_done()
    rest = {n: m for n, m in quantizable_linears(model, job.ignore).items() if not n.startswith(prefix + ".")}
    for name, lin in rest.items():
        session.weights.load(lin, name)
    session.results.update(quantize(rest))


# ------------------------------------------------------------------------------------------- evaluation


def eval_streams(weights: Weights, eval_set, leak_docs, tokenizer, device, progress: bool = False) -> EvalStreams:
    """Layer-0 activations of the eval windows (and of the leak check's documents), for base and variant."""
    from hubquant.leakcheck import CONT_TOKENS, N_DOCS, PREFIX_TOKENS, _windows

    streams = EvalStreams(eval_set=eval_set, leak_docs=leak_docs, tokenizer=tokenizer, progress=progress)
    if eval_set is None:
        return streams
    device = torch.device(device)
    weights.load_rest()
    streams.base.append(Stream(weights.model, eval_set.ids, 2, device))  # evaluate.perplexity's batches
    if leak_docs is not None:
        for texts in leak_docs:  # leakcheck._match_rate's batches
            streams.base.append(Stream(weights.model, _windows(tokenizer, texts, N_DOCS, PREFIX_TOKENS + CONT_TOKENS),
                                       8, device))
    streams.variant = [s.copy() for s in streams.base]
    return streams


def evaluate_streams(weights: Weights, streams: EvalStreams, *, variant: bool):
    """Perplexity (+ agreement and KL for the variant) and calibration-leak rates from the streamed last-layer
    activations, computed by hubquant.evaluate and hubquant.leakcheck exactly as for a model in memory.
    The base's numbers are taken before any Linear outside the decoder layers (an lm_head) is quantized."""
    from hubquant import evaluate
    from hubquant.leakcheck import memorization_rates

    model = weights.model
    weights.load_rest()
    _non_layers_to(model, "cpu")
    group = streams.variant if variant else streams.base
    with replay(model, group[0]) as m:
        if variant:
            streams.compare = evaluate.compare(m, streams.eval_set, streams.reference, progress=streams.progress)
        else:
            streams.reference = evaluate.reference(m, streams.eval_set, progress=streams.progress)
    if streams.leak_docs is not None:
        with replay(model, *group[1:]) as m:
            rates = memorization_rates(m, streams.tokenizer, *streams.leak_docs)
        streams.leak_rates.append(rates)


# ------------------------------------------------------------------------------------------- the switch


def check_config(config, *, trust_remote_code: bool) -> torch.dtype:
    """The checks of the pipeline's in-memory loader (float causal LM), and the checkpoint's dtype."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from hubquant.errors import UnsupportedError

    arch = (config.architectures or [type(config).__name__])[0]
    if getattr(config, "quantization_config", None):
        raise UnsupportedError(f"{arch} checkpoint is already quantized "
                               f"({config.quantization_config.get('quant_method', '?')})",
                               hint="start from the float (bf16/fp16/fp32) base model")
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and not trust_remote_code:
        raise UnsupportedError(f"'{arch}' (model_type {config.model_type}) is not a causal language model "
                               "transformers knows", hint="hubquant converts decoder-only text generation models")
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def open_for(mode: str, *, method: str, fmt: str, path: Path, trust_remote_code: bool, log=print):
    """`--streaming MODE` for this conversion: (Weights, tokenizer), or (None, None) for the in-memory path.

    auto streams models larger than AUTO_FRACTION of the available memory whenever the method, the format and the
    checkpoint allow it (the files are the same bytes); otherwise it logs why and returns (None, None). on streams
    any size and raises UnsupportedError where it cannot.
    """
    from transformers import AutoConfig

    from hubquant.errors import UnsupportedError, UsageError

    if mode not in ("auto", "on", "off"):
        raise UsageError(f"--streaming {mode}", hint="use auto, on or off")
    if mode == "off":
        return None, None
    why = ""
    methods = OWN_STREAMED[fmt][0] if fmt in OWN_STREAMED else STREAMED_METHODS
    if method not in methods:
        why = f"--method {method} runs on the model in memory (streamed: {', '.join(methods)})"
    elif fmt not in STREAMED_FORMATS:
        why = f"--format {fmt} is written from the model in memory"
    weights = tokenizer = None
    if not why and mode == "auto" and _model_bytes(path) < AUTO_FRACTION * _available_bytes():
        return None, None  # fits easily: loaded whole (the same bytes either way)
    if not why:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        dtype = check_config(config, trust_remote_code=trust_remote_code)
        weights, tokenizer = open_checkpoint(path, trust_remote_code=trust_remote_code, dtype=dtype)
        if weights is None:
            why, tokenizer = tokenizer, None
    if why:
        if mode == "on":
            raise UnsupportedError(f"cannot stream this conversion: {why}", hint="use --streaming auto or off")
        log(f"loading the whole model in memory: {why}")
        return None, None
    return_freed_memory()
    log(f"streaming {len(decoder_layers(weights.model))} decoder layers from the checkpoint, one at a time")
    return weights, tokenizer


def run_streamed(run, job, out_dir: Path) -> None:
    """The pipeline's quantize stage for a streamed run (hubquant.stages.Run): quantize and write into `out_dir`,
    keeping the evaluation activations for the evaluate and leak-check stages."""
    if run.plan.format in OWN_STREAMED:
        import importlib

        module, _, fn = OWN_STREAMED[run.plan.format][1].partition(":")
        return getattr(importlib.import_module(module), fn)(run, job, out_dir)
    run.out_dir = out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    run.streams = eval_streams(run.weights, run.eval_set, run.leak_docs, run.tokenizer, run.device, run.opts.progress)
    done = quantize_and_write(run.weights, job, method=run.opts.method, fmt=run.plan.format, out_dir=out_dir,
                              streams=run.streams, log=run.log)
    run.quantized, run.quant_config, run.routing = done.quantized, done.qc, None


AUTO_FRACTION = 0.25  # --streaming auto streams models larger than this share of the available memory


def _model_bytes(path: Path) -> int:
    return sum(e.nbytes for e in Checkpoint(path).entries.values())


def _available_bytes() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62
