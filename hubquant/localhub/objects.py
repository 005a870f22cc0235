"""The local Hub's vocabulary: object ids as git and git-lfs compute them, the Hub's LFS rule, repo ids and
paths, the records the store returns, and its errors. Pure functions and frozen dataclasses, no I/O."""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from datetime import datetime, timezone

from hubquant.errors import ConflictError, NotFoundError, UsageError

REPO_TYPES = ("model", "dataset", "space")
GATED_MODES = ("auto", "manual")
NAME_RE = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9._-]{0,95}\Z")  # \Z: "$" would accept a trailing newline
PR_REF_RE = re.compile(r"\Arefs/pr/([1-9][0-9]*)\Z")
_BAD_REF = re.compile(r"[\x00-\x20\x7f~^:?*\[\\]|\.\.|@\{|//")
_BAD_PATH_CHAR = re.compile(r"[\x00-\x1f\x7f\\]")  # control characters and backslashes
MAX_PATH_BYTES = 4096

# Files the real Hub stores with LFS whatever their size (its default .gitattributes, abridged).
LFS_SUFFIXES = (
    ".7z", ".arrow", ".bin", ".bz2", ".ckpt", ".ftz", ".gguf", ".gz", ".h5", ".joblib", ".mlmodel", ".model",
    ".msgpack", ".npy", ".npz", ".onnx", ".ot", ".parquet", ".pb", ".pickle", ".pkl", ".pt", ".pth", ".rar",
    ".safetensors", ".tar", ".tflite", ".tgz", ".wasm", ".xz", ".zip", ".zst",
)
LFS_MIN_SIZE = 10 * 1024 * 1024  # the real Hub: regular files up to 10 MB

DEFAULT_GITATTRIBUTES = "".join(
    f"*{s} filter=lfs diff=lfs merge=lfs -text\n" for s in LFS_SUFFIXES
) + "*tfevents* filter=lfs diff=lfs merge=lfs -text\n"


class RepoNotFound(NotFoundError):
    """The repo does not exist (or the caller may not know that it does)."""


class RevisionNotFound(NotFoundError):
    """The repo exists; the branch or commit does not."""


class EntryNotFound(NotFoundError):
    """The revision exists; the file does not."""


class CommitConflict(ConflictError):
    """`parentCommit` is not the branch's head any more."""


