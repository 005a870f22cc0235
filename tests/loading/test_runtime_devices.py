"""`hubquant.load` and `hubquant generate` on a CUDA GPU (skipped without one) for every kind hubquant's writers
produce by default and `--format gptq/awq` (bitsandbytes where it is installed), against hubquant's simulated model
on CPU. tests/runtime/test_every_writer.py does the same on CPU. The tokenizer is built here (a word-level
`tokenizers` model), so nothing is read from the Hub or a cache."""
from __future__ import annotations

import re

import pytest
import torch

from hubquant.formats import get_format
from hubquant.methods import METHODS, QuantJob
from hubquant.presets import get_preset
from hubquant.quant import sqnr_db
from tests.helpers import tiny_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")]
VOCAB = 512
CASES = {  # id -> (method, format); quant_method is the format's name, bitsandbytes' for bnb
    "rtn": ("rtn", "compressed-tensors"), "gptq": ("gptq", "compressed-tensors"), "awq": ("awq", "compressed-tensors"),
    "w8a8": ("w8a8", "compressed-tensors"), "smoothquant": ("smoothquant", "compressed-tensors"),
    "fp8": ("fp8", "compressed-tensors"), "gptq-format": ("rtn", "gptq"), "awq-format": ("awq", "awq"),
    "bnb-int8": ("bnb-int8", "bitsandbytes"), "bnb-nf4": ("bnb-nf4", "bitsandbytes"),
    "nvfp4a16": ("rtn", "compressed-tensors"), "mxfp4a16": ("rtn", "compressed-tensors"),  # the FP4 kernels
}
PRESETS = {"nvfp4a16": "NVFP4A16", "mxfp4a16": "MXFP4A16"}  # case -> --scheme preset (else the method's default)
MIN_SQNR_DB = 30  # float16 activations on the GPU's kernels against float32 on CPU (bitsandbytes rounds its own way)
# fp8 activations have a 3-bit mantissa: float16 activations against the float32 simulation move codes across
# rounding boundaries. Measured 29.0 dB on the CPU path with float16 (so not the kernel) and 29.0 dB on an H200.
MIN_SQNR_DB_BY_CASE = {"fp8": 26}


def tiny_tokenizer(path):
    """A word-level tokenizer over VOCAB made-up words, saved as tokenizer.json (what `hubquant generate` reads)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>", "The", "capital", "of", "France", "is"] + [f"w{i}" for i in range(VOCAB - 8)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(path)


def _variant(case, path):
    method, fmt = CASES[case]
    if fmt == "bitsandbytes":
        pytest.importorskip("bitsandbytes")
    spec = METHODS[method]
    scheme = get_preset(PRESETS[case]) if case in PRESETS else spec.default_scheme
    model = tiny_model("llama", vocab=VOCAB)
    calib = torch.randint(0, VOCAB, (4, 32), generator=torch.Generator().manual_seed(1))
    # the calibrated methods' layouts with RTN's numbers (their own math is tested elsewhere)
    run_method = METHODS["rtn"].load() if method in ("gptq", "awq") else spec.load()
    q = run_method(model, QuantJob(scheme=scheme, calib=calib, progress=False))
    get_format(fmt)(model, q, scheme=scheme, out_dir=path, method=method, options={})
    tiny_tokenizer(path)
    return model, q


@pytest.mark.parametrize("case", list(CASES))
def test_load_and_generate_on_cuda(case, tmp_path, capsys):
    from hubquant.cli import run
    from hubquant.runtime import load

    simulated, q = _variant(case, tmp_path)
    model, tok = load(tmp_path, device="cuda", dtype=torch.float16, progress=False)
    quant_method = "bitsandbytes" if CASES[case][1] == "bitsandbytes" else CASES[case][1]
    assert tok is not None and model.hubquant_format["format"] == quant_method
    assert model.hubquant_format["quantized_linears"] == len(q) == 14
    assert {p.device.type for p in model.parameters()} == {"cuda"}
    ids = torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        db = sqnr_db(simulated(ids).logits.float(), model(ids.cuda()).logits.float().cpu())
    assert db > MIN_SQNR_DB_BY_CASE.get(case, MIN_SQNR_DB), db
    assert run(["generate", str(tmp_path), "--prompt", "The capital of France is", "--max-new-tokens", "4",
                "--device", "cuda"]) == 0
    out = capsys.readouterr().out
    assert re.search(rf"\[{quant_method}, 14 quantized Linears, cuda(:\d+)?\] \d+ tokens", out), out
