"""Device-memory placement of the layer runner: activations that wait in host memory between uses, and GPTQ's
Hessians freed group by group (allocation accounting on the CPU; the GPU figures are in docs/memory.md)."""
from __future__ import annotations

import gc
import os

import pytest
import torch

from hubquant import engine
from hubquant.methods import QuantJob
from hubquant.methods import gptq as gptq_mod
from hubquant.quant import QuantScheme, WeightScheme
from tests.helpers import tiny_model

SCHEME = QuantScheme(weights=WeightScheme(bits=4, group_size=32, symmetric=True))


def _calib(n=4, L=32):
    return torch.randint(0, 1000, (n, L), generator=torch.Generator().manual_seed(0))


def _gptq(offload, monkeypatch, tokens_per_batch=16384):
    seen = []
    orig = engine.LayerWork.forward

    def spy(self, hooks=None):
        seen.append((self.host, {x.device.type for x in self.inputs}))
        return orig(self, hooks)

    real = engine.run_layers

    def run_layers(*a, **k):
        return real(*a, **k, offload_activations=offload, tokens_per_batch=tokens_per_batch)

    monkeypatch.setattr(engine.LayerWork, "forward", spy)
    monkeypatch.setattr(gptq_mod, "run_layers", run_layers)
    model = tiny_model("llama", vocab=1000, layers=2)
    q = gptq_mod.run(model, QuantJob(scheme=SCHEME, calib=_calib(), options={"true_sequential": False}, progress=False))
    return q, seen


def test_offloaded_activations_give_the_same_weights(monkeypatch):
    """Activations kept in host memory between uses (each batch visits the device): the same GPTQ codes."""
    kept, seen_kept = _gptq(False, monkeypatch, tokens_per_batch=64)
    assert seen_kept and all(host is None for host, _ in seen_kept)
    monkeypatch.undo()
    off, seen_off = _gptq(True, monkeypatch, tokens_per_batch=64)
    assert seen_off and all(host == torch.device("cpu") and devs == {"cpu"} for host, devs in seen_off), seen_off
    assert kept.keys() == off.keys()
    for name in kept:
        assert torch.equal(kept[name].qweight, off[name].qweight), name
        assert torch.equal(kept[name].scale, off[name].scale), name


def test_gptq_frees_each_hessian_before_its_column_loop(monkeypatch):
    """While a group's weights are quantized, only its inverse-Hessian factor of the [in, in] fp32 matrices is
    alive: the Hessian itself is gone, and so are the earlier groups' (one calibration batch and several)."""
    for tokens_per_batch in (16384, 32):  # one batch: Hessian preps shared per input; several: one pass per group
        alive = []
        orig = gptq_mod.gptq_quantize

        def spy(w, h, scheme, **kw):
            n = w.shape[1]
            gc.collect()
            square = {id(t.untyped_storage()) for t in gc.get_objects()
                      if isinstance(t, torch.Tensor) and t.dtype == torch.float32 and tuple(t.shape) == (n, n)}
            alive.append(len(square))
            return orig(w, h, scheme, **kw)

        monkeypatch.setattr(gptq_mod, "gptq_quantize", spy)
        real = engine.run_layers
        monkeypatch.setattr(gptq_mod, "run_layers",
                            lambda *a, **k: real(*a, **k, tokens_per_batch=tokens_per_batch))
        model = tiny_model("llama", vocab=1000, layers=1, hidden=64, intermediate=256)
        gptq_mod.run(model, QuantJob(scheme=SCHEME, calib=_calib(), progress=False))
        monkeypatch.undo()
        # down_proj reads [*, 256]: its 256 x 256 Hessian is freed once prepared, only the factor remains
        assert alive and alive[-1] == 1, (tokens_per_batch, alive)


def test_expandable_segments_left_to_the_user(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda.memory, "_set_allocator_settings", lambda s: calls.append(s))
    if hasattr(torch._C, "_accelerator_setAllocatorSettings"):  # torch >= 2.11: the engine calls this one
        monkeypatch.setattr(torch._C, "_accelerator_setAllocatorSettings", lambda s: calls.append(s))
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    monkeypatch.delenv("PYTORCH_ALLOC_CONF", raising=False)
    engine._expandable_segments()
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:512")
    engine._expandable_segments()
    assert calls == ["expandable_segments:True"]


