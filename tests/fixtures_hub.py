"""Pytest fixtures for the local Hub (registered in tests/conftest.py via `pytest_plugins`).

`local_hub` (session): `hubquant hub serve` (as `python -m hubquant.localhub.cli hub serve`, which skips the torch
imports of the full CLI) in a subprocess on a free 127.0.0.1 port over a fresh temp
root, with tokens for two users:
    alice  writes to `alice` and to the org `hubquant-org`
    bob    writes to `bob`
Attributes and methods:
    .endpoint              the URL (http://127.0.0.1:PORT), for HF_ENDPOINT or HfApi(endpoint=...)
    .root                  the Hub's data folder (Path)
    .token(user)           the token of "alice" or "bob"; .add_token(user, orgs=(), write=True) makes more
    .hub                   a `hubquant.localhub.LocalHub` on the same root: publish_folder(repo_id, folder),
                           set_gated(repo_id, "manual"), grant_access(repo_id, user), set_private(repo_id)
    .seed_smollm2()        publishes HuggingFaceTB/SmolLM2-135M-Instruct (idempotent; returns the commit sha)
The server writes its log to ROOT/server.log. Each test should create its own repos (unique names): the
session's Hub is shared by every test.

`hub_env` (function): points huggingface_hub in this process (and subprocesses, through the environment) at
`local_hub`: sets HF_ENDPOINT, HF_TOKEN (alice's), HF_HUB_DISABLE_XET=1 and a temp HF_HOME; clears
HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE (the Hub is on loopback); patches the values huggingface_hub read at
import (constants.ENDPOINT, the URL template, HF_HUB_DISABLE_XET, HF_HUB_OFFLINE, the module-level `HfApi`
behind `huggingface_hub.list_models` & co). Returns the `local_hub` object. `point_hf_at(monkeypatch,
endpoint, token, hf_home)` does the same for another server (e.g. `HubProcess` or `LocalHub.serve()`).

`seeded_hub` (session): `local_hub` after `seed_smollm2()`.

`HubProcess(root)` starts/stops/kills a server of its own, for tests that restart or SIGKILL it.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

USERS = {"alice": ("hubquant-org",), "bob": ()}


class HubProcess:
    """`hubquant hub serve --port 0` in a subprocess; `.endpoint` once started."""

    def __init__(self, root: Path, env: dict[str, str] | None = None):
        self.root = Path(root)
        self.env = env or {}
        self.proc: subprocess.Popen | None = None
        self.endpoint = ""

    def start(self, timeout: float = 60) -> str:
        self.root.mkdir(parents=True, exist_ok=True)
        log = self.root / "server.log"
        out = open(log, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "hubquant.localhub.cli", "hub", "serve", "--root", str(self.root), "--port", "0"],
            stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **self.env},
            cwd=Path(__file__).resolve().parents[1],
        )
        out.close()
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the local Hub exited ({self.proc.returncode}):\n{log.read_text()}")
            first = log.read_text().split("\n", 1)[0].strip()
            if first.startswith("http://"):
                try:
                    if httpx.get(first + "/", timeout=2).status_code == 200:
                        self.endpoint = first
                        return first
                except httpx.HTTPError:
                    pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"the local Hub did not start in {timeout:.0f} s:\n{log.read_text()}")

    def kill(self) -> None:
        """SIGKILL: no cleanup of any kind runs in the server."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()


class LocalHubFixture:
    def __init__(self, process: HubProcess, tokens: dict[str, str]):
        from hubquant.localhub import LocalHub

        self.process = process
        self.endpoint = process.endpoint
        self.root = process.root
        self._tokens = tokens
        self.hub = LocalHub(process.root)

    def token(self, user: str) -> str:
        return self._tokens[user]

    def add_token(self, user: str, *, orgs=(), write: bool = True) -> str:
        return self.hub.add_token(user, orgs=orgs, write=write)

    def seed_smollm2(self) -> str:
        return self.hub.seed_smollm2()


