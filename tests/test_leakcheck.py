"""The calibration-leak check flags a model that memorised its calibration text, and only that."""
from __future__ import annotations

import copy

import torch

from hubquant.leakcheck import LEAK_WARN, calibration_leak, memorization_rates
from hubquant.textdata import load_texts
from tests.helpers import tiny_model


class SmallVocab:
    """The real tokenizer with its ids renumbered densely, so a tiny model's vocabulary covers them."""

    def __init__(self, tokenizer, texts):
        ids = sorted({i for t in texts for i in tokenizer(t, add_special_tokens=False)["input_ids"]})
        self.tok, self.map = tokenizer, {old: new for new, old in enumerate(ids)}
        self.vocab_size = len(ids)

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [self.map[i] for i in self.tok(text, add_special_tokens=False)["input_ids"]]}


def _docs(tokenizer):
    texts = [t for t in load_texts("lee-news").texts if len(tokenizer(t)["input_ids"]) > 80][:16]
    small = SmallVocab(tokenizer, texts)
    return texts[:8], texts[8:16], small


def test_memorising_variant_is_flagged(tokenizer):
    calib, heldout, tokenizer = _docs(tokenizer)
    base = tiny_model("llama", vocab=tokenizer.vocab_size).eval()
    # the "variant" memorises the calibration documents (what over-calibration can do)
    variant = copy.deepcopy(base).train()
    ids = torch.tensor([tokenizer(t, add_special_tokens=False)["input_ids"][:64] for t in calib])
    opt = torch.optim.Adam(variant.parameters(), lr=5e-3)
    for _ in range(40):
        loss = variant(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    variant.eval()
    report = calibration_leak(base, variant, tokenizer, calib, heldout)
    assert report["variant_calib_rate"] > 0.5 > report["variant_heldout_rate"]
    assert report["leak_score"] > LEAK_WARN and report["warn"] is True
    assert report["documents"] == {"calibration": 8, "heldout": 8}


def test_unchanged_model_has_zero_score(tokenizer):
    calib, heldout, tokenizer = _docs(tokenizer)
    base = tiny_model("llama", vocab=tokenizer.vocab_size).eval()
    report = calibration_leak(base, base, tokenizer, calib, heldout)
    assert report["leak_score"] == 0.0 and report["warn"] is False
    rates = memorization_rates(base, tokenizer, calib, heldout)
    assert 0.0 <= rates.calib <= 1.0 and rates.n_calib == 8
