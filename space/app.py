"""hubquant's Gradio Space: compare a model with its quantized variants live, and convert on demand.

Run locally with `hubquant space` (against HF_ENDPOINT), or as a Hugging Face Space (`python app.py`).
"""
from __future__ import annotations

import dataclasses
import os
import sys
import time
from pathlib import Path
from typing import Optional

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import gradio as gr  # noqa: E402
from hqspace.compare import METRICS, PanelResult, metrics_markdown, run_comparison, tradeoff_plot  # noqa: E402
from hqspace.discover import describe, find_bases, find_variants  # noqa: E402
from hqspace.jobs import ConvertRequest, JobRunner, error_kind, preflight  # noqa: E402
from hqspace.runner import ModelCache, download, load_model  # noqa: E402

import hubquant  # noqa: E402,F401  (Hub environment before huggingface_hub is imported)
from hubquant.errors import HubquantError  # noqa: E402

DEFAULT_BASE = "HuggingFaceTB/SmolLM2-135M-Instruct"
DEFAULT_PROMPT = "Explain in two sentences why the sky is blue."
MAX_PANELS = 4  # the base and up to three variants
# label -> (bits, group_size); None = the method's default scheme
SCHEMES = {
    "method default": (None, None),
    "W4A16 group 64": (4, 64),
    "W4A16 group 128": (4, 128),
    "W4A16 group 32": (4, 32),
    "W8A16 per channel": (8, -1),
}
CSS = ".panel-out textarea { font-size: 0.9em; }"


def _methods() -> list[str]:
    from hubquant.methods import METHODS

    return list(METHODS)


def _api(token: str | None = None):
    from huggingface_hub import HfApi, constants

    if "huggingface.co" not in constants.ENDPOINT:
        constants.HF_HUB_DISABLE_XET = True
    return HfApi(endpoint=constants.ENDPOINT, token=token or None)


def _error_md(kind: str, e: HubquantError) -> str:
    return f"**{kind}:** {e.message}" + (f"  \n**Fix:** {e.hint}" if e.hint else "")


def build_app(*, default_base: str = DEFAULT_BASE, cache_bytes: int | None = None, max_new_tokens: int = 64,
              on_space: bool | None = None, job_runner: JobRunner | None = None) -> gr.Blocks:
    """The Blocks app with the Compare and Convert tabs.

    Args:
        default_base: the base model the Compare tab opens with.
        cache_bytes: memory bound of loaded models (default: env HUBQUANT_SPACE_CACHE_MB, else 4000 MB).
        max_new_tokens: the default generation length.
        on_space: show the Hugging Face login button (default: when SPACE_ID is set); otherwise a token box.
        job_runner: where conversions run (default: a JobRunner over hubquant.convert).
    """
    if cache_bytes is None:
        cache_bytes = int(float(os.environ.get("HUBQUANT_SPACE_CACHE_MB", "4000")) * 1e6)
    if on_space is None:
        on_space = bool(os.environ.get("SPACE_ID"))
    cache = ModelCache(cache_bytes, loader=lambda repo: load_model(download(repo), repo))
    jobs = job_runner or JobRunner()

    handlers = _compare_handlers(cache, default_base)
    convert = _convert_handler(jobs, on_space)
    with gr.Blocks(title="hubquant: compare quantized variants", analytics_enabled=False) as demo:
        gr.Markdown("# hubquant\nCompare a model with its quantized variants on one prompt, or make new variants.")
        with gr.Tab("Compare"):
            _compare_tab(demo, handlers, default_base, max_new_tokens)
        with gr.Tab("Convert"):
            _convert_tab(convert, on_space)
    demo.queue(default_concurrency_limit=1, max_size=32)
    return demo


