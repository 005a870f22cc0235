"""Larger-than-memory conversion: one decoder layer in memory at a time (`convert --streaming auto|on|off`).

    skeleton on the meta device (no weights) -> embeddings, final norm and lm_head from the checkpoint when
    calibration or evaluation needs them -> for each decoder layer: read its tensors from the safetensors shards
    (running transformers' own WeightConverters on just that layer's keys: per-expert MoE tensors fused into 3-D
    parameters, then per-expert Linears as in memory), run the base model's evaluation activations through it,
    quantize it (RTN here; calibrated methods through hubquant.engine.run_layers' layer hooks, MoE layers under
    the routing policy), run the variant's evaluation activations through it, hand its tensors to the writer,
    free it -> perplexity, agreement, KL and the calibration-leak rates from the kept last-layer activations.

Peak memory is one decoder layer, the non-layer weights and the activations (calibration, evaluation), not the
model. The files are byte-identical to the in-memory path's.

Modules:
    checkpoint   `Weights` (model key -> checkpoint key or transformers converter; `load`/`release` a module),
                 `load_skeleton`, `key_mapping`, `open_checkpoint`
    activations  `Stream` (hidden states advanced layer by layer, on the conversion's device), `replay`,
                 `EvalStreams`, `eval_streams`, `add_leak_streams`, `evaluate_streams`, `leak_rates`
    session      `Session` (the engine's layer hooks), `quantize_and_write`, the RTN layer loop
    switch       `open_for` (the --streaming policy)
    pipeline     the stages' streamed bodies (baseline, leak_check, quantize, evaluate) for hubquant.stages

Writer interface (stable; a streamed writer such as GGUF plugs in here): per decoder layer, in layer order,
`Session.write_part(state, quantized, modules)` receives
    state      {full model key: CPU tensor} of the layer's float tensors (quantized Linears' weights included,
               holding their dequantized values; the writer drops them via `quantized`),
    quantized  {full Linear name (model naming, e.g. `model.layers.3.mlp.experts.5.down_proj`): QuantizedWeight},
    modules    [(full module name, module)] of the layer,
and writes `dense_tensors` + `FormatSpec.linear_tensors` under checkpoint names (`hubquant.moe.checkpoint_name`:
Mixtral's `block_sparse_moe`) into `formats/shards.ShardWriter`; `Session.finish(out_dir)` adds the tensors outside
the layers and the format's config files and lays the shards out as `save_tensors` does.
"""
from hubquant.streaming.activations import (
                                            EvalStreams,
                                            Stream,
                                            add_leak_streams,
                                            eval_streams,
                                            evaluate_streams,
                                            leak_rates,
                                            replay,
)
from hubquant.streaming.checkpoint import Weights, key_mapping, load_skeleton, open_checkpoint
from hubquant.streaming.session import Session, StreamedResult, quantize_and_write
from hubquant.streaming.switch import STREAMED_FORMATS, STREAMED_METHODS, open_for, return_freed_memory

__all__ = [
    "EvalStreams", "STREAMED_FORMATS", "STREAMED_METHODS", "Session", "Stream", "StreamedResult", "Weights",
    "add_leak_streams", "eval_streams", "evaluate_streams", "key_mapping", "leak_rates", "load_skeleton",
    "open_checkpoint", "open_for", "quantize_and_write", "replay", "return_freed_memory",
]
