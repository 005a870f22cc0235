"""Streamed conversion with `--device cuda`: each decoder layer is read on the host, quantized on the GPU and
written, and the variant is what the CPU-streamed conversion writes. RTN is the same bytes; GPTQ's Hessian
arithmetic on the GPU rounds differently, so its variant is compared by the logits of the loaded models.

Reads its text from a local file (docs/), so it runs on a bare GPU machine without the offline corpora.
HUBQUANT_TEST_DEVICE=cpu rehearses it without a GPU (both conversions then run on the CPU).
"""
from __future__ import annotations

import filecmp
import os
from pathlib import Path

import pytest
import torch

from hubquant.calibration import NGRAM_WORDS, _ngram_hashes
from hubquant.convert import ConvertOptions, convert
from tests.helpers import save_tiny_repo

DEVICE = os.environ.get("HUBQUANT_TEST_DEVICE", "cuda")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(),
                                                  reason="no CUDA GPU")]
ROOT = Path(__file__).resolve().parents[1]
CASES = [("llama", "rtn"), ("llama", "gptq"), ("qwen3_moe", "rtn"), ("qwen3_moe", "gptq")]


@pytest.fixture(scope="module")
def texts(tmp_path_factory) -> tuple[str, str]:
    """A calibration and an evaluation text file: paragraphs of this repository's docs."""
    folder = tmp_path_factory.mktemp("texts")
    calib, ev = folder / "calib.txt", folder / "eval.txt"
    calib_text = (ROOT / "docs" / "moe.md").read_text()
    calib.write_text(calib_text)
    # docs quote each other (e.g. the hardware line of a benchmark): keep the paragraphs that share no word run
    # with the calibration file, which convert's overlap check would refuse
    seen = _ngram_hashes(calib_text, NGRAM_WORDS)
    paragraphs = (ROOT / "docs" / "memory.md").read_text().split("\n\n")
    ev.write_text("\n\n".join(p for p in paragraphs if _ngram_hashes(p, NGRAM_WORDS).isdisjoint(seen)))
    return str(calib), str(ev)


def _logits(folder: Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits.float()


def _compare(a: Path, b: Path) -> tuple[int, int, float]:
    """(tensors with identical bytes, tensors, fraction of identical 4-bit weight codes) of two checkpoints with the
    same keys."""
    from hubquant.formats.shards import Checkpoint

    ca, cb = Checkpoint(a), Checkpoint(b)
    assert set(ca.keys()) == set(cb.keys())
    same, codes, differ = 0, 0, 0
    for k in ca.keys():
        x, y = ca.read(k).view(-1).view(torch.uint8), cb.read(k).view(-1).view(torch.uint8)
        same += torch.equal(x, y)
        if k.endswith(".weight_packed"):  # two 4-bit codes a byte
            xor = x ^ y
            codes += 2 * x.numel()
            differ += int(((xor & 0xF) != 0).sum() + ((xor >> 4) != 0).sum())
    return same, len(ca.keys()), 1 - differ / max(codes, 1)


def _sqnr(ref: torch.Tensor, x: torch.Tensor) -> float:
    return float(10 * torch.log10(ref.pow(2).sum() / (ref - x).pow(2).sum().clamp_min(1e-30)))


@pytest.mark.parametrize("arch,method", CASES, ids=[f"{a}-{m}" for a, m in CASES])
def test_streamed_on_cuda_matches_streamed_on_cpu(tokenizer, tmp_path, texts, arch, method):
    base = save_tiny_repo(tmp_path / "base", arch, tokenizer, layers=3, dtype=torch.float32)
    logs, out = {}, {}
    for key, device in (("ref", "cpu"), ("dev", DEVICE)):
        logs[key], out[key] = [], tmp_path / key
        convert(ConvertOptions(repo_id=str(base), method=method, streaming="on", device=device, group_size=32,
                               calib_dataset=texts[0], eval_dataset=texts[1], num_samples=4, seq_len=64,
                               eval_windows=2, eval_seq_len=64, progress=False, output_dir=str(out[key])),
                log=logs[key].append)
        assert any(m.startswith("streaming 3 decoder layers") for m in logs[key]), logs[key]
    shards = sorted(p.name for p in out["ref"].glob("*.safetensors"))
    assert shards == sorted(p.name for p in out["dev"].glob("*.safetensors")) and shards
    assert filecmp.cmp(out["ref"] / "config.json", out["dev"] / "config.json", shallow=False)
    same, tensors, codes = _compare(out["ref"], out["dev"])
    ids = torch.randint(0, 49152, (2, 64), generator=torch.Generator().manual_seed(0))
    float_logits = _logits(base, ids)
    ref, dev = _logits(out["ref"], ids), _logits(out["dev"], ids)  # plain transformers loads both variants
    to_float = {"ref": _sqnr(float_logits, ref), "dev": _sqnr(float_logits, dev)}
    between = _sqnr(ref, dev)
    top1 = float((ref.argmax(-1) == dev.argmax(-1)).float().mean())
    print(f"{arch}-{method}: SQNR vs float cpu {to_float['ref']:.1f} dB, {DEVICE} {to_float['dev']:.1f} dB; "
          f"{DEVICE} vs cpu {between:.1f} dB, top-1 {top1:.4f}; identical tensors {same} of {tensors}, "
          f"identical weight codes {codes:.4f}")
    if method == "rtn":  # elementwise rounding (scales divided exactly on every device): the same bytes
        assert same == tensors and all(filecmp.cmp(out["ref"] / n, out["dev"] / n, shallow=False) for n in shards)
        return
    # GPTQ: the Hessians are summed in another order on the GPU, so some roundings differ, and a tiny random
    # model's logits move with them; the quality against the float model is the same
    assert to_float["ref"] > 10 and abs(to_float["dev"] - to_float["ref"]) <= 1.5, to_float
    assert between >= to_float["ref"] and codes >= 0.5, (between, codes)
