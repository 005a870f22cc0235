"""`hubquant generate` on a tiny W4A16 variant with SmolLM2's tokenizer."""
from __future__ import annotations

import re

import torch

from hubquant.cli import run
from hubquant.runtime import load, synth
from tests.helpers import tiny_model


def test_generate_prints_text_and_speed(tmp_path, tokenizer, capsys):
    base = tiny_model("llama")  # vocab 49152, SmolLM2's
    synth.write_model_variant(base.to(torch.bfloat16), tmp_path, "ct-w4a16", group_size=64, tokenizer=tokenizer)
    rc = run(["generate", str(tmp_path), "--prompt", "The capital of France is", "--max-new-tokens", "6",
              "--device", "cpu", "--dtype", "float32"])
    out = capsys.readouterr().out
    assert rc == 0
    m = re.search(r"\[compressed-tensors, 14 quantized Linears, cpu\] (\d+) tokens in [\d.]+ s: ([\d.]+) tokens/s", out)
    assert m and int(m.group(1)) == 5 and float(m.group(2)) > 0  # 6 tokens: 1 from prefill + 5 decode steps
    model, tok = load(tmp_path, device="cpu", dtype=torch.float32, progress=False)
    ids = tok("The capital of France is", return_tensors="pt")["input_ids"]
    want = model.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False)[0, ids.shape[1]:]
    assert out.splitlines()[0] == tok.decode(want, skip_special_tokens=True).splitlines()[0]
    assert run(["generate", str(tmp_path), "--prompt", "The capital of France is", "--max-new-tokens", "6",
                "--device", "cpu", "--dtype", "float32", "--fuse"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == out.splitlines()[0]  # the fused decoder: same text


def test_generate_usage_errors(tmp_path, capsys):
    assert run(["generate", str(tmp_path / "nope"), "--prompt", "x", "--max-new-tokens", "0"]) == 2
    assert "--max-new-tokens" in capsys.readouterr().err
    assert run(["generate", str(tmp_path / "nope"), "--prompt", "x", "--device", "cpu"]) == 4
