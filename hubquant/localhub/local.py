"""`LocalHub`: the Python face of the local Hub for tests, demos and other parts of hubquant.

    hub = LocalHub(root)
    token = hub.add_token("alice", orgs=["hubquant-org"])
    hub.seed_smollm2()
    with hub.serve() as url:            # uvicorn in a background thread on a free loopback port
        os.environ["HF_ENDPOINT"] = url
"""
from __future__ import annotations

import hashlib
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from hubquant.errors import UsageError
from hubquant.localhub.store import (
    AddFile,
    DeletePath,
    Store,
    git_blob_oid,
    lfs_pointer,
    wants_lfs,
)


class LocalHub:
    """A local Hub rooted at a folder (created if missing). Everything persists under `root`."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.store = Store(self.root)

    def add_token(self, user: str, *, orgs: list[str] | tuple[str, ...] = (), write: bool = True) -> str:
        """A new token for `user`, with write access to `user` and `orgs` unless `write=False`."""
        return self.store.add_token(user, orgs=orgs, write=write)

    def set_gated(self, repo_id: str, gated: str | bool = "manual", *, repo_type: str = "model") -> None:
        """Gate (`"auto"`/`"manual"`/True) or ungate (False) a repo: downloads then need access."""
        self.store.set_gated(repo_id, gated, repo_type)

    def grant_access(self, repo_id: str, user: str, *, repo_type: str = "model") -> None:
        """Let `user` download from a gated repo."""
        self.store.grant_access(repo_id, user, repo_type)

    def add_publisher(self, repo_id: str, *, issuer: str, claims: dict[str, str], repo_type: str = "model") -> None:
        """Trust `issuer`'s OIDC id tokens with these exact claims (e.g. {"repository": "acme/ci",
        "workflow": "convert.yml"}) to write to the repo (`POST /oauth/token`, see localhub/oidc.py)."""
        self.store.add_publisher(repo_id, repo_type, issuer=issuer, claims=claims)

    def set_private(self, repo_id: str, private: bool = True, *, repo_type: str = "model") -> None:
        self.store.set_private(repo_id, private, repo_type)

    def publish_folder(
        self,
        repo_id: str,
        folder: str | os.PathLike,
        *,
        message: str | None = None,
        author: str = "hubquant",
        repo_type: str = "model",
        private: bool = False,
        delete_missing: bool = False,
    ) -> str:
        """Commit every file of `folder` to `repo_id` (created if needed) directly through the store.

        Idempotent: when the repo already holds the same bytes at the same paths, no commit is made.

        Returns:
            The head commit sha after publishing.

        Raises:
            UsageError: `folder` is not a folder.
        """
        folder = Path(folder)
        if not folder.is_dir():
            raise UsageError(f"{folder} is not a folder", hint="pass the folder that holds the model files")
        repo, _ = self.store.create_repo(repo_id, repo_type, private=private, author=author)
        head = self.store.resolve(repo, "main")
        current = self.store.files(head)
        ops: list[AddFile | DeletePath] = []
        local = sorted(p for p in folder.rglob("*") if p.is_file() and ".git" not in p.relative_to(folder).parts)
        for p in local:
            rel = p.relative_to(folder).as_posix()
            sha256, size = _sha256_of(p), p.stat().st_size
            old = current.get(rel)
            if old is not None and old.sha256 == sha256:
                continue
            if not self.store.has_blob(sha256, size):
                sha256, size = self.store.add_local_file(p)
            with open(p, "rb") as f:
                sample = f.read(512)
            lfs = wants_lfs(rel, size, sample)
            git_oid = git_blob_oid(lfs_pointer(sha256, size)) if lfs else git_blob_oid(p.read_bytes())
            ops.append(AddFile(path=rel, sha256=sha256, size=size, lfs=lfs, git_oid=git_oid))
        if delete_missing:
            names = {p.relative_to(folder).as_posix() for p in local}
            ops += [DeletePath(path=k) for k in current if k not in names and k != ".gitattributes"]
        if not ops:
            return head
        return self.store.commit(
            repo, ops, title=message or f"Upload {len(ops)} files", author=author, parent=head,
        )

    def seed_smollm2(self) -> str:
        """Publish SmolLM2-135M-Instruct (hubquant.assets) as HuggingFaceTB/SmolLM2-135M-Instruct."""
        from hubquant.localhub.seed import seed_smollm2

        return seed_smollm2(self)

    @contextmanager
    def serve(self, *, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
        """Run the HTTP server in a background thread; yields its URL (port 0 picks a free one)."""
        import uvicorn

        from hubquant.localhub.app import create_app
        from hubquant.localhub.serving import uvicorn_config

        sock = bind_socket(host, port)
        server = uvicorn.Server(uvicorn_config(create_app(self.root), lifespan="off"))
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True, name="local-hub")
        thread.start()
        t0 = time.monotonic()
        while not server.started:
            if not thread.is_alive() or time.monotonic() - t0 > 30:
                raise RuntimeError("the local Hub did not start")
            time.sleep(0.02)
        try:
            yield url_of(sock)
        finally:
            server.should_exit = True
            thread.join(timeout=10)
            sock.close()


def _sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket (port 0 = a free port chosen by the OS)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
