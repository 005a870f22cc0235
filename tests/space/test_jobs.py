import os
import time

from hqspace.jobs import ConvertRequest, JobRunner, hub_token
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


def test_hub_token_is_set_for_the_block_and_restored(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "server-token")
    from huggingface_hub import get_token

    with hub_token("user-token"):
        assert get_token() == "user-token"
    assert get_token() == "server-token"
    monkeypatch.delenv("HF_TOKEN")
    with hub_token("user-token"):
        assert os.environ["HF_TOKEN"] == "user-token"
    assert "HF_TOKEN" not in os.environ
