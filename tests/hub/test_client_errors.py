"""What `hubquant convert` says when the Hub hangs, is unreachable, or rejects the token: one line plus a fix,
its exit code, within the configured timeouts (real sockets and a real local Hub on loopback)."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]


def _convert(args: list[str], env: dict[str, str], tmp_path: Path, timeout: float = 120):
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_DISABLE_TELEMETRY": "1", **env}
    env.pop("HF_HUB_OFFLINE", None)
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "hubquant.cli", "convert", *args], env=env, cwd=REPO_ROOT,
                       capture_output=True, text=True, timeout=timeout)
    return r, time.monotonic() - t0


def _one_error(stderr: str) -> list[str]:
    assert "Traceback" not in stderr, stderr
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 2 and lines[0].startswith("error: ") and lines[1].startswith("  fix: "), stderr
    return lines


@pytest.fixture
def silent_server():
    """A TCP server on loopback that accepts connections and never answers."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(64)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept():
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(srv.accept()[0])
            except (TimeoutError, OSError):
                continue

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.getsockname()[1]}", held
    stop.set()
    t.join(2)
    for c in held:
        c.close()
    srv.close()


def test_a_hub_that_never_answers_does_not_hang_convert(silent_server, tmp_path):
    endpoint, held = silent_server
    r, took = _convert(["some-org/some-model", "--skip-eval"], {
        "HF_ENDPOINT": endpoint, "HF_HUB_ETAG_TIMEOUT": "1", "HF_HUB_DOWNLOAD_TIMEOUT": "1"}, tmp_path)
    assert r.returncode == 4, r.stderr
    err, fix = _one_error(r.stderr)
    assert "did not answer in time" in err and endpoint in err and "HUBQUANT_HUB_READ_TIMEOUT" in fix
    assert held, "the client never connected"
    assert took < 60


def test_an_unreachable_hub_is_one_line_exit_4(tmp_path):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there any more
    r, took = _convert(["some-org/some-model", "--skip-eval"], {"HF_ENDPOINT": f"http://127.0.0.1:{port}"}, tmp_path)
    assert r.returncode == 4, r.stderr
    err, fix = _one_error(r.stderr)
    assert "cannot be reached" in err and "HF_ENDPOINT" in fix
    assert took < 90


def test_a_rejected_token_is_reported_as_such(local_hub, tmp_path):
    folder = tmp_path / "pub"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "llama"}\n')
    local_hub.hub.publish_folder("alice/public-model", folder)
    env = {"HF_ENDPOINT": local_hub.endpoint, "HF_TOKEN": "hf_expiredOrMadeUpToken0000000000"}
    for args in (["alice/public-model", "--skip-eval"], ["alice/public-model", "--skip-eval", "--push"]):
        r, _ = _convert(args, env, tmp_path)
        assert r.returncode == 3, r.stderr
        err, fix = _one_error(r.stderr)
        assert "token rejected" in err and "not allowed" not in err and "not found" not in err, err
        assert "HF_TOKEN" in fix
        assert env["HF_TOKEN"] not in r.stderr + r.stdout  # never printed


def test_timeouts_honour_huggingface_hub_settings(monkeypatch):
    from hubquant.hub import client

    for k in ("HUBQUANT_HUB_CONNECT_TIMEOUT", "HUBQUANT_HUB_READ_TIMEOUT", "HF_HUB_ETAG_TIMEOUT",
              "HF_HUB_DOWNLOAD_TIMEOUT"):
        monkeypatch.delenv(k, raising=False)
    assert client.timeouts() == (10.0, 60.0)
    monkeypatch.setenv("HF_HUB_ETAG_TIMEOUT", "3")
    monkeypatch.setenv("HF_HUB_DOWNLOAD_TIMEOUT", "7")
    assert client.timeouts() == (3.0, 7.0)
    monkeypatch.setenv("HUBQUANT_HUB_CONNECT_TIMEOUT", "2")
    monkeypatch.setenv("HUBQUANT_HUB_READ_TIMEOUT", "30")
    assert client.timeouts() == (2.0, 30.0)
