"""Streamed GGUF: header first, one decoder layer at a time from the checkpoint; the files are byte-identical to
the in-memory path's (one file and gguf-split shards, plain and importance-matrix, dense and mixture-of-experts
models), while any tensor is written at most one decoder layer holds weights, and a MoE's routing statistics reach
the log, hubquant.json and the card as in memory."""
from __future__ import annotations

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from hubquant.formats.gguf import streamed  # noqa: E402
from hubquant.formats.gguf.method import collect_imatrix, run  # noqa: E402
from hubquant.formats.gguf.writer import write  # noqa: E402
from hubquant.methods import QuantJob  # noqa: E402
from hubquant.schemes import QuantScheme, WeightScheme  # noqa: E402
from tests.helpers import tiny_model  # noqa: E402


def _job(calib=None):
    return QuantJob(scheme=QuantScheme(weights=WeightScheme(bits=4, group_size=-1)), calib=calib, progress=False)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tokenizer):
    folder = tmp_path_factory.mktemp("tiny-qwen3")
    tiny_model("qwen3", hidden=256, intermediate=512, layers=4).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("method,preset,split", [("rtn", "Q4_K_M", "0"), ("imatrix", "Q3_K_M", "0"),
                                                 ("rtn", "Q6_K", "3M")])
def test_streamed_bytes_equal_in_memory_bytes(tmp_path, checkpoint, method, preset, split, monkeypatch):
    from transformers import AutoModelForCausalLM

    from hubquant.streaming import open_checkpoint

    calib = torch.randint(0, 49152, (4, 48), generator=torch.Generator().manual_seed(3)) if method != "rtn" else None
    options = {"gguf_type": preset, "tokenizer_dir": str(checkpoint), "name": "tiny", "split_size": split}
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    mode = {"rtn": "plain", "imatrix": "imatrix"}[method]
    qc_mem = write(model, run(model, _job(calib), mode=mode, preset=preset, log=lambda m: None),
                   out_dir=tmp_path / "mem", method=method, options=options)

    weights, _ = open_checkpoint(checkpoint, trust_remote_code=False, dtype=torch.float32)
    layers = list(weights.model.model.layers)
    held, added = [], []
    add = streamed.GGUFStream.add

    def spy(self, name, data):  # at every write: how many decoder layers hold weights, and the writer's own data
        held.append(sum(any(not p.is_meta for p in layer.parameters()) for layer in layers))
        assert all(ti.tensor is None for t in self.writer.tensors for ti in t.values())
        added.append(name)
        add(self, name, data)

    monkeypatch.setattr(streamed.GGUFStream, "add", spy)
    seen = {}
    qc = streamed.write_streamed(weights, _job(calib), method=method, out_dir=tmp_path / "stream", options=options,
                                 after=lambda i, layer: seen.setdefault(i, layer.mlp.down_proj.weight.clone()),
                                 log=lambda m: None)
    # after each layer is written it computes what the file holds: the in-memory path's dequantized weights
    assert all(torch.equal(seen[i], model.model.layers[i].mlp.down_proj.weight) for i in range(len(layers)))
    assert qc == qc_mem
    if split != "0":
        assert len(qc["files"]) >= 2
    for name in qc["files"]:
        assert (tmp_path / "stream" / name).read_bytes() == (tmp_path / "mem" / name).read_bytes(), name
    assert max(held) == 1 and len(added) == len(set(added))
    # the layers' tensors are written in layer order, each layer's before the next one is read
    blocks = [int(n.split(".")[1]) for n in added if n.startswith("blk.")]
    assert blocks == sorted(blocks)
    assert all(p.is_meta for layer in layers for p in layer.parameters())  # every layer freed at the end


