"""Talking to a Hub (the real one, a mirror, or `hubquant hub serve`) through huggingface_hub.

Every huggingface_hub error is translated into a hubquant error that names the fix; nothing here
prints or logs a token.
"""
from __future__ import annotations

import contextlib
import fnmatch
import json
import os
from dataclasses import dataclass
from pathlib import Path

import hubquant  # noqa: F401  (Hub environment before huggingface_hub is imported)
from hubquant.errors import AuthError, ConflictError, CorruptFileError, NotFoundError, UnsupportedError

# What a quantized variant needs from the base repo; nothing else is downloaded.
ALLOW_PATTERNS = (
    "*.safetensors", "*.safetensors.index.json", "config.json", "generation_config.json",
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
    "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
    "README.md", "LICENSE", "LICENSE.txt", "NOTICE",
)
PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")
PROVENANCE_FILE = "hubquant.json"


def api(token: str | None = None):
    """An HfApi for the configured endpoint (HF_ENDPOINT) and `token` (default: HF_TOKEN / login)."""
    from huggingface_hub import HfApi, constants

    if "huggingface.co" not in constants.ENDPOINT:
        constants.HF_HUB_DISABLE_XET = True
    # the local Hub answers preupload with "lfs" only to clients that say they upload through the LFS batch API
    return HfApi(endpoint=constants.ENDPOINT, token=token, library_name="hubquant",
                 headers={"X-Hubquant-Transfer": "lfs"} if constants.HF_HUB_DISABLE_XET else None)


def endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


@contextlib.contextmanager
def hub_errors(repo_id: str, *, revision: str | None = None, action: str = "read", token: str | None = None):
    """Translate huggingface_hub's typed errors into hubquant's, with the fix."""
    from huggingface_hub import errors as hf

    try:
        yield
    except hf.GatedRepoError as e:
        raise AuthError(f"{repo_id} is gated and your token has no access",
                        hint=f"request access on the model page, then set HF_TOKEN ({endpoint()}/{repo_id})") from e
    except hf.RevisionNotFoundError as e:
        raise NotFoundError(f"revision '{revision}' does not exist in {repo_id}",
                            hint="pass an existing branch, tag or commit sha to --revision") from e
    except hf.EntryNotFoundError as e:
        raise NotFoundError(f"a file is missing in {repo_id}: {e}", hint="check the repo's files") from e
    except hf.RepositoryNotFoundError as e:
        has_token = bool(token or _token())
        raise NotFoundError(
            f"repository {repo_id} not found" + ("" if has_token else " (or it is private and no token is set)"),
            hint="check the repo id" + ("" if has_token else ", or set HF_TOKEN to a token that can read it"),
        ) from e
    except hf.HfHubHTTPError as e:
        status = getattr(e.response, "status_code", None)
        if status in (401, 403):
            verb = "write to" if action == "write" else "read"
            raise AuthError(f"not allowed to {verb} {repo_id} (HTTP {status})",
                            hint="set HF_TOKEN to a token with write access to that namespace, or pass "
                                 "--target-repo in a namespace you own" if action == "write" else
                                 "set HF_TOKEN to a token that can read it") from e
        if status in (409, 412):
            raise ConflictError(f"{repo_id} changed while hubquant was writing (HTTP {status})",
                                hint="run the command again") from e
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


def whoami_name(token: str | None = None) -> str:
    hf = api(token)
    if not (token or _token()):
        raise AuthError("pushing needs a Hub token", hint="set HF_TOKEN (or run `hf auth login`)")
    from huggingface_hub import errors as hf_errors

    try:
        return hf.whoami()["name"]
    except hf_errors.HfHubHTTPError as e:
        raise AuthError("the Hub rejected your token", hint="set HF_TOKEN to a valid token") from e


def read_provenance(repo_id: str, token: str | None = None) -> dict | None:
    """The target repo's hubquant.json, or None when the repo or the file does not exist."""
    from huggingface_hub import errors as hf
    from huggingface_hub import hf_hub_download

    try:
        p = hf_hub_download(repo_id, PROVENANCE_FILE, endpoint=endpoint(), token=token)
    except (hf.RepositoryNotFoundError, hf.EntryNotFoundError, hf.RevisionNotFoundError):
        return None
    except hf.HfHubHTTPError as e:
        if getattr(e.response, "status_code", None) in (401, 403, 404):
            return None
        raise
    return json.loads(Path(p).read_text())


def repo_head(repo_id: str, token: str | None = None) -> str | None:
    from huggingface_hub import errors as hf

    try:
        return api(token).model_info(repo_id).sha
    except (hf.RepositoryNotFoundError, hf.RevisionNotFoundError):
        return None


def push_folder(folder: Path, repo_id: str, *, private: bool = False, message: str, description: str = "",
                parent_commit: str | None = None, token: str | None = None) -> str:
    """Create `repo_id` if needed and push every file of `folder` in ONE commit. Returns the commit URL."""
    from huggingface_hub import CommitOperationAdd

    hf = api(token)
    ops = [CommitOperationAdd(path_in_repo=str(p.relative_to(folder)), path_or_fileobj=str(p))
           for p in sorted(folder.rglob("*")) if p.is_file()]
    with hub_errors(repo_id, action="write", token=token):
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
