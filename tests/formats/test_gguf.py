"""GGUF files of tiny models of real architectures: read back with the `gguf` package (names, types, metadata,
dequantized tensors), loaded by transformers (`gguf_file=`) with the logits of hubquant's own dequantized
model, Llama's q/k permutation, gguf-split shards, and `hubquant convert --format gguf` end to end."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from hubquant.errors import UsageError  # noqa: E402
from hubquant.formats.gguf.arch import permute_rows  # noqa: E402
from hubquant.formats.gguf.method import run  # noqa: E402
from hubquant.formats.gguf.writer import write  # noqa: E402
from hubquant.methods import QuantJob  # noqa: E402
from hubquant.schemes import QuantScheme, WeightScheme  # noqa: E402
from tests.helpers import save_tiny_repo, tiny_model  # noqa: E402

SIZE = dict(hidden=256, intermediate=512)  # rows of 256: K-quants apply (128 would fall back everywhere)
SQNR_MIN = {"Q8_0": 40.0, "Q6_K": 30.0, "Q5_K": 25.0, "Q5_0": 23.0, "Q5_1": 24.0, "Q4_K": 19.0, "Q4_0": 18.0,
            "Q4_1": 18.0, "Q3_K": 13.0, "Q2_K": 7.0}


def _job(calib=None, **options):
    return QuantJob(scheme=QuantScheme(weights=WeightScheme(bits=4, group_size=-1)), calib=calib,
                    options=options or None, progress=False)


def _gemma2():
    from transformers import AutoModelForCausalLM, Gemma2Config

    torch.manual_seed(0)
    cfg = Gemma2Config(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=64, vocab_size=49152, max_position_embeddings=512,
                       sliding_window=128)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()


def _source(tmp_path, arch, tokenizer):
    """A float32 tiny model saved with SmolLM2's tokenizer, reloaded from disk (as convert loads it)."""
    from transformers import AutoModelForCausalLM

    model = _gemma2() if arch == "gemma2" else tiny_model(arch, **SIZE)
    if arch == "gemma":  # llama.cpp's Gemma has no output tensor: the head must equal the embeddings
        model.lm_head.weight.data.copy_(model.model.embed_tokens.weight.data)
    src = tmp_path / "src"
    model.save_pretrained(src)
    tokenizer.save_pretrained(src)
    return src, AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()


def _sqnr(ref, got) -> float:
    return float(10 * np.log10((ref ** 2).sum() / ((ref - got) ** 2).sum()))


CASES = [("llama", "Q4_K_M"), ("qwen2", "Q6_K"), ("mistral", "Q4_0"), ("gemma", "Q8_0"), ("gemma2", "Q3_K_M"),
         ("phi3", "Q5_K_M"), ("llama", "Q2_K")]


