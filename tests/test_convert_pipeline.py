"""The pipeline's shape: one plan for convert and the service, options declared once (flags, card, service
allow-list), stages callable alone with progress events and timings that add up, the Python API, target names."""
from __future__ import annotations

import dataclasses
import inspect
import json
import os
import sys
import uuid

import pytest

from hubquant.convert import ConvertOptions, convert
from hubquant.errors import ConflictError, UsageError
from tests.helpers import run_cli as _cli
from tests.helpers import save_tiny_repo

FAST = dict(skip_eval=True, progress=False)


def _uid() -> str:
    return uuid.uuid4().hex[:8]


@pytest.fixture(scope="module")
def tiny(local_hub, tokenizer, tmp_path_factory):
    folder = save_tiny_repo(tmp_path_factory.mktemp("tiny"), "llama", tokenizer)
    repo = f"alice/pipe-llama-{_uid()}"
    local_hub.hub.publish_folder(repo, folder)
    return repo




# ------------------------------------------------------------------------------------------ one plan


def test_convert_and_the_service_share_one_plan(hub_env, tiny):
    from hubquant.plan import plan
    from hubquant.service.jobs import JobSpec
    from hubquant.service.jobs import plan as job_plan

    opts = ConvertOptions(repo_id=tiny, method="rtn", bits=8, push=True, **FAST)
    before = plan(opts)
    assert before.action == "convert" and before.target_head is None and before.target.endswith("-W8A16-RTN")
    res = convert(opts, log=lambda m: None)
    after = plan(opts)
    assert (after.action, after.target, after.settings_hash) == ("skip", res.target_repo, res.settings_hash)
    assert after.target_head is not None
    job = job_plan(JobSpec(repo_id=tiny, method="rtn", scheme="W8A16", namespace="alice",
                           options={"skip_eval": True}))
    assert (job.action, job.target_repo, job.settings_hash) == ("skip", res.target_repo, res.settings_hash)
    # the same decision refuses a target that holds a variant of another base, in both callers
    other = ConvertOptions(repo_id=tiny, method="rtn", bits=8, push=True, target_repo=f"alice/other-{_uid()}", **FAST)
    from huggingface_hub import HfApi

    HfApi().create_repo(other.target_repo)
    HfApi().upload_file(path_or_fileobj=b"{}", path_in_repo="config.json", repo_id=other.target_repo)
    assert plan(other).action == "conflict"
    assert job_plan(JobSpec(repo_id=tiny, method="rtn", scheme="W8A16", options={"skip_eval": True},
                            namespace=None)).action == "skip"


def test_concurrent_runs_end_in_a_conflict_or_a_no_op_never_an_overwrite(hub_env, tiny):
    from hubquant import stages
    from hubquant.convert import _pipeline
    from hubquant.plan import plan

    target = f"alice/race-{_uid()}"
    slow = plan(ConvertOptions(repo_id=tiny, method="rtn", bits=8, push=True, target_repo=target, **FAST))
    # another run with other settings creates the target first
    fast = convert(ConvertOptions(repo_id=tiny, method="rtn", bits=4, group_size=32, push=True, target_repo=target,
                                  **FAST), log=lambda m: None)
    run = stages.resolve(slow, log=lambda m: None)
    with pytest.raises(ConflictError) as e:
        _pipeline(run)
    assert e.value.exit_code == 7
    from huggingface_hub import HfApi

    with open(HfApi().hf_hub_download(target, "hubquant.json")) as f:
        prov = json.load(f)
    assert prov["settings_hash"] == fast.settings_hash  # the first run's variant stands
    # planned while the target was at commit A; another run pushes commit B: pushing on A is a conflict
    stale = plan(ConvertOptions(repo_id=tiny, method="rtn", bits=8, push=True, target_repo=target, **FAST))
    convert(ConvertOptions(repo_id=tiny, method="rtn", bits=4, group_size=64, push=True, target_repo=target, **FAST),
            log=lambda m: None)
    with pytest.raises(ConflictError):
        _pipeline(stages.resolve(stale, log=lambda m: None))
    # the same settings raced: the late run finds the variant there and makes no commit
    same = dict(repo_id=tiny, method="rtn", bits=8, push=True, target_repo=f"alice/race-same-{_uid()}", **FAST)
    late = plan(ConvertOptions(**same))
    convert(ConvertOptions(**same), log=lambda m: None)
    run = stages.resolve(late, log=lambda m: None)
    _pipeline(run)
    assert run.skipped and run.commit_url is None
    assert len(HfApi().list_repo_commits(same["target_repo"])) == 2


# ------------------------------------------------------------------------------------------ options


