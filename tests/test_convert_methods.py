"""Every method through the whole pipeline: convert -> push (one commit) -> card -> a loader reads it back.

Cases are data: (method, extra options, format, how to load the result, quality bound on the tiny model).
"""
from __future__ import annotations

import uuid

import pytest
import torch

from hubquant.convert import ConvertOptions, convert
from tests.helpers import save_tiny_repo

CASES = [
    # id, options, loader, max perplexity increase (%) on the tiny random model
    ("gptq-ct", dict(method="gptq", bits=4, group_size=32), "transformers", 60.0),
    ("gptq-fmt", dict(method="gptq", bits=4, group_size=32, format="gptq"), "hubquant", 60.0),
    # transformers 5.24 runs asymmetric compressed-tensors only decompressed (see test_compressed_tensors.py)
    ("awq-ct", dict(method="awq", bits=4, group_size=32), "transformers-decompress", 60.0),
    ("awq-fmt", dict(method="awq", bits=4, group_size=32, format="awq"), "hubquant", 60.0),
    ("smoothquant", dict(method="smoothquant"), "transformers", 10.0),
    ("w8a8", dict(method="w8a8"), "transformers", 10.0),
    ("fp8", dict(method="fp8"), "transformers", 10.0),
    ("fp8-static", dict(method="fp8", activations="static"), "transformers", 10.0),
    # FP8 with SmoothQuant smoothing and GPTQ weights: reads calibration text although the method alone does not
    ("fp8-smooth-gptq", dict(method="fp8", method_options={"alpha": 0.8, "weights": "gptq"}), "transformers", 10.0),
    ("bnb-int8", dict(method="bnb-int8"), "transformers-bnb", 10.0),
    ("bnb-nf4", dict(method="bnb-nf4"), "transformers-bnb", 60.0),
]


@pytest.fixture(scope="module")
def tiny_llama(local_hub, tokenizer, tmp_path_factory):
    repo = f"alice/tiny-llama-methods-{uuid.uuid4().hex[:6]}"
    local_hub.hub.publish_folder(repo, save_tiny_repo(tmp_path_factory.mktemp("m"), "llama", tokenizer))
    return repo


def _load(kind: str, repo: str):
    from huggingface_hub import snapshot_download

    path = snapshot_download(repo)
    if kind == "hubquant":
        import hubquant

        model, _ = hubquant.load(path, device="cpu")
        return model
    if kind == "transformers-bnb":
        pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    if kind == "transformers-decompress":
        return AutoModelForCausalLM.from_pretrained(
            path, quantization_config=CompressedTensorsConfig(run_compressed=False))
    return AutoModelForCausalLM.from_pretrained(path)


@pytest.mark.parametrize("case_id,opts,loader,max_increase", CASES, ids=[c[0] for c in CASES])
def test_method_end_to_end(hub_env, tiny_llama, case_id, opts, loader, max_increase):
    from huggingface_hub import HfApi, ModelCard

    target = f"alice/tiny-{case_id}-{uuid.uuid4().hex[:6]}"
    res = convert(ConvertOptions(repo_id=tiny_llama, push=True, target_repo=target, num_samples=8, seq_len=64,
                                 calib_dataset="fortunes", eval_windows=2, eval_seq_len=64, progress=False, **opts),
                  log=lambda m: None)
    assert res.commit_url and len(HfApi().list_repo_commits(target)) == 2  # the repo's creation + our one commit
    assert res.metrics["ppl_increase_pct"] < max_increase, res.metrics
    card = ModelCard.load(target)
    assert card.data.base_model == tiny_llama and opts["method"] in card.data.tags
    model = _load(loader, target)
    ids = torch.randint(0, 1000, (1, 24))
    with torch.no_grad():
        logits = model(ids).logits.float()
    assert torch.isfinite(logits).all() and logits.abs().sum() > 0


def test_fp8_options_that_read_calibration_text():
    from hubquant.convert import command_line, needs_calibration

    plain = ConvertOptions(repo_id="a/b", method="fp8")
    assert not needs_calibration(plain)
    for o in ({"alpha": 0.8}, {"smooth": "norms"}, {"weights": "gptq"}):
        opts = ConvertOptions(repo_id="a/b", method="fp8", method_options=o)
        assert needs_calibration(opts)
        assert "--num-samples" in command_line(opts) and "--method-option" in command_line(opts)
    assert needs_calibration(ConvertOptions(repo_id="a/b", method="fp8", activations="static"))
    assert needs_calibration(ConvertOptions(repo_id="a/b", method="gptq"))
