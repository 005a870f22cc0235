"""The host-side fast paths: a decided shape builds no candidates again, and the direct launcher's guards."""
from __future__ import annotations

import pytest
import torch

from hubquant_kernels import _common
from hubquant_kernels._common import Candidate


def test_candidates_are_built_once_per_decided_shape(monkeypatch):
    monkeypatch.setenv("HUBQUANT_TUNE", "0")  # nothing to time: the first candidate is the decision
    monkeypatch.setattr(_common, "_CHOICES", {})
    built = []

    def make():
        built.append(1)
        return [Candidate(name="a", fn=lambda: "a"), Candidate(name="b", fn=lambda: "b")]

    key = ("test", 1, 64, 64)
    first = _common.choose_lazy(key, make, (), on_gpu=True)
    again = _common.choose_lazy(key, make, (), on_gpu=True)
    assert first is again and first.name == "a" and len(built) == 1
    _common.choose_lazy(("test", 2, 64, 64), make, (), on_gpu=True)  # another shape decides anew
    assert len(built) == 2
    _common.choose_lazy(key, make, (), on_gpu=False)  # off the GPU nothing is remembered
    assert len(built) == 3


def test_launch_hooks_and_interpreter_guard():
    triton = pytest.importorskip("triton")
    assert _common._no_hook(None)
    knobs = _common._knobs()
    if knobs is not None and hasattr(knobs, "HookChain"):
        chain = knobs.HookChain()
        assert _common._no_hook(chain)
        chain.add(print)
        assert not _common._no_hook(chain)
    assert not _common._fast_launch_enabled()  # tests run under TRITON_INTERPRET=1: always Triton's own path
    import triton.language as tl

    @triton.jit
    def _add_one(x_ptr, n, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        tl.store(x_ptr + offs, tl.load(x_ptr + offs, mask=offs < n) + 1, mask=offs < n)

    x = torch.zeros(5)
    _common.launch(_add_one, (1,), x, 5, BLOCK=8)
    _common.launch(_add_one, (1,), x, 5, BLOCK=8)
    assert torch.equal(x, torch.full((5,), 2.0))
