"""The app's wiring without a browser: on a Space the Convert tab takes the OAuth token of the logged-in
user (not a token box) and the job runs with it; discovery errors read as messages."""
import os
import uuid

import pytest

gr = pytest.importorskip("gradio")


def _fn(demo, name):
    return next(f.fn for f in demo.fns.values() if f.fn is not None and f.fn.__name__ == name)


class RecordingRunner:
    def __init__(self):
        self.requests = []

    def submit(self, request):
        from hqspace.jobs import Job

        self.requests.append(request)
        job = Job(id=len(self.requests), request=request, state="done")
        job.results.append({"method": "rtn", "target_repo": f"{request.user}/x-W4A16-G64-RTN", "skipped": False})
        job.methods_done = len(request.methods)
        return job


def test_on_a_space_the_oauth_token_is_used(hub_env, tmp_path, tokenizer):
    pytest.importorskip("itsdangerous", reason="gradio[oauth] is needed for the login button")
    from hubquant.space_cli import load_app_module
    from tests.helpers import save_tiny_repo

    repo = f"hubquant-org/app-{uuid.uuid4().hex[:6]}"
    hub_env.hub.publish_folder(repo, save_tiny_repo(tmp_path / "m", "llama", tokenizer, hidden=64, intermediate=128,
                                                    layers=1))
    runner = RecordingRunner()
    demo = load_app_module().build_app(on_space=True, job_runner=runner)
    assert any(isinstance(b, gr.LoginButton) for b in demo.blocks.values())
    assert not any(isinstance(b, gr.Textbox) and b.label == "Hub token" for b in demo.blocks.values())
    convert = _fn(demo, "convert")
    bob = gr.OAuthToken(token=hub_env.token("bob"), scope="openid profile write-repos", expires_at=0)
    outputs = list(convert(repo, ["rtn"], "W4A16 group 64", True, "", oauth_token=bob, progress=lambda *a, **k: None))
    status, _log, links = outputs[-1]
    assert "Job 1 for bob" in status and "bob/x-W4A16-G64-RTN" in links
    req = runner.requests[0]
    assert (req.token, req.user) == (hub_env.token("bob"), "bob")
    assert (req.bits, req.group_size, req.methods) == (4, 64, ("rtn",))
    # logged out on a Space: refused, although the server has an HF_TOKEN (the owner's must never push for others)
    assert os.environ["HF_TOKEN"] == hub_env.token("alice")  # set by hub_env
    status, _, _ = list(convert(repo, ["rtn"], "method default", True, "", oauth_token=None,
                                progress=lambda *a, **k: None))[-1]
    assert status.startswith("**Unauthorized:**")


def test_find_variants_reports_a_missing_base_in_words(hub_env):
    from hubquant.space_cli import load_app_module

    demo = load_app_module().build_app(on_space=False, job_runner=RecordingRunner())
    _, msg = _fn(demo, "refresh_variants")("hubquant-org/no-such-model")
    assert msg.startswith("0 variant(s) of hubquant-org/no-such-model")
    _, msg = _fn(demo, "refresh_variants")("")
    assert msg == "Choose a base model."


def test_variants_are_listed_when_the_page_loads(hub_env, tmp_path):
    """The page's load event fills the base box and then the Variants box (no click on "Find variants")."""
    from hubquant.space_cli import load_app_module
    from tests.space.test_discover import _publish

    tag = uuid.uuid4().hex[:6]
    base = f"alice/base-{tag}"
    _publish(hub_env, tmp_path, base, base="none/none")
    _publish(hub_env, tmp_path, f"alice/v-{tag}", base=base)
    demo = load_app_module().build_app(default_base=base, on_space=False, job_runner=RecordingRunner())
    fns = {i: f for i, f in demo.fns.items() if f.fn is not None}
    on_load = [i for i, f in fns.items() if any(event == "load" for _, event in f.targets)]
    chained = [f for f in fns.values() if f.fn.__name__ == "refresh_variants" and f.trigger_after in on_load]
    assert len(on_load) == 1 and fns[on_load[0]].fn.__name__ == "base_choices" and len(chained) == 1
    dropdown = fns[on_load[0]].fn()
    boxes, msg = chained[0].fn(dropdown.value)
    assert dropdown.value == base and [v for _, v in boxes.choices] == [f"alice/v-{tag}"]
    assert msg.startswith(f"1 variant(s) of {base}")
