"""The streamed quantize-and-write pass: the layer hooks (`Session`) and the method drivers.

Per decoder layer, `Session.before` materializes the layer (`Weights.load`) and advances the base's evaluation
activations through it; the method quantizes it (its QuantizedWeights go to `Session.results`, the sink
`hubquant.engine.results()` returns); `Session.after` advances the variant's activations, quantizes any expert
projection the method left out (the routing policy's rule), hands the layer's tensors to the writer and frees it.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from hubquant import fp4, moe
from hubquant.engine import layer_hooks
from hubquant.formats.shards import ShardWriter
from hubquant.modeling import decoder_layers, layers_prefix, quantizable_linears
from hubquant.streaming.activations import EvalStreams, evaluate_streams, leak_rates
from hubquant.streaming.checkpoint import Weights
from hubquant.streaming.switch import trim_heap


class Session:
    """The layer hooks of a streamed conversion (see hubquant.engine.layer_hooks): materialize, evaluate,
    write, release. `results` is the dict the method fills with each layer's QuantizedWeights."""

    def __init__(self, weights: Weights, writer: ShardWriter, fmt, *, job, method: str, streams: EvalStreams,
                 log=print):
        self.weights, self.writer, self.fmt, self.job, self.log = weights, writer, fmt, job, log
        self.scheme, self.method, self.options = job.scheme, method, job.options
        self.device, self.streams = torch.device(job.device), streams
        self.results: dict = _Sink(self)  # early: expert projections written as soon as they are quantized
        self.names: set[str] = set()  # every quantized Linear, once its layer is written
        self.written: dict[str, Written] = {}  # what the pipeline keeps of each (its scheme)
        self.witness: tuple | None = None  # one written QuantizedWeight, for the final config call
        self.policy = None  # the routing policy of a mixture-of-experts run
        self.done = False  # the base's numbers are taken
        self.expected: dict = {}  # sampled expert projections' tensors, checked against the files at the end
        self.picked: set | None = None
        self.checked = 0
        self.unrouted = 0  # expert projections the method left out, quantized by the policy's rule
        self.tmp = writer.out_dir / ".hubquant-final"  # the format's own writer writes the config files here

    def inputs_ready(self) -> None:
        """Layer 0's calibration inputs are captured: no embeddings needed until the evaluation rereads them."""
        self.weights.release_rest()

    def before(self, index: int, name: str, layer: nn.Module, *, experts: bool = True) -> None:
        """experts=False: per-expert Linears stay unread where `Weights.load_expert_linear` can read them (the
        method reads and drops each in turn)."""
        self.weights.load(layer, name, experts=experts)
        self._advance(self.streams.base, index, layer)
        if self.results.early:
            self._pick()
            self.results.experts = set(moe.expert_linear_names(layer, name))

    def after(self, index: int, name: str, layer: nn.Module) -> None:
        self._quantize_left_out_experts(name, layer)
        self._advance(self.streams.variant, index, layer)
        self.results.experts = set()
        quantized = {n: self.results.pop(n) for n in list(self.results) if n.startswith(name + ".")}
        moe.pack_weight_only_int8(self.weights.model, quantized, self.scheme)
        self._check_experts(index, name, layer, quantized)
        state = {f"{name}.{k}": v for k, v in layer.state_dict().items()}
        modules = [(f"{name}.{n}" if n else name, m) for n, m in layer.named_modules()]
        self.write_part(state, quantized, modules)
        self.weights.release(layer)
        trim_heap()
        if index == len(decoder_layers(self.weights.model)) - 1:
            self.layers_done()

    def layers_done(self) -> None:
        """Every decoder layer is quantized: the base's numbers, before a Linear outside the layers changes."""
        if self.streams.base and not self.done:
            self.done = True
            evaluate_streams(self.weights, self.streams, variant=False)
            leak_rates(self.weights, self.streams, variant=False)

    def _quantize_left_out_experts(self, name: str, layer: nn.Module) -> None:
        """hubquant.moe_pipeline.quantize_with_policy's rule, per layer: round-to-nearest for every expert projection
        the method did not quantize (an expert no calibration batch reached), counted."""
        if self.policy is None:
            return
        from hubquant.moe_pipeline import _rtn_linears

        experts = moe.expert_linear_names(layer, name)
        missing = {n: m for n, m in quantizable_linears(layer, self.job.ignore, name).items()
                   if n in experts and n not in self.results}
        if missing:
            self.policy.fallback_linears.extend(missing)
            self.unrouted += len(missing)
            self.results.update(_rtn_linears(missing, self.job))

    def _check_experts(self, index: int, name: str, layer: nn.Module, quantized: dict) -> None:
        """hubquant.moe_pipeline.verify_written, one layer at a time: the evaluated weights of sampled expert
        projections are their stored values dequantized; their expected tensors are compared with the files in
        `finish` (64 projections spread over layers and experts)."""
        from hubquant.errors import QualityGateError
        from hubquant.formats.common import method_options

        self._pick()
        if getattr(self.fmt, "name", "") != "compressed-tensors":  # (as in memory)
            return
        lins = dict(layer.named_modules())
        options = method_options(self.method, self.options)
        for n in sorted(n for n in quantized if n in self.picked):
            qw, w = quantized[n], lins[n.removeprefix(name + ".")].weight
            if not torch.equal(w.detach().cpu(), qw.dequantize(w.dtype)):
                raise QualityGateError(f"{n}: the evaluated weight is not the dequantized stored one",
                                       hint="report the model and method; nothing was pushed")
            ckpt = moe.checkpoint_name(self.weights.model, n)
            self.expected.update(self.fmt.linear_tensors(ckpt, qw, self.scheme, options=options))

    def _pick(self) -> None:
        """verify_written's sample: spread over the sorted names of every expert projection."""
        if self.picked is None:
            model = self.weights.model
            quantizable = quantizable_linears(model, self.job.ignore)
            names = sorted(n for n in moe.expert_linear_names(model) if n in quantizable)
            picked = names[:: max(1, len(names) // 64)] + names[-1:] if names else []
            self.picked, self.checked = set(picked), len(picked)

    def _check_disk(self, out_dir: Path) -> None:
        from hubquant.errors import QualityGateError
        from hubquant.formats.shards import Checkpoint

        if not self.expected:
            return
        written = Checkpoint(out_dir)
        for key, value in self.expected.items():
            got = written.read(key) if key in written else None
            if got is None or got.dtype != value.dtype or not torch.equal(got.view(torch.uint8),
                                                                         value.view(torch.uint8)):
                raise QualityGateError(f"{key} on disk differs from the quantized values that were evaluated",
                                       hint="report the model and method; nothing was pushed")
        self.log(f"moe: {self.checked} expert projections on disk match the evaluated model")

    def _advance(self, streams: list, index: int, layer: nn.Module) -> None:
        if not any(s.hidden for s in streams):
            return
        home = next(layer.parameters()).device
        layer.to(self.device)
        for s in streams:
            s.advance(index, layer, self.device)
        layer.to(home)

    def write_part(self, state: dict, quantized: dict, modules: list) -> None:
        """One decoder layer's tensors into the shards: its float tensors, and each quantized Linear's tensors as
        the format names them (FormatSpec.linear_tensors), under their checkpoint names
        (hubquant.moe.checkpoint_name), as the format's whole-model writer makes them."""
        from hubquant.formats.common import dense_tensors

        model = self.weights.model
        config = model.config
        for key, t in dense_tensors(_View(config, state, modules), quantized).items():
            self.writer.add(moe.checkpoint_name(model, key), t)
        for name, qw in quantized.items():
            if name not in self.names:  # (else its tensors went to the shards when it was quantized)
                self.write_linear(name, qw)
        if self.witness is None and quantized:  # the layer's first quantized Linear, as written at once
            first = next(iter(quantized.items()))
            self.witness = first if not isinstance(first[1], Written) else self.results.first

    def write_linear(self, name: str, qw) -> None:
        """One quantized Linear's tensors as the format names them (FormatSpec.linear_tensors), under their
        checkpoint names (hubquant.moe.checkpoint_name)."""
        from hubquant.formats.common import method_options

        model = self.weights.model
        options = method_options(self.method, self.options)
        for key, t in self.fmt.linear_tensors(name, qw, self.scheme, options=options).items():
            self.writer.add(moe.checkpoint_name(model, key), t)
        self.names.add(name)
        self.written[name] = Written.of(qw)

    def finish(self, out_dir: Path) -> dict:
        """Non-layer tensors, config.json and side files; lays the shards out. Returns the quantization_config."""
        from hubquant.formats.common import dense_tensors

        model, config = self.weights.model, self.weights.model.config
        rest = dict(self.results)  # Linears outside the decoder layers that the method quantized (lm_head)
        moe.pack_weight_only_int8(model, rest, self.scheme)
        self.names.update(rest)
        self.written.update({n: Written.of(qw) for n, qw in rest.items()})
        prefix = layers_prefix(model) + "."
        skip = {f"{n}.weight" for n in self.names}
        for key, t in model.state_dict().items():
            if key.startswith(prefix) or key in skip:
                continue
            if not dense_tensors(_View(config, {key: torch.empty(0)}, []), self.names):
                continue  # left out by the writers' rules (tied lm_head, rotary buffers)
            value = t if not t.is_meta else self.weights.tensor(key, t.dtype)
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
        self._check_disk(out_dir)
        return qc


class _Sink(dict):
    """`Session.results`. With `early` set (GPTQ), each expert projection of the layer being quantized
    (`experts`) is written to the shards as soon as the method stores it: its value becomes its `Written` record
    (the sampled ones, `Session.picked`, keep their QuantizedWeight for the layer's check), so a layer's quantized
    experts never wait in memory all together. The written tensors and the files are the same as when the layer
    is written at once (the shards are laid out by name). Only item assignment writes early: `update()` (the
    low-token rule's and NVFP4's batches) bypasses `__setitem__`, and those wait for the layer."""

    def __init__(self, session: Session):
        super().__init__()
        self.session = session
        self.early = False
        self.experts: set[str] = set()
        self.first: tuple | None = None  # the first early-written (name, QuantizedWeight): a witness if need be

    def __setitem__(self, name: str, qw) -> None:
        from hubquant.quant import QuantizedWeight

        s = self.session
        if name in self.experts and type(qw) is QuantizedWeight:
            moe.pack_weight_only_int8(s.weights.model, {name: qw}, s.scheme)
            s.write_linear(name, qw)
            self.first = self.first or (name, qw)
            trim_heap()  # the projection's work leaves holes in the heap; the next one would grow it
            if name not in s.picked:
                qw = s.written[name]
        super().__setitem__(name, qw)


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


@dataclass(frozen=True)
class Written:
    """A quantized Linear whose tensors are in the files already: what the card and provenance read of it."""

    scheme: object
    extra: dict = field(default_factory=dict)  # the QuantizedWeight's flags (its tensors are in the files)

    @classmethod
    def of(cls, qw) -> Written:
        flags = {k: v for k, v in (getattr(qw, "extra", None) or {}).items() if isinstance(v, (bool, int, str))}
        return cls(getattr(qw, "scheme", None), flags)


@dataclass
class StreamedResult:
    quantized: dict  # quantized Linear name -> Written (the tensors are in the files)
    qc: dict
    streams: EvalStreams
    seconds: float
    routing: object = None  # hubquant.moe.RoutingPolicy of a mixture-of-experts model


def quantize_and_write(weights: Weights, job, *, method: str, fmt: str, out_dir: Path, streams: EvalStreams,
                       method_options: dict | None = None, log=print) -> StreamedResult:
    """Quantize the model layer by layer from its checkpoint and write the variant into `out_dir`.

    Every stream in `streams.base` goes through each float layer, every one in `streams.variant` through each
    quantized layer; the base's numbers are taken once the last layer is written, the variant's afterwards
    (`evaluate_streams`, `leak_rates` with variant=True). Mixture-of-experts models (experts
    unfused on the skeleton, `hubquant.moe.unfuse_experts`) run under the routing policy of `method_options` (the
    raw `--method-option`s) exactly as `hubquant.moe_pipeline.quantize_with_policy` runs them in memory.
    """
    from hubquant.formats import get_format
    from hubquant.moe_pipeline import quantize_with_policy

    t0 = time.time()
    writer = ShardWriter(out_dir)
    session = Session(weights, writer, get_format(fmt), job=job, method=method, streams=streams, log=log)
    if job.calib is not None:
        weights.load_rest(head=False)  # the embeddings make the calibration activations
    try:
        with layer_hooks(session):
            _, policy = quantize_with_policy(weights.model, job, _driver(method, session), options=method_options,
                                             log=log)
        session.layers_done()
        qc = session.finish(out_dir)
    except BaseException:
        writer.abort()
        _rmtree(session.tmp)
        raise
    names = {n: session.written[n] for n in sorted(session.names)}
    return StreamedResult(quantized=names, qc=qc, streams=streams, seconds=time.time() - t0, routing=policy)


def _driver(method: str, session: Session):
    """The method run for `quantize_with_policy`: quantized Linears go to the session's sink, low-token experts'
    round-to-nearest too; returns every quantized name (the tensors are written already)."""
    from hubquant.methods import get_method
    from hubquant.moe_pipeline import _rtn_linears

    def run(model: nn.Module, job) -> dict:
        session.job = job
        session.policy = moe.current_policy()
        # GPTQ and integer RTN store expert projections one at a time: written as they come (_Sink)
        session.results.early = method == "gptq" or (method == "rtn" and not fp4.kind_of(job.scheme))
        if session.policy is not None:  # the rule's tensors go where the layer's are written
            session.policy.fallback = lambda lins: session.results.update(_rtn_linears(lins, job))
        if method == "rtn" and (job.scheme.activations is None or not fp4.kind_of(job.scheme)):
            _rtn(model, job, session)  # NVFP4 W4A4 calibrates: the method's own layer loop
        else:
            prefix = layers_prefix(model) + "."
            for name, lin in quantizable_linears(model, job.ignore).items():
                if not name.startswith(prefix):  # a Linear outside the layers that a method may round (lm_head)
                    session.weights.load(lin, name)
            get_method(method).load()(model, job)
        if session.unrouted:
            session.log(f"moe: {session.unrouted} expert Linears got no statistics from the method; "
                        "quantized with round-to-nearest")
        return dict.fromkeys(session.names | set(session.results))

    return run


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
    # no activations to advance: each expert projection is read, quantized, written and dropped in turn
    one_by_one = not kind and not any(s.hidden for s in (*session.streams.base, *session.streams.variant))
    for i, layer in enumerate(tqdm(layers, desc="rtn: layers", disable=not job.progress)):
        name = f"{prefix}.{i}"
        session.before(i, name, layer, experts=not one_by_one)
        linears = quantizable_linears(layer, job.ignore, name)
        if kind:  # NVFP4's fused Linears share a global scale
            session.results.update(quantize(linears))
        else:  # each Linear on its own (the same values): expert projections are written as they come
            _rtn_one_by_one(layer, name, linears, session, quantize)
        session.after(i, name, layer)
    rest = {n: m for n, m in quantizable_linears(model, job.ignore).items() if not n.startswith(prefix + ".")}
    for name, lin in rest.items():
        session.weights.load(lin, name)
    session.results.update(quantize(rest))


def _rtn_one_by_one(layer: nn.Module, name: str, linears: dict, session: Session, quantize) -> None:
    """Integer RTN on each Linear of a layer in turn; an expert projection left unread by `Session.before` is read
    first and dropped once written (the sampled ones stay for the layer's check)."""
    where = moe.expert_linear_names(layer, name)
    mods = moe.expert_modules(layer, name)

    def read(n: str) -> bool:
        ename, e = where[n]
        return session.weights.load_expert_linear(mods[ename], ename, e, n.rpartition(".")[2])

    for n, lin in linears.items():
        fresh = lin.weight.is_meta and read(n)
        session.results[n] = quantize({n: lin})[n]
        if fresh and n not in session.picked:
            session.weights.release(lin)
    for n in where:  # expert projections left float (--ignore) are written as they are
        if n not in linears and layer.get_submodule(n.removeprefix(name + ".")).weight.is_meta:
            read(n)
