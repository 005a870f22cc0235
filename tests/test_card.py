"""The variant card: Hub metadata, a "How to use" section true for its format (engine table with exact commands,
the loader each format needs), the calibration line once, and `.eval_results/` in the Hub's format."""
from __future__ import annotations

import pytest
import yaml

from hubquant.card import CardInputs, eval_results_yaml, render, save

METRICS = {"perplexity": 12.3456, "base_perplexity": 11.5, "ppl_increase_pct": 7.35, "top1_agreement": 0.91,
           "mean_kl": 0.0321, "eval_tokens": 4096}
CALIB = "fortunes (Debian's fortune cookies): 32 x 512 tokens, seed 0"


def _inputs(fmt: str, tmp_path, **kw) -> CardInputs:
    base_card = tmp_path / "base.md"
    base_card.write_text("---\nlicense: mit\npipeline_tag: text-generation\nlanguage: [en]\n---\n# base\n")
    args = dict(target_repo="alice/tiny-W4A16-GPTQ", base_model="org/tiny", base_sha="a" * 40,
                base_card_path=base_card, method="gptq", method_summary="s", scheme_name="W4A16", weights_desc="w",
                acts_desc="a", format=fmt, quant_method=fmt, ignored=["lm_head"], calib_desc=CALIB,
                calib_spec="fortunes", eval_desc="WikiText-2 test", eval_spec="Salesforce/wikitext:wikitext-2-raw-v1",
                metrics=METRICS, size_bytes=10_000_000, base_size_bytes=40_000_000, settings={"method": "gptq"},
                settings_hash="h", command="hubquant convert org/tiny --method gptq", hubquant_version="0.1.0",
                hardware_key="w4a16")
    args.update(kw)
    return CardInputs(**args)


@pytest.mark.parametrize("fmt,must,must_not", [
    ("compressed-tensors", ["pip install transformers compressed-tensors", "vllm serve alice/tiny-W4A16-GPTQ",
                            "sglang.launch_server --model-path alice/tiny-W4A16-GPTQ"], ["gptqmodel", "bitsandbytes"]),
    ("gptq", ["pip install transformers optimum gptqmodel", "through `gptqmodel`", "--quantize gptq"],
     ["bitsandbytes"]),
    ("awq", ["pip install transformers gptqmodel", "transformers 5 loads AWQ checkpoints through `gptqmodel`"],
     ["optimum", "bitsandbytes"]),
    ("bitsandbytes", ["pip install transformers accelerate bitsandbytes", "--quantization bitsandbytes",
                      "BitsAndBytesConfig"], ["gptqmodel", "compressed-tensors"]),
])
def test_how_to_use_is_true_for_the_format(tmp_path, fmt, must, must_not):
    card = render(_inputs(fmt, tmp_path))
    how = card.text.split("## How to use", 1)[1].split("## Provenance", 1)[0]
    for text in must:
        assert text in how, text
    for text in must_not:
        assert text not in how, text
    assert how.count("| transformers |") == 1
    assert card.content.count("32 x 512 tokens") == 1  # the calibration line, once
    data = card.data.to_dict()
    assert data["library_name"] == "transformers" and data["base_model"] == "org/tiny"
    assert data["base_model_relation"] == "quantized" and data["license"] == "mit"
    assert data["pipeline_tag"] == "text-generation" and "hubquant" in data["tags"]
    assert data["model-index"][0]["results"][0]["metrics"][0]["value"] == pytest.approx(12.3456)


def test_eval_results_file_in_the_hubs_format(tmp_path):
    inp = _inputs("compressed-tensors", tmp_path)
    save(render(inp), inp, tmp_path / "out")
    text = (tmp_path / "out" / ".eval_results" / "perplexity.yaml").read_text()
    entries = yaml.safe_load(text)
    assert entries[0]["dataset"] == {"id": "Salesforce/wikitext", "task_id": "perplexity"}
    assert entries[0]["value"] == pytest.approx(12.3456)
    hub = pytest.importorskip("huggingface_hub")
    if hasattr(hub, "parse_eval_result_entries"):  # the Hub client's own parser reads it back
        parsed = hub.parse_eval_result_entries(entries)
        assert parsed[0].dataset_id == "Salesforce/wikitext" and parsed[0].value == pytest.approx(12.3456)
    # a local corpus is no Hub dataset: model-index only
    assert eval_results_yaml(_inputs("compressed-tensors", tmp_path, eval_spec="lee-news")) is None
    assert eval_results_yaml(_inputs("compressed-tensors", tmp_path, metrics={})) is None


def test_dequantize_note_only_when_written(tmp_path):
    plain = render(_inputs("compressed-tensors", tmp_path)).text
    noted = render(_inputs("compressed-tensors", tmp_path, dequantize_note="transformers dequantizes X")).text
    assert "transformers dequantizes X" in noted and "dequantizes X" not in plain


def test_eval_results_reach_the_hub(hub_env, tmp_path):
    import uuid

    from huggingface_hub import HfApi, hf_hub_download

    from hubquant.hub.client import push_folder

    inp = _inputs("compressed-tensors", tmp_path)
    out = tmp_path / "variant"
    save(render(inp), inp, out)
    repo = f"alice/card-{uuid.uuid4().hex[:8]}"
    push_folder(out, repo, message="card")
    assert {"README.md", ".eval_results/perplexity.yaml"} <= set(HfApi().list_repo_files(repo))
    entries = yaml.safe_load(open(hf_hub_download(repo, ".eval_results/perplexity.yaml")).read())
    assert entries[0]["value"] == pytest.approx(12.3456)


def test_how_to_use_names_the_class_that_loads_the_base(tmp_path):
    text_only = render(_inputs("compressed-tensors", tmp_path)).text
    assert "model = AutoModelForCausalLM.from_pretrained(\"alice/tiny-W4A16-GPTQ\")" in text_only
    vlm = render(_inputs("compressed-tensors", tmp_path, auto_class="AutoModelForImageTextToText")).text
    how = vlm.split("## How to use", 1)[1].split("## Provenance", 1)[0]
    assert "from transformers import AutoModelForImageTextToText, AutoTokenizer" in how
    assert "model = AutoModelForImageTextToText.from_pretrained(\"alice/tiny-W4A16-GPTQ\")" in how
    assert "AutoModelForCausalLM" not in how