@pytest.mark.parametrize("arch,preset", CASES)
def test_architecture_writes_reads_and_loads(tmp_path, tokenizer, arch, preset):
    src, model = _source(tmp_path, arch, tokenizer)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    quantized = run(model, _job(), mode="plain", preset=preset, log=lambda m: None)
    qc = write(model, quantized, out_dir=tmp_path / "out", options={"gguf_type": preset, "tokenizer_dir": str(src)})
    assert qc["files"] == [f"src-{preset}.gguf"]
    reader = gguf.GGUFReader(tmp_path / "out" / qc["files"][0])

    def field(key):
        f = reader.fields[key]
        return f.contents()

    gguf_arch = {"mistral": "llama"}.get(arch, arch)
    assert field("general.architecture") == gguf_arch
    cfg = model.config
    assert field(f"{gguf_arch}.block_count") == cfg.num_hidden_layers
    assert field(f"{gguf_arch}.attention.head_count_kv") == cfg.num_key_value_heads
    assert field(f"{gguf_arch}.context_length") == cfg.max_position_embeddings
    assert field("tokenizer.ggml.model") == "gpt2" and len(field("tokenizer.ggml.tokens")) == cfg.vocab_size
    assert field("tokenizer.ggml.merges")[0].count(" ") == 1
    assert field("tokenizer.ggml.eos_token_id") == tokenizer.eos_token_id
    assert "im_start" in field("tokenizer.chat_template")
    assert field("general.file_type") == int(getattr(gguf.LlamaFileType, f"MOSTLY_{preset}"))

    # every quantized tensor: the gguf package's dequantization is our in-memory weight; SQNR per type
    names = {e: q for e, q in quantized.items()}
    tensors = {t.name: t for t in reader.tensors}
    assert "output.weight" not in tensors if arch.startswith("gemma") else "output.weight" in tensors
    params = dict(model.named_parameters())
    checked = 0
    from hubquant.formats.gguf.arch import tensor_entries

    for e in tensor_entries(model):
        t = tensors[e.gguf]
        if not e.quantizable:
            assert t.tensor_type == gguf.GGMLQuantizationType.F32
            continue
        qtype = names[e.module].extra["gguf_type"]
        assert t.tensor_type.name == qtype
        deq = gguf.quants.dequantize(t.data, t.tensor_type).reshape(e.shape)
        ours = params[e.param].detach().numpy()
        if e.permute_heads:
            ours = permute_rows(ours, e.permute_heads)
        assert np.array_equal(deq, ours), e.gguf
        assert _sqnr(original[e.param].numpy(), params[e.param].detach().numpy()) > SQNR_MIN[qtype], e.gguf
        checked += 1
    assert checked == len(quantized)

    if arch == "gemma":  # transformers' GGUF loader has no Gemma (1) architecture; llama.cpp reads it
        norm = tensors["output_norm.weight"]
        assert np.allclose(norm.data, model.model.norm.weight.detach().numpy() + 1)
        return
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", gguf_file=qc["files"][0], dtype=torch.float32)
    ids = torch.randint(0, cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, got = model(ids).logits, loaded.eval()(ids).logits
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


def test_llama_qk_rows_are_permuted(tmp_path, tokenizer):
    src, model = _source(tmp_path, "llama", tokenizer)
    quantized = run(model, _job(), mode="plain", preset="Q8_0", log=lambda m: None)
    qc = write(model, quantized, out_dir=tmp_path / "out", options={"gguf_type": "Q8_0", "tokenizer_dir": str(src)})
    t = {t.name: t for t in gguf.GGUFReader(tmp_path / "out" / qc["files"][0]).tensors}
    wq = model.model.layers[0].self_attn.q_proj.weight.detach().numpy()
    stored = gguf.quants.dequantize(t["blk.0.attn_q.weight"].data, gguf.GGMLQuantizationType.Q8_0)
    head_dim = wq.shape[0] // 4
    # llama.cpp's head layout: row 2i of a head holds rotary pair (i, i + head_dim/2) of transformers' layout
    assert np.array_equal(stored[1], wq[head_dim // 2])
    assert not np.array_equal(stored, wq)
    wk = model.model.layers[0].self_attn.k_proj.weight.detach().numpy()
    stored_k = gguf.quants.dequantize(t["blk.0.attn_k.weight"].data, gguf.GGMLQuantizationType.Q8_0)
    assert np.array_equal(stored_k, permute_rows(wk, 2))  # k uses the KV head count


def test_split_files_as_gguf_split_names_them(tmp_path, tokenizer):
    src, model = _source(tmp_path, "qwen2", tokenizer)
    quantized = run(model, _job(), mode="plain", preset="Q4_0", log=lambda m: None)
    qc = write(model, quantized, out_dir=tmp_path / "out",
               options={"gguf_type": "Q4_0", "tokenizer_dir": str(src), "split_size": "4M"})
    n = len(qc["files"])
    assert n >= 2 and qc["files"] == [f"src-Q4_0-{i:05d}-of-{n:05d}.gguf" for i in range(1, n + 1)]
    total, names = 0, set()
    for i, name in enumerate(qc["files"]):
        r = gguf.GGUFReader(tmp_path / "out" / name)
        assert r.fields["split.no"].contents() == i and r.fields["split.count"].contents() == n
        total = r.fields["split.tensors.count"].contents()
        names |= {t.name for t in r.tensors}
        assert ("tokenizer.ggml.tokens" in r.fields) == (i == 0)
        # under the limit, unless one tensor alone is larger (tensors are never cut)
        assert len(r.tensors) == 1 or sum(int(t.n_bytes) for t in r.tensors) <= 4_000_000
    assert total == len(names) == len(model.state_dict())


def test_imatrix_and_gptq_modes_need_calibration_and_lower_error(tokenizer):
    base = tiny_model("llama", **SIZE)
    calib = torch.randint(0, 49152, (4, 64), generator=torch.Generator().manual_seed(1))
    with pytest.raises(Exception, match="calibration"):
        run(tiny_model("llama", **SIZE), _job(), mode="imatrix", preset="Q4_K_M", log=lambda m: None)
    import copy

    seen = {}
    for mode in ("plain", "imatrix", "gptq"):
        m = copy.deepcopy(base)
        q = run(m, _job(calib if mode != "plain" else None), mode=mode, preset="Q4_K_M", log=lambda s: None)
        assert all(qw.extra["imatrix"] == (mode != "plain") for n, qw in q.items() if "layers" in n)
        seen[mode] = {n: qw.extra["gguf_type"] for n, qw in q.items()}
    assert seen["plain"] == seen["imatrix"] == seen["gptq"]  # same per-tensor types in every mode


@pytest.fixture(scope="module")
def gguf_repo(local_hub, tokenizer, tmp_path_factory):
    folder = save_tiny_repo(tmp_path_factory.mktemp("llama"), "llama", tokenizer, **SIZE)
    repo = "alice/tiny-llama-gguf"
    local_hub.hub.publish_folder(repo, folder)
    return repo


@pytest.mark.parametrize("method", ["imatrix", "gptq"])
def test_convert_end_to_end(hub_env, gguf_repo, tmp_path, method):
    from transformers import AutoModelForCausalLM

    from hubquant.convert import ConvertOptions, convert

    out = tmp_path / "variant"
    res = convert(ConvertOptions(repo_id=gguf_repo, method=method, format="gguf", gguf_type="Q4_K_M",
                                 output_dir=str(out), num_samples=4, seq_len=64, eval_windows=2, eval_seq_len=64,
                                 progress=False), log=lambda m: None)
    files = sorted(p.name for p in out.glob("*.gguf"))
    assert files == ["tiny-llama-gguf-Q4_K_M.gguf"]
    assert 0 <= res.metrics["mean_kl"] < 0.01 and abs(res.metrics["ppl_increase_pct"]) < 2
    prov = json.loads((out / "hubquant.json").read_text())
    assert prov["settings"]["gguf_type"] == "Q4_K_M" and prov["settings"]["format"] == "gguf"
    card = (out / "README.md").read_text()
    assert "## GGUF" in card and "ollama run hf.co/" in card and "llama-cli -hf" in card and "| Q2_K |" in card
    base_row = next(line for line in card.splitlines() if line.startswith("| base (float) |"))
    assert f"{res.metrics['base_perplexity']:.3f}" in base_row
    assert f"| {res.metrics['perplexity']:.3f} | {res.metrics['ppl_increase_pct']:+.2f}% |" in card
    assert f"| **Q4_K_M** (this repo) | `{files[0]}` |" in card
    reader = gguf.GGUFReader(out / files[0])
    assert reader.fields["quantize.imatrix.entries_count"].contents() == 14  # 7 Linears x 2 layers
    loaded = AutoModelForCausalLM.from_pretrained(out, gguf_file=files[0], dtype=torch.float32)
    assert loaded.config.num_hidden_layers == 2


def test_cli_gguf_flags_need_the_format(tmp_path):
    p = subprocess.run([sys.executable, "-m", "hubquant.cli", "convert", "x/y", "--gguf-type", "Q4_0"],
                       capture_output=True, text=True)
    assert p.returncode == 2 and "--format gguf" in p.stderr


def test_plan_names_hashes_and_allows_the_gguf_options():
    from hubquant.options import ConvertOptions, command_line, service_options
    from hubquant.plan import check_options, default_target, settings_hash, settings_of
    from hubquant.service.jobs import JobSpec, convert_options

    opts = ConvertOptions(repo_id="org/Model", format="gguf")
    scheme, fmt = check_options(opts)
    assert default_target("Model", "me", scheme, "rtn", fmt) == "me/Model-GGUF"
    assert default_target("Model", "me", scheme, "imatrix", fmt) == "me/Model-GGUF"
    plain = settings_of(opts, scheme, fmt)
    assert plain["gguf_type"] == "Q4_K_M"  # the default preset is hashed as itself
    same = settings_of(ConvertOptions(repo_id="org/Model", format="gguf", gguf_type="Q4_K_M"), scheme, fmt)
    other = settings_of(ConvertOptions(repo_id="org/Model", format="gguf", gguf_type="Q8_0"), scheme, fmt)
    assert settings_hash("b", plain) == settings_hash("b", same) != settings_hash("b", other)
    with pytest.raises(UsageError, match="Q9_K"):
        check_options(ConvertOptions(repo_id="org/Model", format="gguf", gguf_type="Q9_K"))
    with pytest.raises(UsageError, match="--format gguf"):
        check_options(ConvertOptions(repo_id="org/Model", gguf_split_size="4G"))
    line = command_line(ConvertOptions(repo_id="org/Model", format="gguf", gguf_type="Q8_0"), calibrated=False)
    assert line.endswith("--format gguf --gguf-type Q8_0")
    assert {"gguf_type", "gguf_split_size"} <= service_options()
    job = convert_options(JobSpec(repo_id="o/m", options={"format": "gguf", "gguf_type": "Q6_K"}))
    assert job.gguf_type == "Q6_K"


def test_card_section_quality_files_per_budget_and_commands(tmp_path, tokenizer):
    from hubquant.formats.gguf.card import card_section, preset_sizes, shard_count

    src, model = _source(tmp_path, "qwen2", tokenizer)
    quantized = run(model, _job(), mode="plain", preset="Q4_0", log=lambda m: None)
    qc = write(model, quantized, out_dir=tmp_path / "out",
               options={"gguf_type": "Q4_0", "tokenizer_dir": str(src), "split_size": "4M"})
    files = qc["files"]
    metrics = {"base_perplexity": 12.3456, "perplexity": 13.0, "ppl_increase_pct": 5.302, "top1_agreement": 0.912,
               "mean_kl": 0.0312, "eval_tokens": 4096}
    text = card_section(model, qc, metrics, "alice/src-GGUF", split_size=4_000_000)
    assert "| base (float) | - | 12.346 |" in text and "| 13.000 | +5.30% | 91.2% | 0.0312 |" in text
    assert "(4096 tokens)" in text
    sizes = preset_sizes(model)
    written = sum((tmp_path / "out" / f).stat().st_size for f in files)
    assert abs(sizes["Q4_0"] - written) / written < 0.15  # the estimate misses only the header and tokenizer
    row = next(line for line in text.splitlines() if line.startswith("| **Q4_0** (this repo)"))
    assert all(f"`{f}`" in row for f in files) and len(files) >= 2
    q8 = next(line for line in text.splitlines() if line.startswith("| Q8_0 |"))
    n8 = shard_count(sizes["Q8_0"], 4_000_000)
    assert n8 > len(files) and f"`src-Q8_0-00001-of-{n8:05d}.gguf`" in q8
    assert 'hf download alice/src-GGUF --include "src-Q4_0*.gguf"' in text
    assert "llama-cli -hf alice/src-GGUF:Q4_0" in text and f"llama-server -m {files[0]}" in text
    assert f"llama-gguf-split --merge {files[0]} src-Q4_0.gguf" in text and "ollama create src" in text
    single = card_section(model, {**qc, "files": ["src-Q4_0.gguf"]}, {}, "alice/src-GGUF")
    assert "ollama run hf.co/alice/src-GGUF:Q4_0" in single and "perplexity" not in single
    assert "| Q8_0 | `src-Q8_0.gguf` |" in single