def test_convert_streamed_gguf_equals_in_memory(hub_env, local_hub, tokenizer, tmp_path):
    """`hubquant convert --format gguf --streaming on`: the same file and the same evaluation numbers as the
    conversion of the model in memory (--streaming off)."""
    from hubquant.convert import ConvertOptions, convert
    from tests.helpers import save_tiny_repo

    folder = save_tiny_repo(tmp_path / "src", "llama", tokenizer, dtype=torch.float32, hidden=256, intermediate=512)
    local_hub.hub.publish_folder("alice/tiny-llama-stream", folder)
    results, logs = {}, []
    for mode in ("off", "on"):
        out = tmp_path / mode
        res = convert(ConvertOptions(repo_id="alice/tiny-llama-stream", method="imatrix", format="gguf",
                                     gguf_type="Q4_K_M", output_dir=str(out), num_samples=4, seq_len=64,
                                     eval_windows=2, eval_seq_len=64, streaming=mode, progress=False),
                      log=logs.append)
        results[mode] = (res.metrics, (out / "tiny-llama-stream-Q4_K_M.gguf").read_bytes(),
                         (out / "README.md").read_text())
    (m_off, b_off, _), (m_on, b_on, card_on) = results["off"], results["on"]
    assert b_on == b_off
    assert sum("(imatrix, streamed)" in m for m in logs) == 1  # only the second conversion streamed
    for key in ("base_perplexity", "perplexity", "top1_agreement"):
        assert abs(m_on[key] - m_off[key]) <= 1e-3 * abs(m_off[key]), key
    assert m_on["perplexity"] != m_on["base_perplexity"]
    assert "| base (float) |" in card_on and "tiny-llama-stream-Q4_K_M.gguf" in card_on


def _moe_checkpoint(folder, arch: str, tokenizer):
    """A tiny 3-layer MoE checkpoint (float32) with expert rows of 256, so the K-quants apply to the experts."""
    from transformers import AutoModelForCausalLM

    from tests.helpers import tiny_config

    cfg = tiny_config(arch, hidden=256, intermediate=256, layers=3)
    if arch != "mixtral":
        cfg.moe_intermediate_size = 256
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / "README.md").write_text(f"---\nlicense: apache-2.0\n---\n# tiny {arch}\n")
    return folder


MOE_CASES = [("qwen3_moe", "imatrix", "Q5_K_M"), ("qwen3_moe", "rtn", "Q4_K_M"), ("mixtral", "imatrix", "Q4_K_M"),
             ("deepseek_v3", "imatrix", "Q4_K_M"), ("deepseek_v3", "rtn", "Q3_K_M")]