def _spd(n: int, seed: int = 0) -> torch.Tensor:
    x = torch.randn(2 * n, n, generator=torch.Generator().manual_seed(seed))
    return x.T @ x / (2 * n)


def _factor_out_of_place(h: torch.Tensor, damp: float) -> tuple[torch.Tensor, float]:
    """The three-matrix formula: factor, inverse, factor of the inverse as new tensors."""
    diag, mean, added = h.diagonal(), h.diagonal().mean().item(), 0.0
    for mult in gptq_mod.DAMP_RETRIES:
        d = damp * mult
        diag.add_(d * mean - added)
        added = d * mean
        low, info = torch.linalg.cholesky_ex(h)
        if info.item() == 0:
            up, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(low), upper=True)
            if info.item() == 0 and torch.isfinite(up).all():
                return up, d
    raise gptq_mod.CholeskyFailed("singular")


def test_inverse_factor_in_place_same_bits_and_layout():
    """The in-place factor has the out-of-place one's values and column-major layout (the GEMMs that read it
    round alike), also when the damping has to be raised, and fails where the formula fails."""
    used = []
    for h in (_spd(300), _spd(200, 1) - 0.1 * torch.eye(200), _spd(200, 1) - 0.5 * torch.eye(200)):
        ref, d_ref = _factor_out_of_place(h.clone(), 0.01)
        got, d = gptq_mod.inverse_hessian_cholesky(h.clone(), 0.01)
        assert d == d_ref and torch.equal(got, ref) and got.stride() == ref.stride()
        used.append(d)
    assert used == [0.01, 0.1, 1.0]  # the first damping, then the second and third retries
    with pytest.raises(gptq_mod.CholeskyFailed):
        gptq_mod.inverse_hessian_cholesky(-torch.eye(50), 0.01)


