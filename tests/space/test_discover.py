from hqspace.discover import ModelEntry, _base_models, _perplexity_from_card, _perplexity_from_provenance, _provenance_base


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
    meta = {"base_model": {"repo_id": "org/base", "sha": "abc"}, "metrics": {"perplexity": 20.5, "base_perplexity": 19.0}}
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
