"""Peak resident memory of `hubquant convert` against model size: streamed (one decoder layer at a time) and
in-memory (the whole model loaded), side by side, on random-weight Llama-shaped models.

    python bench/memory/run.py                                  # 1, 2 and 4 GB; rtn and gptq; docs/memory.md
    python bench/memory/run.py --sizes 1 --cases rtn --no-doc   # quick look
    python bench/memory/report.py bench/memory/results/A.json bench/memory/results/B.json   # runs side by side

Each size is written once (bench/memory/synthetic.py), published on a local Hub (127.0.0.1) and converted by
`python -m hubquant.cli convert` in a subprocess; its peak resident set size is the run's own VmHWM
(bench/memory/peak.py). The in-memory path runs only for sizes up to --in-memory-max-gb (it needs about three times the
model). Both paths' safetensors are hashed: "same bytes" compares them.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench.memory.peak import run_cli, safetensors_sha256  # noqa: E402

COMMON = ["--calib-dataset", "fortunes", "--eval-dataset", "lee-news", "--eval-windows", "4", "--eval-seq-len", "256",
          "--group-size", "128", "--quiet"]
# case -> (method, extra flags)
CASES = {"rtn": ("rtn", ["--skip-eval"]), "rtn+eval": ("rtn", []),
         "gptq": ("gptq", ["--skip-eval", "--num-samples", "16", "--seq-len", "512"])}


def start_hub(root: Path) -> tuple[subprocess.Popen, str]:
    log = root / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "hubquant.localhub.cli", "hub", "serve", "--root", str(root),
                                 "--port", "0"], stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
    for _ in range(600):
        first = log.read_text().split("\n", 1)[0].strip() if log.exists() else ""
        if first.startswith("http://"):
            time.sleep(0.5)
            return proc, first
        if proc.poll() is not None:
            raise RuntimeError(log.read_text())
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError("the local Hub did not start")


def run_convert(repo: str, case: str, streaming: str, out: Path, env: dict) -> dict:
    method, extra = CASES[case]
    cmd = [sys.executable, "-m", "hubquant.cli", "convert", repo, "--method", method, "--output-dir", str(out),
           "--streaming", streaming, *COMMON, *extra]
    t0 = time.time()
    logf = out.parent / f"{out.name}.log"
    rc, peak = run_cli(cmd[3:], env=env, cwd=ROOT, log=logf)
    wall = time.time() - t0
    if rc != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{logf.read_text(errors='replace')[-3000:]}")
    prov = json.loads((out / "hubquant.json").read_text())
    return {"case": case, "method": method, "streaming": streaming, "peak_rss_bytes": peak, "wall_s": round(wall, 1),
            "sha256": safetensors_sha256(out), "metrics": prov.get("metrics", {}), "timings": prov.get("timings_s", {}),
            "command": "hubquant convert REPO " + " ".join(cmd[cmd.index("--method"):])}


def bench(args) -> list[dict]:

    from bench.memory.synthetic import layers_for, write_checkpoint

    work = Path(tempfile.mkdtemp(prefix="hubquant-membench-", dir=args.work))
    rows = []
    try:
        for gb in args.sizes:
            rows += bench_size(args, gb, work, layers_for(gb * 1e9), write_checkpoint)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return rows


def _wanted(args, gb: float, case: str, mode: str) -> bool:
    if mode == "off" and (gb > args.in_memory_max_gb or case == "rtn+eval"):
        return False
    if case == "rtn+eval" and gb > args.eval_max_gb:
        return False
    return not (CASES[case][0] == "gptq" and gb > args.gptq_max_gb)


def bench_size(args, gb: float, work: Path, layers: int, write_checkpoint) -> list[dict]:
    """Write one size, publish it on its own local Hub (or convert it from its folder), run the cases, and delete
    every file of that size before the next one (the disk holds one size at a time)."""
    from hubquant.localhub import LocalHub

    folder = work / f"model-{gb}gb"
    nbytes = write_checkpoint(folder, layers)
    from_folder = gb >= args.folder_min_gb
    env = {**os.environ, "HF_HOME": str(work / f"hf-{gb}"), "HF_HUB_DISABLE_XET": "1",
           "OMP_NUM_THREADS": str(args.threads or os.cpu_count() or 1)}
    env.pop("HF_HUB_OFFLINE", None)
    env.pop("HF_TOKEN", None)
    proc = None
    hub_root = work / f"hub-{gb}"
    rows = []
    try:
        if from_folder:
            source = str(folder)
        else:
            hub_root.mkdir()
            proc, env["HF_ENDPOINT"] = start_hub(hub_root)
            source = f"bench/llama-random-{layers}l"
            LocalHub(hub_root).publish_folder(source, folder)
            shutil.rmtree(folder)
            subprocess.run([sys.executable, "-c", "import sys; from huggingface_hub import snapshot_download; "
                            "snapshot_download(sys.argv[1])", source], env=env, check=True, cwd=ROOT,
                           capture_output=True)  # download once, outside the measured runs
        for case in args.cases:
            for mode in ("on", "off"):
                if not _wanted(args, gb, case, mode):
                    continue
                out = work / f"out-{gb}-{case}-{mode}"
                r = run_convert(source, case, mode, out, env)
                r.update(size_gb=gb, layers=layers, model_bytes=nbytes,
                         source="local folder" if from_folder else "local Hub")
                r["rss_pct_of_model"] = round(100 * r["peak_rss_bytes"] / nbytes, 1)
                rows.append(r)
                if args.partial:
                    Path(args.partial).write_text(json.dumps(rows, indent=2) + "\n")
                print(f"{gb} GB ({layers} layers) {case:8s} streaming={mode:3s} peak RSS "
                      f"{r['peak_rss_bytes'] / 1e9:.2f} GB ({r['rss_pct_of_model']}% of the model), "
                      f"{r['wall_s']} s", flush=True)
                shutil.rmtree(out)
    finally:
        if proc is not None:
            proc.kill()
            proc.wait()
        for p in (folder, hub_root, work / f"hf-{gb}"):
            shutil.rmtree(p, ignore_errors=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=float, nargs="+", default=[1, 2, 4], help="model sizes in GB (default 1 2 4)")
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES),
                   help="rtn and gptq skip the evaluation; rtn+eval streams it too (streamed path only)")
    p.add_argument("--in-memory-max-gb", type=float, default=2, help="run the in-memory path up to this size")
    p.add_argument("--gptq-max-gb", type=float, default=1, help="run GPTQ up to this size (slow on a CPU)")
    p.add_argument("--eval-max-gb", type=float, default=1e9, help="run rtn+eval up to this size")
    p.add_argument("--folder-min-gb", type=float, default=1e9,
                   help="convert sizes from this one up from their local folder instead of a local Hub (one copy "
                        "of the model on disk instead of three)")
    p.add_argument("--threads", type=int, default=None,
                   help="OMP_NUM_THREADS of the conversions (default: every core; 1 is faster on a busy machine)")
    p.add_argument("--work", default=None, help="scratch folder (default: the system temp folder)")
    p.add_argument("--json", default=str(ROOT / "bench/memory/results/latest.json"))
    p.add_argument("--partial", default=None, help="also write the rows measured so far here, after each run")
    p.add_argument("--no-doc", action="store_true", help="do not rewrite docs/memory.md")
    args = p.parse_args()
    rows = bench(args)
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "hardware": hardware(), "command": "python bench/memory/run.py " + " ".join(sys.argv[1:])}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    if not args.no_doc:
        from bench.memory.report import write_report

        write_report(meta, rows, ROOT / "docs" / "memory.md", ROOT / "docs" / "img" / "memory.svg")


def hardware() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        lines = Path("/proc/meminfo").read_text().splitlines()
        mem = next(int(x.split()[1]) for x in lines if x.startswith("MemTotal"))
    except (OSError, StopIteration):
        mem = 0
    return f"{os.cpu_count()} CPU cores ({cpu}), {mem / 1024**2:.0f} GiB RAM, no GPU"


if __name__ == "__main__":
    main()
