import math

import pytest
import torch
from hqspace.metrics import mean_kl, token_agreement, tokens_per_second


def test_token_agreement_counts_positions_over_the_longer_output():
    assert token_agreement([1, 2, 3, 4], [1, 2, 3, 4]) == 100.0
    assert token_agreement([1, 2, 3, 4], [1, 9, 3, 9]) == 50.0
    # a variant that stops after 2 of 4 tokens agrees on 2 of 4 positions
    assert token_agreement([1, 2, 3, 4], [1, 2]) == 50.0
    assert token_agreement([1, 2], [1, 2, 3, 4, 5]) == 40.0
    assert token_agreement([], []) == 100.0


def test_mean_kl_matches_the_closed_form():
    # two positions over a 2-token vocabulary: p = (0.5, 0.5) vs q = (0.9, 0.1), then identical
    p = torch.log(torch.tensor([[0.5, 0.5], [0.2, 0.8]], dtype=torch.float64))
    q = torch.log(torch.tensor([[0.9, 0.1], [0.2, 0.8]], dtype=torch.float64))
    expected = (0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1) + 0.0) / 2
    assert mean_kl(p, q) == pytest.approx(expected, rel=1e-12)
    # logits are shift-invariant and KL of a distribution with itself is 0
    assert mean_kl(p, p + 3.0) == pytest.approx(0.0, abs=1e-12)


def test_mean_kl_rejects_mismatched_vocabularies():
    with pytest.raises(ValueError, match="shapes differ"):
        mean_kl(torch.zeros(3, 5), torch.zeros(3, 6))


def test_tokens_per_second():
    assert tokens_per_second(50, 2.0) == 25.0
    assert tokens_per_second(5, 0.0) == 0.0
