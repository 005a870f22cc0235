"""Perplexity with the logits taken a chunk of positions at a time gives the numbers of whole windows, bit for bit
(real transformers models, including Gemma 2's soft-capped logits), and compare() the agreement and KL of the
whole-window formula."""
from __future__ import annotations

import pytest
import torch

from hubquant import evaluate
from tests.helpers import tiny_model


def _eval_set(n: int, seq: int, vocab: int) -> evaluate.EvalSet:
    ids = torch.randint(0, vocab, (n, seq), generator=torch.Generator().manual_seed(1))
    return evaluate.EvalSet(ids=ids, spec="random", description="random tokens")


@pytest.mark.parametrize("arch,dtype", [("llama", torch.bfloat16), ("gemma2", torch.float32)])
def test_chunked_logits_same_numbers(arch, dtype):
    model = tiny_model(arch, vocab=4096).to(dtype)
    assert evaluate._decoder_attr(model) == "model"  # logits_to_keep: the chunked path runs
    if arch == "gemma2":
        assert model.config.final_logit_softcapping  # the model's own forward applies it to every chunk
    es = _eval_set(5, 150, 4096)  # 149 positions: chunks of 64, 64 and 21; an odd last batch
    whole = evaluate.perplexity(model, es, keep_logprobs=3, chunk=0, progress=False)
    chunked = evaluate.perplexity(model, es, keep_logprobs=3, chunk=64, progress=False)
    assert chunked[0] == whole[0]
    assert chunked[1].shape == (3, 149, 4096) and torch.equal(chunked[1], whole[1])


def test_compare_window_by_window_matches_whole():
    model = tiny_model("llama", vocab=4096).to(torch.bfloat16)
    es = _eval_set(4, 300, 4096)  # 299 positions: three chunks of TOKEN_CHUNK (128) per window
    ref = evaluate.reference(model, es, n_prompts=4, progress=False)
    with torch.no_grad():
        model.lm_head.weight.mul_(1.05).add_(0.01)  # a different "variant"
    _, var = evaluate.perplexity(model, es, keep_logprobs=4, chunk=0, progress=False)
    agree = kl = 0.0
    for b16, v16 in zip(ref.logprobs, var):  # the whole-window formula
        base, v = b16.float(), v16.float()
        agree += (base.argmax(-1) == v.argmax(-1)).float().sum().item()
        kl += (base.exp() * (base - v)).sum(-1).clamp(min=0).sum().item()
    n = var.shape[0] * var.shape[1]
    got = evaluate.compare(model, es, ref, progress=False)
    assert 0.0 < got.top1_agreement < 1.0 and got.mean_kl > 0
    assert got.top1_agreement == agree / n and got.mean_kl == kl / n
