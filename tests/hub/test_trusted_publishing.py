"""Trusted publishing end to end with real parts: an OIDC issuer on loopback that mints RS256 id tokens the way
GitHub's runtime does (tests/hub/oidc_issuer.py), the local Hub's `POST /oauth/token` checking them against the
issuer's JWKS and the repo's trusted publisher, huggingface_hub's own exchange (`HF_OIDC_RESOURCE`), and
`hubquant convert --push` in a child process with no HF_TOKEN at all."""
from __future__ import annotations

import base64
import json
import os
import time
import uuid
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from hubquant.errors import AuthError
from tests.helpers import run_cli, save_tiny_repo
from tests.hub.oidc_issuer import GitHubIssuer, b64url

CI_REPO, WORKFLOW = "acme/models-ci", "convert.yml"


@pytest.fixture(autouse=True)
def _restore_environ():
    """hubquant.hub.trusted hands the id token it mints to huggingface_hub through os.environ (HF_OIDC_ID_TOKEN);
    monkeypatch restores only the variables a test set itself, so put the whole environment back after each test
    (a leaked token made a later test's action see an id token where it expected none)."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture
def trusted(local_hub):
    """(target repo, issuer): alice's empty repo that trusts acme/models-ci's convert.yml on main."""
    from huggingface_hub import HfApi

    repo = f"alice/tp-{uuid.uuid4().hex[:8]}"
    HfApi(endpoint=local_hub.endpoint, token=local_hub.token("alice")).create_repo(repo)
    with GitHubIssuer(repository=CI_REPO, workflow_file=WORKFLOW) as issuer:
        local_hub.hub.add_publisher(repo, issuer=issuer.url, claims={
            "repository": CI_REPO, "workflow": WORKFLOW, "ref": "refs/heads/main"})
        yield repo, issuer


def _exchange(endpoint: str, subject_token: str, resource: str) -> httpx.Response:
    """The request huggingface_hub's `_oidc.exchange_oidc_token` sends (asserted equal below)."""
    return httpx.post(f"{endpoint}/oauth/token", timeout=30, json={
        "grant_type": "urn:ietf:params:oauth:grant-type:token-exchange",
        "subject_token_type": "urn:ietf:params:oauth:token-type:id_token",
        "subject_token": subject_token, "resource": resource})


def _reasons(local_hub) -> str:
    return (local_hub.root / "server.log").read_text()


def test_the_exchange_gives_a_token_for_that_one_repo(local_hub, trusted, tmp_path):
    from huggingface_hub import HfApi
    from huggingface_hub._oidc import exchange_oidc_token
    from huggingface_hub.errors import HfHubHTTPError

    repo, issuer = trusted
    answer = exchange_oidc_token(subject_token=issuer.mint(local_hub.endpoint), resource=repo,
                                 endpoint=local_hub.endpoint)  # huggingface_hub's own request
    assert answer["token_type"] == "bearer" and answer["expires_in"] == 3600
    assert answer["issued_token_type"] == "urn:ietf:params:oauth:token-type:access_token"
    scoped = HfApi(endpoint=local_hub.endpoint, token=answer["access_token"])
    (tmp_path / "f.txt").write_text("from CI\n")
    scoped.upload_file(path_or_fileobj=str(tmp_path / "f.txt"), path_in_repo="f.txt", repo_id=repo)
    assert [c.authors for c in scoped.list_repo_commits(repo)][0] == [f"[OIDC]:{repo}"]
    assert scoped.whoami()["auth"]["accessToken"]["fineGrained"]["scoped"][0]["entity"]["name"] == repo
    other = f"alice/tp-other-{uuid.uuid4().hex[:6]}"
    HfApi(endpoint=local_hub.endpoint, token=local_hub.token("alice")).create_repo(other)
    for call in (lambda: scoped.upload_file(path_or_fileobj=b"x", path_in_repo="x", repo_id=other),
                 lambda: scoped.create_repo(f"alice/tp-new-{uuid.uuid4().hex[:6]}"),
                 lambda: scoped.delete_repo(repo),
                 lambda: scoped.update_repo_settings(repo, private=True)):
        with pytest.raises(HfHubHTTPError) as e:
            call()
        assert e.value.response.status_code == 403
    assert scoped.file_exists(repo, "f.txt")  # the repo is still there, public
    # the same request by hand: a user name or a malformed resource is not a repo publisher's
    assert _exchange(local_hub.endpoint, issuer.mint(local_hub.endpoint), "alice").json()["error"] == "invalid_request"


def _no_alg_token(issuer, audience: str) -> str:
    head = b64url(json.dumps({"alg": "none", "kid": issuer.kid}).encode())
    return f"{head}.{b64url(json.dumps(issuer.claims(audience)).encode())}."


