"""The pipeline's stages for a streamed run (hubquant.stages.Run with `run.weights`): the same stages, events and
log lines as the in-memory path, where the work is a pass over the decoder layers.

    baseline     embeds the evaluation windows (their base perplexity is measured as the layers stream)
    leak_check   base: embeds the leak check's documents; variant: the variant's memorisation rates
    quantize     quantizes and writes each layer; the base's numbers once the last layer is written
    evaluate     the variant's perplexity, top-1 agreement and KL from the kept last-layer activations
"""
from __future__ import annotations

from pathlib import Path

from hubquant.streaming.activations import EvalStreams, add_leak_streams, eval_streams, evaluate_streams, leak_rates


def _streams(run) -> EvalStreams:
    if run.streams is None:
        run.streams = eval_streams(run.weights, None, run.tokenizer, run.device, run.opts.progress)
    return run.streams


def baseline(run) -> None:
    run.streams = eval_streams(run.weights, run.eval_set, run.tokenizer, run.device, run.opts.progress)
    run.log(f"base: {run.eval_set.n_tokens} evaluation tokens embedded; their perplexity is measured as each "
            "decoder layer streams")


def leak_check(run, which: str) -> dict | None:
    """Base: the documents' layer-0 activations. Variant: its rates and the report."""
    from hubquant.leakcheck import leak_documents, leak_report

    streams = _streams(run)
    if which == "base":
        run.leak_docs = leak_documents(run.calib, run.texts.eval_src)
        add_leak_streams(run.weights, streams, run.leak_docs,
                         on_set=lambda done, total: run.emit(0.5 * done / total, f"base: {done}/{total} document sets"))
        return None
    if len(streams.leak_rates) != 1:
        return None
    leak_rates(run.weights, streams, variant=True,
               on_batch=lambda done, total: run.emit(0.5 + 0.5 * done / max(1, total),
                                                     f"variant: {done}/{total} batches"))
    return leak_report(*streams.leak_rates)


def quantize(run, job, out_dir: Path) -> None:
    """Quantize and write into `out_dir`, keeping the evaluation activations for the evaluate and leak-check
    stages."""
    from hubquant.streaming.session import quantize_and_write
    from hubquant.streaming.switch import OWN_STREAMED

    run.out_dir = out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    run.kept_files = set(out_dir.rglob("*"))  # the user's own files stay out of the variant's file list
    _streams(run)
    if run.plan.format in OWN_STREAMED:  # the format quantizes and writes itself (GGUF)
        import importlib

        module, _, fn = OWN_STREAMED[run.plan.format][1].partition(":")
        return getattr(importlib.import_module(module), fn)(run, job, out_dir)
    done = quantize_and_write(run.weights, job, method=run.opts.method, fmt=run.plan.format, out_dir=out_dir,
                              streams=_streams(run), method_options=run.opts.method_options, log=run.log)
    run.quantized, run.quant_config, run.routing = done.quantized, done.qc, done.routing


def evaluate(run):
    """(reference, comparison) of base and variant."""
    evaluate_streams(run.weights, run.streams, variant=True)
    return run.streams.reference, run.streams.compare

