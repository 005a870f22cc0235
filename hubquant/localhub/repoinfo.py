"""What the Hub derives from a repo's files: card metadata (README.md YAML), tags, library, pipeline tag,
and the JSON shapes of model info, tree entries and commits."""
from __future__ import annotations

import json
import re

import yaml

from hubquant.localhub.store import Commit, FileEntry, Repo, Store

_FRONT_MATTER = re.compile(r"\A\s*---\r?\n(.*?)\r?\n---\s*(\r?\n|\Z)", re.S)


def parse_card(text: str) -> dict | None:
    """The YAML front matter of a README (a dict), or None when there is none.

    Raises:
        yaml.YAMLError: the front matter is not valid YAML.
        ValueError: the front matter is not a mapping.
    """
    m = _FRONT_MATTER.match(text)
    if not m:
        return None
    data = yaml.safe_load(m.group(1))
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError("the README metadata must be a YAML mapping")
    return data


def _as_list(v) -> list:
    if v is None:
        return []
    return [x for x in (v if isinstance(v, list) else [v]) if isinstance(x, str | int | float)]


def derive_tags(card: dict | None, files: dict[str, FileEntry], config: dict | None) -> list[str]:
    """Tags as the real Hub derives them: card tags, library, model type, file types, pipeline tag, license,
    datasets, languages, base models (with their relation), and regions omitted."""
    card = card or {}
    tags: list[str] = [str(t) for t in _as_list(card.get("tags"))]
    lib = library_name(card, files, config)
    if lib:
        tags.append(lib)
    if any(p.endswith(".safetensors") for p in files):
        tags.append("safetensors")
    if any(p.endswith(".gguf") for p in files):
        tags.append("gguf")
    if config and isinstance(config.get("model_type"), str):
        tags.append(config["model_type"])
    pipe = card.get("pipeline_tag")
    if isinstance(pipe, str):
        tags.append(pipe)
    tags += [f"dataset:{d}" for d in _as_list(card.get("datasets"))]
    tags += [str(lang) for lang in _as_list(card.get("language"))]
    bases = [str(b) for b in _as_list(card.get("base_model"))]
    relation = card.get("base_model_relation")
    if not isinstance(relation, str):
        relation = "quantized" if config and "quantization_config" in config else "finetune"
    for b in bases:
        tags += [f"base_model:{b}", f"base_model:{relation}:{b}"]
    for lic in _as_list(card.get("license")):
        tags.append(f"license:{lic}")
    return list(dict.fromkeys(tags))


def library_name(card: dict | None, files: dict[str, FileEntry], config: dict | None) -> str | None:
    lib = (card or {}).get("library_name")
    if isinstance(lib, str):
        return lib
    if config and config.get("architectures"):
        return "transformers"
    return None


def _json_file(store: Store, files: dict[str, FileEntry], path: str) -> dict | None:
    entry = files.get(path)
    if entry is None:
        return None
    raw = store.read_small(entry, limit=1024 * 1024)
    try:
        data = json.loads(raw) if raw is not None else None
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def card_of(store: Store, files: dict[str, FileEntry]) -> dict | None:
    entry = files.get("README.md")
    raw = store.read_small(entry) if entry else None
    if raw is None:
        return None
    try:
        return parse_card(raw.decode("utf-8", "replace"))
    except (yaml.YAMLError, ValueError):
        return None


def sibling_json(e: FileEntry) -> dict:
    d = {"rfilename": e.path, "size": e.size, "blobId": e.git_oid}
    if e.lfs:
        d["lfs"] = {"sha256": e.sha256, "size": e.size, "pointerSize": e.pointer_size}
    return d


def tree_entry_json(e: FileEntry) -> dict:
    d = {"type": "file", "oid": e.git_oid, "size": e.size, "path": e.path}
    if e.lfs:
        d["lfs"] = {"oid": e.sha256, "size": e.size, "pointerSize": e.pointer_size}
    return d


def commit_json(c: Commit) -> dict:
    return {
        "id": c.oid,
        "title": c.title,
        "message": c.message,
        "authors": [{"user": c.author}],
        "date": c.created_at,
        "parents": [c.parent] if c.parent else [],
    }


def repo_json(
    store: Store, repo: Repo, oid: str, *, siblings: bool = True, card_data: bool = True, full: bool = True
) -> dict:
    """The model/dataset/space info object at commit `oid` (what `HfApi.model_info` parses)."""
    files = store.files(oid)
    card = card_of(store, files)
    config = _json_file(store, files, "config.json") if repo.type == "model" else None
    d: dict = {
        "_id": repo.uid,
        "id": repo.repo_id,
        "private": repo.private,
        "tags": derive_tags(card, files, config),
        "downloads": repo.downloads,
        "likes": repo.likes,
        "createdAt": repo.created_at,
    }
    if repo.type == "model":
        d["modelId"] = repo.repo_id
        lib = library_name(card, files, config)
        if lib:
            d["library_name"] = lib
        pipe = (card or {}).get("pipeline_tag")
        if isinstance(pipe, str):
            d["pipeline_tag"] = pipe
    if full:
        d.update(
            author=repo.namespace, sha=oid, lastModified=store.commit_info(oid).created_at,
            gated=repo.gated or False, disabled=False,
            usedStorage=sum(e.size for e in files.values()),
        )
        if config is not None:
            d["config"] = {k: config[k] for k in ("architectures", "model_type") if k in config}
            if "quantization_config" in config:
                d["config"]["quantization_config"] = config["quantization_config"]
    if card_data and card is not None:
        d["cardData"] = card
    if siblings:
        d["siblings"] = [sibling_json(e) for e in files.values()]
    return d
