"""Helpers for the service tests: Hub webhook payloads, servers on free loopback ports, commit counts."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

REPO_ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def webhook_payload(repo_id: str, sha: str | None, *, scope: str = "repo.content", action: str = "update",
                    repo_type: str = "model", tags: list[str] | None = None) -> dict:
    """A version-3 Hub webhook payload as the Hub sends it for a push to main."""
    owner = repo_id.split("/")[0]
    p = {
        "event": {"action": action, "scope": scope},
        "repo": {"type": repo_type, "name": repo_id, "id": "65f0c0ffee" + owner[:6], "private": False,
                 "owner": {"id": "6500" + owner[:8]}, "tags": tags or ["transformers", "safetensors"],
                 "url": {"web": f"https://huggingface.co/{repo_id}", "api": f"https://huggingface.co/api/models/{repo_id}"}},
        "webhook": {"id": "6600beef", "version": 3},
    }
    if sha:
        p["repo"]["headSha"] = sha
        p["updatedRefs"] = [{"ref": "refs/heads/main", "oldSha": "0" * 40, "newSha": sha}]
    return p


class ServerThread:
    """An ASGI app on 127.0.0.1:<free port> under uvicorn in a thread (real HTTP)."""

    def __init__(self, app):
        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.time() + 20
        while not self.server.started:
            if time.time() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(10)


class ServiceProcess:
    """`hubquant serve` in a subprocess, with its log in `log_path`."""

    def __init__(self, args: list[str], env: dict[str, str], log_path: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        out = open(log_path, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "hubquant.cli", "serve", "--port", str(self.port), *args],
                                     env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT, cwd=REPO_ROOT)
        out.close()
        deadline = time.time() + 90
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"hubquant serve exited:\n{log_path.read_text()}")
            try:
                if httpx.get(self.url + "/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                self.stop()
                raise RuntimeError(f"hubquant serve did not start:\n{log_path.read_text()}")
            time.sleep(0.2)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def wait_for(pred, timeout: float, what: str, every: float = 0.3):
    deadline = time.time() + timeout
    while time.time() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def hubquant_commits(repo_id: str) -> list[str]:
    """Titles of the commits hubquant made in `repo_id` (the Hub's own 'initial commit' excluded)."""
    from huggingface_hub import HfApi

    return [c.title for c in HfApi().list_repo_commits(repo_id) if c.title.startswith("hubquant:")]


# Conversions in these tests: RTN W8 per channel, no evaluation (a tiny random model has no perplexity to keep).
FAST = {"skip_eval": True}
