"""Host memory of materializing one streamed mixture-of-experts layer: each expert's checkpoint tensors are read
straight into its Linears, so the layer's experts are in memory once (transformers' converters, which stack the
per-expert tensors and concatenate gate and up, hold 4/3 of that at their peak)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HIDDEN, INTER, EXPERTS = 1024, 512, 64  # one layer's experts: 64 x 3 x 512 x 1024 bf16 = 201 MB

# Runs in a fresh interpreter: the skeleton is built, the high-water mark reset (clear_refs 5), one decoder layer
# read; prints the growth of the peak resident size over the resident size before the read.
CHILD = r"""
import json, re, sys
import torch
from hubquant import moe
from hubquant.streaming import open_checkpoint
from hubquant.streaming.checkpoint import Weights

def status(field):
    return int(re.search(field + r":\s+(\d+)", open("/proc/self/status").read())[1]) * 1024

folder, fused = sys.argv[1], sys.argv[2] == "fused"
if fused:  # transformers' converters build the fused tensors, the Linears are views of them
    Weights.expert_sources = lambda self, name, n: None
weights, why = open_checkpoint(folder, trust_remote_code=False, dtype=torch.bfloat16)
assert why == "", why
moe.unfuse_experts(weights.model)
layer = weights.model.model.layers[0]
before = status("VmRSS")
open("/proc/self/clear_refs", "w").write("5")
weights.load(layer, "model.layers.0")
peak = status("VmHWM")
held = sum(p.numel() * p.element_size() for p in layer.parameters())
print(json.dumps({"peak_growth": peak - before, "held": held, "after": status("VmRSS") - before}))
"""


def _write_checkpoint(folder: Path, *, hidden: int = HIDDEN, inter: int = INTER, experts: int = EXPERTS,
                      layers: int = 1, vocab: int = 1024) -> int:
    """A Qwen3-MoE checkpoint with per-expert tensors (the Hub's layout), random bf16 weights; returns the bytes of
    the experts."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    from hubquant import moe

    config = Qwen3MoeConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2048, moe_intermediate_size=inter,
                            num_experts=experts, num_experts_per_tok=4, num_hidden_layers=layers,
                            num_attention_heads=8, num_key_value_heads=2, head_dim=64, tie_word_embeddings=False,
                            architectures=["Qwen3MoeForCausalLM"])
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    moe.unfuse_experts(model)  # state_dict names: model.layers.0.mlp.experts.{i}.gate_proj.weight, ...
    gen = torch.Generator().manual_seed(0)
    state = {k: (torch.randn(v.shape, generator=gen) * 0.02).to(torch.bfloat16)
             for k, v in model.state_dict().items() if "rotary" not in k}
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(folder)
    return sum(t.numel() * t.element_size() for k, t in state.items() if ".experts." in k)


def _measure(folder: Path, mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, str(folder), mode], capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc (VmHWM reset)")
def test_streamed_moe_layer_holds_its_experts_once(tmp_path):
    expert_bytes = _write_checkpoint(tmp_path)
    assert expert_bytes == EXPERTS * 3 * INTER * HIDDEN * 2
    direct, fused = _measure(tmp_path, "direct"), _measure(tmp_path, "fused")
    ratio = {k: v["peak_growth"] / expert_bytes for k, v in (("direct", direct), ("fused", fused))}
    print(f"peak growth / expert bytes ({expert_bytes / 1e6:.0f} MB): {ratio}")
    # the layer holds its experts (plus attention, norms, router: about 4%), read once
    assert expert_bytes <= direct["held"] <= 1.06 * expert_bytes
    assert direct["peak_growth"] <= 1.15 * expert_bytes, ratio
    # the measurement tells the two apart: transformers' stack-and-concatenate holds the stacked gate and up
    # halves and their concatenation at once (4/3 of the experts; measured 1.34)
    assert fused["peak_growth"] >= 1.25 * expert_bytes, ratio


# Runs in a fresh interpreter: bf16 Linears over 600 token counts (routed experts see a new count in every layer),
# with the kernel caches as a streamed conversion sets them (argv "capped") or torch's defaults; prints the growth
# of the resident size and a digest of the outputs.
KERNELS_CHILD = r"""
import ctypes, hashlib, re, sys
if sys.argv[1] == "capped":
    from hubquant.streaming.switch import cap_kernel_caches
    cap_kernel_caches()
import torch

def rss():
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    return int(re.search(r"VmRSS:\s+(\d+)", open("/proc/self/status").read())[1]) * 1024

gen = torch.Generator().manual_seed(0)
w = torch.randn(512, 1024, generator=gen).to(torch.bfloat16)
x = torch.randn(1300, 1024, generator=gen).to(torch.bfloat16)
digest = hashlib.sha256()
torch.nn.functional.linear(x[:8], w)
before = rss()
for m in range(700, 1300):
    digest.update(torch.nn.functional.linear(x[:m], w).view(torch.int16).numpy().tobytes())
print(rss() - before, digest.hexdigest())
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_capped_kernel_caches_stay_small_and_compute_the_same():
    env = {k: v for k, v in os.environ.items() if k not in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")}
    got = {}
    for mode in ("capped", "default"):
        out = subprocess.run([sys.executable, "-c", KERNELS_CHILD, mode], capture_output=True, text=True,
                             env={**env, "OMP_NUM_THREADS": "1"}, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        growth, digest = out.stdout.split()
        got[mode] = (int(growth), digest)
    assert got["capped"][1] == got["default"][1]  # the same kernels: the same bytes
    if got["default"][0] < 100e6:
        pytest.skip(f"this torch build's default caches grew by {got['default'][0] / 1e6:.0f} MB only")
    assert got["capped"][0] < 60e6, got


def test_streamed_rtn_without_evaluation_reads_one_expert_projection_at_a_time(tmp_path, tokenizer, monkeypatch):
    """Evaluation skipped: no activations go through the layers, so streamed RTN reads each expert projection from
    its own checkpoint tensor just before quantizing it and drops it once written; the files are the in-memory
    path's bytes, a projection left float by --ignore included."""
    from hubquant.convert import ConvertOptions, convert
    from hubquant.streaming.checkpoint import Weights

    folder = tmp_path / "base"
    folder.mkdir()
    _write_checkpoint(folder, hidden=256, inter=128, experts=64, layers=2, vocab=tokenizer.vocab_size + 64)
    tokenizer.save_pretrained(folder)
    reads, live = [], []
    original = Weights.load_expert_linear

    def counting(self, mods, ename, index, proj):
        reads.append(f"{ename}.{index}.{proj}")
        live.append(sum(not p.is_meta for p in mods.parameters()))  # expert weights in memory before this read
        return original(self, mods, ename, index, proj)

    monkeypatch.setattr(Weights, "load_expert_linear", counting)
    for mode in ("off", "on"):
        convert(ConvertOptions(repo_id=str(folder), method="rtn", group_size=32, streaming=mode, skip_eval=True,
                               ignore=("experts.3.down_proj",), progress=False, output_dir=str(tmp_path / mode)),
                log=lambda m: None)
    assert len(reads) == len(set(reads)) == 2 * 64 * 3  # every expert projection of both layers, once
    # each is dropped once written, but for the ones sampled for the layer's check (a fifth here)
    assert max(live) < 64 * 3 // 4, max(live)
    assert (tmp_path / "off" / "model.safetensors").read_bytes() == (tmp_path / "on" / "model.safetensors").read_bytes()
