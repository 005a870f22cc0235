"""Trusted publishing (the Hub's OIDC token exchange) as hubquant uses it.

With `HF_OIDC_RESOURCE=ns/name` and no explicit token, huggingface_hub (>= 1.19, `_oidc.py` and
`utils/_auth.py:_get_token_from_oidc`) gets a token wherever one is needed: when `GITHUB_ACTIONS=true`, it asks
GitHub's runtime for an id token (`GET $ACTIONS_ID_TOKEN_REQUEST_URL&audience=<HF_ENDPOINT>` with
`Authorization: Bearer $ACTIONS_ID_TOKEN_REQUEST_TOKEN`, answer `{"value": JWT}`; elsewhere it takes
`HF_OIDC_ID_TOKEN`), exchanges it at `POST <HF_ENDPOINT>/oauth/token` (RFC 8693 JSON: grant_type token-exchange,
subject_token_type id_token, subject_token, resource) for `{"access_token", "expires_in", ...}` and caches it
until 5 minutes before it expires. The Hub's token may write to that one repo and nothing else (a bare user name
gives a read-only token), and cannot create repos: the repo exists, since its settings hold the publisher.

This module makes the exchange happen up front, with hubquant's errors (exit 3 and a fix) instead of a
huggingface_hub exception from the middle of a download, and tells the pipeline which repo the token is for.

One step it does itself: huggingface_hub 2.4 passes the audience as `params=`, and its HTTP client (httpx2)
then REPLACES the query of ACTIONS_ID_TOKEN_REQUEST_URL, dropping the `api-version=2.0` GitHub puts there
(GitHub's own toolkit appends `&audience=`). So in a GitHub job hubquant mints the id token as the toolkit does
and hands it to huggingface_hub as HF_OIDC_ID_TOKEN (in this process only), minting a fresh one when the last is
older than ID_TOKEN_REUSE_S, so that a re-exchange after the Hub token's hour still has a valid id token.
tests/hub/test_trusted_publishing.py checks that huggingface_hub still drops it.
"""
from __future__ import annotations

import os
import time
from urllib.parse import quote

from hubquant.errors import AuthError

RESOURCE_ENV = "HF_OIDC_RESOURCE"
ID_TOKEN_ENV = "HF_OIDC_ID_TOKEN"
ID_TOKEN_REUSE_S = 120  # GitHub's id tokens live about 5 minutes
_minted: dict[str, float] = {}  # the id token hubquant put into HF_OIDC_ID_TOKEN -> when


def github_id_token(audience: str) -> str:
    """An id token from GitHub's runtime, requested as @actions/core does (the URL as given + `&audience=`).

    Raises:
        AuthError: the job has no `id-token: write` permission, or GitHub refuses.
    """
    import httpx2

    url, bearer = os.environ.get("ACTIONS_ID_TOKEN_REQUEST_URL"), os.environ.get("ACTIONS_ID_TOKEN_REQUEST_TOKEN")
    if not url or not bearer:
        raise AuthError("trusted publishing: this GitHub job cannot request an OIDC id token",
                        hint="grant the job `permissions: id-token: write`")
    sep = "&" if "?" in url else "?"
    try:
        r = httpx2.get(f"{url}{sep}audience={quote(audience, safe='')}", timeout=30,
                       headers={"Authorization": f"Bearer {bearer}", "Accept": "application/json"})
        r.raise_for_status()
        return r.json()["value"]
    except (httpx2.HTTPError, ValueError, KeyError, TypeError) as e:
        status = getattr(getattr(e, "response", None), "status_code", type(e).__name__)
        raise AuthError(f"trusted publishing: GitHub's id-token endpoint failed ({status})",
                        hint="grant the job `permissions: id-token: write`, and run the step again") from None


