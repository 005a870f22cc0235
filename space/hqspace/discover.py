"""Find a base model's quantized variants on the Hub and read what their cards say.

A variant is found two ways, and the union is kept:
- the Hub's model tree: ``list_models(filter="base_model:quantized:<base>")``;
- hubquant's own tag: ``list_models(filter="hubquant")``, kept when its ``hubquant.json`` names the base.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass

from hubquant.errors import AuthError, NotFoundError

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")


@dataclass(frozen=True, kw_only=True)
class ModelEntry:
    """One model in a comparison: the base or one of its variants."""

    repo_id: str
    base: str | None = None           # None for the base itself
    method: str | None = None         # from hubquant.json
    scheme: str | None = None
    perplexity: float | None = None   # from the card's model-index (or hubquant.json metrics)
    base_perplexity: float | None = None  # the base's, measured on the same text (hubquant.json)
    size_bytes: int | None = None     # weight files on the Hub
    sha: str | None = None
    declared_bases: tuple[str, ...] = ()  # what its card and hubquant.json name as base

    @property
    def label(self) -> str:
        what = " ".join(x for x in (self.method, self.scheme) if x)
        return f"{self.repo_id} ({what})" if what else self.repo_id


def _base_models(card_data) -> list[str]:
    if card_data is None:
        return []
    base = card_data.get("base_model") if hasattr(card_data, "get") else getattr(card_data, "base_model", None)
    if base is None:
        return []
    return [base] if isinstance(base, str) else [str(b) for b in base]


def _perplexity_from_card(card_data) -> float | None:
    """The variant's own perplexity from `model-index` (a result whose name says 'base' is skipped)."""
    if card_data is None:
        return None
    index = card_data.get("model-index") if hasattr(card_data, "get") else None
    for model in index or []:
        for result in model.get("results", []) or []:
            for metric in result.get("metrics", []) or []:
                kind = f"{metric.get('type', '')} {metric.get('name', '')}".lower()
                if "perplexity" in kind and "base" not in kind:
                    try:
                        value = float(metric.get("value"))
                    except (TypeError, ValueError):
                        continue
                    if math.isfinite(value):
                        return value
    return None


def _perplexity_from_provenance(meta: dict) -> float | None:
    metrics = meta.get("metrics") or meta.get("eval") or {}
    for key in ("perplexity", "ppl", "variant_perplexity"):
        value = metrics.get(key) if isinstance(metrics, dict) else None
        if isinstance(value, (int, float)) and math.isfinite(value):
            return float(value)
    return None


def _base_perplexity_from_provenance(meta: dict) -> float | None:
    metrics = meta.get("metrics") or {}
    value = metrics.get("base_perplexity") if isinstance(metrics, dict) else None
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def _read_provenance(api, repo_id: str, sha: str | None) -> dict:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError

    try:
        path = hf_hub_download(repo_id, "hubquant.json", revision=sha, endpoint=api.endpoint, token=api.token)
    except (EntryNotFoundError, HfHubHTTPError, OSError):
        return {}
    try:
        return json.loads(open(path, encoding="utf-8").read())
    except (OSError, ValueError):
        return {}


def _scheme_name(meta: dict) -> str | None:
    scheme = meta.get("scheme")
    if isinstance(scheme, str):
        return scheme
    if isinstance(scheme, dict):
        return scheme.get("name") or None
    return meta.get("scheme_name")


def describe(api, repo_id: str, *, base: str | None = None) -> ModelEntry:
    """Read one repo's card, weight sizes and (for a variant, `base` set) hubquant.json into a ModelEntry.

    Raises:
        NotFoundError: the repo does not exist.
        AuthError: it is gated or private and the token has no access.
    """
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    try:
        info = api.model_info(repo_id, files_metadata=True)
    except GatedRepoError as e:
        raise AuthError(f"{repo_id} is gated",
                        hint=f"accept its terms on the Hub page of {repo_id}, then log in") from e
    except RepositoryNotFoundError as e:
        raise NotFoundError(f"no model named {repo_id} on {api.endpoint}",
                            hint="check the spelling, or log in if it is private") from e
    size = sum((s.size or 0) for s in (info.siblings or []) if s.rfilename.endswith(WEIGHT_SUFFIXES)) or None
    meta = _read_provenance(api, repo_id, info.sha) if base is not None else {}
    ppl = _perplexity_from_card(info.card_data)
    if ppl is None:
        ppl = _perplexity_from_provenance(meta)
    declared = _base_models(info.card_data)
    if _provenance_base(meta):
        declared.append(_provenance_base(meta))
    return ModelEntry(
        repo_id=repo_id, base=base, method=meta.get("method") or (meta.get("settings") or {}).get("method"),
        scheme=_scheme_name(meta),
        perplexity=ppl, base_perplexity=_base_perplexity_from_provenance(meta), size_bytes=size, sha=info.sha,
        declared_bases=tuple(dict.fromkeys(declared)),
    )


def _provenance_base(meta: dict) -> str | None:
    base = meta.get("base_model") or meta.get("base_repo") or meta.get("base")
    if isinstance(base, dict):
        base = base.get("repo_id") or base.get("id") or base.get("repo")
    return base if isinstance(base, str) else None


def find_variants(api, base: str, *, limit: int = 50) -> list[ModelEntry]:
    """The quantized variants of `base` on the Hub `api` talks to, sorted by repo id.

    Args:
        api: a `huggingface_hub.HfApi` (its endpoint and token are used).
        base: the base model's repo id.
        limit: at most this many repos are asked for per query.
    """
    candidates: dict[str, None] = {}
    for m in api.list_models(filter=f"base_model:quantized:{base}", limit=limit):
        candidates[m.id] = None
    for m in api.list_models(filter="hubquant", limit=limit, cardData=True):
        # the listing carries card data: read hubquant.json only for repos whose card names this base
        listed = _base_models(getattr(m, "card_data", None))
        if m.id != base and (base in listed or not listed):
            candidates.setdefault(m.id, None)
    out = []
    for repo_id in candidates:
        try:
            entry = describe(api, repo_id, base=base)
        except (NotFoundError, AuthError):
            continue
        if base in entry.declared_bases:
            out.append(entry)
    return sorted(out, key=lambda e: e.repo_id)


def find_bases(api, *, limit: int = 100) -> list[str]:
    """Base models that hubquant variants on this Hub were made from (for the base dropdown)."""
    bases: dict[str, None] = {}
    for m in api.list_models(filter="hubquant", limit=limit, cardData=True):
        for b in _base_models(getattr(m, "card_data", None)):
            bases[b] = None
    return sorted(bases)
