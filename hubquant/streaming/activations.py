"""Evaluation activations of a streamed conversion: hidden states advanced one decoder layer at a time, and the
quality numbers computed from the last layer's.

Activations stay on the conversion's device (`--device`), as the layers visit it; the embeddings, final norm and
lm_head go there for the final step.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import torch
from torch import nn

from hubquant.engine import _clean_kwargs, _Passthrough, _to, layer_attention_types
from hubquant.modeling import decoder_layers


class Stream:
    """Hidden states of token batches on their way through the decoder layers, advanced one layer at a time
    (kept on `device`, where each layer runs)."""

    def __init__(self, model: nn.Module, ids: torch.Tensor | None, batch_size: int, device: torch.device):
        from hubquant.engine import capture_inputs, kwargs_by_attention_type

        self.hidden: list[torch.Tensor] = []
        self.kwargs: list[dict] = []
        self.by_type: dict = {}
        self.types = None
        if ids is None:
            return
        inputs, kwargs = capture_inputs(model, ids, device=device, batch_size=batch_size)
        by_type = kwargs_by_attention_type(model, ids, kwargs, device=device, batch_size=batch_size)
        self.hidden = [x.to(device) for x in inputs]
        self.kwargs = [_to(kw, device) for kw in kwargs]
        self.by_type = {t: [_to(kw, device) for kw in kws] for t, kws in by_type.items()}
        self.types = layer_attention_types(model)

    def copy(self) -> Stream:
        other = Stream.__new__(Stream)
        other.hidden, other.kwargs, other.by_type = list(self.hidden), self.kwargs, self.by_type
        other.types = self.types
        return other

    @torch.no_grad()
    def advance(self, index: int, layer: nn.Module, device: torch.device) -> None:
        kws = self.by_type.get(self.types[index], self.kwargs) if self.hidden else []
        for b, (x, kw) in enumerate(zip(self.hidden, kws)):
            y = layer(x.to(device), **_to(_clean_kwargs(kw), device))
            self.hidden[b] = y[0] if isinstance(y, (tuple, list)) else y


def non_layers_to(model: nn.Module, device) -> None:
    """Move the embeddings, final norm and lm_head (everything beside the decoder layers) to `device`."""
    layers = decoder_layers(model)
    parent = next(m for m in model.modules() if any(c is layers for c in m.children()))
    for child in parent.children():
        if child is not layers:
            child.to(device)
    head = getattr(model, "lm_head", None)
    if isinstance(head, nn.Module):
        head.to(device)


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


@dataclass
class EvalStreams:
    """The base's and the variant's activations for perplexity/agreement/KL and the calibration-leak check."""

    base: list[Stream] = field(default_factory=list)
    variant: list[Stream] = field(default_factory=list)
    eval_set: object = None
    leak_docs: tuple | None = None
    tokenizer: object = None
    progress: bool = False
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    reference: object = None  # evaluate.Reference of the base
    compare: object = None  # evaluate.Comparison of the variant
    leak_rates: list = field(default_factory=list)  # leakcheck.Rates of the base, then of the variant


def eval_streams(weights, eval_set, tokenizer, device, progress: bool = False) -> EvalStreams:
    """Layer-0 activations of the evaluation windows (evaluate.perplexity's batches), for base and variant, on
    `device`."""
    device = torch.device(device)
    streams = EvalStreams(eval_set=eval_set, tokenizer=tokenizer, progress=progress, device=device)
    if eval_set is not None:
        weights.load_rest()
        streams.base.append(Stream(weights.model, eval_set.ids, 2, device))
        streams.variant.append(streams.base[-1].copy())
        non_layers_to(weights.model, "cpu")  # until the evaluation: the device holds one decoder layer at a time
    return streams


def add_leak_streams(weights, streams: EvalStreams, leak_docs: tuple, on_set=None) -> None:
    """Layer-0 activations of the calibration-leak check's documents (leakcheck._match_rate's batches), for base
    and variant; `on_set(done, total)` after each document set."""
    from hubquant.leakcheck import CONT_TOKENS, N_DOCS, PREFIX_TOKENS, _windows

    streams.leak_docs = leak_docs
    weights.load_rest()
    for i, texts in enumerate(leak_docs):
        ids = _windows(streams.tokenizer, texts, N_DOCS, PREFIX_TOKENS + CONT_TOKENS)
        streams.base.append(Stream(weights.model, ids, 8, streams.device))
        streams.variant.append(streams.base[-1].copy())
        if on_set is not None:
            on_set(i + 1, len(leak_docs))
    non_layers_to(weights.model, "cpu")


def evaluate_streams(weights, streams: EvalStreams, *, variant: bool) -> None:
    """Perplexity (+ agreement and KL for the variant) from the streamed last-layer activations, computed by
    hubquant.evaluate exactly as for a model in memory, on the streams' device (`streams.reference`,
    `streams.compare`). The base's numbers are taken before any Linear outside the decoder layers (an lm_head) is
    quantized."""
    from hubquant import evaluate

    if streams.eval_set is None:
        return
    group = streams.variant if variant else streams.base
    with _final_step(weights, streams.device), replay(weights.model, group[0]) as m:
        if variant:
            streams.compare = evaluate.compare(m, streams.eval_set, streams.reference, progress=streams.progress)
        else:
            streams.reference = evaluate.reference(m, streams.eval_set, progress=streams.progress)


def leak_rates(weights, streams: EvalStreams, *, variant: bool, on_batch=None) -> None:
    """The calibration-leak check's memorisation rates from the streamed activations (hubquant.leakcheck, as for a
    model in memory), appended to `streams.leak_rates` (the base's first)."""
    from hubquant.leakcheck import memorization_rates

    if streams.leak_docs is None:
        return
    group = streams.variant if variant else streams.base
    with _final_step(weights, streams.device), replay(weights.model, *group[streams.eval_set is not None:]) as m:
        streams.leak_rates.append(memorization_rates(m, streams.tokenizer, *streams.leak_docs, on_batch=on_batch))


class _final_step:
    """Context: embeddings, final norm and lm_head loaded and on `device` (back on the CPU afterwards)."""

    def __init__(self, weights, device):
        self.weights, self.device = weights, device

    def __enter__(self):
        self.weights.load_rest()
        non_layers_to(self.weights.model, self.device)

    def __exit__(self, *exc):
        non_layers_to(self.weights.model, "cpu")
        return False
