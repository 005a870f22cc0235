"""Calibration-leak check: does the variant reproduce its calibration text more than the base model does?

A model calibrated on too much data can learn to continue calibration sentences verbatim. For documents that
were in the calibration windows and for held-out documents of the same source, we feed a prefix and measure how
often the model's greedy next token equals the document's own next token over the following tokens (teacher
forced: one forward pass per batch, no sampling). Memorisation shows as a gap between calibration and held-out
documents; the base model's own gap is subtracted, so only what quantization added counts:

    leak_score = (variant_calib - variant_heldout) - (base_calib - base_heldout)

`warn` is set when the score exceeds LEAK_WARN (5 percentage points of verbatim next-token matches).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

LEAK_WARN = 0.05
PREFIX_TOKENS = 32
CONT_TOKENS = 32
N_DOCS = 32


@dataclass(frozen=True)
class Rates:
    """Verbatim next-token match rates (0..1) on calibration and held-out documents."""

    calib: float
    heldout: float
    n_calib: int
    n_heldout: int


def _windows(tokenizer, texts, n_docs: int, length: int) -> torch.Tensor | None:
    rows = []
    for t in texts:
        ids = tokenizer(t, add_special_tokens=False)["input_ids"]
        if len(ids) >= length:
            rows.append(ids[:length])
        if len(rows) == n_docs:
            break
    return torch.tensor(rows, dtype=torch.long) if rows else None


@torch.no_grad()
def _match_rate(model, windows: torch.Tensor | None, *, batch_size: int = 8,
                on_batch: Callable[[], None] | None = None) -> float:
    if windows is None:
        return float("nan")
    dev = next(model.parameters()).device
    hits = total = 0
    for batch in windows.split(batch_size):
        if on_batch is not None:
            on_batch()
        batch = batch.to(dev)
        logits = model(batch).logits
        # predictions for positions PREFIX_TOKENS .. end (the continuation), teacher forced
        pred = logits[:, PREFIX_TOKENS - 1:-1].argmax(-1)
        target = batch[:, PREFIX_TOKENS:]
        hits += (pred == target).sum().item()
        total += target.numel()
    return hits / total


def memorization_rates(model, tokenizer, calib_texts, heldout_texts, *, n_docs: int = N_DOCS,
                       on_batch: Callable[[int, int], None] | None = None) -> Rates:
    """Match rates of `model` on calibration vs held-out documents (each at least PREFIX+CONT tokens long).
    `on_batch(done, total)` is called as the forward passes progress."""
    length = PREFIX_TOKENS + CONT_TOKENS
    cw = _windows(tokenizer, calib_texts, n_docs, length)
    hw = _windows(tokenizer, heldout_texts, n_docs, length)
    total = sum(0 if w is None else -(-len(w) // 8) for w in (cw, hw))
    done = [0]

    def tick() -> None:
        if on_batch is not None:
            on_batch(done[0], total)
        done[0] += 1

    rates = Rates(calib=_match_rate(model, cw, on_batch=tick), heldout=_match_rate(model, hw, on_batch=tick),
                  n_calib=0 if cw is None else len(cw), n_heldout=0 if hw is None else len(hw))
    if on_batch is not None:
        on_batch(total, total)
    return rates


def leak_report(base: Rates, variant: Rates, *, threshold: float = LEAK_WARN) -> dict:
    """The card's numbers: rates of both models, the score and whether to warn."""
    score = (variant.calib - variant.heldout) - (base.calib - base.heldout)
    r = lambda x: round(x, 4)
    return {
        "base_calib_rate": r(base.calib), "base_heldout_rate": r(base.heldout),
        "variant_calib_rate": r(variant.calib), "variant_heldout_rate": r(variant.heldout),
        "leak_score": r(score), "threshold": threshold, "warn": bool(score > threshold),
        "documents": {"calibration": variant.n_calib, "heldout": variant.n_heldout},
        "prefix_tokens": PREFIX_TOKENS, "continuation_tokens": CONT_TOKENS,
    }


def calibration_leak(base_model, variant_model, tokenizer, calib_texts, heldout_texts, **kw) -> dict:
    """Both models at hand: measure each and report (see module doc)."""
    base = memorization_rates(base_model, tokenizer, calib_texts, heldout_texts, **kw)
    var = memorization_rates(variant_model, tokenizer, calib_texts, heldout_texts, **kw)
    return leak_report(base, var)


def leak_documents(calib, eval_src) -> tuple[list[str], list[str]]:
    """Calibration documents, and held-out documents of the same source (else the eval text)."""
    from hubquant.errors import HubquantError
    from hubquant.textdata import load_texts

    used = set(calib.texts)
    try:
        rest = [t for t in load_texts(calib.spec).texts if t not in used]
    except HubquantError:  # the source was loadable a moment ago; fall back rather than fail the conversion
        rest = []
    heldout = rest if len(rest) >= 8 else list(eval_src.texts)
    return list(calib.texts), heldout