@pytest.mark.parametrize("arch,method,preset", MOE_CASES, ids=[f"{a}-{m}" for a, m, _ in MOE_CASES])
def test_streamed_moe_bytes_equal_in_memory_bytes(tmp_path, tokenizer, arch, method, preset, monkeypatch):
    """Mixtures of experts: stacked experts, shared experts and F32 routers written one decoder layer at a time
    are the in-memory file's bytes, with the same routed-token counts, the same experts under the low-token rule
    (quantized without importance) and the imatrix entry count the routing decides."""
    from transformers import AutoModelForCausalLM

    from hubquant import moe
    from hubquant.streaming import open_checkpoint

    folder = _moe_checkpoint(tmp_path / "base", arch, tokenizer)
    calib = torch.randint(0, 49152, (4, 48), generator=torch.Generator().manual_seed(3)) if method != "rtn" else None
    options = {"gguf_type": preset, "tokenizer_dir": str(folder), "name": "tiny", "split_size": "0"}
    policies, qcs, threshold = {}, {}, 16
    if calib is not None:  # a threshold with experts on both sides: the median routed count
        probe = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        moe.unfuse_experts(probe)
        with moe.policy_in_force(moe.RoutingPolicy()) as counted:
            collect_imatrix(probe, calib, progress=False)
        threshold = int(np.median([c for cs in counted.counts.values() for c in cs]))
    mem = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with moe.policy_in_force(moe.RoutingPolicy(min_expert_tokens=threshold)) as policies["mem"]:
        qcs["mem"] = write(mem, run(mem, _job(calib), mode={"rtn": "plain"}.get(method, method), preset=preset,
                                    log=lambda m: None), out_dir=tmp_path / "mem", method=method, options=options)

    weights, why = open_checkpoint(folder, trust_remote_code=False, dtype=torch.float32)
    assert why == ""
    layers = list(weights.model.model.layers)
    held = []
    add = streamed.GGUFStream.add

    def spy(self, name, data):
        held.append(sum(any(not p.is_meta for p in layer.parameters()) for layer in layers))
        add(self, name, data)

    monkeypatch.setattr(streamed.GGUFStream, "add", spy)
    logs = []
    with moe.policy_in_force(moe.RoutingPolicy(min_expert_tokens=threshold)) as policies["stream"]:
        qcs["stream"] = streamed.write_streamed(weights, _job(calib), method=method, out_dir=tmp_path / "stream",
                                                options=options, log=logs.append)
    name = "tiny-" + preset + ".gguf"
    assert (tmp_path / "stream" / name).read_bytes() == (tmp_path / "mem" / name).read_bytes()
    assert qcs["stream"] == qcs["mem"]
    assert max(held) == 1 and all(p.is_meta for layer in layers for p in layer.parameters())
    ex = qcs["stream"]["experts"]
    assert ex["projections"] == len(moe.expert_linear_names(mem)) > 0
    reader = gguf.GGUFReader(tmp_path / "stream" / name)
    count = reader.get_field("quantize.imatrix.entries_count")
    if method == "rtn":
        assert count is None and ex["without_imatrix"] == ex["projections"] and not policies["stream"].counts
        return
    assert policies["stream"].counts == policies["mem"].counts and policies["stream"].counts
    assert policies["stream"].fallback_linears == policies["mem"].fallback_linears
    # the low-token rule applied (some experts under the threshold, not all), and the header counts the rest
    assert 0 < ex["without_imatrix"] == len(policies["stream"].fallback_linears) < ex["projections"]
    n_linears = sum(1 for n in moe.expert_linear_names(mem)) + sum(
        1 for n, m in mem.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n
        and not n.endswith(("gate", "shared_expert_gate")) and n not in moe.expert_linear_names(mem))
    assert int(count.parts[-1][0]) == n_linears - ex["without_imatrix"]
    assert sum(f"expert projections saw under {threshold} routed calibration tokens" in m for m in logs) == 1


def test_convert_streamed_moe_gguf_routing_equals_in_memory(hub_env, local_hub, tokenizer, tmp_path):
    """`hubquant convert --method imatrix --format gguf --streaming on` of a Qwen3-MoE streams (no fallback to
    memory) and gives the in-memory conversion's file, routing log lines, hubquant.json routing record and card."""
    import json

    from hubquant.convert import ConvertOptions, convert

    folder = _moe_checkpoint(tmp_path / "src", "qwen3_moe", tokenizer)
    local_hub.hub.publish_folder("alice/tiny-moe-stream", folder)
    logs, files, cards, prov = {}, {}, {}, {}
    for mode in ("off", "on"):
        out, logs[mode] = tmp_path / mode, []
        convert(ConvertOptions(repo_id="alice/tiny-moe-stream", method="imatrix", format="gguf", gguf_type="Q4_K_M",
                               output_dir=str(out), num_samples=4, seq_len=64, eval_windows=2, eval_seq_len=64,
                               streaming=mode, method_options={"min_expert_tokens": "40"}, progress=False),
                log=logs[mode].append)
        files[mode] = (out / "tiny-moe-stream-Q4_K_M.gguf").read_bytes()
        cards[mode] = (out / "README.md").read_text()
        prov[mode] = json.loads((out / "hubquant.json").read_text())["moe"]
    assert any(m.startswith("streaming 3 decoder layers") for m in logs["on"])
    assert files["on"] == files["off"]
    routing = {mode: [m for m in logs[mode] if "routed calibration tokens" in m] for mode in logs}
    assert routing["on"] == routing["off"] and len(routing["on"]) == 2  # the statistics and the low-token rule
    assert prov["on"] == prov["off"] and prov["on"]["routing"]["experts"] == 8 * 3
    line = {mode: next(x for x in cards[mode].splitlines() if "Calibration tokens routed to each expert" in x)
            for mode in cards}
    assert line["on"] == line["off"]
    experts = {mode: next(x for x in cards[mode].splitlines() if x.startswith("Experts: stacked")) for mode in cards}
    assert experts["on"] == experts["off"] and "saw too few routed tokens" in experts["on"]
