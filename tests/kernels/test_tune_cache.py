"""The chooser's on-disk memory: a choice made for one GPU model and kernel source is reused by later processes."""
from __future__ import annotations

import json

import pytest

from hubquant_kernels import _common
from hubquant_kernels._common import Candidate


@pytest.fixture
def cache(tmp_path, monkeypatch):
    path = tmp_path / "choices.json"
    monkeypatch.setenv("HUBQUANT_TUNE_CACHE", str(path))
    monkeypatch.setattr(_common, "_DISK", None)
    return path


CANDS = [Candidate(name="gemv_a", fn=lambda: "a"), Candidate(name="gemv_b", fn=lambda: "b")]
KEY = ("w4a16", 1, 4096, 4096, 128, False, "torch.bfloat16", False)


def test_choice_survives_a_new_process(cache, monkeypatch):
    _common.remember_choice("NVIDIA H100 80GB HBM3", KEY, "gemv_b")
    data = json.loads(cache.read_text())
    assert list(data.values()) == ["gemv_b"] and "NVIDIA H100 80GB HBM3" in next(iter(data))
    monkeypatch.setattr(_common, "_DISK", None)  # what a new process sees
    assert _common.cached_choice("NVIDIA H100 80GB HBM3", KEY, CANDS).name == "gemv_b"
    assert _common.cached_choice("NVIDIA H200", KEY, CANDS) is None  # another GPU model tunes anew
    assert _common.cached_choice("NVIDIA H100 80GB HBM3", KEY[:-1] + (True,), CANDS) is None
    assert _common.cached_choice("NVIDIA H100 80GB HBM3", KEY, CANDS[:1]) is None  # no longer offered


def test_kernel_source_is_part_of_the_key(cache):
    tag = _common._software_tag()
    assert "triton" in tag and "src " in tag
    _common.remember_choice("GPU", KEY, "gemv_a")
    assert tag in next(iter(json.loads(cache.read_text())))


def test_corrupt_file_is_ignored_and_rewritten(cache, monkeypatch):
    cache.write_text("{not json")
    assert _common.cached_choice("GPU", KEY, CANDS) is None
    _common.remember_choice("GPU", KEY, "gemv_a")
    assert list(json.loads(cache.read_text()).values()) == ["gemv_a"]


def test_cache_can_be_turned_off(tmp_path, monkeypatch):
    monkeypatch.setenv("HUBQUANT_TUNE_CACHE", "0")
    monkeypatch.setattr(_common, "_DISK", None)
    assert _common.tune_cache_path() is None
    _common.remember_choice("GPU", KEY, "gemv_a")  # kept in memory only
    assert _common.cached_choice("GPU", KEY, CANDS).name == "gemv_a"
    assert not list(tmp_path.iterdir())
