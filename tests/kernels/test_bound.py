"""Launchers bound per layer (hubquant_kernels.bound): same numbers as the entry points, and plans that replay
only what may be replayed."""
from __future__ import annotations

import torch

from hubquant_kernels import bound, pack, w4a16, w8a8


def test_bound_w4a16_matches_entry_point():
    g = torch.Generator().manual_seed(0)
    k, n = 256, 48
    qw = pack.pack_kn(torch.randint(0, 16, (k, n), generator=g))
    s = (torch.rand(k // 64, n, generator=g) * 0.02 + 1e-3).to(torch.bfloat16)
    b = torch.randn(n, generator=g).to(torch.bfloat16)
    op = w4a16.bind(qw, s, None, 64, b)
    for m in (1, 3, 1):
        x = torch.randn(2, m, k, generator=g).to(torch.bfloat16)
        y = op(x)
        ref = w4a16.w4a16_matmul(x, qw, s, None, 64, b)
        assert y.shape == (2, m, n) and torch.equal(y, ref)
    assert op.plans() == 0  # no plan off the GPU: every call takes the entry point's path


def test_bound_w8a8_matches_entry_point():
    g = torch.Generator().manual_seed(1)
    qw = torch.randint(-127, 128, (40, 128), generator=g).to(torch.int8)
    sw = torch.rand(40, generator=g) * 0.01
    x = torch.randn(5, 128, generator=g).to(torch.bfloat16)
    assert torch.equal(w8a8.bind(qw, sw)(x), w8a8.w8a8_matmul(x, qw, sw))


class _Launcher:
    """Stands in for a compiled kernel: `run` keeps the arguments Triton's C launcher would receive."""

    function, packed_metadata = "fn", "meta"

    def __init__(self):
        self.calls = []

    def run(self, *a):
        self.calls.append(a)


def test_plan_substitutes_x_and_y_and_refuses_foreign_tensors():
    x, y, w, other = torch.zeros(4), torch.zeros(4), torch.zeros(4), torch.zeros(4)
    k = _Launcher()
    records = [(k, ("BLOCK", 8), (2, 1), (x, w, y, 7))]
    plan = bound.make_plan(records, x, y, consts=(w, None))
    assert plan is not None
    plan(111, 222)
    grid, args = k.calls[0][:3], k.calls[0][9:]
    assert grid == (2, 1, 1) and args == (111, w.data_ptr(), 222, 7, "BLOCK", 8)
    plan(333, 444)
    assert k.calls[1][9:11] == (333, w.data_ptr())
    assert bound.make_plan([(k, (), (1,), (x, other, y))], x, y, consts=(w,)) is None  # a copy of x, say
    assert bound.make_plan([(k, (), (1,), (x, other, y))], x, y, consts=(w,), scratch=[other]) is not None
    assert bound.make_plan(records + [None], x, y, consts=(w,)) is None  # a launch through Triton's own path
    assert bound.make_plan([], x, y, consts=(w,)) is None  # no launch at all (a cuBLAS call)


def test_every_cpu_runnable_scaled_mm_candidate_writes_its_output_in_place():
    # bound plans and `bind` hold the preallocated y: a candidate that returned a new tensor instead (as the cuBLAS
    # FP8 one did) left y unwritten
    g = torch.Generator().manual_seed(2)
    qw = torch.randint(-127, 128, (48, 256), generator=g).to(torch.int8)
    sw = torch.rand(48, generator=g) * 0.01
    qa, sa = w8a8.quantize_act(torch.randn(20, 256, generator=g).to(torch.bfloat16))
    ref = w8a8.scaled_mm_reference(qa, sa, qw, sw, None, torch.float32)
    for c in w8a8.mm_candidates(20, 48, 256, False, torch.bfloat16):
        if c.name.startswith("cublas"):
            continue  # CUDA only
        y = torch.full((20, 48), float("nan"), dtype=torch.bfloat16)
        assert c.fn(qa, sa, qw, sw, None, y) is y, c.name
        assert float((y.float() - ref).norm() / ref.norm()) < 1e-2, c.name


def test_layer_op_is_made_again_when_its_tensors_change():
    from hubquant.runtime import modules

    k, n = 128, 16
    qw = pack.pack_kn(torch.randint(0, 16, (k, n), generator=torch.Generator().manual_seed(3)))
    mod = modules.W4A16Linear(k, n, 128, qweight=qw, scales=torch.rand(1, n).to(torch.bfloat16))
    made = []

    def op():
        tensors = (mod.qweight, mod.scales, mod.zeros, mod.bias)
        return modules._bound(mod, tensors, lambda: made.append(1) or w4a16.bind(*tensors[:3], 128, tensors[3]))

    first = op()
    assert op() is first and len(made) == 1  # one op per layer while its tensors stay
    mod.scales = mod.scales.clone()  # load_state_dict / fusing replace buffers
    assert op() is not first and len(made) == 2
    mod.float()  # moving the module drops the op (it holds the old tensors)
    assert mod._op is None
