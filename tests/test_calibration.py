"""Calibration windows: shapes, seeding, caps with warnings, chat template, documents used; disjointness check."""

import pytest
import torch

from hubquant.calibration import CalibrationSet, build_calibration, check_disjoint
from hubquant.errors import UsageError
from hubquant.textdata import load_texts


def test_windows_are_seeded_and_non_overlapping(tokenizer):
    a = build_calibration(tokenizer, spec="fortunes", num_samples=16, seq_len=256, seed=0)
    b = build_calibration(tokenizer, spec="fortunes", num_samples=16, seq_len=256, seed=0)
    c = build_calibration(tokenizer, spec="fortunes", num_samples=16, seq_len=256, seed=1)
    assert a.ids.shape == (16, 256) and a.ids.dtype == torch.long
    assert torch.equal(a.ids, b.ids) and not torch.equal(a.ids, c.ids)
    assert len({tuple(r) for r in a.ids.tolist()}) == 16
    assert a.spec == "fortunes" and "16 x 256" in a.description and "fortunes" in a.description
    # every window's text comes from the listed documents
    joined = " ".join(a.texts)
    for row in a.ids[:4]:
        words = tokenizer.decode(row[50:70]).split()[1:-1]
        assert " ".join(words[:3]) in joined


def test_seq_len_capped_to_model_and_corpus(tokenizer):
    with pytest.warns(UserWarning, match="context length 128"):
        c = build_calibration(tokenizer, spec="fortunes", num_samples=2, seq_len=512, model_max_len=128)
    assert c.ids.shape == (2, 128)
    with pytest.warns(UserWarning, match="capped"):
        big = build_calibration(tokenizer, spec="fortunes", num_samples=1, seq_len=10**8)
    assert 100_000 < big.ids.shape[1] < 10**8
    with pytest.warns(UserWarning, match="overlap"):
        build_calibration(tokenizer, spec="fortunes", num_samples=4, seq_len=big.ids.shape[1] // 2)


def test_chat_template_formats_documents(tokenizer):
    c = build_calibration(tokenizer, spec="fortunes", num_samples=4, seq_len=256, chat_template=True)
    text = tokenizer.decode(c.ids.flatten())
    assert "<|im_start|>user" in text and "<|im_start|>assistant" in text
    assert "chat template" in c.description


def test_bad_sizes_raise(tokenizer):
    with pytest.raises(UsageError):
        build_calibration(tokenizer, spec="fortunes", num_samples=0)


def test_disjoint_sources_pass_and_overlap_is_caught(tokenizer):
    calib = build_calibration(tokenizer, spec="fortunes", num_samples=8, seq_len=256)
    check_disjoint(calib, load_texts("lee-news"))  # different sources: no error
    with pytest.raises(UsageError, match="overlap") as e:
        check_disjoint(calib, ["An unrelated sentence about the weather in Sydney today.", calib.texts[0]])
    assert "--eval-dataset" in e.value.hint
    # a long shared passage inside an otherwise new document is caught too
    words = " ".join(" ".join(calib.texts).split()[100:120])
    with pytest.raises(UsageError, match="1 of 1"):
        check_disjoint(calib, [f"Breaking news from Canberra. {words} The minister declined to comment."])
    # a short common phrase is not overlap
    check_disjoint(calib, ["It was the best of times, said the reporter, and then the rain came down on Perth."])


def test_calibration_set_is_frozen():
    c = CalibrationSet(ids=torch.zeros(1, 2, dtype=torch.long), spec="x", description="d", texts=("a",))
    with pytest.raises(AttributeError):  # dataclasses.FrozenInstanceError
        c.spec = "y"
    assert c.num_samples == 1 and c.seq_len == 2
