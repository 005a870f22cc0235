"""Talking to a Hub (the real one, a mirror, or `hubquant hub serve`) through huggingface_hub.

Every huggingface_hub error is translated into a hubquant error that names the fix; nothing here
prints or logs a token. Every HTTP call huggingface_hub makes for hubquant has connect and read timeouts
(`configure_http`): a Hub that does not answer ends in HubUnreachableError (exit 4), never a hang.

Timeouts (seconds): connect = $HUBQUANT_HUB_CONNECT_TIMEOUT, else huggingface_hub's HF_HUB_ETAG_TIMEOUT
(default 10); read = $HUBQUANT_HUB_READ_TIMEOUT, else HF_HUB_DOWNLOAD_TIMEOUT when set, else 60 (a large
commit can keep the Hub busy longer than huggingface_hub's 10 s download default). Calls where
huggingface_hub passes its own timeout (metadata HEAD, file downloads) keep it.
"""
from __future__ import annotations

import contextlib
import fnmatch
import json
import os
from dataclasses import dataclass
from pathlib import Path

import hubquant  # noqa: F401  (Hub environment before huggingface_hub is imported)
from hubquant.errors import (
    AuthError,
    ConflictError,
    CorruptFileError,
    HubUnreachableError,
    NotFoundError,
    UnsupportedError,
)
from hubquant.hub import trusted

# What a quantized variant needs from the base repo; nothing else is downloaded.
ALLOW_PATTERNS = (
    "*.safetensors", "*.safetensors.index.json", "config.json", "generation_config.json",
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
    "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
    "README.md", "LICENSE", "LICENSE.txt", "NOTICE",
    "preprocessor_config.json", "processor_config.json", "video_preprocessor_config.json",  # vision-language
)
PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")
PROVENANCE_FILE = "hubquant.json"
CONNECT_TIMEOUT_ENV = "HUBQUANT_HUB_CONNECT_TIMEOUT"
READ_TIMEOUT_ENV = "HUBQUANT_HUB_READ_TIMEOUT"
_http_configured = False


def timeouts() -> tuple[float, float]:
    """(connect, read) timeouts in seconds for Hub calls (see the module docstring)."""
    from huggingface_hub import constants

    def env(name: str) -> float | None:
        try:
            v = float(os.environ.get(name) or 0)
        except ValueError:
            return None
        return v if v > 0 else None

    connect = env(CONNECT_TIMEOUT_ENV) or env("HF_HUB_ETAG_TIMEOUT") or float(constants.HF_HUB_ETAG_TIMEOUT)
    read = env(READ_TIMEOUT_ENV) or env("HF_HUB_DOWNLOAD_TIMEOUT") or 60.0
    return connect, read


def configure_http() -> None:
    """Give every request of huggingface_hub's shared HTTP client connect/read timeouts. Idempotent.

    huggingface_hub passes `timeout=None` (no limit) explicitly on most API calls, which overrides a client
    default; a request hook fills every missing timeout on the request itself instead.
    """
    global _http_configured
    if _http_configured:
        return
    from huggingface_hub import set_client_factory
    from huggingface_hub.utils._http import default_client_factory

    def fill_timeouts(request) -> None:
        connect, read = timeouts()
        t = dict(request.extensions.get("timeout") or {})
        for k, v in (("connect", connect), ("read", read), ("write", read), ("pool", read)):
            if t.get(k) is None:
                t[k] = v
        request.extensions["timeout"] = t

    def factory():
        client = default_client_factory()
        client.event_hooks = {**client.event_hooks,
                              "request": [*client.event_hooks.get("request", []), fill_timeouts]}
        return client

    set_client_factory(factory)
    _http_configured = True


def _transport_error(e: BaseException) -> BaseException | None:
    """The network failure (refused, reset, timed out, DNS) behind `e`, if any, following the cause chain."""
    import httpx2

    seen = 0
    while e is not None and seen < 20:
        if isinstance(e, httpx2.TransportError | TimeoutError | ConnectionError) and not isinstance(
                e, HubUnreachableError):
            return e
        e, seen = e.__cause__ or e.__context__, seen + 1
    return None


def unreachable(cause: BaseException) -> HubUnreachableError:
    connect, read = timeouts()
    kind = "did not answer in time" if "timeout" in type(cause).__name__.lower() else "cannot be reached"
    return HubUnreachableError(
        f"the Hub at {endpoint()} {kind} ({type(cause).__name__})",
        hint=f"check HF_ENDPOINT and your network; timeouts are {connect:g} s to connect and {read:g} s to read "
             f"(set {CONNECT_TIMEOUT_ENV} / {READ_TIMEOUT_ENV} to change them)")


