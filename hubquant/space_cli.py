"""`hubquant space`: start the Gradio Space (space/app.py) locally, against HF_ENDPOINT."""
from __future__ import annotations

import argparse
import importlib.util
import os
from pathlib import Path

from hubquant.errors import NotFoundError, missing_dependency

APP_FILE = Path(__file__).resolve().parent.parent / "space" / "app.py"


def load_app_module(path: Path = APP_FILE):
    """Import space/app.py as a module (it is a Space's entry file, not part of the package).

    Raises:
        NotFoundError: space/app.py is not there (hubquant installed from a wheel, not a checkout).
        UnsupportedError: gradio is not installed.
    """
    if not path.is_file():
        raise NotFoundError(f"the Space's app is not at {path}",
                            hint="run `hubquant space` from a source checkout (pip install -e '.[space]')")
    if importlib.util.find_spec("gradio") is None:
        raise missing_dependency("gradio", extra="space", why="the Space's UI")
    spec = importlib.util.spec_from_file_location("hubquant_space_app", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def export(out_dir: Path) -> Path:
    """Write a self-contained Space folder: space/, the hubquant and hubquant_kernels packages, cards/.

    Upload the folder as a Gradio Space (`hf upload --repo-type space USER/NAME DIR`); app.py imports
    the packages that sit next to it.

    Raises:
        NotFoundError: not run from a source checkout.
        UsageError: out_dir exists and is not empty.
    """
    import shutil

    from hubquant.errors import UsageError

    root = APP_FILE.parent.parent
    sources = {"": APP_FILE.parent, "hubquant": root / "hubquant", "cards": root / "cards",
               "hubquant_kernels": root / "kernels" / "hubquant_kernels"}
    for src in sources.values():
        if not src.is_dir():
            raise NotFoundError(f"{src} is missing", hint="run `hubquant space --export` from a source checkout")
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise UsageError(f"{out_dir} is not empty", hint="pass a new or empty folder to --export")
    skip = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache")
    for name, src in sources.items():
        shutil.copytree(src, out_dir / name if name else out_dir, ignore=skip, dirs_exist_ok=True)
    # the README's screenshots, at paths that resolve inside the Space repo
    (out_dir / "docs" / "img").mkdir(parents=True, exist_ok=True)
    for img in (root / "docs" / "img").glob("space*.png"):
        shutil.copyfile(img, out_dir / "docs" / "img" / img.name)
    readme = out_dir / "README.md"
    readme.write_text(readme.read_text().replace("](../docs/img/", "](docs/img/"))
    (out_dir / "requirements.txt").write_text(_bundled_requirements())
    return out_dir


def _bundled_requirements() -> str:
    """requirements.txt for an exported folder: hubquant sits in it, so its dependencies (and the Space extra's)
    are listed instead of `hubquant[space]`."""
    import re
    from importlib.metadata import PackageNotFoundError, requires

    try:
        reqs = requires("hubquant") or []
    except PackageNotFoundError:
        reqs = []
    keep = [r.split(";")[0].strip() for r in reqs
            if ";" not in r or re.search(r"""extra\s*==\s*["']space["']""", r)]
    head = "# hubquant and hubquant_kernels are in this folder; these are their dependencies and the Space's.\n"
    return head + "\n".join(keep or ["hubquant[space]"]) + "\n"


def _run(args: argparse.Namespace) -> int:
    from huggingface_hub import constants

    if args.export:
        out = export(Path(args.export))
        print(f"wrote a Space to {out}; upload it with: hf upload --repo-type space USER/NAME {out} .")
        return 0
    app = load_app_module()
    print(f"hubquant space on http://{args.host}:{args.port or 7860} against {constants.ENDPOINT}", flush=True)
    demo = app.build_app(default_base=args.base, max_new_tokens=args.max_new_tokens,
                         cache_bytes=int(args.cache_mb * 1e6))
    app.launch(demo, host=args.host, port=args.port or int(os.environ.get("GRADIO_SERVER_PORT", "7860")))
    return 0


def add_parsers(subparsers) -> None:
    p = subparsers.add_parser("space", help="start the Gradio Space (compare variants, convert) locally",
                              description="Start the Gradio Space against the Hub in HF_ENDPOINT (e.g. `hubquant "
                                          "hub serve`). Compare a model with its variants; convert new ones.")
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="port (default: GRADIO_SERVER_PORT or 7860)")
    p.add_argument("--base", default="HuggingFaceTB/SmolLM2-135M-Instruct",
                   help="base model the Compare tab opens with")
    p.add_argument("--max-new-tokens", type=int, default=64, help="default generation length (default: 64)")
    p.add_argument("--cache-mb", type=float, default=float(os.environ.get("HUBQUANT_SPACE_CACHE_MB", "4000")),
                   help="memory bound of loaded models in MB (default: 4000)")
    p.add_argument("--export", metavar="DIR", default=None,
                   help="write a self-contained Space folder (app, hubquant packages) to DIR instead of serving")
    p.set_defaults(func=_run)
