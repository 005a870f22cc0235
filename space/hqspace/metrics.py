"""Pure math for comparing a variant with its base: token agreement and next-token KL.

No model walking here: these take token lists and logits that the runner produced.
"""
from __future__ import annotations

import torch


def token_agreement(base: list[int], variant: list[int]) -> float:
    """Percentage of positions where two greedy continuations hold the same token.

    Positions are compared one by one over the longer of the two continuations, so a variant that
    stops early (or runs on) is charged for the missing tokens.

    Args:
        base: token ids the base model generated.
        variant: token ids the variant generated from the same prompt.

    Returns:
        Percentage in [0, 100]; 100.0 when both are empty.
    """
    n = max(len(base), len(variant))
    if n == 0:
        return 100.0
    same = sum(1 for a, b in zip(base, variant) if a == b)
    return 100.0 * same / n


def mean_kl(base_logits: torch.Tensor, variant_logits: torch.Tensor) -> float:
    """Mean KL(base || variant) of the next-token distributions, in nats per position.

    Args:
        base_logits: [positions, vocab] logits of the base model on a token sequence.
        variant_logits: [positions, vocab] logits of the variant on the same sequence.

    Returns:
        The KL divergence averaged over positions (float64 math).

    Raises:
        ValueError: if the shapes differ.
    """
    if base_logits.shape != variant_logits.shape:
        raise ValueError(f"logit shapes differ: {tuple(base_logits.shape)} vs {tuple(variant_logits.shape)}")
    p_log = torch.log_softmax(base_logits.double(), dim=-1)
    q_log = torch.log_softmax(variant_logits.double(), dim=-1)
    kl = (p_log.exp() * (p_log - q_log)).sum(dim=-1)
    return float(kl.mean())


def tokens_per_second(n_tokens: int, seconds: float) -> float:
    """Decode speed; 0.0 when nothing was timed."""
    return n_tokens / seconds if seconds > 0 else 0.0
