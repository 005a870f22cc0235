"""The layer-sequential runner shared by calibrated methods (GPTQ, AWQ, SmoothQuant).

    embeddings -> capture decoder-layer-0 inputs (args + kwargs such as position_embeddings and the
    attention mask) -> for each decoder layer: move it to the device, let the method collect per-Linear
    statistics with hooks and change the layer, rerun it so the next layer sees the changed outputs,
    move it back.

Peak device memory is one decoder layer plus the calibration activations (inputs and outputs of one
layer), independent of depth. A method plugs in through one callback::

    def on_layer(work: LayerWork) -> None:
        stats = work.collect(work.linears, hessian=True)      # one pass over the calibration batch
        ...                                                   # change work.layer's weights
    run_layers(model, calib_ids, on_layer=on_layer, device="cuda")

``LayerWork.forward(hooks=...)`` runs arbitrary input hooks instead (SmoothQuant: per-channel max).
``LayerWork.sequential(on_group)`` changes the Linears in the order the layer runs them, each from
statistics taken after the earlier ones changed (GPTQ's true-sequential mode); with one calibration batch
that is a single forward whose outputs are already the changed layer's, so the engine skips the rerun.
With ``rerun=False`` the engine reuses the outputs of the callback's last pass (for callbacks that
leave the layer's float function unchanged, e.g. statistics only or exact folding).
"""
from __future__ import annotations

import contextlib
import contextvars
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from hubquant import moe
from hubquant.modeling import DEFAULT_IGNORE, decoder_layers, layers_prefix, quantizable_linears

InputHook = Callable[[torch.Tensor], None]

# Set by hubquant.streaming while a model streams from its checkpoint: `before(index, name, layer)` materializes
# a decoder layer's weights before the method sees it, `after(index, name, layer)` writes and frees it.
_LAYER_HOOKS: contextvars.ContextVar = contextvars.ContextVar("hubquant_layer_hooks", default=None)


@contextlib.contextmanager
def layer_hooks(hooks):
    """Within the block, `run_layers` calls `hooks.before(i, name, layer)` and `hooks.after(i, name, layer)`
    around each layer, and `results()` returns `hooks.results` (a sink that writes each layer's tensors)."""
    token = _LAYER_HOOKS.set(hooks)
    try:
        yield hooks
    finally:
        _LAYER_HOOKS.reset(token)


def results() -> dict:
    """The dict a method collects its QuantizedWeights in: a plain dict, or the streaming sink."""
    hooks = _LAYER_HOOKS.get()
    return hooks.results if hooks is not None else {}


def for_each_layer(model: nn.Module, fn: Callable[[str, nn.Module], None], *, progress: bool = False,
                   desc: str = "layers") -> None:
    """`fn(name, layer)` on every decoder layer in order, for work without calibration data (per-Linear rounding);
    under `layer_hooks` each layer is materialized before and written after, as in `run_layers`."""
    from tqdm.auto import tqdm

    hooks = _LAYER_HOOKS.get()
    prefix = layers_prefix(model)
    for i, layer in enumerate(tqdm(decoder_layers(model), desc=desc, disable=not progress, unit="layer")):
        name = f"{prefix}.{i}"
        if hooks is not None:
            hooks.before(i, name, layer)
        fn(name, layer)
        if hooks is not None:
            hooks.after(i, name, layer)


class _StopForward(Exception):
    """Raised by a statistics hook once every wanted input of the batch is seen: the rest of the layer is skipped."""


class _Captured(Exception):
    """Raised by the catcher to stop the model right after layer 0's inputs are known."""


class _Catcher(nn.Module):
    def __init__(self, layer: nn.Module, store: list):
        super().__init__()
        self.layer = layer
        self.store = store
        self.attention_type = getattr(layer, "attention_type", None)  # some models read it off the layer

    def forward(self, *args, **kwargs):
        self.store.append((args, kwargs))
        raise _Captured