def api(token: str | None = None):
    """An HfApi for the configured endpoint (HF_ENDPOINT) and `token` (default: HF_TOKEN / login)."""
    from huggingface_hub import HfApi, constants

    configure_http()
    trusted.scoped_repo(token, constants.ENDPOINT)  # trusted publishing: exchange first, with hubquant's errors
    if "huggingface.co" not in constants.ENDPOINT:
        constants.HF_HUB_DISABLE_XET = True
    # the local Hub answers preupload with "lfs" only to clients that say they upload through the LFS batch API
    return HfApi(endpoint=constants.ENDPOINT, token=token, library_name="hubquant",
                 headers={"X-Hubquant-Transfer": "lfs"} if constants.HF_HUB_DISABLE_XET else None)


def endpoint() -> str:
    from huggingface_hub import constants

    configure_http()
    return constants.ENDPOINT


def token_rejected(token: str | None = None) -> bool:
    """Whether a token is set and the Hub refuses it (whoami answers 401)."""
    from huggingface_hub import errors as hf

    if not (token or _token()):
        return False
    try:
        api(token).whoami()
    except hf.HfHubHTTPError as e:
        return getattr(e.response, "status_code", None) == 401
    except Exception:  # noqa: BLE001 - a second failure (network...) says nothing about the token
        return False
    return False


def _rejected(token: str | None) -> AuthError:
    return AuthError(f"token rejected: the Hub at {endpoint()} does not accept your token (invalid or expired)",
                     hint="set HF_TOKEN to a valid token (or `hf auth login`), or unset it to read public repos")


@contextlib.contextmanager
def hub_errors(repo_id: str, *, revision: str | None = None, action: str = "read", token: str | None = None):
    """Translate huggingface_hub's typed errors (and network failures) into hubquant's, with the fix."""
    from huggingface_hub import errors as hf

    try:
        yield
    except hf.GatedRepoError as e:
        if token_rejected(token):
            raise _rejected(token) from e
        raise AuthError(f"{repo_id} is gated and your token has no access",
                        hint=f"request access on the model page, then set HF_TOKEN ({endpoint()}/{repo_id})") from e
    except hf.RevisionNotFoundError as e:
        raise NotFoundError(f"revision '{revision}' does not exist in {repo_id}",
                            hint="pass an existing branch, tag or commit sha to --revision") from e
    except hf.EntryNotFoundError as e:
        raise NotFoundError(f"a file is missing in {repo_id}: {e}", hint="check the repo's files") from e
    except hf.RepositoryNotFoundError as e:
        if token_rejected(token):
            raise _rejected(token) from e
        has_token = bool(token or _token())
        raise NotFoundError(
            f"repository {repo_id} not found" + ("" if has_token else " (or it is private and no token is set)"),
            hint="check the repo id" + ("" if has_token else ", or set HF_TOKEN to a token that can read it"),
        ) from e
    except hf.HfHubHTTPError as e:
        status = getattr(e.response, "status_code", None)
        if status in (401, 403):
            if token_rejected(token):
                raise _rejected(token) from e
            verb = "write to" if action == "write" else "read"
            raise AuthError(f"not allowed to {verb} {repo_id} (HTTP {status})",
                            hint="set HF_TOKEN to a token with write access to that namespace, or pass "
                                 "--target-repo in a namespace you own" if action == "write" else
                                 "set HF_TOKEN to a token that can read it") from e
        if status in (409, 412):
            raise ConflictError(f"{repo_id} changed while hubquant was writing (HTTP {status})",
                                hint="run the command again") from e
        cause = _transport_error(e)
        if cause is not None:
            raise unreachable(cause) from e
        raise
    except Exception as e:
        cause = _transport_error(e)
        if cause is not None:
            raise unreachable(cause) from e
        raise


def _token() -> str | None:
    from huggingface_hub import get_token

    return get_token()


@dataclass(frozen=True)
class Downloaded:
    repo_id: str
    sha: str
    path: Path
    files: tuple[str, ...]