REFUSALS = {  # case -> (how the token differs, the reason the Hub logs)
    "foreign-repository": ({"repository": "mallory/models-ci", "sub": "repo:mallory/models-ci:ref:refs/heads/main"},
                           "claims match no trusted publisher"),
    "other-workflow": ({"workflow_ref": f"{CI_REPO}/.github/workflows/other.yml@refs/heads/main"},
                       "claims match no trusted publisher"),
    "other-branch": ({"ref": "refs/heads/main-backup"}, "claims match no trusted publisher"),
    "audience": ({"aud": "https://huggingface.co"}, "audience"),
    "expired": ({"iat": int(time.time()) - 900, "nbf": int(time.time()) - 900, "exp": int(time.time()) - 600},
                "expired"),
    "foreign-key": ("sign_with", "bad signature"),
    "alg-none": ("alg_none", "algorithm 'none' is not RS256"),
    "unknown-issuer": ({"iss": "https://token.actions.githubusercontent.com"}, "no trusted publisher with issuer"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refused_tokens_get_invalid_grant(local_hub, trusted, case):
    repo, issuer = trusted
    change, reason = REFUSALS[case]
    if change == "sign_with":
        issuer.sign_with = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        token = issuer.mint(local_hub.endpoint)
    elif change == "alg_none":
        token = _no_alg_token(issuer, local_hub.endpoint)
    else:
        issuer.overrides = change
        token = issuer.mint(local_hub.endpoint)
    r = _exchange(local_hub.endpoint, token, repo)
    assert r.status_code == 400 and r.json()["error"] == "invalid_grant", r.text
    assert "access_token" not in r.text
    assert f"refused a token exchange for {repo}: {reason}" in _reasons(local_hub)
    issuer.overrides, issuer.sign_with = {}, None  # the control: the same publisher accepts a right token
    assert _exchange(local_hub.endpoint, issuer.mint(local_hub.endpoint), repo).status_code == 200


def test_huggingface_hub_still_drops_githubs_api_version(trusted, monkeypatch):
    """Why hubquant mints GitHub's id token itself (hubquant/hub/trusted.py): huggingface_hub passes the audience as
    `params=`, which replaces the `?api-version=2.0` of ACTIONS_ID_TOKEN_REQUEST_URL. When this fails, upstream
    keeps the query and hubquant's own minting can go."""
    from huggingface_hub._oidc import get_oidc_token
    from huggingface_hub.errors import HfHubHTTPError

    _, issuer = trusted
    for k, v in issuer.env().items():
        monkeypatch.setenv(k, v)
    with pytest.raises(HfHubHTTPError):
        get_oidc_token(provider="github", audience="http://hub.test")
    assert issuer.requests[-1][0] == "/_apis/token?audience=http%3A%2F%2Fhub.test"


def test_a_token_expires(local_hub, trusted):
    repo, _ = trusted
    token = local_hub.hub.store.add_repo_token(repo, ttl=-1, issuer="x", subject="y")
    r = httpx.get(f"{local_hub.endpoint}/api/whoami-v2", headers={"Authorization": f"Bearer {token}"}, timeout=30)
    assert r.status_code == 401


@pytest.fixture
def base_model(local_hub, tokenizer, tmp_path):
    from huggingface_hub import HfApi

    repo = f"hubquant-org/tp-base-{uuid.uuid4().hex[:8]}"
    folder = save_tiny_repo(tmp_path / "base", "llama", tokenizer)  # hidden 128: W8A16 groups of 128
    api = HfApi(endpoint=local_hub.endpoint, token=local_hub.token("alice"))
    api.create_repo(repo)
    api.upload_folder(repo_id=repo, folder_path=str(folder), commit_message="tiny model")
    return repo


def _ci_env(local_hub, issuer, resource: str, tmp_path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_ID_TOKEN",
                                                            "HUBQUANT_DEBUG", "HF_HUB_OFFLINE")}
    return {**env, **issuer.env(), "HF_OIDC_RESOURCE": resource, "HF_ENDPOINT": local_hub.endpoint,
            "HF_HUB_DISABLE_XET": "1", "HF_HOME": str(tmp_path / "hf"), "OMP_NUM_THREADS": "1"}


def _commits(local_hub, repo: str) -> list[str]:
    from huggingface_hub import HfApi

    return [c.title for c in HfApi(endpoint=local_hub.endpoint, token=local_hub.token("alice")).list_repo_commits(repo)]


def test_convert_pushes_with_only_the_ci_identity(local_hub, trusted, base_model, tmp_path):
    repo, issuer = trusted
    before = _commits(local_hub, repo)
    r = run_cli(["convert", base_model, "--method", "rtn", "--scheme", "W8A16", "--skip-eval", "--push"],
                _ci_env(local_hub, issuer, repo, tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    after = _commits(local_hub, repo)
    assert len(after) == len(before) + 1 and after[0].startswith(f"hubquant: W8A16-G128 rtn of {base_model}@")
    from huggingface_hub import HfApi

    files = HfApi(endpoint=local_hub.endpoint, token=local_hub.token("alice")).list_repo_files(repo)
    assert {"hubquant.json", "config.json", "model.safetensors", "README.md"} <= set(files)
    # GitHub's runtime was asked for a token with the Hub as audience, with the request token
    mints = [(p, a) for p, a in issuer.requests if p.startswith("/_apis/token")]
    assert mints and all(a == f"Bearer {issuer.request_token}" for _, a in mints)
    assert all(parse_qs(urlsplit(p).query) == {"api-version": ["2.0"], "audience": [local_hub.endpoint]}
               for p, _ in mints)
    out = r.stdout + r.stderr
    assert "hf_jwt_" not in out and not any(t in out for t in issuer.minted)  # no token printed


@pytest.mark.parametrize("case", ["foreign-repository", "audience", "expired"])
def test_convert_refused_exchange_exits_3_and_pushes_nothing(local_hub, trusted, base_model, tmp_path, case):
    repo, issuer = trusted
    issuer.overrides = REFUSALS[case][0]
    before = _commits(local_hub, repo)
    r = run_cli(["convert", base_model, "--method", "rtn", "--scheme", "W8A16", "--skip-eval", "--push"],
                _ci_env(local_hub, issuer, repo, tmp_path))
    assert r.returncode == 3, r.stderr[-3000:]
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert "Traceback" not in r.stderr and len(lines) == 2, r.stderr
    assert lines[0].startswith("error: trusted publishing: the Hub refused") and "invalid_grant" in lines[0]
    assert lines[1].startswith("  fix: ") and "trusted publisher" in lines[1] and repo in lines[1]
    assert _commits(local_hub, repo) == before
    out = r.stdout + r.stderr
    assert "hf_jwt_" not in out and not any(t in out for t in issuer.minted)


def test_convert_refuses_a_target_outside_the_tokens_repo(local_hub, trusted, base_model, tmp_path):
    repo, issuer = trusted
    other = f"alice/tp-elsewhere-{uuid.uuid4().hex[:6]}"
    r = run_cli(["convert", base_model, "--method", "rtn", "--scheme", "W8A16", "--skip-eval", "--push",
                 "--target-repo", other], _ci_env(local_hub, issuer, repo, tmp_path))
    assert r.returncode == 3, r.stderr[-3000:]
    assert f"scopes the token to {repo}, not {other}" in r.stderr and f"--target-repo {repo}" in r.stderr
    assert len(_commits(local_hub, repo)) == 1  # only the commit that created it


def test_the_action_publishes_with_oidc_resource_only(local_hub, trusted, base_model, tmp_path, monkeypatch):
    from tests.service.test_action import run_action

    repo, issuer = trusted
    for k, v in {**issuer.env(), "HF_HOME": str(tmp_path / "hf"), "HF_HUB_DISABLE_XET": "1"}.items():
        monkeypatch.setenv(k, v)
    for k in ("HF_TOKEN", "HF_OIDC_ID_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(k, raising=False)
    inputs = {"hf-token": "", "oidc-resource": repo, "hf-endpoint": local_hub.endpoint, "models": base_model,
              "methods": "rtn", "schemes": "W8A16", "install": "false", "options": "skip_eval=true\n"}
    code, out, summary, log = run_action(inputs, tmp_path / "run")
    assert code == 0 and (out["converted"], out["failed"], out["exit-code"]) == ("1", "0", "0"), log[-3000:]
    commits = _commits(local_hub, repo)
    assert len(commits) == 2 and commits[0].startswith(f"hubquant: W8A16 rtn of {base_model}@")
    assert "hf_jwt_" not in log + summary and not any(t in log + summary for t in issuer.minted)


def test_github_id_tokens_are_minted_fresh_and_a_users_own_is_kept(trusted, monkeypatch):
    from hubquant.hub import trusted as tp

    _, issuer = trusted
    for k, v in issuer.env().items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv(tp.ID_TOKEN_ENV, raising=False)
    monkeypatch.setattr(tp, "_minted", {})
    tp._provide_id_token("http://hub.test")
    tp._provide_id_token("http://hub.test")  # young enough: reused
    assert issuer.minted == [os.environ[tp.ID_TOKEN_ENV]]
    tp._minted[issuer.minted[0]] -= tp.ID_TOKEN_REUSE_S + 1
    tp._provide_id_token("http://hub.test")
    assert len(issuer.minted) == 2 and os.environ[tp.ID_TOKEN_ENV] == issuer.minted[1]
    assert json.loads(base64.urlsafe_b64decode(issuer.minted[1].split(".")[1] + "=="))["aud"] == "http://hub.test"
    monkeypatch.setenv(tp.ID_TOKEN_ENV, "a-token-the-user-minted")  # e.g. GitLab's id_tokens: never replaced
    tp._provide_id_token("http://hub.test")
    assert os.environ[tp.ID_TOKEN_ENV] == "a-token-the-user-minted" and len(issuer.minted) == 2
    monkeypatch.delenv("ACTIONS_ID_TOKEN_REQUEST_TOKEN")
    monkeypatch.delenv(tp.ID_TOKEN_ENV)
    with pytest.raises(AuthError, match="cannot request an OIDC id token") as e:
        tp._provide_id_token("http://hub.test")
    assert "id-token: write" in e.value.hint