class _Passthrough(nn.Module):
    """Stands in for a decoder layer while a later layer's arguments are captured: returns its input."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.attention_type = getattr(layer, "attention_type", None)

    def forward(self, *args, **kwargs):
        return args[0] if args else kwargs["hidden_states"]


@dataclass
class LinearStats:
    """Statistics of one Linear's input over the calibration batch.

    `xtx` is the fp32 sum of x^T x (the GPTQ Hessian is 2 * xtx / count); Linears that read the very
    same input tensor (q/k/v, gate/up) share one `xtx` object. `absmean`/`absmax` are per input channel.
    """

    count: int = 0
    xtx: torch.Tensor | None = None
    abssum: torch.Tensor | None = None
    absmax: torch.Tensor | None = None
    shared_with: str | None = None  # the Linear whose xtx this one reuses

    @property
    def absmean(self) -> torch.Tensor:
        return self.abssum / max(self.count, 1)

    def hessian(self) -> torch.Tensor:
        """2 X^T X / n in fp32 (a new tensor)."""
        return self.xtx * (2.0 / max(self.count, 1))


@dataclass
class LayerWork:
    """One decoder layer on the device, with its captured calibration inputs."""

    index: int
    name: str
    layer: nn.Module
    linears: dict[str, nn.Linear]
    device: torch.device
    inputs: list[torch.Tensor]
    kwargs: list[dict]
    outputs: list[torch.Tensor] | None = field(default=None, repr=False)
    outputs_final: bool = False  # self.outputs already come from the changed layer (no rerun needed)
    forward_calls: int = 0  # decoder-layer calls made for this layer (whole or stopped early)
    scratch: dict = field(default_factory=dict, repr=False)  # buffers and hints shared by all layers of a run
    host: torch.device | None = None  # where inputs/outputs wait between uses (None: on `device`)

    def _to_device(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.host is None else x.to(self.device, non_blocking=True)

    def _to_host(self, y: torch.Tensor) -> torch.Tensor:
        return y if self.host is None else _host_copy(y)

    def relative(self, full_name: str) -> str:
        return full_name[len(self.name) + 1:]

    @torch.no_grad()
    def forward(self, hooks: dict[str, InputHook] | None = None) -> list[torch.Tensor]:
        """Run the layer over every captured batch; `hooks[name](x)` sees each named Linear's input.

        Returns (and keeps in `self.outputs`) the layer's hidden-state outputs, one tensor per batch.
        """
        handles = []
        for name, fn in (hooks or {}).items():
            handles.append(self.linears[name].register_forward_pre_hook(lambda m, a, fn=fn: fn(a[0])))
        try:
            outs = []
            for x, kw in zip(self.inputs, self.kwargs):
                self.forward_calls += 1
                y = self.layer(self._to_device(x), **kw)
                outs.append(self._to_host(y[0] if isinstance(y, (tuple, list)) else y))
        finally:
            for h in handles:
                h.remove()
        self.outputs = outs
        self.outputs_final = False
        return outs

    @torch.no_grad()
    def collect(self, names, *, hessian: bool = True, absmean: bool = False, absmax: bool = False,
                dtype: torch.dtype = torch.float32, keep_outputs: bool = False) -> dict[str, LinearStats]:
        """One pass that gathers input statistics for the Linears `names` (batched matmuls, fp32).

        With keep_outputs the layer's outputs of this pass are kept in `self.outputs` (for rerun=False);
        otherwise they are dropped batch by batch (less device memory while the method works), and each
        batch's forward stops as soon as every Linear in `names` has seen its input (what the layer computes
        after that, e.g. the down projection when only earlier inputs are wanted, is skipped).
        """
        acc = _StatsAccumulator(names, hessian=hessian, absmean=absmean, absmax=absmax, dtype=dtype,
                                scratch=self.scratch)

        def hook(name, x):
            acc.add(name, x)
            if not keep_outputs and len(acc.fired) == len(acc.stats):
                raise _StopForward

        outs = []
        for x, kw in zip(self.inputs, self.kwargs):
            acc.new_batch()
            y = self._run_hooked(x, kw, {n: hook for n in names})
            if keep_outputs:
                outs.append(y)
            del y
        self.outputs = outs if keep_outputs else None
        self.outputs_final = False
        return acc.finish()

    @torch.no_grad()
    def sequential(self, on_group: Callable[[list[str], LinearStats], None], names=None, *,
                   dtype: torch.dtype = torch.float32) -> None:
        """True-sequential statistics: hand the Linears `names` (default: all) to `on_group(members, stats)`
        in the order the layer runs them, where `members` read one input tensor and `stats` (Hessian
        statistics of that input) come from a forward in which every earlier group was already changed by
        `on_group` (e.g. quantized). `on_group` changes its members' weights in place.

        One calibration batch: a single forward; `on_group` runs in the forward pre-hook of each Linear, before
        it runs (Linears reading the same tensor get the same `stats` object, one call each); the forward's
        outputs are the changed layer's outputs, so they are kept (`outputs_final`) and the engine does not
        rerun the layer. Several batches: one pass over the batches per group, each batch stopped where the
        next group's first Linear would run; the engine then reruns the layer. Both give the same statistics.
        """
        todo = [n for n in (names if names is not None else self.linears)]
        if len(self.inputs) == 1:
            # (weak reference to the input tensor, its stats): the layer frees each input once its Linears ran,
            # and the stats of a freed input are dropped (a method may key its per-input work on them)
            inputs: list[tuple[weakref.ref, LinearStats]] = []

            def hook(name, x):
                inputs[:] = [(t, s) for t, s in inputs if t() is not None]
                st = next((s for t, s in inputs if t() is x), None)
                if st is None:
                    acc = _StatsAccumulator([name], hessian=True, dtype=dtype, scratch=self.scratch)
                    acc.add(name, x)
                    st = acc.finish()[name]
                    inputs.append((weakref.ref(x), st))
                on_group([name], st)

            self.outputs = [self._run_hooked(self.inputs[0], self.kwargs[0], {n: hook for n in todo})]
            self.outputs_final = True
            return
        while todo:
            group, st = self._next_group(todo, dtype)
            if not group:  # none of the remaining Linears runs in this layer
                break
            on_group(group, st)
            todo = [n for n in todo if n not in group]
        self.outputs = None
        self.outputs_final = False

    def _next_group(self, todo: list[str], dtype: torch.dtype) -> tuple[list[str], LinearStats | None]:
        """One pass over the batches: the first Linear of `todo` to run, the others that read the same tensor,
        and their input statistics; each batch stops where a Linear reading another tensor would run."""
        group: list[str] = []  # members, in the order of the first batch
        acc = _StatsAccumulator(todo, hessian=True, dtype=dtype, scratch=self.scratch)
        batch_input: list[torch.Tensor] = []

        def hook(name, t):
            if first[0]:  # the first batch that runs any of `todo` defines the group
                if not batch_input:
                    batch_input.append(t)
                elif t is not batch_input[0]:
                    raise _StopForward  # the next group's input: this group's statistics are complete
                group.append(name)
                acc.add(name, t)
                return
            if name not in group:
                if batch_input:
                    raise _StopForward
                return  # routed experts: another expert of `todo` may run first in this batch
            if not batch_input:
                batch_input.append(t)
            acc.add(name, t)
            if len(acc.fired) == len(group):
                raise _StopForward

        first = [True]
        for x, kw in zip(self.inputs, self.kwargs):
            acc.new_batch()
            batch_input.clear()
            self._run_hooked(x, kw, {n: hook for n in todo})
            first[0] = not group
        if not group:
            return [], None
        return group, acc.finish()[group[0]]

    def _run_hooked(self, x, kw, hooks: dict[str, Callable]) -> torch.Tensor | None:
        """One layer call on one batch with `hooks[name](name, input)` as forward pre-hooks; None if a hook
        stopped it (_StopForward)."""
        handles = [self.linears[n].register_forward_pre_hook(lambda m, a, n=n, fn=fn: fn(n, a[0]))
                   for n, fn in hooks.items()]
        self.forward_calls += 1
        try:
            y = self.layer(self._to_device(x), **kw)
        except _StopForward:
            return None
        finally:
            for h in handles:
                h.remove()
        return self._to_host(y[0] if isinstance(y, (tuple, list)) else y)


def _host_copy(y: torch.Tensor) -> torch.Tensor:
    """A copy of `y` in (pinned, when CUDA is there) host memory."""
    out = torch.empty(y.shape, dtype=y.dtype, device="cpu", pin_memory=y.is_cuda)
    out.copy_(y)
    return out


# Calibration activations larger than this leave the GPU between uses (each batch visits it in turn): at 70B
# scale the inputs and outputs of a layer are 2 x 4.3 GB of the peak, for ~1 s of PCIe traffic per layer.
OFFLOAD_MIN_BYTES = 2 * 1024**3


def _expandable_segments() -> None:
    """Let the CUDA caching allocator grow segments instead of keeping many fixed ones (the layer-sized and
    Hessian-sized blocks of a run otherwise fragment it: 35 GiB reserved for 22 GiB allocated at 70B scale).
    Left alone when the user set PYTORCH_CUDA_ALLOC_CONF."""
    import os

    if "PYTORCH_CUDA_ALLOC_CONF" in os.environ or "PYTORCH_ALLOC_CONF" in os.environ:
        return
    try:  # torch >= 2.11's setter; the older one warns
        getattr(torch._C, "_accelerator_setAllocatorSettings", torch.cuda.memory._set_allocator_settings)(
            "expandable_segments:True")
    except (AttributeError, RuntimeError):
        pass


class _StatsAccumulator:
    """Per-Linear input statistics over batches; Linears that read the very same tensor in a batch share
    the first one's accumulators (`add` is called from forward pre-hooks)."""

    def __init__(self, names, *, hessian: bool = True, absmean: bool = False, absmax: bool = False,
                 dtype: torch.dtype = torch.float32, scratch: dict | None = None):
        self.stats = {n: LinearStats() for n in names}
        self.scratch = scratch
        self.hessian, self.absmean, self.absmax, self.dtype = hessian, absmean, absmax, dtype
        self.seen: list[tuple[torch.Tensor, str]] = []  # inputs of the current batch (refs keep ids valid)
        self.fired: set[str] = set()  # Linears that saw their input in the current batch

    def new_batch(self) -> None:
        self.seen.clear()
        self.fired.clear()

    def add(self, name: str, x: torch.Tensor) -> None:
        self.fired.add(name)
        st = self.stats[name]
        owner = next((n for t, n in self.seen if t is x), None)
        if owner is not None:  # same tensor as an earlier Linear (q/k/v, gate/up): share
            src = self.stats[owner]
            st.shared_with, st.count, st.xtx = owner, src.count, src.xtx
            st.abssum, st.absmax = src.abssum, src.absmax
            return
        self.seen.append((x, name))
        x2 = x.reshape(-1, x.shape[-1])
        if self.hessian:
            if st.xtx is None:
                st.xtx = torch.zeros(x2.shape[1], x2.shape[1], dtype=self.dtype, device=x2.device)
            _accumulate_xtx(st.xtx, x2)
        if self.absmean or self.absmax:
            a = x2.abs()
            if self.absmean:
                s = a.sum(0, dtype=torch.float32)
                st.abssum = s if st.abssum is None else st.abssum.add_(s)
            if self.absmax:
                m = a.amax(0).float()
                st.absmax = m if st.absmax is None else torch.maximum(st.absmax, m)
        st.count += x2.shape[0]

    def finish(self) -> dict[str, LinearStats]:
        self.new_batch()
        for st in self.stats.values():
            if st.xtx is not None and not st.shared_with:
                _finish_xtx(st.xtx)
        for st in self.stats.values():  # shared entries point at the owner's final tensors
            if st.shared_with:
                src = self.stats[st.shared_with]
                st.count, st.xtx, st.abssum, st.absmax = src.count, src.xtx, src.abssum, src.absmax
        return self.stats