def test_blocked_hessian_upcasts_by_column_block_same_bits():
    """acc += x^T x from bf16 inputs upcast one column block at a time equals the fp32 GEMM of the whole upcast
    input (upper block rows, mirrored), bit for bit."""
    x = (torch.randn(700, 1100, generator=torch.Generator().manual_seed(2)) * 3).to(torch.bfloat16)
    ref = torch.ones(1100, 1100)
    xf = x.float()
    b = -(-1100 // engine._SYM_BLOCKS)
    for i in range(0, 1100, b):
        ref[i: i + b, i:].addmm_(xf[:, i: i + b].T, xf[:, i:])
    got = torch.ones(1100, 1100)
    engine._accumulate_xtx(got, x)
    assert torch.equal(got.triu(), ref.triu())
    engine._finish_xtx(got)
    assert torch.equal(got, got.T)


def test_rtn_row_blocks_and_packing_same_bytes():
    """RTN a block of rows at a time and int32 packing a block of rows at a time: the whole-weight values."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    from hubquant.formats.compressed_tensors import PACK_ROWS, pack_int32
    from hubquant.methods import rtn
    from hubquant.quant import rtn_quantize

    for ws in (WeightScheme(bits=4, group_size=128), WeightScheme(bits=3, group_size=32, symmetric=False)):
        lin = torch.nn.Linear(512, 3 * rtn.ROWS + 5, bias=False).to(torch.bfloat16)
        ref = rtn_quantize(lin.weight.data, ws, scale_dtype=torch.bfloat16)
        deq = ref.dequantize(torch.bfloat16)
        got = rtn.quantize_linears({"x": lin}, QuantJob(scheme=QuantScheme(weights=ws), progress=False))["x"]
        assert torch.equal(got.qweight, ref.qweight) and torch.equal(got.scale, ref.scale)
        assert (got.zero_point is None) == (ref.zero_point is None)
        assert got.zero_point is None or torch.equal(got.zero_point, ref.zero_point)
        assert torch.equal(lin.weight.data, deq)
        q = torch.randint(-4, 4, (2 * PACK_ROWS + 3, 96), dtype=torch.int8)
        assert torch.equal(pack_int32(q, ws.bits), pack_to_int32(q, ws.bits, packed_dim=1))


def _squares(n: int, exclude=()) -> int:
    """Distinct float32 [n, n] storages alive (besides `exclude`'s)."""
    gc.collect()
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    return len({t.untyped_storage().data_ptr() for t in gc.get_objects()
                if isinstance(t, torch.Tensor) and t.dtype == torch.float32 and tuple(t.shape) == (n, n)
                and t.untyped_storage().data_ptr() not in skip})


def test_prepare_hessian_in_place_keeps_one_hessian(monkeypatch):
    """prepare_hessian(inplace=True) works in the caller's Hessian (no copy of it): while the factor is computed,
    the Hessian is the only [in, in] matrix besides the factor's buffer; the factor has the copying call's bits."""
    h = _spd(320, 3)
    ref = gptq_mod.prepare_hessian(h.clone(), SCHEME.weights, clip=True)
    seen = []
    orig = gptq_mod.inverse_hessian_cholesky

    def spy(hh, damp):
        seen.append(_squares(320, exclude=[ref.hinv]))
        return orig(hh, damp)

    monkeypatch.setattr(gptq_mod, "inverse_hessian_cholesky", spy)
    got = gptq_mod.prepare_hessian(h, SCHEME.weights, clip=True, inplace=True)
    assert seen == [1]
    assert torch.equal(got.hinv, ref.hinv) and torch.equal(got.perm, ref.perm) and torch.equal(got.blocks, ref.blocks)


def _peak_bytes(fn) -> int:
    """Growth of this process's peak resident size while `fn` runs (Linux: VmHWM reset through clear_refs)."""
    page = os.sysconf("SC_PAGE_SIZE")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    with open("/proc/self/statm") as f:
        before = int(f.read().split()[1]) * page
    fn()
    with open("/proc/self/status") as f:
        hwm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))
    return hwm - before


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux's VmHWM reset")
def test_factor_and_clip_search_temporaries_stay_small():
    """The host-memory peak of the inverse factor (Hessian of a 4096-wide input) and of the clip search (a
    2048 x 5632 weight, the down projection of a 1B model) beyond their inputs: the factor's buffer plus under
    a third of it (checking the factor for inf/NaN a few rows at a time), and the clip search's temporaries
    about one weight-sized buffer (a few groups at a time; the whole weight at once needed three)."""
    n = 4096
    x = torch.randn(n + 64, n, generator=torch.Generator().manual_seed(0))
    h = x.T @ x / n
    del x
    grew = _peak_bytes(lambda: gptq_mod.inverse_hessian_cholesky(h, 0.01))
    assert grew < 1.4 * h.numel() * 4, grew / 1e6
    w = torch.randn(2048, 5632, generator=torch.Generator().manual_seed(1))
    blocks = torch.randn(44, 128, 128, generator=torch.Generator().manual_seed(2))
    blocks = blocks @ blocks.mT
    scheme = WeightScheme(bits=4, group_size=128)
    ratios = []
    grew = _peak_bytes(lambda: ratios.append(gptq_mod.clip_ratios(w, blocks, scheme)))
    assert grew < 1.6 * w.numel() * 4, grew / 1e6
    whole = gptq_mod._clip_search(w, blocks, scheme, gptq_mod.CLIP_GRID, gptq_mod.CLIP_MIN_RATIO).T
    assert torch.equal(ratios[0], whole)  # the same ratios as the search over every group at once


def test_true_sequential_drops_factors_of_freed_inputs(monkeypatch):
    """One calibration batch: when down_proj is quantized, the factors of q/k/v's and o_proj's inputs (freed by
    the layer) are gone; only gate/up's remains (the MLP still holds its input)."""
    alive = []
    orig = gptq_mod.gptq_quantize
    model = tiny_model("llama", vocab=1000, layers=1, hidden=64, intermediate=256)
    params = list(model.parameters())

    def spy(w, h, scheme, **kw):
        if w.shape[1] == 256:  # down_proj
            alive.append(_squares(64, exclude=params))
        return orig(w, h, scheme, **kw)

    monkeypatch.setattr(gptq_mod, "gptq_quantize", spy)
    gptq_mod.run(model, QuantJob(scheme=SCHEME, calib=_calib(), progress=False))
    assert alive == [1]
