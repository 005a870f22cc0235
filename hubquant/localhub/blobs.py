"""Content-addressed blobs of the local Hub, and the uploads on their way in.

Layout under ROOT (all 0700 folders, 0600 files):
    blobs/ab/abcdef...      file contents, named by their sha256
    tmp/s-PID-XXXX/         one folder per live process: its partial uploads, and `.lock`, which the process
                            holds (flock) for as long as it lives

A blob is streamed into its process's tmp folder while hashed, fsynced, then renamed to its name, so a blob
under blobs/ is always whole. A process that dies (also by SIGKILL) releases its lock; the next server start
(`clean_tmp`) removes every tmp folder whose lock is free, and with it the crashed uploads. Folders of live
processes (another server, or a `LocalHub` on the same root) are left alone.
"""
from __future__ import annotations

import fcntl
import hashlib
import os
import re
import shutil
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path

from hubquant.errors import UsageError
from hubquant.localhub.db import private_dir

SHA256_RE = re.compile(r"\A[0-9a-f]{64}\Z")
CHUNK = 1 << 20
_SETUP_GRACE_S = 3600  # a `.new-` folder older than this was left by a crash during setup
_SESSIONS: dict[tuple[str, int], Path] = {}  # (tmp folder, pid) -> this process's locked upload folder
_SESSIONS_GUARD = threading.Lock()


class BlobStore:
    """Blobs under ROOT/blobs, partial uploads under ROOT/tmp (see the module docstring)."""

    def __init__(self, root: Path):
        self.blobs = private_dir(Path(root) / "blobs")
        self.tmp = private_dir(Path(root) / "tmp")
        self._session: Path | None = None

    def session_dir(self) -> Path:
        """This process's tmp folder (created, and locked, on first use; shared by every store of the root)."""
        key = (str(self.tmp.resolve()), os.getpid())
        with _SESSIONS_GUARD:
            if key not in _SESSIONS:
                tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
                new = private_dir(self.tmp / f".new-{tag}")
                fd = os.open(new / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
                fcntl.flock(fd, fcntl.LOCK_EX)  # held until the process ends (the fd is never closed)
                final = self.tmp / f"s-{tag}"
                os.rename(new, final)  # only now can a cleaner see it, already locked
                _SESSIONS[key] = final
            self._session = _SESSIONS[key]
            return self._session

    def clean_tmp(self) -> int:
        """Remove the partial uploads of processes that are gone; returns how many files were removed."""
        n = 0
        for p in self.tmp.iterdir():
            if p.is_dir() and p.name.startswith("s-"):
                if p in _SESSIONS.values():
                    continue
                try:
                    fd = os.open(p / ".lock", os.O_RDWR)
                except FileNotFoundError:
                    continue
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # a live process holds it
                try:
                    n += sum(1 for f in p.iterdir() if f.name != ".lock")
                    shutil.rmtree(p, ignore_errors=True)
                finally:
                    os.close(fd)
            elif p.is_dir():  # `.new-` folders: a crash between mkdir and rename
                if p.stat().st_mtime < time.time() - _SETUP_GRACE_S:
                    shutil.rmtree(p, ignore_errors=True)
            else:  # loose files of an older layout
                p.unlink(missing_ok=True)
                n += 1
        return n

    def blob_path(self, sha256: str) -> Path:
        return self.blobs / sha256[:2] / sha256

    def has_blob(self, sha256: str, size: int | None = None) -> bool:
        if not isinstance(sha256, str) or not SHA256_RE.match(sha256):
            return False
        p = self.blob_path(sha256)
        return p.is_file() and (size is None or p.stat().st_size == size)

    def open_upload(self) -> BlobWriter:
        """A writer that streams bytes to a temp file and files them under their sha256 on `finish()`."""
        return BlobWriter(self)

    def write_blob(
        self, chunks: Iterable[bytes], *, sha256: str | None = None, size: int | None = None
    ) -> tuple[str, int]:
        """Store bytes; returns (sha256, size). Raises UsageError if `sha256`/`size` are given and differ."""
        w = self.open_upload()
        try:
            for c in chunks:
                w.write(c)
            return w.finish(sha256=sha256, size=size)
        finally:
            w.abort()

    def add_local_file(self, path: str | os.PathLike) -> tuple[str, int]:
        """Store a local file's bytes (streamed)."""
        def chunks() -> Iterator[bytes]:
            with open(path, "rb") as f:
                while block := f.read(CHUNK):
                    yield block

        return self.write_blob(chunks())


class BlobWriter:
    """Streams bytes into this process's tmp folder while hashing; `finish()` renames the file to its name."""

    def __init__(self, store: BlobStore):
        self._store = store
        self._tmp = store.session_dir() / f"upload-{uuid.uuid4().hex}"
        self._f = os.fdopen(os.open(self._tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb")
        self._sha = hashlib.sha256()
        self.size = 0

    def write(self, chunk: bytes) -> None:
        self._f.write(chunk)
        self._sha.update(chunk)
        self.size += len(chunk)

    def finish(self, *, sha256: str | None = None, size: int | None = None) -> tuple[str, int]:
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        digest = self._sha.hexdigest()
        if (sha256 is not None and digest != sha256) or (size is not None and self.size != size):
            raise UsageError(
                f"uploaded bytes do not match: got sha256 {digest} size {self.size}, expected {sha256} size {size}",
                hint="upload the file again",
            )
        dest = self._store.blob_path(digest)
        private_dir(dest.parent)
        if dest.exists() and dest.stat().st_size == self.size:
            self._tmp.unlink()
        else:
            os.replace(self._tmp, dest)
        return digest, self.size

    def abort(self) -> None:
        if not self._f.closed:
            self._f.close()
        self._tmp.unlink(missing_ok=True)