def test_every_declared_option_has_a_flag_the_card_and_service_read_the_declarations(cli_env, tiny, tmp_path):
    from hubquant.cli import build_parser
    from hubquant.options import declared, service_options
    from hubquant.service.jobs import JobSpec, convert_options

    parser = build_parser()
    flags = {f.metadata["flag"] for f in declared()}
    args = parser.parse_args(["convert", "--ignore", "mlp.down_proj", "self_attn.o_proj", "org/model"])
    assert args.repo_id is None and args.ignore[-1] == "org/model"  # argparse alone eats the repo id ...
    from hubquant.options import from_args

    opts = from_args(args)  # ... and hubquant takes it back
    assert opts.repo_id == "org/model" and opts.ignore == ("mlp.down_proj", "self_attn.o_proj")
    assert opts.ignored_patterns == ("lm_head", "mlp.down_proj", "self_attn.o_proj")
    help_text = parser._subparsers._group_actions[0].choices["convert"].format_help()
    for flag in flags:
        for f in flag.split("/"):
            assert f in help_text, f
    # the service takes only what the declarations allow
    for bad in ("token", "output_dir", "trust_remote_code", "allow_pickle", "push"):
        assert bad not in service_options()
        with pytest.raises(UsageError) as e:
            convert_options(JobSpec(repo_id="o/m", options={bad: "x"}))
        assert bad in e.value.message
    ok = convert_options(JobSpec(repo_id="o/m", options={"ignore": ["mlp.down_proj"], "num_samples": 8}))
    assert ok.ignored_patterns == ("lm_head", "mlp.down_proj") and ok.num_samples == 8
    # options before the repo id, through the CLI; the card reproduces them
    out = tmp_path / "out"
    r = _cli(["convert", "--ignore", "mlp.down_proj", "--skip-eval", "--quiet", "--output-dir", str(out), tiny],
             cli_env)
    assert r.returncode == 0, r.stderr
    card = (out / "README.md").read_text()
    assert f"hubquant convert {tiny} --method rtn --ignore mlp.down_proj" in card
    assert ("left unquantized (3 Linear layers, --ignore lm_head mlp.down_proj): lm_head, "
            "model.layers.0.mlp.down_proj, model.layers.1.mlp.down_proj") in r.stdout
    st = json.loads((out / "hubquant.json").read_text())
    assert st["settings"]["ignore"] == ["lm_head", "mlp.down_proj"]
    assert "model.layers.0.mlp.down_proj.weight" in _tensor_names(out)  # kept in float
    assert "lm_head.weight" in _tensor_names(out)


def _tensor_names(folder) -> set[str]:
    from safetensors import safe_open

    names = set()
    for f in folder.glob("*.safetensors"):
        with safe_open(str(f), framework="pt") as st:
            names |= set(st.keys())
    return names


def test_no_default_ignore_quantizes_lm_head(cli_env, tiny, tmp_path):
    out = tmp_path / "out"
    r = _cli(["convert", tiny, "--no-default-ignore", "--bits", "8", "--skip-eval", "--quiet",
              "--output-dir", str(out)], cli_env)
    assert r.returncode == 0, r.stderr
    names = _tensor_names(out)
    assert "lm_head.weight_scale" in names and "lm_head.weight" in names  # int8 weight + its scale
    assert "left unquantized (0 Linear layers, --ignore -): nothing" in r.stdout
    assert "--no-default-ignore" in (out / "README.md").read_text()


# ------------------------------------------------------------------------------------------ stages


def test_stages_run_alone_emit_events_and_timings_add_up(hub_env, tiny, tmp_path):
    from hubquant import stages
    from hubquant.plan import plan

    opts = ConvertOptions(repo_id=tiny, method="gptq", group_size=32, num_samples=4, seq_len=64,
                          calib_dataset="fortunes", eval_windows=2, eval_seq_len=64, progress=False,
                          output_dir=str(tmp_path / "v"))
    events = []
    run = stages.resolve(plan(opts), log=lambda m: None, on_event=events.append)
    assert run.path is None and run.model is None  # resolve downloads nothing
    stages.download(run)
    assert (run.path / "model.safetensors").is_file()
    stages.load(run)
    stages.calibrate(run)
    assert run.calib.ids.shape == (4, 64) and run.eval_set.n_tokens == 128
    stages.baseline(run)
    stages.leak_check(run, "base")
    stages.quantize(run)
    stages.write(run)
    stages.evaluate_variant(run)
    stages.leak_check(run, "variant")
    stages.card(run)
    assert run.metrics["perplexity"] > 0 and run.leak is not None
    order = [e.stage for i, e in enumerate(events) if i == 0 or events[i - 1].stage != e.stage]
    assert order == ["resolve", "download", "load", "calibrate", "baseline", "leak_check", "quantize", "write",
                     "evaluate", "leak_check", "card"]
    leak = [e.fraction for e in events if e.stage == "leak_check"]
    assert any(0 < f < 0.5 for f in leak) and any(0.5 < f < 1 for f in leak)  # both halves report batches
    assert set(run.timings) == set(order)
    files = json.loads((tmp_path / "v" / "hubquant.json").read_text())["files"]
    assert "model.safetensors" in files and "README.md" in files


