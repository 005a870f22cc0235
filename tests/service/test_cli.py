"""The watch/serve CLI helpers: list flags, KEY=VALUE options, config files."""
from __future__ import annotations

import pytest

from hubquant.errors import UsageError
from hubquant.service.cli import _options, _split, load_config
from hubquant.service.jobs import JobSpec, parse_scheme


def test_list_flags_accept_commas_newlines_and_repeats():
    assert _split(["rtn,gptq", "awq", "rtn\nfp8", " "]) == ("rtn", "gptq", "awq", "fp8")
    assert _split(None) == ()


def test_options_are_json_values():
    assert _options(["num_samples=64", "skip_eval=true", "calib_dataset=fortunes", "x=1.5"]) == {
        "num_samples": 64, "skip_eval": True, "calib_dataset": "fortunes", "x": 1.5}
    with pytest.raises(UsageError):
        _options(["nokey"])


@pytest.mark.parametrize("suffix, text", [
    (".json", '{"methods": ["rtn", "gptq"], "max-ppl-increase": 5}'),
    (".toml", 'methods = ["rtn", "gptq"]\nmax-ppl-increase = 5\n'),
    (".yaml", "methods: [rtn, gptq]\nmax-ppl-increase: 5\n"),
])
def test_config_files(tmp_path, suffix, text):
    p = tmp_path / f"svc{suffix}"
    p.write_text(text)
    assert load_config(str(p)) == {"methods": ["rtn", "gptq"], "max_ppl_increase": 5}


def test_config_errors(tmp_path):
    with pytest.raises(UsageError):
        load_config(str(tmp_path / "missing.toml"))
    (tmp_path / "x.ini").write_text("a=1")
    with pytest.raises(UsageError):
        load_config(str(tmp_path / "x.ini"))


def test_schemes_and_job_keys():
    assert parse_scheme("default") == {}
    assert parse_scheme("W4A16-G32") == {"bits": 4, "group_size": 32}
    assert parse_scheme("w4a16-asym-g128") == {"bits": 4, "group_size": 128, "symmetric": False}
    assert parse_scheme("W8A16") == {"bits": 8, "group_size": -1}
    with pytest.raises(UsageError):
        parse_scheme("W4-G32")
    a = JobSpec(repo_id="o/m", revision="a" * 40, method="rtn", scheme="W8A16")
    assert a.key() == JobSpec.from_dict(a.to_dict()).key()
    assert a.key() != JobSpec(repo_id="o/m", revision="b" * 40, method="rtn", scheme="W8A16").key()
    assert a.key() != JobSpec(repo_id="o/m", revision="a" * 40, method="rtn", scheme="W4A16-G32").key()
    with pytest.raises(UsageError):
        JobSpec(repo_id="no-slash")
    with pytest.raises(UsageError):
        JobSpec.from_dict({"repo_id": "o/m", "bogus": 1})
