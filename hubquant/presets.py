"""Scheme presets: the names llm-compressor users know (``--scheme W4A16``), each one a `QuantScheme`.

A preset fixes bits, group size, symmetry and activations; `--bits/--group-size/--sym/--asym/--activations`
may repeat its values but not contradict them. Which methods can produce a preset is said by the methods' registry
entries (`MethodSpec.schemes`, checked by `MethodSpec.resolve_scheme(preset=...)`). No torch import (the CLI
starts fast).
"""
from __future__ import annotations

from hubquant.errors import UsageError
from hubquant.schemes import ActivationScheme, QuantScheme, WeightScheme

_INT8_DYN = ActivationScheme(bits=8, type="int", dynamic=True, strategy="token")
_FP8 = WeightScheme(bits=8, group_size=-1, type="float")

PRESETS: dict[str, QuantScheme] = {
    "W4A16": QuantScheme(weights=WeightScheme(bits=4, group_size=128, symmetric=True)),
    "W4A16_ASYM": QuantScheme(weights=WeightScheme(bits=4, group_size=128, symmetric=False)),
    "W8A16": QuantScheme(weights=WeightScheme(bits=8, group_size=128, symmetric=True)),
    "W8A8": QuantScheme(weights=WeightScheme(bits=8, group_size=-1), activations=_INT8_DYN),
    # FP8: per-tensor weights, static per-tensor activations; FP8_DYNAMIC: per-channel weights, per-token activations
    "FP8": QuantScheme(weights=_FP8, activations=ActivationScheme(bits=8, type="float", dynamic=False,
                                                                  strategy="tensor")),
    "FP8_DYNAMIC": QuantScheme(weights=_FP8, activations=ActivationScheme(bits=8, type="float", dynamic=True,
                                                                          strategy="token")),
    "NVFP4A16": QuantScheme(weights=WeightScheme(bits=4, group_size=16, type="float")),
    # W4A4: e4m3 activation scales per 16 inputs computed at run time under a calibrated global scale
    "NVFP4": QuantScheme(weights=WeightScheme(bits=4, group_size=16, type="float"),
                         activations=ActivationScheme(bits=4, type="float", dynamic=False, strategy="tensor_group")),
    "MXFP4A16": QuantScheme(weights=WeightScheme(bits=4, group_size=32, type="float")),
}


def get_preset(name: str) -> QuantScheme:
    """The scheme of preset `name` (case-insensitive).

    Raises:
        UsageError: an unknown name, listing the known ones.
    """
    try:
        return PRESETS[name.upper()]
    except KeyError:
        raise UsageError(f"unknown --scheme {name}", hint=f"choose one of: {', '.join(PRESETS)}") from None


def check_overrides(name: str, scheme: QuantScheme, *, bits: int | None = None, group_size: int | None = None,
                    symmetric: bool | None = None, activations: str | None = None) -> None:
    """Raise UsageError when a flag contradicts preset `name` (repeating its value is fine)."""
    w, a = scheme.weights, scheme.activations
    conflicts = []
    if bits is not None and bits != w.bits:
        conflicts.append(f"--bits {bits} (it has {w.bits})")
    if group_size is not None and group_size != w.group_size:
        conflicts.append(f"--group-size {group_size} (it has {w.group_size})")
    if symmetric is not None and symmetric != w.symmetric:
        conflicts.append(f"--{'sym' if symmetric else 'asym'} (it is {'' if w.symmetric else 'a'}symmetric)")
    if activations is not None:
        have = None if a is None else ("dynamic" if a.dynamic else "static")
        if a is None or (activations != have and a.strategy != "tensor_group"):
            conflicts.append(f"--activations {activations} (it has {have or 'none'})")
    if conflicts:
        raise UsageError(f"--scheme {name} conflicts with {', '.join(conflicts)}",
                         hint=f"drop the flag(s), or drop --scheme {name}")
