"""One plan: from `ConvertOptions` decide the scheme, the format, the settings hash, the target repo and whether
to convert, skip (the target is up to date) or refuse (the target holds something else).

`hubquant convert` and the conversion service both call `plan()`; nothing else makes these decisions.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from hubquant.errors import NotFoundError, UsageError
from hubquant.options import ConvertOptions
from hubquant.quant import QuantScheme

# ---------------------------------------------------------------------------------------------- method knowledge
# (what each method and format accepts lives in their registries: hubquant.methods, hubquant.formats)


def resolve_scheme(opts: ConvertOptions) -> QuantScheme:
    """The preset (--scheme) or the method's default scheme, with the user's overrides applied (and checked)."""
    from hubquant.methods import get_method

    return get_method(opts.method).resolve_scheme(bits=opts.bits, group_size=opts.group_size,
                                                  symmetric=opts.symmetric, activations=opts.activations,
                                                  preset=opts.scheme)


def resolve_format(opts: ConvertOptions, scheme: QuantScheme) -> str:
    """The format's name: --format, or the method's first format; checked against the method and the scheme."""
    from hubquant.formats import resolve_format as resolve
    from hubquant.methods import get_method

    return resolve(get_method(opts.method), opts.format, scheme).name


def needs_calibration(opts: ConvertOptions, scheme: QuantScheme | None = None) -> bool:
    """Calibrated methods, static activation scales, and options that need data (e.g. FP8 smoothing)."""
    from hubquant.methods import get_method

    if opts.activations == "static":
        return True
    return get_method(opts.method).needs_calibration(scheme, opts.method_options)


# ---------------------------------------------------------------------------------------------- settings


def settings_of(opts: ConvertOptions, scheme: QuantScheme, fmt: str) -> dict:
    """What determines the variant's bytes (the idempotency key hashes this plus the base sha)."""
    from hubquant.formats import get_format
    from hubquant.methods import get_method

    s = {
        "method": opts.method, "format": fmt, "scheme": dataclasses.asdict(scheme),
        "ignore": sorted(opts.ignored_patterns), "method_options": dict(sorted(opts.method_options.items())),
    }
    version = get_method(opts.method).algorithm_version
    if version is not None:
        s["algorithm_version"] = version
    s.update(get_format(fmt).settings(opts))
    if needs_calibration(opts, scheme):
        s.update(calib_dataset=opts.calib_dataset, num_samples=opts.num_samples, seq_len=opts.seq_len,
                 seed=opts.seed, chat_template=opts.chat_template)
    return s


def settings_hash(base_repo: str, settings: dict) -> str:
    blob = json.dumps({"base": base_repo, "settings": settings}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def default_target(repo_id: str, namespace: str, scheme: QuantScheme, method: str, fmt: str) -> str:
    """{namespace}/{model}-{SCHEME}-{METHOD}[-{format}], without saying the same thing twice
    (W8A8 by w8a8 is `-W8A8`, FP8 by fp8 `-FP8`, GPTQ in the gptq format `-GPTQ`); a format with a repo suffix
    names one repo per base for all its variants (`-GGUF`: files named by type)."""
    from hubquant.formats import get_format
    from hubquant.methods import get_method

    name = repo_id.rstrip("/").split("/")[-1]
    suffix = get_format(fmt).repo_suffix
    if suffix:
        return f"{namespace}/{name}-{suffix}"
    if not get_method(method).scheme_in_name:
        return f"{namespace}/{name}-{method.upper()}"
    parts = [scheme.name]
    if method.upper() not in scheme.name.split("-"):
        parts.append(method.upper())
    if fmt != "compressed-tensors" and fmt.upper() not in parts:
        parts.append(fmt)
    return f"{namespace}/{name}-{'-'.join(parts)}"


# ---------------------------------------------------------------------------------------------- the base


@dataclass(frozen=True)
class Base:
    """The model to quantize: a Hub repo at one commit, or a local folder identified by its content hash.

    `id` names the base in provenance and the settings hash; `card_base` is the card's base_model (None for a
    folder unless the user names the Hub model it derives from)."""

    id: str
    sha: str
    name: str
    folder: Path | None = None
    card_base: str | None = None

    @property
    def is_local(self) -> bool:
        return self.folder is not None


def looks_local(ref: str) -> bool:
    return Path(ref).expanduser().is_dir() or ref.startswith(("./", "../", "/", "~", ".\\")) or ref in (".", "..")


def folder_hash(folder: Path) -> str:
    """sha256 over every file's relative path and bytes (hidden folders such as .git and .cache skipped)."""
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder)
        if not p.is_file() or any(part.startswith(".") for part in rel.parts):
            continue
        h.update(str(rel.as_posix()).encode() + b"\0")
        with p.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        h.update(b"\0")
    return h.hexdigest()


