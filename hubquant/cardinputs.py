"""What the model card says about a run: the scheme in words, the ignored layers, the data, the numbers."""
from __future__ import annotations

from hubquant.quant import QuantScheme


def describe(scheme: QuantScheme) -> tuple[str, str, str]:
    """(weights in words, activations in words, the card's hardware key)."""
    w, a = scheme.weights, scheme.activations
    if w.type == "float" and w.bits == 4:
        mx = w.group_size == 32
        wd = (f"FP4 e2m1, {'E8M0' if mx else 'FP8 e4m3'} scales per {w.group_size} inputs"
              + ("" if mx else " and a per-tensor global scale"))
        ad = "16-bit (not quantized)" if a is None else "FP4 e2m1, e4m3 scales per 16 inputs (dynamic), global static"
        return wd, ad, "fp4"
    if w.type == "float":
        wd = "FP8 e4m3, per-channel scales" if (a is None or a.dynamic) else "FP8 e4m3, per-tensor scale"
    else:
        g = "per output channel" if w.group_size == -1 else f"groups of {w.group_size}"
        wd = f"INT{w.bits}, {'symmetric' if w.symmetric else 'asymmetric'}, {g}"
    if a is None:
        ad = "16-bit (not quantized)"
    else:
        kind = "FP8 e4m3" if a.type == "float" else f"INT{a.bits}"
        ad = f"{kind}, {'dynamic per token' if a.dynamic else 'static per tensor'}"
    if w.type == "float":
        hw = "fp8"
    elif a is not None:
        hw = "int8"
    else:
        hw = "w4a16" if w.bits < 8 else "w8a16"
    return wd, ad, hw


def card_inputs(run):
    """The CardInputs of a finished run (hubquant.stages.Run)."""
    import hubquant
    from hubquant.card import DEQUANTIZE_NOTE, CardInputs
    from hubquant.formats import get_format
    from hubquant.hub import client
    from hubquant.methods import get_method
    from hubquant.modeling import auto_class
    from hubquant.plan import default_target
    from hubquant.stages import card_command, unquantized

    plan, calib, ev = run.plan, run.calib, run.eval_set
    wd, ad, hw = describe(plan.scheme)
    calib_desc = calib.description if calib else "none (no calibration needed)"
    fields = dict(
        target_repo=plan.target or default_target(plan.base.name, "local", plan.scheme, run.opts.method, plan.format),
        base_model=plan.base.card_base, base_sha=plan.base.sha, base_card_path=run.path / "README.md",
        method=run.opts.method, method_summary=get_method(run.opts.method).summary, scheme_name=plan.scheme.name,
        weights_desc=wd, acts_desc=ad, format=plan.format,
        quant_method=run.quant_config.get("quant_method", plan.format),
        ignored=unquantized(run.model, set(run.quantized)), calib_desc=calib_desc,
        calib_spec=calib.spec if calib else None, eval_desc=ev.description if ev else "not evaluated",
        eval_spec=run.texts.eval_spec, metrics=run.metrics if run.ref is not None else {},
        size_bytes=run.metrics["size_bytes"], base_size_bytes=run.metrics["base_size_bytes"],
        settings=plan.settings, settings_hash=plan.settings_hash, command=card_command(plan),
        hubquant_version=hubquant.__version__, hardware_key=hw, leak=run.leak, endpoint=client.endpoint(),
        base_label=plan.base.card_base or f"a local model folder ({plan.base.name})",
        dequantize_note=DEQUANTIZE_NOTE if run.quant_config.get("dequantize") else "",
        auto_class=auto_class(run.model.config).__name__ if getattr(run.model, "config", None) is not None
        else "AutoModelForCausalLM",
    )
    fields.update(get_format(plan.format).card_fields(run))  # e.g. GGUF's own words and section
    return CardInputs(**fields)
