"""One comparison: the base and its variants on one prompt, with the numbers per model."""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace

from hqspace.discover import ModelEntry
from hqspace.metrics import mean_kl, token_agreement
from hqspace.runner import ModelCache, Stream, prompt_ids, run_streams, sequence_logits

MB = 1e6


@dataclass(frozen=True, kw_only=True)
class PanelResult:
    """What one output panel shows. Numbers are None until known."""

    entry: ModelEntry
    text: str = ""
    status: str = "waiting"
    n_tokens: int = 0
    tokens_per_s: float | None = None
    ttft_ms: float | None = None
    disk_mb: float | None = None
    memory_mb: float | None = None
    agreement_pct: float | None = None
    mean_kl: float | None = None
    perplexity: float | None = None
    ppl_change_pct: float | None = None  # vs the base's perplexity on the same text, from the same card
    loader: str = ""  # how it was loaded, and the loader's notes


# (label, attribute, unit, format) in the order panels show them
METRICS = (
    ("Speed", "tokens_per_s", "tokens/s", "{:.1f}"),
    ("Time to first token", "ttft_ms", "ms", "{:.0f}"),
    ("Size on disk", "disk_mb", "MB", "{:.1f}"),
    ("Memory", "memory_mb", "MB", "{:.1f}"),
    ("Identical tokens", "agreement_pct", "%", "{:.1f}"),
    ("Mean KL", "mean_kl", "nats/token", "{:.4f}"),
    ("Perplexity (card)", "perplexity", "", "{:.2f}"),
    ("Perplexity change (card)", "ppl_change_pct", "%", "{:+.1f}"),
)


def metrics_markdown(p: PanelResult) -> str:
    """The panel's metrics as a Markdown list: numbers with units, or an em dash while unknown."""
    lines = [f"**{p.status}**" + (f" · {p.loader}" if p.loader else "")]
    for label, attr, unit, fmt in METRICS:
        value = getattr(p, attr)
        shown = "—" if value is None else (fmt.format(value) + (f" {unit}" if unit else ""))
        lines.append(f"- {label}: {shown}")
    return "\n".join(lines)


def _ppl_change(entry: ModelEntry) -> float | None:
    if entry.base is None:
        return 0.0
    if entry.perplexity is None or not entry.base_perplexity:
        return None
    return 100.0 * (entry.perplexity / entry.base_perplexity - 1.0)


def _panel(entry: ModelEntry, stream: Stream | None, status: str) -> PanelResult:
    if stream is None:
        return PanelResult(entry=entry, status=status, perplexity=entry.perplexity, ppl_change_pct=_ppl_change(entry))
    loaded = stream.loaded
    return PanelResult(
        entry=entry, text=stream.text, status=status, n_tokens=len(stream.tokens),
        tokens_per_s=stream.decode_tokens_per_second if len(stream.tokens) > 1 else None,
        ttft_ms=None if stream.ttft is None else 1000 * stream.ttft,
        disk_mb=(entry.size_bytes or loaded.disk_bytes) / MB, memory_mb=loaded.memory_bytes / MB,
        perplexity=entry.perplexity, ppl_change_pct=_ppl_change(entry),
        loader="; ".join((loaded.loader, *loaded.notes)),
    )


def run_comparison(entries: list[ModelEntry], prompt: str, *, cache: ModelCache,
                   max_new_tokens: int = 64) -> Iterator[list[PanelResult]]:
    """Generate greedily with every model (entries[0] is the base) and yield the panels as they fill.

    The last yield carries agreement with the base (free-running greedy tokens, position by position)
    and the mean KL(base || variant) of next-token distributions over prompt + the base's output.
    """
    panels = [_panel(e, None, "waiting") for e in entries]
    loaded = []
    for i, e in enumerate(entries):
        panels[i] = replace(panels[i], status="loading")
        yield list(panels)
        loaded.append(cache.get(e.repo_id))
        panels[i] = replace(panels[i], status="loaded")
    streams = [Stream(loaded=lm, prompt=prompt_ids(lm.tokenizer, prompt), max_new_tokens=max_new_tokens)
               for lm in loaded]
    for _ in run_streams(streams):
        yield [_panel(e, s, "done" if s.done else "generating") for e, s in zip(entries, streams)]

    base = streams[0]
    base_seq = base.prompt + base.tokens
    base_logits = sequence_logits(base.loaded, base_seq)
    final = []
    for i, (e, s) in enumerate(zip(entries, streams)):
        p = _panel(e, s, "done")
        if i == 0:
            p = replace(p, agreement_pct=100.0, mean_kl=0.0)
        else:
            kl = None
            if s.prompt == base.prompt:
                logits = sequence_logits(s.loaded, base_seq)
                if logits.shape == base_logits.shape:
                    kl = mean_kl(base_logits, logits)
            p = replace(p, agreement_pct=token_agreement(base.tokens, s.tokens), mean_kl=kl)
        final.append(p)
    yield final


def tradeoff_plot(panels: list[PanelResult]):
    """Size on disk (x) vs quality (y: perplexity change from the cards, else mean KL) vs speed (marker area).

    Each card measures its variant and the base on the same text, so the change in % compares across
    variants even when their cards used different evaluation text; raw perplexities would not.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=100)
    rows = [p for p in panels if p.disk_mb is not None]
    use_ppl = bool(rows) and all(p.ppl_change_pct is not None for p in rows)
    for p in rows:
        y = p.ppl_change_pct if use_ppl else (p.mean_kl or 0.0)
        speed = p.tokens_per_s or 0.0
        ax.scatter([p.disk_mb], [y], s=40 + 8 * speed, alpha=0.6)
        ax.annotate(f"{p.entry.repo_id.split('/')[-1]}\n{speed:.1f} tok/s", (p.disk_mb, y),
                    textcoords="offset points", xytext=(6, 6), fontsize=8)
    ax.set_xlabel("size on disk (MB)")
    ax.set_ylabel("perplexity change vs base, from card (%)" if use_ppl else "mean KL vs base (nats/token)")
    ax.set_title("size vs quality vs speed (marker area = tokens/s)")
    ax.grid(alpha=0.3)
    ax.margins(x=0.25, y=0.3)
    fig.tight_layout()
    return fig