def _accumulate_xtx(acc: torch.Tensor, x: torch.Tensor) -> None:
    """acc += x^T x in fp32. CUDA, 16-bit inputs: a 16-bit GEMM with fp32 output (products of bf16/fp16 values are
    exact in fp32: the fp32 GEMM of the upcast values). CPU, large inputs: the upper block rows (mirrored once at
    the end), upcasting a column block of `x` at a time, not the whole input (the same products and sums)."""
    if x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and acc.dtype == torch.float32:
        try:
            acc += torch.mm(x.T, x, out_dtype=torch.float32)
            return
        except (RuntimeError, TypeError):  # torch without mm(out_dtype=)
            pass
    if not _blocked(acc):
        xf = x.to(acc.dtype)
        acc.addmm_(xf.T, xf)
        return
    n = x.shape[1]
    b = -(-n // _SYM_BLOCKS)  # symmetric: only the upper block rows (10/16 of the work); mirrored once at the end
    for i in range(0, n, b):
        left = x[:, i: i + b].to(acc.dtype)
        for j in range(i, n, b):
            right = left if j == i else x[:, j: j + b].to(acc.dtype)
            acc[i: i + b, j: j + b].addmm_(left.T, right)
            del right


_SYM_BLOCKS, _SYM_MIN = 4, 512


def _blocked(acc: torch.Tensor) -> bool:
    return not acc.is_cuda and acc.shape[0] >= _SYM_MIN


def _finish_xtx(acc: torch.Tensor) -> None:
    """Mirror the upper block rows of a blocked accumulation into the lower triangle."""
    if not _blocked(acc):
        return
    n = acc.shape[0]
    b = -(-n // _SYM_BLOCKS)
    for i in range(0, n - b, b):
        acc[i + b:, i: i + b] = acc[i: i + b, i + b:].T


def _move_non_layers(model: nn.Module, layers: nn.ModuleList, device) -> nn.Module:
    """Move the modules that run before the decoder layers (embeddings, rotary) to `device`."""
    parent = next(m for m in model.modules() if any(c is layers for c in m.children()))
    for child in parent.children():
        if child is not layers:
            child.to(device)
    return parent


def _to(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (tuple, list)):
        return (tuple if isinstance(obj, tuple) else list)(_to(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


def _run_to_catcher(parent, layers, index: int, calib, *, device, batch_size: int) -> list:
    """Forward the calibration batches until decoder layer `index` is called; its (args, kwargs) per batch.
    The layers before it pass their input through (only layer `index`'s arguments are wanted)."""
    saved = [layers[i] for i in range(index + 1)]
    store: list = []
    for i in range(index):
        layers[i] = _Passthrough(saved[i])
    layers[index] = _Catcher(saved[index], store)
    try:
        for i in range(0, calib.shape[0], batch_size):
            ids = calib[i: i + batch_size].to(device)
            try:
                parent(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
            except _Captured:
                pass
    finally:
        for i, layer in enumerate(saved):
            layers[i] = layer
    return store


def _clean_kwargs(kw: dict) -> dict:
    kw = {k: v for k, v in kw.items() if k not in ("past_key_values", "past_key_value", "use_cache", "hidden_states")}
    kw["use_cache"] = False
    return kw


@torch.no_grad()
def capture_inputs(model: nn.Module, calib: torch.Tensor, *, device, batch_size: int) -> tuple[list, list]:
    """Run the embeddings on `calib` in batches and return layer 0's (hidden states, kwargs) per batch.

    Models whose layers use different attention (Gemma 2/3, Qwen with sliding windows: `layer.attention_type`)
    get different masks per layer: `layer_kwargs(model, ...)` captures those."""
    layers = decoder_layers(model)
    parent = _move_non_layers(model, layers, device)
    store = _run_to_catcher(parent, layers, 0, calib, device=device, batch_size=batch_size)
    inputs, kwargs = [], []
    for args, kw in store:
        inputs.append(args[0] if args else kw["hidden_states"])
        kwargs.append(_clean_kwargs(kw))
    return inputs, kwargs


def layer_attention_types(model: nn.Module) -> list:
    """Each decoder layer's attention kind: `config.layer_types` (transformers 5) or `layer.attention_type`."""
    layers = decoder_layers(model)
    config = getattr(model, "config", None)
    config = getattr(config, "text_config", None) or config
    types = getattr(config, "layer_types", None)
    if isinstance(types, (list, tuple)) and len(types) >= len(layers):
        return list(types[: len(layers)])
    return [getattr(layer, "attention_type", None) for layer in layers]


@torch.no_grad()
def kwargs_by_attention_type(model: nn.Module, calib: torch.Tensor, first_kwargs: list, *, device,
                             batch_size: int) -> dict:
    """{attention_type: kwargs per batch} for every attention type the decoder layers use (layer 0's type maps
    to `first_kwargs`). Empty when all layers attend alike."""
    layers = decoder_layers(model)
    types = layer_attention_types(model)
    if len(set(types)) < 2:
        return {}
    out = {types[0]: first_kwargs}
    parent = _move_non_layers(model, layers, device)
    for t in dict.fromkeys(types):
        if t not in out:
            store = _run_to_catcher(parent, layers, types.index(t), calib, device=device, batch_size=batch_size)
            out[t] = [_clean_kwargs(kw) for _, kw in store]
    return out


def run_layers(
    model: nn.Module, calib: torch.Tensor, *, on_layer: Callable[[LayerWork], None], device: str = "cpu",
    ignore=DEFAULT_IGNORE, tokens_per_batch: int = 16384, rerun: bool = True, progress: bool = True,
    desc: str = "layers", log: Callable[[str], None] | None = None, offload_activations: bool | None = None,
) -> None:
    """Run `on_layer` on every decoder layer in order, on `device`, with that layer's calibration inputs.

    Args:
        model: a transformers causal LM (weights anywhere; each layer visits `device` in turn and goes
            back where it was).
        calib: LongTensor [n_samples, seq_len] of token ids.
        on_layer: callback; it may collect statistics (`work.collect`, `work.forward(hooks=...)`) and
            change the layer's weights in place.
        device: where the layer runs ("cuda", "cpu", ...).
        ignore: Linear name patterns left out of `work.linears`.
        tokens_per_batch: calibration tokens per forward call (memory vs speed).
        rerun: after `on_layer`, run the layer again so the next layer sees the changed outputs. False
            reuses the outputs of the callback's last pass (only valid if the layer's function is unchanged).
        progress: show a tqdm bar.
        desc: progress-bar label.
        log: called with a one-line timing summary at the end.
        offload_activations: keep the calibration activations in host memory between uses (each batch visits
            the device in turn). None: when the device is a GPU and they exceed OFFLOAD_MIN_BYTES.
    """
    from tqdm.auto import tqdm

    t0 = time.time()
    device = torch.device(device)
    if device.type == "cuda":
        _expandable_segments()
        torch.cuda.empty_cache()  # cached blocks of earlier work would be reused as fixed segments
    layers = decoder_layers(model)
    prefix = layers_prefix(model)
    batch_size = max(1, tokens_per_batch // calib.shape[1])
    home = {}
    parent = next(m for m in model.modules() if any(c is layers for c in m.children()))
    for name, child in parent.named_children():
        if child is not layers:
            p = next(iter(child.parameters()), None)
            p = p if p is not None else next(iter(child.buffers()), None)
            home[name] = p.device if p is not None else torch.device("cpu")
    inputs, kwargs = capture_inputs(model, calib, device=device, batch_size=batch_size)
    by_type = kwargs_by_attention_type(model, calib, kwargs, device=device, batch_size=batch_size)
    hooks = _LAYER_HOOKS.get()
    for name, child in parent.named_children():
        if name in home:
            child.to(home[name])
    getattr(hooks, "inputs_ready", lambda: None)()  # a streamed conversion frees the embeddings until needed
    kwargs = [_to(kw, device) for kw in kwargs]
    act_bytes = sum(x.numel() * x.element_size() for x in inputs)
    if offload_activations is None:
        offload_activations = device.type == "cuda" and act_bytes > OFFLOAD_MIN_BYTES
    host = torch.device("cpu") if offload_activations else None
    if host is not None:
        inputs = [_host_copy(x) for x in inputs]
    by_type = {t: [_to(kw, device) for kw in kws] for t, kws in by_type.items()}

    types = layer_attention_types(model)
    scratch: dict = {}
    bar = tqdm(range(len(layers)), desc=desc, disable=not progress, unit="layer")
    for i in bar:
        layer = layers[i]
        name = f"{prefix}.{i}"
        if hooks is not None:
            hooks.before(i, name, layer)
        layer_home = next(layer.parameters()).device
        layer.to(device)
        layer_kwargs = by_type.get(types[i], kwargs)
        work = LayerWork(index=i, name=name, layer=layer, linears=quantizable_linears(layer, ignore, name),
                         device=device, inputs=inputs, kwargs=layer_kwargs, scratch=scratch, host=host)
        moe.prepare_layer(work)
        on_layer(work)
        moe.finish_layer(work)
        if work.outputs is None or (rerun and not work.outputs_final):
            work.forward()
        inputs = work.outputs
        work.outputs = None
        layer.to(layer_home)
        del work
        if hooks is not None:
            hooks.after(i, name, layer)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if log:
        log(f"{desc}: {len(layers)} layers on {device} in {time.time() - t0:.1f} s")