def download_model(repo_id: str, *, revision: str | None = None, allow_pickle: bool = False,
                   trust_remote_code: bool = False, progress: bool = True, token: str | None = None) -> Downloaded:
    """Download what a variant needs (safetensors, config, tokenizer, card), pinned to the resolved sha.

    Raises:
        NotFoundError: repo/revision missing. AuthError: gated/private without access.
        UnsupportedError: only pickled weights (without allow_pickle), or remote code (without trust_remote_code).
        CorruptFileError: a safetensors shard does not parse.
    """
    from huggingface_hub import snapshot_download

    hf = api(token)
    with hub_errors(repo_id, revision=revision, token=token):
        info = hf.model_info(repo_id, revision=revision, files_metadata=False)
    files = tuple(s.rfilename for s in (info.siblings or []))
    has_st = any(f.endswith(".safetensors") for f in files)
    pickles = [f for f in files if any(fnmatch.fnmatch(f, p) for p in PICKLE_PATTERNS)]
    patterns = list(ALLOW_PATTERNS)
    if not has_st:
        if not pickles:
            raise NotFoundError(f"{repo_id} has no model weights (no .safetensors files)",
                                hint="pick a repo that ships safetensors weights")
        if not allow_pickle:
            raise UnsupportedError(
                f"{repo_id} ships only pickled weights ({pickles[0]}); loading them can execute code",
                hint="convert the base to safetensors first, or pass --allow-pickle if you trust this repo")
        patterns += list(PICKLE_PATTERNS)
    if not progress:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    with hub_errors(repo_id, revision=revision, token=token):
        path = Path(snapshot_download(repo_id, revision=info.sha, allow_patterns=patterns, endpoint=endpoint(),
                                      token=token))
    config = path / "config.json"
    if not config.is_file():
        raise NotFoundError(f"{repo_id} has no config.json", hint="hubquant needs a transformers model repo")
    cfg = json.loads(config.read_text())
    if cfg.get("auto_map") and not trust_remote_code:
        raise UnsupportedError(f"{repo_id} needs custom code from the repo to load (auto_map in config.json)",
                               hint="pass --trust-remote-code if you trust this repo's code")
    verify_safetensors(path)
    return Downloaded(repo_id=repo_id, sha=info.sha, path=path, files=files)


def verify_safetensors(path: Path) -> None:
    """Parse every shard's header and check its size, so a truncated file fails here, clearly."""
    from safetensors import safe_open

    for f in sorted(path.glob("*.safetensors")):
        try:
            with safe_open(str(f), framework="pt") as st:
                keys = list(st.keys())
                if keys:
                    st.get_slice(keys[-1])
            header_len = int.from_bytes(f.open("rb").read(8), "little")
            with f.open("rb") as fh:
                fh.seek(8)
                header = json.loads(fh.read(header_len))
            end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
            if f.stat().st_size < 8 + header_len + end:
                raise ValueError(f"file is {f.stat().st_size} bytes, header needs {8 + header_len + end}")
        except Exception as e:  # safetensors raises its own SafetensorError, json/ValueError...
            raise CorruptFileError(f"{f.name} is corrupt: {e}",
                                   hint="the shard in the repo is damaged; re-upload it (or clear the HF cache)") from e


def _whoami(token: str | None) -> dict:
    """whoami with the pipeline's errors: no token / rejected token (exit 3), a silent Hub (exit 4)."""
    from huggingface_hub import errors as hf_errors

    if not (token or _token()):
        raise AuthError("pushing needs a Hub token", hint="set HF_TOKEN (or run `hf auth login`)")
    try:
        return api(token).whoami()
    except hf_errors.HfHubHTTPError as e:
        if getattr(e.response, "status_code", None) == 401:
            raise _rejected(token) from e
        raise AuthError(f"the Hub refused whoami (HTTP {getattr(e.response, 'status_code', '?')})",
                        hint="set HF_TOKEN to a valid token") from e
    except Exception as e:
        cause = _transport_error(e)
        if cause is not None:
            raise unreachable(cause) from e
        raise


def whoami_name(token: str | None = None) -> str:
    return _whoami(token)["name"]


def scoped_target(token: str | None = None) -> str | None:
    """With trusted publishing (HF_OIDC_RESOURCE), the one repo the token may write to: the default target."""
    scoped = trusted.scoped_repo(token, endpoint())
    return scoped if scoped and "/" in scoped else None


def read_provenance(repo_id: str, token: str | None = None, revision: str | None = None) -> dict | None:
    """The target repo's hubquant.json (at `revision`), or None when the repo or the file does not exist."""
    from huggingface_hub import errors as hf
    from huggingface_hub import hf_hub_download

    trusted.scoped_repo(token, endpoint())
    try:
        with hub_errors(repo_id, token=token):
            try:
                p = hf_hub_download(repo_id, PROVENANCE_FILE, endpoint=endpoint(), token=token,
                                    revision=revision)
            except (hf.RepositoryNotFoundError, hf.EntryNotFoundError, hf.RevisionNotFoundError):
                return None
            except hf.HfHubHTTPError as e:
                if getattr(e.response, "status_code", None) in (401, 403, 404):
                    return None
                raise
    except NotFoundError:
        return None
    return json.loads(Path(p).read_text())