def now_iso() -> str:
    """The current UTC time as the Hub writes it (`2026-11-27T10:24:48.000Z`)."""
    t = datetime.now(timezone.utc)
    return t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{t.microsecond // 1000:03d}Z"


def git_blob_oid(data: bytes) -> str:
    """The git object id (sha1 of `blob <len>\\0<data>`) that the Hub reports for a regular file."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    """The git-lfs pointer file that git stores in place of an LFS file."""
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def wants_lfs(path: str, size: int, sample: bytes = b"") -> bool:
    """Whether the real Hub would store this file with LFS: large, a binary suffix, or binary content."""
    return size >= LFS_MIN_SIZE or path.lower().endswith(LFS_SUFFIXES) or b"\0" in sample


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def split_repo_id(repo_id: str) -> tuple[str, str]:
    """`ns/name` -> (ns, name); raises UsageError for anything else."""
    parts = repo_id.split("/") if isinstance(repo_id, str) else []
    if len(parts) != 2 or not all(NAME_RE.match(p) for p in parts) or parts[1].endswith((".git", "..")):
        raise UsageError(f"invalid repo id {repo_id!r}", hint="use NAMESPACE/NAME (letters, digits, . _ -)")
    return parts[0], parts[1]


@dataclass(frozen=True, kw_only=True)
class Principal:
    """Who a token belongs to and what it may do."""

    user: str
    orgs: tuple[str, ...] = ()
    write: bool = True
    repo: int | None = None  # a trusted publisher's token: this repo (its id) only

    def member_of(self, namespace: str) -> bool:
        return self.repo is None and (namespace == self.user or namespace in self.orgs)

    def holds(self, repo: Repo) -> bool:
        """Whether the token may read everything of `repo` (a member of its namespace, or scoped to it)."""
        return self.member_of(repo.namespace) or self.repo == repo.id

    def can_write_repo(self, repo: Repo) -> bool:
        return self.write and (self.repo == repo.id if self.repo is not None else self.member_of(repo.namespace))

    def can_write(self, namespace: str) -> bool:
        return self.write and self.member_of(namespace)


@dataclass(frozen=True, kw_only=True)
class Repo:
    id: int
    uid: str
    type: str
    namespace: str
    name: str
    private: bool
    gated: str | None
    created_at: str
    last_modified: str
    downloads: int
    likes: int

    @property
    def repo_id(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True, kw_only=True)
class FileEntry:
    path: str
    sha256: str
    size: int
    lfs: bool
    git_oid: str  # sha1 of the git blob: the content for regular files, the LFS pointer for LFS files

    @property
    def pointer_size(self) -> int:
        return len(lfs_pointer(self.sha256, self.size))


@dataclass(frozen=True, kw_only=True)
class Commit:
    oid: str
    parent: str | None
    title: str
    message: str
    author: str
    created_at: str


@dataclass(frozen=True, kw_only=True)
class Discussion:
    """A discussion or pull request. A pull request's commits live on `refs/pr/{num}`, which started at
    `start` (a commit of `base`, the branch it targets)."""

    num: int
    title: str
    description: str
    author: str
    is_pull_request: bool
    status: str  # "draft" | "open" | "closed" | "merged"
    created_at: str
    base: str | None
    start: str | None

    @property
    def git_ref(self) -> str | None:
        return f"refs/pr/{self.num}" if self.is_pull_request else None


@dataclass(frozen=True, kw_only=True)
class AddFile:
    """Put the blob `sha256` at `path` (the blob must already be stored)."""

    path: str
    sha256: str
    size: int
    lfs: bool
    git_oid: str


@dataclass(frozen=True, kw_only=True)
class DeletePath:
    """Remove a file, or with `folder=True` everything under `path/`."""

    path: str
    folder: bool = False


def check_ref_name(name: str, kind: str) -> str:
    """A branch or tag name git would accept, outside the `refs/` namespace the Hub keeps for itself.

    Raises:
        UsageError: the name is not a valid git ref name, or starts with `refs/` (e.g. `refs/pr/5`).
    """
    parts = name.split("/")
    if (not name or len(name) > 200 or name == "@" or _BAD_REF.search(name) or name.endswith((".lock", "."))
            or any(not p or p.startswith(".") for p in parts) or name.startswith("-") or parts[0] == "refs"):
        raise UsageError(f"invalid {kind} name {name!r}",
                         hint="use letters, digits, '.', '_', '-' or '/' (not starting with 'refs/')")
    return name


def check_path(path: str) -> str:
    """A file path inside a repo that git and the Hub accept.

    Raises:
        UsageError: empty, absolute, `.`/`..`/empty parts, under `.git/`, a control character (NUL, newline...)
            or a backslash, or longer than 4096 bytes in UTF-8.
    """
    if not isinstance(path, str):
        raise UsageError(f"invalid path in repo {path!r}", hint="paths are strings")
    parts = path.split("/")
    if not path or path.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise UsageError(f"invalid path in repo {path!r}", hint="use a relative path without '..' or empty parts")
    if _BAD_PATH_CHAR.search(path):
        raise UsageError(f"invalid path in repo {path[:200]!r}",
                         hint="paths may not hold control characters (NUL, newline, tab...) or backslashes")
    if len(path.encode("utf-8", "surrogatepass")) > MAX_PATH_BYTES:
        raise UsageError(f"path in repo is longer than {MAX_PATH_BYTES} bytes ({path[:60]!r}...)",
                         hint="use a shorter path")
    if parts[0] == ".git":
        raise UsageError(f"invalid path in repo {path!r}", hint="paths under .git/ are reserved")
    return path


def check_no_file_dir_clash(files: dict) -> None:
    dirs = {p.rsplit("/", 1)[0] for p in files if "/" in p}
    expanded = set()
    for d in dirs:
        parts = d.split("/")
        expanded.update("/".join(parts[: i + 1]) for i in range(len(parts)))
    clash = expanded.intersection(files)
    if clash:
        raise UsageError(f"{sorted(clash)[0]} would be both a file and a folder", hint="rename one of them")
