"""Perplexity over fixed token windows (needs only torch; shared by the hubquant and llm-compressor runs)."""
from __future__ import annotations

import math

import torch


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, *, batch_size: int = 8) -> float:
    """exp(mean next-token NLL) over every window in ids [n, L] (each window scored on its own)."""
    total, count = 0.0, 0
    for i in range(0, ids.shape[0], batch_size):
        x = ids[i: i + batch_size]
        logits = model(input_ids=x).logits.float()
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1),
                                                reduction="sum")
        total += float(nll)
        count += x[:, 1:].numel()
    return math.exp(total / count)


def peak_rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
