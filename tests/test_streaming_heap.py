"""glibc heap settings of a streamed conversion: blocks freed inside the heap go back to the OS after each layer
(hubquant.streaming.switch.trim_heap, called by Session.after)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import sys
from hubquant.streaming.switch import return_freed_memory, trim_heap

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096

return_freed_memory()  # as a streamed conversion sets it: blocks >= 1 MiB are mmapped, smaller ones use the heap
base = rss()
blocks, pins = [], []
for i in range(2000):  # 2000 x 64 KiB on the heap, every other one freed below: holes between live blocks
    blocks.append(b"\x01" * (64 << 10))  # written, so resident
    pins.append(b"\x02" * (64 << 10))
base += 2000 * (64 << 10)  # the pins stay
blocks.clear()  # freed, but the pins keep the heap from shrinking at its top
held = rss() - base
trim_heap()
print(held, rss() - base)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")
def test_trim_heap_returns_freed_heap_blocks():
    """128 MiB of 64 KiB blocks freed between small live ones stay resident until trim_heap gives them back."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "kernels")])}
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, env=env, cwd=ROOT,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    held, after = (int(v) for v in out.stdout.split())
    assert held > 100 * 2**20, held  # glibc keeps the freed blocks resident ...
    assert after < 20 * 2**20, (held, after)  # ... until the trim