def _compare_handlers(cache: ModelCache, default_base: str):
    """The Compare tab's callbacks: (refresh_variants, base_choices, compare)."""

    def refresh_variants(base: str):
        base = (base or "").strip()
        if not base:
            return gr.CheckboxGroup(choices=[], value=[]), "Choose a base model."
        try:
            found = find_variants(_api(), base)
        except HubquantError as e:
            return gr.CheckboxGroup(choices=[], value=[]), _error_md(error_kind(e), e)
        except Exception as e:  # Hub unreachable etc.: say so on the page
            return gr.CheckboxGroup(choices=[], value=[]), f"**Error:** cannot list models: {e}"
        choices = [(e.label, e.repo_id) for e in found]
        msg = f"{len(found)} variant(s) of {base} found on {_api().endpoint}."
        return gr.CheckboxGroup(choices=choices, value=[e.repo_id for e in found[: MAX_PANELS - 1]]), msg

    def base_choices():
        try:
            bases = find_bases(_api())
        except Exception:
            bases = []
        if default_base not in bases:
            bases.insert(0, default_base)
        return gr.Dropdown(choices=bases, value=default_base)

    def _outputs(panels: list[PanelResult], status: str, plot=None):
        updates = []
        for i in range(MAX_PANELS):
            if i < len(panels):
                p = panels[i]
                updates.append(gr.Column(visible=True))
                updates.append(gr.Textbox(label=p.entry.repo_id, value=p.text))
                updates.append(gr.Markdown(value=metrics_markdown(p)))
            else:
                updates += [gr.Column(visible=False), gr.Textbox(value=""), gr.Markdown(value="")]
        table = [[p.entry.repo_id] + [None if getattr(p, attr) is None else float(fmt.format(getattr(p, attr)))
                                      for _, attr, _, fmt in METRICS] for p in panels]
        return [status, *updates, table, plot]

    def compare(base: str, variants: list[str], prompt: str, n_tokens: float):
        base = (base or "").strip()
        variants = [v for v in (variants or []) if v != base]
        note = ""
        if len(variants) > MAX_PANELS - 1:
            note = f" Showing the first {MAX_PANELS - 1} variants ({len(variants)} ticked)."
            variants = variants[: MAX_PANELS - 1]
        if not base or not (prompt or "").strip():
            yield _outputs([], "Choose a base model and write a prompt.")
            return
        api = _api()
        try:
            found = [describe(api, v, base=base) for v in variants]
            base_entry = describe(api, base)
        except HubquantError as e:
            yield _outputs([], _error_md(error_kind(e), e))
            return
        # the base's perplexity, when every variant's card measured it on the same text
        base_ppls = {round(v.base_perplexity, 3) for v in found if v.base_perplexity is not None}
        if base_entry.perplexity is None and len(base_ppls) == 1:
            base_entry = dataclasses.replace(base_entry, perplexity=base_ppls.pop())
        entries = [base_entry, *found]
        t0 = time.perf_counter()
        panels: list[PanelResult] = []
        try:
            for panels in run_comparison(entries, prompt, cache=cache, max_new_tokens=int(n_tokens)):
                busy = next((p for p in panels if p.status in ("loading", "generating")), None)
                status = f"{busy.status} {busy.entry.repo_id}…" if busy and busy.status == "loading" else "generating…"
                yield _outputs(panels, status)
        except HubquantError as e:
            yield _outputs(panels, _error_md(error_kind(e), e))
            return
        except Exception as e:  # show any other failure on the page instead of a bare "Error" toast
            yield _outputs(panels, f"**Error:** {type(e).__name__}: {e}")
            raise
        done = (f"Done in {time.perf_counter() - t0:.1f} s: {len(entries)} models, greedy, "
                f"{int(n_tokens)} new tokens at most.{note}")
        yield _outputs(panels, done, tradeoff_plot(panels))

    return refresh_variants, base_choices, compare


def _convert_handler(jobs: JobRunner, on_space: bool):
    """The Convert tab's callback (a generator streaming the job's status, log and links)."""

    def convert(model_id: str, methods: list[str], scheme: str, evaluate: bool, token_text: str,
                oauth_token: Optional[gr.OAuthToken] = None,  # noqa: UP045 (gradio matches this hint)
                progress=gr.Progress()):
        model_id = (model_id or "").strip()
        if not model_id or not methods:
            yield "Enter a model id and pick at least one method.", "", ""
            return
        if on_space:  # only the visitor's own login: never the Space owner's HF_TOKEN
            token = oauth_token.token if oauth_token else None
        else:
            token = (token_text or "").strip() or os.environ.get("HF_TOKEN")
        api = _api(token)
        try:
            user = preflight(api, model_id, token)
        except HubquantError as e:
            yield _error_md(error_kind(e), e), "", ""
            return
        bits, group = SCHEMES.get(scheme, (None, None))
        job = jobs.submit(ConvertRequest(repo_id=model_id, methods=tuple(methods), bits=bits, group_size=group,
                                         token=token, user=user, evaluate=bool(evaluate)))
        while True:
            finished = job.state in ("done", "failed")
            progress(job.progress, desc=f"{job.state}: {job.stage}" if job.stage else job.state)
            status = (f"Job {job.id} for {user}: **{job.state}** · {job.methods_done}/{len(job.request.methods)} "
                      f"methods · {100 * job.progress:.0f}% · {job.elapsed:.0f} s")
            links = ""
            if job.results:
                links = "\n".join(
                    f"- [{r['target_repo']}]({api.endpoint}/{r['target_repo']}) ({r['method']}"
                    + (", unchanged: same base and settings" if r.get("skipped") else "") + ")"
                    for r in job.results)
                links = "New repos:\n" + links
            if job.state == "failed":
                fix = f"  \n**Fix:** {job.hint}" if job.hint else ""
                status = f"**{job.error_kind or 'Error'}:** {job.error}{fix}  \n{status}"
            yield status, "\n".join(job.lines[-400:]), links
            if finished:
                return
            time.sleep(0.5)

    return convert


