"""Where calibration and evaluation text comes from.

A text source is named by a spec string:
- a built-in offline corpus shipped by an installable package:
  ``fortunes`` (Debian's `fortunes` package: varied English prose, quotes and anecdotes) and
  ``lee-news`` (the Lee news corpus, ~300 Australian news articles, shipped in the `gensim` wheel);
- a local file: ``path/to/file.txt`` (paragraphs split on blank lines), ``.json``/``.jsonl``/``.parquet``
  (column ``text`` unless ``path:COLUMN``);
- a Hub dataset: ``ID[:CONFIG[:SPLIT[:COLUMN]]]``, e.g. ``wikitext:wikitext-2-raw-v1:train:text``.

Defaults: on the public Hub, WikiText-2 (train split to calibrate, test split to evaluate); offline,
`fortunes` to calibrate and `lee-news` to evaluate: general prose to calibrate, text from a
different source to evaluate.
"""
from __future__ import annotations

import importlib.util
import os
import re
from dataclasses import dataclass
from pathlib import Path

from hubquant.errors import NotFoundError, UnsupportedError, UsageError

FORTUNES_DIR = Path(os.environ.get("HUBQUANT_FORTUNES_DIR", "/usr/share/games/fortunes"))
# English prose files of the `fortunes` package (ascii-art, code and the offensive set left out).
FORTUNE_FILES = (
    "fortunes", "literature", "wisdom", "people", "humorists", "love", "men-women", "politics",
    "education", "science", "miscellaneous", "work", "law", "medicine", "food", "art", "pets",
    "riddles", "news", "platitudes", "definitions", "kids", "goedel", "songs-poems", "sports", "magic",
)

ONLINE_CALIB = "wikitext:wikitext-2-raw-v1:train:text"
ONLINE_EVAL = "wikitext:wikitext-2-raw-v1:test:text"
OFFLINE_CALIB = "fortunes"
OFFLINE_EVAL = "lee-news"


@dataclass(frozen=True)
class TextSource:
    """A list of documents plus where they came from (the card names the source)."""

    spec: str
    description: str
    texts: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.texts)


def _fortunes() -> TextSource:
    if not FORTUNES_DIR.is_dir():
        raise UnsupportedError(
            f"the built-in calibration corpus 'fortunes' needs Debian's fortunes package ({FORTUNES_DIR} is missing)",
            hint="run: apt-get install fortunes   or pass --calib-dataset PATH_OR_HUB_ID",
        )
    texts = []
    for name in FORTUNE_FILES:
        f = FORTUNES_DIR / name
        if not f.is_file():
            continue
        raw = f.read_text(encoding="utf-8", errors="replace")
        for entry in raw.split("\n%\n"):
            entry = entry.strip().strip("%").strip()
            # drop ascii drawings and very short one-liners
            if len(entry) >= 80 and sum(c.isalpha() for c in entry) > 0.6 * len(entry):
                texts.append(entry)
    return TextSource("fortunes", "Debian `fortunes` package (quotes, anecdotes and literature excerpts)", tuple(texts))


def package_dir(module: str, *, missing: str, hint: str) -> Path:
    """The folder of an installed package, found without importing it (we only read its data files)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise UnsupportedError(missing, hint=hint)
    return Path(list(spec.submodule_search_locations)[0])


def _lee_news() -> TextSource:
    root = package_dir(
        "gensim", missing="the built-in evaluation corpus 'lee-news' ships in the gensim wheel, which is not installed",
        hint="run: pip install 'hubquant[data]'   or pass --eval-dataset PATH_OR_HUB_ID") / "test" / "test_data"
    texts = []
    for name in ("lee_background.cor", "lee.cor"):
        f = root / name
        if f.is_file():
            lines = f.read_text(encoding="utf-8", errors="replace").splitlines()
            texts += [line.strip() for line in lines if line.strip()]
    if not texts:
        raise NotFoundError(f"the Lee corpus files are missing under {root}", hint="reinstall gensim")
    return TextSource("lee-news", "Lee news corpus (Australian news articles, shipped in the gensim package)",
                      tuple(texts))


BUILTIN = {"fortunes": _fortunes, "lee-news": _lee_news}


def _local(path: Path, column: str) -> TextSource:
    suffix = path.suffix.lower()
    if suffix in (".txt", ".md", ".text"):
        raw = path.read_text(encoding="utf-8", errors="replace")
        texts = [p.strip() for p in re.split(r"\n\s*\n", raw) if p.strip()]
    else:
        try:
            import datasets
        except ImportError as e:
            raise UnsupportedError("reading JSON/parquet text needs `datasets`",
                                   hint="run: pip install datasets") from e
        kind = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}.get(suffix)
        if kind is None:
            raise UsageError(f"cannot read text from {path.name}", hint="use .txt, .json, .jsonl, .csv or .parquet")
        ds = datasets.load_dataset(kind, data_files=str(path), split="train")
        if column not in ds.column_names:
            raise UsageError(f"{path.name} has no column '{column}'",
                             hint=f"use {path}:COLUMN with one of {ds.column_names}")
        texts = [t for t in ds[column] if isinstance(t, str) and t.strip()]
    return TextSource(str(path), f"local file {path.name}", tuple(texts))


def _hub_dataset(spec: str) -> TextSource:
    parts = spec.split(":")
    ds_id, config, split, column = (parts + [None, None, None])[:4]
    split = split or "train"
    column = column or "text"
    try:
        import datasets
    except ImportError as e:
        raise UnsupportedError("Hub datasets need the `datasets` package", hint="run: pip install datasets") from e
    try:
        ds = datasets.load_dataset(ds_id, config or None, split=split)
    except Exception as e:  # datasets raises many types: connection, missing config, ...
        raise NotFoundError(
            f"could not load dataset '{spec}': {type(e).__name__}: {str(e).splitlines()[0][:200]}",
            hint="check the id/config/split, or use a built-in offline corpus (fortunes, lee-news) or a local file",
        ) from e
    if column not in ds.column_names:
        raise UsageError(f"dataset '{ds_id}' has no column '{column}'", hint=f"use one of {ds.column_names}")
    texts = [t for t in ds[column] if isinstance(t, str) and t.strip()]
    return TextSource(spec, f"Hub dataset {ds_id} ({config or 'default'}, {split})", tuple(texts))


def load_texts(spec: str) -> TextSource:
    """Load a text source from its spec (see module doc). Raises UsageError/NotFoundError/UnsupportedError."""
    if spec in BUILTIN:
        return BUILTIN[spec]()
    path_part, _, column = spec.partition(":") if not Path(spec).exists() else (spec, "", "")
    if Path(path_part).exists():
        return _local(Path(path_part), column or "text")
    return _hub_dataset(spec)


def hub_datasets_reachable() -> bool:
    """True only when talking to the public Hub with networking allowed (a local Hub has no datasets)."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or os.environ.get("HF_DATASETS_OFFLINE") == "1":
        return False
    if "huggingface.co" not in constants.ENDPOINT:
        return False
    try:
        import socket

        socket.create_connection(("huggingface.co", 443), timeout=3).close()
        return True
    except OSError:
        return False


def default_specs() -> tuple[str, str]:
    """(calibration spec, evaluation spec) for this environment."""
    if hub_datasets_reachable():
        return ONLINE_CALIB, ONLINE_EVAL
    return OFFLINE_CALIB, OFFLINE_EVAL
