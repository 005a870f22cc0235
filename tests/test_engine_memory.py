"""Device-memory placement of the layer runner: activations that wait in host memory between uses, and GPTQ's
Hessians freed group by group (allocation accounting on the CPU; the GPU figures are in docs/memory.md)."""
from __future__ import annotations

import gc

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
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    monkeypatch.delenv("PYTORCH_ALLOC_CONF", raising=False)
    engine._expandable_segments()
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:512")
    engine._expandable_segments()
    assert calls == ["expandable_segments:True"]
