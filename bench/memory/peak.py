"""Peak resident memory of one `hubquant` CLI run, as the run's own VmHWM.

A child's ru_maxrss (wait4, /usr/bin/time run from Python) also counts the pages it shared with its parent between
fork and exec, so a large measuring process inflates it. VmHWM belongs to the address space the command gets at
exec: the wrapper below reads it when the CLI exits.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path

WRAPPER = (
    "import atexit, runpy, sys\n"
    "out = sys.argv.pop(1)\n"
    "def report():\n"
    "    hwm = next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM'))\n"
    "    open(out, 'w').write(hwm)\n"
    "atexit.register(report)\n"
    "sys.argv[0] = 'hubquant'\n"
    "runpy.run_module('hubquant.cli', run_name='__main__', alter_sys=True)\n"
)


def run_cli(args: list[str], *, env: dict, cwd: Path, log: Path) -> tuple[int, int]:
    """Run `hubquant ARGS` (stdout and stderr to `log`); returns (exit code, peak resident bytes)."""
    with tempfile.NamedTemporaryFile(suffix=".hwm", delete=False) as f:
        hwm_file = Path(f.name)
    try:
        with open(log, "wb") as out:
            rc = subprocess.run([sys.executable, "-c", WRAPPER, str(hwm_file), *args], stdout=out,
                                stderr=subprocess.STDOUT, env=env, cwd=cwd).returncode
        text = hwm_file.read_text().strip()
        return rc, int(text) * 1024 if text else 0
    finally:
        os.unlink(hwm_file)


def safetensors_sha256(folder: Path) -> str:
    """One sha256 over the output's safetensors files in name order (equal digests: the same bytes)."""
    digest = hashlib.sha256()
    for f in sorted(folder.glob("*.safetensors")):
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 24), b""):
                digest.update(chunk)
    return digest.hexdigest()
