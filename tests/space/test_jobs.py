import os
import time

from hqspace.jobs import ConvertRequest, JobRunner, default_convert

from hubquant.errors import UnsupportedError


def _wait(job, timeout=10.0):
    t0 = time.time()
    while job.state not in ("done", "failed") and time.time() - t0 < timeout:
        time.sleep(0.02)
    return job


def test_jobs_run_each_method_in_the_background_and_keep_the_log():
    calls = []

    def fake_convert(req, method, log):
        log(f"step 1 of {method}")
        calls.append((req.repo_id, method, os.environ.get("HF_TOKEN")))
        return {"method": method, "target_repo": f"me/{method}", "commit_url": "u", "skipped": False}

    runner = JobRunner(fake_convert)
    job = _wait(runner.submit(ConvertRequest(repo_id="org/m", methods=("rtn", "fp8"), token="tok-123")))
    assert job.state == "done" and job.methods_done == 2 and job.progress == 1.0
    assert [r["target_repo"] for r in job.results] == ["me/rtn", "me/fp8"]
    assert calls == [("org/m", "rtn", None), ("org/m", "fp8", None)]  # the fake does not set the token
    assert "step 1 of fp8" in job.lines and runner.get(job.id) is job


def test_a_failing_job_reports_the_message_and_the_fix():
    def unsupported(req, method, log):
        raise UnsupportedError("architecture FooForCausalLM is not supported", hint="pick a Llama-like model")

    job = _wait(JobRunner(unsupported).submit(ConvertRequest(repo_id="org/foo", methods=("rtn",))))
    assert job.state == "failed" and job.methods_done == 0
    assert job.error == "architecture FooForCausalLM is not supported" and job.hint == "pick a Llama-like model"
    assert any("fix: pick a Llama-like model" in line for line in job.lines)


def test_the_visitors_token_goes_to_convert_per_call(monkeypatch):
    """The token travels in ConvertOptions, never through the process environment (shared by all visitors)."""
    import hubquant.convert as conv

    seen = []

    def fake(opts, log):
        seen.append((opts.token, os.environ.get("HF_TOKEN")))
        return conv.ConvertResult(out_dir=conv.Path("/nonexistent"), target_repo="me/x", commit_url="u",
                                  skipped=False, metrics={}, settings_hash="h", base_sha="s")

    monkeypatch.setattr(conv, "convert", fake)
    monkeypatch.setenv("HF_TOKEN", "server-token")
    out = default_convert(ConvertRequest(repo_id="org/m", methods=("rtn",), token="user-token"), "rtn", print)
    assert seen == [("user-token", "server-token")] and out["target_repo"] == "me/x"
    assert "user-token" not in repr(conv.ConvertOptions(repo_id="a/b", token="user-token"))


def test_export_writes_a_self_contained_space(tmp_path):
    import subprocess
    import sys

    import pytest

    pytest.importorskip("gradio")
    from hubquant.space_cli import export

    out = export(tmp_path / "space")
    for rel in ("app.py", "README.md", "requirements.txt", "hqspace/runner.py", "hubquant/convert.py",
                "hubquant_kernels/w4a16.py", "cards/variant.md.j2", "docs/img/space-compare.png"):
        assert (out / rel).is_file(), rel
    reqs = (out / "requirements.txt").read_text()  # hubquant is bundled: its dependencies, not hubquant itself
    assert "gradio" in reqs and "transformers" in reqs and "hubquant[space]" not in reqs
    readme = (out / "README.md").read_text()
    assert readme.startswith("---\n") and "sdk: gradio" in readme and "hf_oauth: true" in readme
    assert "](docs/img/space-compare.png)" in readme
    # the exported app builds from its own folder's packages
    code = ("import sys; sys.argv=['app.py']; import runpy; g = runpy.run_path('app.py', run_name='space');"
            "import hubquant; assert hubquant.__file__.startswith(sys.path[0]), hubquant.__file__;"
            "d = g['build_app'](); print(type(d).__name__)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=out, capture_output=True, text=True, timeout=120,
                          env={**__import__("os").environ, "PYTHONPATH": ""})
    assert proc.returncode == 0 and proc.stdout.strip().endswith("Blocks"), proc.stderr[-2000:]
