"""SmoothQuant alpha search on the quantized decoder layer's output (alpha="layer-search")."""
from __future__ import annotations

import pytest
import torch

from hubquant.errors import UsageError
from hubquant.methods import METHODS, QuantJob
from hubquant.methods.smooth_search import _slice_batch
from hubquant.methods.smoothquant import SmoothConfig, smooth_model
from hubquant.quant import sqnr_db
from tests.methods.test_smoothquant import W8A8, _ids, _logits, _with_outliers


def _run(opts, scheme=W8A8, method="smoothquant"):
    ids, calib = _ids(), _ids(seed=2)
    m = _with_outliers()
    ref = _logits(m, ids)
    q = METHODS[method].load()(m, QuantJob(scheme=scheme, calib=calib, options=opts, progress=False))
    return m, q, sqnr_db(ref, _logits(m, ids))


def test_layer_search_lowers_each_layer_error_and_beats_a_bad_fixed_alpha():
    grid = [i / 10 for i in range(11)]
    m, q, sq = _run({"alpha": "layer-search"})
    info = m._hubquant_smoothquant["layer_search"]
    assert set(info) == {"model.layers.0", "model.layers.1"}
    for layer in info.values():
        assert layer["trials"] == 1 + 4 * 10  # start (0.5 everywhere), then 10 other values per group
        assert layer["error"] <= layer["error_start"], info
    assert info["model.layers.0"]["error"] < 0.97 * info["model.layers.0"]["error_start"], info  # measured -5%
    used = m._hubquant_smoothquant["alphas_used"]
    assert len(used) == 8 and set(used.values()) <= set(grid)
    _, _, fixed_08 = _run({"alpha": 0.8})
    assert sq > fixed_08 + 1.5, (sq, fixed_08)  # measured 28.5 vs 26.1 dB (alpha 0.5: 28.7)
    assert q["model.layers.0.self_attn.q_proj"].qweight.dtype == torch.int8


def test_layer_search_starts_from_alpha_start_and_keeps_it_when_nothing_else_is_tried():
    m, _, sq = _run({"alpha": "layer-search", "alpha_grid": [0.8], "alpha_start": {"default": 0.8}})
    assert set(m._hubquant_smoothquant["alphas_used"].values()) == {0.8}
    _, _, fixed = _run({"alpha": 0.8})
    assert sq == fixed  # the same smoothing, the same model


def test_layer_search_for_fp8():
    _, q, sq = _run({"alpha": "layer-search", "alpha_grid": [0.3, 0.5, 0.7, 0.9]},
                    scheme=METHODS["fp8"].default_scheme, method="fp8")
    assert q["model.layers.1.mlp.down_proj"].qweight.dtype == torch.float8_e4m3fn
    _, _, plain = _run({}, scheme=METHODS["fp8"].default_scheme, method="fp8")
    assert sq > plain + 1.5, (sq, plain)  # measured 18.7 vs 16.1 dB (grid 0..1)


def test_layer_search_options_and_errors():
    cfg = SmoothConfig.from_options({"alpha": "layer-search", "alpha_start": 0.7, "layer_search_tokens": 1024})
    assert cfg.alpha == "layer-search" and cfg.alpha_start == (("default", 0.7),) and cfg.layer_search_tokens == 1024
    with pytest.raises(UsageError, match="alpha"):
        SmoothConfig.from_options({"alpha": "layer-search", "alpha_grid": [0.5, 1.5]})
    with pytest.raises(UsageError, match="layer-search"):
        smooth_model(_with_outliers(), _ids(), config=cfg, progress=False)


def test_slice_batch_cuts_only_batch_dimensions():
    kw = {"mask": torch.zeros(8, 1, 4, 4), "pos": (torch.zeros(1, 4, 2), torch.zeros(1, 4, 2)), "n": 3}
    out = _slice_batch(kw, 8, 2)
    assert out["mask"].shape == (2, 1, 4, 4) and out["pos"][0].shape == (1, 4, 2) and out["n"] == 3
