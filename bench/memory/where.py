"""Where a `hubquant` CLI run peaks: samples the resident set every few milliseconds in the process itself and
prints the peak with the Python stack that was running at that moment (a quick look before a full benchmark).

    python bench/memory/where.py convert MODEL_DIR --method gptq --streaming on --skip-eval --output-dir OUT
"""
from __future__ import annotations

import os
import runpy
import sys
import threading
import time
import traceback

PAGE = os.sysconf("SC_PAGE_SIZE")


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def main() -> None:
    main_id = threading.get_ident()
    best = {"rss": 0, "stack": [], "t": 0.0}
    timeline: list[tuple[float, int, str]] = []  # (seconds, rss, innermost hubquant frame), every 0.2 s
    t0 = time.time()
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            r = _rss()
            now = time.time() - t0
            if os.environ.get("WHERE_TIMELINE") and (not timeline or now - timeline[-1][0] >= 0.2):
                frame = sys._current_frames().get(main_id)
                stack = traceback.extract_stack(frame) if frame is not None else []
                ours = [f for f in stack if "/hubquant/" in f.filename]
                at = f"{ours[-1].name}:{ours[-1].lineno}" if ours else (stack[-1].name if stack else "?")
                timeline.append((now, r, at))
            if r > best["rss"] * 1.002:
                frame = sys._current_frames().get(main_id)
                best.update(rss=r, t=time.time() - t0,
                            stack=traceback.format_stack(frame)[-8:] if frame is not None else [])
            time.sleep(0.005)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    sys.argv = ["hubquant", *sys.argv[1:]]
    try:
        runpy.run_module("hubquant.cli", run_name="__main__", alter_sys=True)
    except SystemExit as e:
        code = e.code
    else:
        code = 0
    finally:
        stop.set()
        th.join()
        for t, r, at in timeline:
            print(f"{t:7.1f} s {r / 1e9:6.3f} GB {at}", file=sys.stderr)
        print(f"peak RSS {best['rss'] / 1e9:.3f} GB at {best['t']:.1f} s in:", file=sys.stderr)
        print("".join(best["stack"]), file=sys.stderr)
    sys.exit(code)


if __name__ == "__main__":
    main()
