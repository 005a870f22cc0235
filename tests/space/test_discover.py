from hqspace.discover import (
    ModelEntry,
    _base_models,
    _perplexity_from_card,
    _perplexity_from_provenance,
    _provenance_base,
)


def test_perplexity_is_read_from_model_index_and_skips_the_base_row():
    card = {"model-index": [{"name": "x", "results": [{
        "task": {"type": "text-generation"},
        "metrics": [{"type": "perplexity", "name": "base perplexity", "value": 17.5},
                    {"type": "perplexity", "name": "perplexity", "value": 18.25}],
    }]}]}
    assert _perplexity_from_card(card) == 18.25
    assert _perplexity_from_card({"license": "mit"}) is None
    assert _perplexity_from_card(None) is None


def test_provenance_fields():
    meta = {"base_model": {"repo_id": "org/base", "sha": "abc"},
            "metrics": {"perplexity": 20.5, "base_perplexity": 19.0}}
    assert _provenance_base(meta) == "org/base"
    assert _provenance_base({"base_model": "org/other"}) == "org/other"
    assert _perplexity_from_provenance(meta) == 20.5
    assert _perplexity_from_provenance({"metrics": {"perplexity": float("nan")}}) is None


def test_base_models_accepts_a_string_or_a_list():
    assert _base_models({"base_model": "a/b"}) == ["a/b"]
    assert _base_models({"base_model": ["a/b", "c/d"]}) == ["a/b", "c/d"]
    assert _base_models(None) == []


def test_entry_label_names_method_and_scheme():
    assert ModelEntry(repo_id="u/m-rtn", method="rtn", scheme="W4A16-G64").label == "u/m-rtn (rtn W4A16-G64)"
    assert ModelEntry(repo_id="u/m").label == "u/m"


def _publish(local_hub, tmp_path, repo_id: str, *, base: str, tags=("hubquant",), metrics=None, weights=1000):
    import json

    folder = tmp_path / repo_id.replace("/", "--")
    folder.mkdir()
    tag_yaml = "".join(f"- {t}\n" for t in tags)
    (folder / "README.md").write_text(f"---\nbase_model: {base}\nbase_model_relation: quantized\n"
                                      f"library_name: transformers\ntags:\n{tag_yaml}---\n# {repo_id}\n")
    (folder / "hubquant.json").write_text(json.dumps({"base_model": base, "scheme_name": "W4A16-G64",
                                                      "settings": {"method": "rtn"}, "metrics": metrics or {}}))
    (folder / "model.safetensors").write_bytes(b"\0" * weights)
    local_hub.hub.publish_folder(repo_id, folder)


def test_find_variants_on_the_local_hub(local_hub, tmp_path):
    import uuid

    from hqspace.discover import describe, find_bases, find_variants
    from huggingface_hub import HfApi

    tag = uuid.uuid4().hex[:6]
    base, other = f"hubquant-org/base-{tag}", f"hubquant-org/other-{tag}"
    _publish(local_hub, tmp_path, f"alice/v1-{tag}", base=base, metrics={"perplexity": 12.5, "base_perplexity": 11.0},
             weights=4096)
    _publish(local_hub, tmp_path, f"alice/v2-{tag}", base=base, tags=("gptq",))  # found by the model tree only
    _publish(local_hub, tmp_path, f"alice/v3-{tag}", base=other)
    api = HfApi(endpoint=local_hub.endpoint)
    found = find_variants(api, base)
    assert [e.repo_id for e in found] == [f"alice/v1-{tag}", f"alice/v2-{tag}"]
    v1 = found[0]
    assert (v1.method, v1.scheme, v1.perplexity, v1.base_perplexity) == ("rtn", "W4A16-G64", 12.5, 11.0)
    assert v1.size_bytes == 4096
    assert [e.repo_id for e in find_variants(api, other)] == [f"alice/v3-{tag}"]
    assert {base, other} <= set(find_bases(api))
    assert describe(api, f"alice/v1-{tag}").method is None  # provenance is read for variants only