def _compare_tab(demo: gr.Blocks, handlers, default_base: str, max_new_tokens: int) -> None:
    """Lay out the Compare tab (inside its gr.Tab) and wire its events."""
    refresh_variants, base_choices, compare = handlers
    with gr.Row():
        base = gr.Dropdown(label="Base model", choices=[default_base], value=default_base,
                           allow_custom_value=True, scale=4)
        find = gr.Button("Find variants", scale=1)
    variants = gr.CheckboxGroup(label="Variants", choices=[], elem_id="variants")
    find_msg = gr.Markdown()
    prompt = gr.Textbox(label="Prompt", value=DEFAULT_PROMPT, lines=2)
    with gr.Row():
        n_tokens = gr.Slider(8, 256, value=max_new_tokens, step=8, label="Max new tokens", scale=3)
        compare_btn = gr.Button("Compare", variant="primary", scale=1)
    status = gr.Markdown(elem_id="compare-status")
    panel_components = []
    with gr.Row(equal_height=False):
        for i in range(MAX_PANELS):
            with gr.Column(min_width=220, visible=False, variant="panel") as col:
                out = gr.Textbox(label=f"model {i + 1}", lines=8, max_lines=16, interactive=False,
                                 elem_id=f"panel-{i}", elem_classes="panel-out")
                met = gr.Markdown(elem_id=f"metrics-{i}")
                panel_components += [col, out, met]
    headers = ["model"] + [f"{label} ({unit})" if unit else label for label, _, unit, _ in METRICS]
    table = gr.Dataframe(headers=headers, label="Metrics", interactive=False, elem_id="metrics-table")
    plot = gr.Plot(label="Size vs quality vs speed")
    find.click(refresh_variants, base, [variants, find_msg])
    base.change(refresh_variants, base, [variants, find_msg])
    demo.load(base_choices, None, base).then(refresh_variants, base, [variants, find_msg])
    compare_btn.click(compare, [base, variants, prompt, n_tokens], [status, *panel_components, table, plot],
                      concurrency_limit=1, concurrency_id="compare")


def _convert_tab(convert, on_space: bool) -> None:
    """Lay out the Convert tab (inside its gr.Tab) and wire its events."""
    gr.Markdown("Quantize a model from the Hub and push the variant to your namespace "
                "(one repo per method, named after the base, method and scheme).")
    if on_space:
        gr.LoginButton()
        token_box = gr.Textbox(visible=False, value="")
    else:
        token_box = gr.Textbox(label="Hub token", type="password",
                               placeholder="hf_… (empty: the server's HF_TOKEN)")
    model_box = gr.Textbox(label="Model", placeholder="org/name", value="")
    with gr.Row():
        methods = gr.CheckboxGroup(label="Methods", choices=_methods(), value=["rtn"])
        scheme = gr.Dropdown(label="Scheme", choices=list(SCHEMES), value="method default",
                             info="applies to weight-only methods (rtn, gptq, awq)")
    evaluate = gr.Checkbox(label="Measure perplexity against the base (slower; shown on the card)", value=True)
    convert_btn = gr.Button("Convert", variant="primary")
    job_status = gr.Markdown(elem_id="convert-status")
    job_links = gr.Markdown(elem_id="convert-links")
    job_log = gr.Textbox(label="Log", lines=14, max_lines=30, interactive=False, autoscroll=True)
    convert_btn.click(convert, [model_box, methods, scheme, evaluate, token_box],
                      [job_status, job_log, job_links], concurrency_limit=4, concurrency_id="convert",
                      show_progress_on=[job_status])


def launch(demo: gr.Blocks, *, host: str = "127.0.0.1", port: int | None = None, block: bool = True):
    """Start the server (no share tunnel, no server-side rendering, which would need Node)."""
    return demo.launch(server_name=host, server_port=port, share=False, ssr_mode=False, show_error=True,
                       prevent_thread_lock=not block, quiet=not block, theme=_theme(), css=CSS)


def _theme():
    # system fonts: the page needs nothing from the internet
    return gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])


if __name__ == "__main__":
    on_space = bool(os.environ.get("SPACE_ID"))
    launch(build_app(), host=os.environ.get("GRADIO_SERVER_NAME", "0.0.0.0" if on_space else "127.0.0.1"),
           port=int(os.environ.get("GRADIO_SERVER_PORT", "7860")))