def _provide_id_token(endpoint: str) -> None:
    """In a GitHub job, put a fresh id token for `endpoint` into HF_OIDC_ID_TOKEN (unless the user set one)."""
    current = os.environ.get(ID_TOKEN_ENV)
    if os.environ.get("GITHUB_ACTIONS") != "true" or (current and current not in _minted):
        return
    if current and time.monotonic() - _minted[current] < ID_TOKEN_REUSE_S:
        return
    token = github_id_token(endpoint)
    _minted.clear()
    _minted[token] = time.monotonic()
    os.environ[ID_TOKEN_ENV] = token
_TRUST_FIX = ("on the Hub, add a trusted publisher to {repo} (Settings > Trusted Publishers) whose claims "
              "(repository, workflow, ref) match this workflow exactly; the id token's audience must be {endpoint}")


def resource() -> str | None:
    """HF_OIDC_RESOURCE, or None when trusted publishing is off."""
    return (os.environ.get(RESOURCE_ENV) or "").strip() or None


def repo_of(res: str) -> str:
    """The model repo id a resource names (`ns/name` or `models/ns/name`)."""
    return res.removeprefix("models/")


def scoped_repo(token: str | None, endpoint: str) -> str | None:
    """The repo (or user) the Hub token is scoped to when trusted publishing is on (None when it is off, or when
    an explicit token is given, which huggingface_hub then sends instead). Exchanges now (huggingface_hub caches
    the result).

    Raises:
        AuthError: huggingface_hub cannot exchange (too old, no id token), or the CI or the Hub refuses.
    """
    res = resource()
    if token or not res:
        return None
    try:
        from huggingface_hub.errors import HfHubHTTPError, OIDCError
        from huggingface_hub.utils import get_token
    except ImportError as e:
        raise AuthError(f"{RESOURCE_ENV} is set but this huggingface_hub cannot exchange OIDC tokens",
                        hint="pip install -U 'huggingface_hub>=1.19', or set HF_TOKEN and unset "
                             f"{RESOURCE_ENV}") from e
    _provide_id_token(endpoint)
    try:
        get_token()
    except OIDCError as e:
        raise AuthError(f"trusted publishing: no OIDC id token to exchange ({str(e).splitlines()[0][:200]})",
                        hint="run in a GitHub Actions job with `permissions: id-token: write` (or set "
                             f"HF_OIDC_ID_TOKEN), or set HF_TOKEN and unset {RESOURCE_ENV}") from e
    except HfHubHTTPError as e:
        status = getattr(e.response, "status_code", "?")
        url = str(getattr(getattr(e.response, "request", None), "url", ""))
        if url.startswith(endpoint.rstrip("/") + "/oauth/token"):
            raise AuthError(f"trusted publishing: the Hub refused to exchange this job's OIDC token for {res} "
                            f"(HTTP {status}, {_oauth_error(e)})",
                            hint=_TRUST_FIX.format(repo=f"{endpoint}/{repo_of(res)}", endpoint=endpoint)) from e
        raise AuthError(f"trusted publishing: the CI's id-token endpoint refused (HTTP {status})",
                        hint="grant the job `permissions: id-token: write`") from e
    return repo_of(res)


def _oauth_error(e) -> str:
    try:
        return str(e.response.json().get("error") or "error")[:60]
    except Exception:  # noqa: BLE001 - a body that is not the OAuth error object
        return "error"


def check_target(repo_id: str, scoped: str) -> None:
    """A token scoped to `scoped` writes nowhere else: refuse any other target before converting."""
    if "/" not in scoped:
        raise AuthError(f"{RESOURCE_ENV}={scoped} names a user: the Hub's token for it is read-only",
                        hint=f"set {RESOURCE_ENV} (the action's oidc-resource) to the variant repo, NAMESPACE/NAME")
    if repo_id != scoped:
        raise AuthError(f"trusted publishing scopes the token to {scoped}, not {repo_id}",
                        hint=f"pass --target-repo {scoped}, or set {RESOURCE_ENV} (the action's oidc-resource) to "
                             f"{repo_id} and add the trusted publisher there")