@pytest.fixture(scope="session")
def local_hub(tmp_path_factory):
    from hubquant.localhub import LocalHub

    root = tmp_path_factory.mktemp("local-hub")
    admin = LocalHub(root)
    tokens = {user: admin.add_token(user, orgs=orgs) for user, orgs in USERS.items()}
    proc = HubProcess(root, env={"HUBQUANT_HUB_PAGE_SIZE": os.environ.get("HUBQUANT_HUB_PAGE_SIZE", "1000")})
    proc.start()
    try:
        yield LocalHubFixture(proc, tokens)
    finally:
        proc.stop()


@pytest.fixture(scope="session")
def seeded_hub(local_hub):
    local_hub.seed_smollm2()
    return local_hub


def point_hf_at(monkeypatch, endpoint: str, token: str | None, hf_home: Path) -> None:
    """Make this process's huggingface_hub (and child processes) talk to `endpoint`."""
    import huggingface_hub
    from huggingface_hub import constants

    for k, v in {"HF_ENDPOINT": endpoint, "HF_HUB_DISABLE_XET": "1", "HF_HOME": str(hf_home),
                 "HF_HUB_CACHE": str(hf_home / "hub"), "HF_HUB_DISABLE_TELEMETRY": "1"}.items():
        monkeypatch.setenv(k, v)
    if token is None:
        monkeypatch.delenv("HF_TOKEN", raising=False)
    else:
        monkeypatch.setenv("HF_TOKEN", token)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    # the local Hub is on loopback: an offline switch meant to keep tests off the internet must not block it
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HOME", str(hf_home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hf_home / "hub"))
    monkeypatch.setattr(constants, "HUGGINGFACE_HUB_CACHE", str(hf_home / "hub"), raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(hf_home / "token"), raising=False)
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(hf_home / "stored_tokens"), raising=False)
    host = endpoint.split("://", 1)[1].split("/", 1)[0].rsplit(":", 1)[0].strip("[]")
    if hasattr(constants, "HF_URL_HOSTS"):
        monkeypatch.setattr(constants, "HF_URL_HOSTS", frozenset(constants.HF_URL_HOSTS | {host}))
    import huggingface_hub.file_download  # noqa: F401  (submodules are lazy: import them before patching)
    import huggingface_hub.hf_api  # noqa: F401

    monkeypatch.setattr(huggingface_hub.hf_api.api, "endpoint", endpoint)
    # file_download and transformers keep their own reference to the cache folder default
    fd = huggingface_hub.file_download
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if hasattr(fd, name):
            monkeypatch.setattr(fd, name, str(hf_home / "hub"))


@pytest.fixture
def hub_env(local_hub, monkeypatch, tmp_path):
    point_hf_at(monkeypatch, local_hub.endpoint, local_hub.token("alice"), tmp_path / "hf_home")
    return local_hub


def commit_into_failpoint(root: Path, push) -> tuple[list[BaseException], str, threading.Thread]:
    """Run push() (a commit against a server started with the commit failpoint) in a thread and wait until the
    server stops inside the commit; returns (errors push raised, server log so far, the thread). The caller
    kills the server, then joins the thread and checks that push failed."""
    errors: list[BaseException] = []

    def run():
        try:
            push()
        except BaseException as e:  # noqa: BLE001 - the connection dies with the server
            errors.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    log = root / "server.log"
    t0 = time.monotonic()
    while "failpoint: commit" not in log.read_text():
        assert time.monotonic() - t0 < 60, log.read_text()
        time.sleep(0.05)
    return errors, log.read_text(), t


@pytest.fixture
def own_hub(tmp_path):
    """A Hub of this test's own (fresh root, own server processes, all killed at the end) and alice's token."""
    from hubquant.localhub import LocalHub

    root = tmp_path / "hub"
    token = LocalHub(root).add_token("alice")
    procs: list[HubProcess] = []

    def start(**env) -> HubProcess:
        p = HubProcess(root, env=env)
        p.start()
        procs.append(p)
        return p

    yield root, token, start
    for p in procs:
        p.kill()