def repo_head(repo_id: str, token: str | None = None) -> str | None:
    from huggingface_hub import errors as hf

    try:
        with hub_errors(repo_id, token=token):
            try:
                return api(token).model_info(repo_id).sha
            except (hf.RepositoryNotFoundError, hf.RevisionNotFoundError):
                return None
    except NotFoundError:
        return None


def push_folder(folder: Path, repo_id: str, *, private: bool = False, message: str, description: str = "",
                parent_commit: str | None = None, token: str | None = None, files: list[str] | None = None) -> str:
    """Create `repo_id` if needed and push every file of `folder` (or only `files`, relative paths) in ONE
    commit. Returns the commit URL."""
    from huggingface_hub import CommitOperationAdd

    hf = api(token)
    paths = [folder / f for f in sorted(files)] if files is not None else sorted(folder.rglob("*"))
    ops = [CommitOperationAdd(path_in_repo=str(p.relative_to(folder)), path_or_fileobj=str(p))
           for p in paths if p.is_file()]
    with hub_errors(repo_id, action="write", token=token):
        if not trusted.scoped_repo(token, endpoint()):  # a trusted publisher's token cannot create repos
            hf.create_repo(repo_id, private=private, exist_ok=True)
        info = hf.create_commit(repo_id, ops, commit_message=message, commit_description=description,
                                parent_commit=parent_commit)
    return info.commit_url


def hub_url(repo_id: str) -> str:
    return f"{endpoint().rstrip('/')}/{repo_id}"


def env_summary(token: str | None = None) -> str:
    """Where we talk to, without secrets."""
    return f"endpoint {endpoint()}, token {'set' if token or _token() else 'not set'}" + (
        ", xet off" if os.environ.get("HF_HUB_DISABLE_XET") == "1" else "")


def download_file(repo_id: str, filename: str, *, revision: str | None = None, token: str | None = None) -> Path | None:
    """One file of a repo (e.g. config.json before the weights), or None when the repo has no such file."""
    from huggingface_hub import errors as hf
    from huggingface_hub import hf_hub_download

    trusted.scoped_repo(token, endpoint())
    with hub_errors(repo_id, revision=revision, token=token):
        try:
            return Path(hf_hub_download(repo_id, filename, revision=revision, endpoint=endpoint(), token=token))
        except hf.LocalEntryNotFoundError as e:  # the Hub did not answer and the file is not cached
            raise ConnectionError(f"{filename} of {repo_id}: the Hub did not answer") from e
        except hf.EntryNotFoundError:
            return None


def has_files(repo_id: str, token: str | None = None) -> bool:
    """Whether the repo holds any file besides .gitattributes."""
    try:
        files = api(token).list_repo_files(repo_id)
    except Exception:  # noqa: BLE001 - an unreadable repo has no files we could overwrite
        return False
    return any(f not in (".gitattributes",) for f in files)


def check_write_access(repo_id: str, token: str | None = None) -> None:
    """Refuse early when the token cannot write to `repo_id`'s namespace (read-only token, foreign namespace).

    Raises:
        AuthError: no token, a token the Hub rejects, or no write access to the namespace.
        HubUnreachableError: the Hub does not answer.
    """
    scoped = trusted.scoped_repo(token, endpoint())
    if scoped:  # a trusted publisher's token: one repo, whatever whoami says about the synthetic user
        trusted.check_target(repo_id, scoped)
        return
    me = _whoami(token)
    namespace = repo_id.split("/")[0]
    role = ((me.get("auth") or {}).get("accessToken") or {}).get("role")
    orgs = {o.get("name"): o.get("roleInOrg") for o in me.get("orgs") or []}
    fix = f"set HF_TOKEN to a token with write access to {namespace}, or pass --target-repo in a namespace you own"
    if role == "read":
        raise AuthError(f"not allowed to write to {repo_id}: the token is read-only", hint=fix)
    if namespace != me.get("name") and (namespace not in orgs or orgs[namespace] == "read"):
        raise AuthError(f"not allowed to write to {repo_id} (the token's user is {me.get('name')})", hint=fix)


def create_new_repo(repo_id: str, *, private: bool = False, token: str | None = None) -> str | None:
    """Create `repo_id`; returns its first commit, or None when the repo exists already (created meanwhile)."""
    from huggingface_hub import errors as hf

    hf_api = api(token)
    with hub_errors(repo_id, action="write", token=token):
        try:
            hf_api.create_repo(repo_id, private=private, exist_ok=False)
        except hf.HfHubHTTPError as e:
            if getattr(e.response, "status_code", None) == 409:
                return None
            raise
    return repo_head(repo_id, token)
