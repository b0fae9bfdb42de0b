"""Argument checks that must happen in Python, before the dispatcher sees the call.

Everything about a tensor's dtype, device, rank and shape is checked once, in
C++ (csrc/problem.cpp), so the ops give the same messages however they are
called. Here: what the dispatcher would otherwise reject with an unhelpful
message — non-tensors, non-strided layouts (they dispatch to backends that
have no kernel) — and the string options.
"""
import torch

REDUCTIONS = {"mean": 1, "sum": 2}
ACTIVATIONS = {"sigmoid": 0, "identity": 1}


def check_tensors(fn_name, names, values, n_required):
    """The first ``n_required`` of ``values`` must be tensors; the rest tensors or None."""
    for index, (name, value) in enumerate(zip(names, values)):
        if isinstance(value, torch.Tensor):
            if value.layout is not torch.strided:
                raise ValueError(
                    f"fusedgrad.{fn_name}: argument '{name}' must be a dense (torch.strided) tensor, "
                    f"got layout {value.layout}"
                )
            continue
        if value is None and index >= n_required:
            continue
        expected = "a torch.Tensor" if index < n_required else "a torch.Tensor or None"
        raise TypeError(
            f"fusedgrad.{fn_name}: argument '{name}' must be {expected}, got {type(value).__name__}"
        )


def option(fn_name, name, value, choices):
    code = choices.get(value) if isinstance(value, str) else None
    if code is None:
        allowed = " or ".join(repr(c) for c in choices)
        raise ValueError(f"fusedgrad.{fn_name}: argument '{name}' must be {allowed}, got {value!r}")
    return code
