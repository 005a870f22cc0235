"""`hubquant.load` and `hubquant generate` on CPU for every kind hubquant's writers produce (each method's default
format, `--format gptq/awq`, bitsandbytes), and a clear error naming the extra where a kind needs one."""
from __future__ import annotations

import re
import subprocess
import sys

import pytest
import torch

from hubquant.cli import run
from hubquant.formats import get_format
from hubquant.methods import METHODS, QuantJob
from hubquant.quant import sqnr_db
from hubquant.runtime import load
from tests.helpers import tiny_model

CASES = {  # id -> (method, format, expected format in hubquant_format)
    "rtn": ("rtn", "compressed-tensors"), "awq": ("awq", "compressed-tensors"), "w8a8": ("w8a8", "compressed-tensors"),
    "fp8": ("fp8", "compressed-tensors"), "gptq-format": ("rtn", "gptq"), "awq-format": ("awq", "awq"),
    "bnb-int8": ("bnb-int8", "bitsandbytes"), "bnb-nf4": ("bnb-nf4", "bitsandbytes"),
}
QUANT_METHOD = {"compressed-tensors": "compressed-tensors", "gptq": "gptq", "awq": "awq",
                "bitsandbytes": "bitsandbytes"}


def _variant(case, tokenizer, path):
    method, fmt = CASES[case]
    if fmt == "bitsandbytes":
        pytest.importorskip("bitsandbytes")
    spec = METHODS[method]
    model = tiny_model("llama")  # SmolLM2's vocabulary, so the real tokenizer fits
    calib = torch.randint(0, 1000, (4, 32), generator=torch.Generator().manual_seed(1))
    run_method = METHODS["rtn"].load() if method == "awq" else spec.load()  # AWQ's layout, RTN's numbers
    q = run_method(model, QuantJob(scheme=spec.default_scheme, calib=calib, progress=False))
    get_format(fmt)(model, q, scheme=spec.default_scheme, out_dir=path, method=method, options={})
    tokenizer.save_pretrained(path)
    return model, q


@pytest.mark.parametrize("case", list(CASES))
def test_load_and_generate_on_cpu(case, tokenizer, tmp_path, capsys):
    simulated, q = _variant(case, tokenizer, tmp_path)
    model, tok = load(tmp_path, device="cpu", dtype=torch.float32, progress=False)
    assert tok is not None and model.hubquant_format["format"] == QUANT_METHOD[CASES[case][1]]
    assert model.hubquant_format["quantized_linears"] == len(q) == 14
    ids = torch.randint(0, 49152, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        db = sqnr_db(simulated(ids).logits.float(), model(ids).logits.float())
    assert db > (30 if case.startswith("bnb") else 40), db
    assert run(["generate", str(tmp_path), "--prompt", "The capital of France is", "--max-new-tokens", "4",
                "--device", "cpu", "--dtype", "float32"]) == 0
    out = capsys.readouterr().out
    assert re.search(rf"\[{QUANT_METHOD[CASES[case][1]]}, 14 quantized Linears, cpu\] \d+ tokens", out), out


def test_bitsandbytes_without_the_extra_names_it(tokenizer, tmp_path):
    _variant("bnb-int8", tokenizer, tmp_path)
    code = ("import sys; sys.modules['bitsandbytes'] = None; from hubquant.cli import run; "
            f"sys.exit(run(['generate', {str(tmp_path)!r}, '--prompt', 'x', '--device', 'cpu']))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 5, proc.stderr[-2000:]
    assert "bitsandbytes" in proc.stderr and "pip install 'hubquant[bnb]'" in proc.stderr