def test_cli_timings_line_includes_the_leak_check_and_adds_up(cli_env, tiny, tmp_path):
    r = _cli(["convert", tiny, "--method", "gptq", "--group-size", "32", "--num-samples", "4", "--seq-len", "64",
              "--calib-dataset", "fortunes", "--eval-windows", "2", "--eval-seq-len", "64", "--json",
              "--output-dir", str(tmp_path / "v")], cli_env)
    assert r.returncode == 0, r.stderr
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("timings: "))
    parts = dict(p.rsplit(" ", 1) for p in line.removeprefix("timings: ").split(", "))
    secs = {k: float(v.rstrip("s")) for k, v in parts.items()}
    assert "leak_check" in secs and "quantize" in secs
    total = secs.pop("total")
    assert abs(sum(secs.values()) - total) <= 0.05 * total + 0.1 * len(secs), secs
    assert "leak_check" in r.stderr and "%" in r.stderr  # the progress bars, on stderr


# ------------------------------------------------------------------------------------------ API, names


def test_python_api_mirrors_the_cli_and_load_keeps_its_signature(hub_env, tiny, tmp_path):
    import hubquant
    from hubquant.convert import ConvertResult
    from hubquant.runtime.loader import load

    res = hubquant.convert(tiny, method="rtn", bits=4, group_size=32, ignore="mlp.down_proj", skip_eval=True,
                           progress=False, output_dir=str(tmp_path / "api"), log=lambda m: None)
    assert isinstance(res, ConvertResult) and not res.skipped
    assert json.loads((tmp_path / "api" / "hubquant.json").read_text())["settings"]["ignore"] == [
        "lm_head", "mlp.down_proj"]
    with pytest.raises(UsageError) as e:
        hubquant.convert(tiny, methd="rtn")
    assert "methd" in e.value.message
    assert hubquant.load is load and "repo_or_path" in str(inspect.signature(hubquant.load))
    assert "Load a hubquant variant" in (hubquant.load.__doc__ or "")
    from hubquant.convert import quantize

    params = inspect.signature(quantize).parameters
    assert {"method", "bits", "group_size", "push", "ignore", "default_ignore"} <= set(params)
    fields = {f.name for f in dataclasses.fields(ConvertOptions)} - {"repo_id", "version"}
    assert fields <= set(params)


@pytest.mark.parametrize("method,fmt,bits,suffix", [
    ("w8a8", None, None, "-W8A8"), ("fp8", None, None, "-FP8"), ("gptq", "gptq", None, "-W4A16-G128-GPTQ"),
    ("smoothquant", None, None, "-W8A8-SMOOTHQUANT"), ("rtn", "gptq", None, "-W4A16-G128-RTN-gptq"),
    ("rtn", None, 8, "-W8A16-RTN"), ("bnb-nf4", None, None, "-BNB-NF4"),
])
def test_target_names_do_not_repeat_the_scheme(method, fmt, bits, suffix):
    from hubquant.plan import check_options, default_target

    opts = ConvertOptions(repo_id="org/Model", method=method, format=fmt, bits=bits)
    scheme, f = check_options(opts)
    assert default_target("Model", "me", scheme, method, f) == f"me/Model{suffix}"


def test_space_jobs_follow_progress_events():
    import time

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "space"))
    from hqspace.jobs import ConvertRequest, JobRunner

    from hubquant.stages import STAGES, ProgressEvent

    seen = []

    def fake(req, method, log, on_event=None):
        on_event(ProgressEvent("quantize", 0.5, "layer 1 of 2"))
        seen.append(on_event.__self__.progress)  # the job whose event() this is
        return {"method": method}

    job = JobRunner(fake).submit(ConvertRequest(repo_id="o/m", methods=("rtn",)))
    t0 = time.time()
    while job.state not in ("done", "failed") and time.time() - t0 < 10:
        time.sleep(0.02)
    assert job.state == "done", job.lines
    assert seen and seen[0] == pytest.approx((STAGES.index("quantize") + 0.5) / len(STAGES))
    assert job.stage == "quantize"


def test_the_service_stores_the_stage_events_on_the_job_result(hub_env, tiny):
    from hubquant.service.jobs import JobSpec, run_job

    out = run_job(JobSpec(repo_id=tiny, method="w8a8", scheme="W8A8", namespace="alice",
                          options={"skip_eval": True}), log=lambda m: None)
    assert out["target_repo"] == f"alice/{tiny.split('/')[1]}-W8A8" and out["commit_url"]
    ends = [e["stage"] for e in out["stages"] if e["fraction"] == 1.0]
    assert ends == ["resolve", "download", "load", "calibrate", "quantize", "write", "card", "push"]
    assert all(e["seconds"] >= 0 for e in out["stages"])
    json.dumps(out)  # plain JSON, as the queue stores it