def check_repo_id(repo_id: str, what: str = "repo id") -> None:
    """Refuse names the Hub would reject, before any request."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise UsageError(f"'{repo_id}' is not a valid {what}: {str(e).splitlines()[0][:160]}",
                         hint="use NAMESPACE/NAME (letters, digits, '-', '_', '.'), or ./FOLDER for a local model"
                         ) from None


def resolve_base(opts: ConvertOptions) -> Base:
    """The base's identity: a folder's content hash, or the Hub commit sha that `revision` points at.

    Raises:
        UsageError: a name the Hub would reject. NotFoundError: a missing folder, repo or revision.
        AuthError: gated or private without access.
    """
    from hubquant.hub import client

    if looks_local(opts.repo_id):
        folder = Path(opts.repo_id).expanduser().resolve()
        if not folder.is_dir():
            raise NotFoundError(f"folder {opts.repo_id} does not exist", hint="check the path")
        if opts.revision:
            raise UsageError("--revision applies to Hub repos, not to a local folder", hint="drop --revision")
        if opts.base_model:
            check_repo_id(opts.base_model, "--base-model")
        return Base(id=opts.base_model or f"local:{folder.name}", sha=f"sha256:{folder_hash(folder)}",
                    name=folder.name, folder=folder, card_base=opts.base_model)
    check_repo_id(opts.repo_id)
    if opts.base_model and opts.base_model != opts.repo_id:
        raise UsageError("--base-model names the Hub model of a local folder", hint="drop --base-model")
    with client.hub_errors(opts.repo_id, revision=opts.revision, token=opts.token):
        info = client.api(opts.token).model_info(opts.repo_id, revision=opts.revision)
    return Base(id=opts.repo_id, sha=info.sha, name=opts.repo_id.split("/")[-1], card_base=opts.repo_id)


# ---------------------------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class Plan:
    """What a conversion will do, decided before any download.

    Attributes:
        action: "convert", "skip" (the target holds this base commit with these settings) or "conflict"
            (the target holds another base, or files hubquant did not write).
        target: the repo to push to (None without --push). target_head: its commit when it was checked
            (the push's parent commit, so a concurrent push ends in a conflict, never an overwrite).
        provenance: the target's hubquant.json when it has one.
    """

    opts: ConvertOptions
    scheme: QuantScheme
    format: str
    calibrated: bool
    settings: dict
    settings_hash: str
    base: Base
    target: str | None
    target_head: str | None
    action: str
    reason: str
    provenance: dict | None = None

    @property
    def format_spec(self):
        """The format's registry entry (hubquant.formats.FormatSpec)."""
        from hubquant.formats import get_format

        return get_format(self.format)


def check_options(opts: ConvertOptions) -> tuple[QuantScheme, str]:
    """Flag combinations that are wrong whatever the model is. Returns the scheme and the format."""
    from hubquant.methods import get_method

    scheme = resolve_scheme(opts)
    fmt = resolve_format(opts, scheme)
    get_method(opts.method).parse_options(opts.method_options)  # unknown keys, bad values
    check_format_options(opts, fmt)
    if opts.max_ppl_increase is not None and opts.skip_eval:
        raise UsageError("--max-ppl-increase needs the evaluation", hint="drop --skip-eval")
    if opts.num_samples < 1 or opts.seq_len < 16:
        raise UsageError("--num-samples must be >= 1 and --seq-len >= 16",
                         hint="use e.g. --num-samples 128 --seq-len 2048")
    if opts.eval_windows < 1 or opts.eval_seq_len < 16:
        raise UsageError("--eval-windows must be >= 1 and --eval-seq-len >= 16",
                         hint="use e.g. --eval-windows 8 --eval-seq-len 512")
    return scheme, fmt


def check_format_options(opts: ConvertOptions, fmt: str) -> None:
    """A format's own options (e.g. --gguf-type) given with another format, or with bad values, are refused."""
    from hubquant.formats import FORMATS
    from hubquant.options import declared

    flags = {f.name: f.metadata["flag"] for f in declared()}
    for spec in FORMATS.values():
        given = [flags[name] for name in spec.options if getattr(opts, name) is not None]
        if spec.name != fmt and given:
            raise UsageError(f"{'/'.join(given)} apply to --format {spec.name}", hint=f"add --format {spec.name}")
    FORMATS[fmt].settings(opts)  # the chosen format's own values (e.g. an unknown --gguf-type)


def plan(opts: ConvertOptions) -> Plan:
    """Decide scheme, format, settings hash, target and action for `opts` (reads the base's commit and the
    target's hubquant.json; downloads no weights).

    Raises:
        UsageError: bad flags or names. NotFoundError, AuthError: the base cannot be read.
    """
    from hubquant.hub import client

    scheme, fmt = check_options(opts)
    settings = settings_of(opts, scheme, fmt)
    base = resolve_base(opts)
    shash = settings_hash(base.id, settings)
    common = dict(opts=opts, scheme=scheme, format=fmt, calibrated=needs_calibration(opts, scheme),
                  settings=settings, settings_hash=shash, base=base)
    if not opts.push:
        return Plan(**common, target=None, target_head=None, action="convert", reason="no push")
    if opts.target_repo:
        check_repo_id(opts.target_repo, "--target-repo")
        target = opts.target_repo
    else:
        target = client.scoped_target(opts.token) or default_target(
            base.name, client.whoami_name(opts.token), scheme, opts.method, fmt)
    if target == base.id:
        raise UsageError("the target repo is the base repo", hint="pass another --target-repo")
    head = client.repo_head(target, opts.token)
    prov = client.read_provenance(target, opts.token, revision=head) if head else None
    action, reason = _decide(target, head, prov, base, shash, opts.token)
    return Plan(**common, target=target, target_head=head, action=action, reason=reason, provenance=prov)


def _decide(target: str, head: str | None, prov: dict | None, base: Base, shash: str, token) -> tuple[str, str]:
    from hubquant.hub import client

    if head is None:
        return "convert", "no variant yet"
    if prov is None:
        if client.has_files(target, token):
            return "conflict", f"{target} already exists and was not written by hubquant"
        return "convert", "no variant yet"
    if prov.get("base_model") != base.id:
        return "conflict", f"{target} holds a variant of {prov.get('base_model')}, not of {base.id}"
    if prov.get("base_sha") == base.sha and prov.get("settings_hash") == shash:
        return "skip", f"up to date (base {base.sha[:10]}, settings {shash})"
    if prov.get("base_sha") != base.sha:
        return "convert", f"new base commit {base.sha[:10]} (variant has {str(prov.get('base_sha'))[:10]})"
    return "convert", f"settings changed ({prov.get('settings_hash')} -> {shash})"
