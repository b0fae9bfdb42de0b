"""Argument checks that must happen in Python, before the dispatcher sees the call.

Everything about a tensor's dtype, device, rank and shape is checked once, in
C++ (csrc/common/problem.cpp), and so are the values of the string options
(csrc/common/options.cpp: the activation table's names), so the ops give the
same messages however they are called. Here: what the dispatcher would
otherwise reject with an unhelpful message — non-tensors, non-strided layouts
(they dispatch to backends that have no kernel), options that are not strings.
"""
import re
from typing import Mapping, Optional, Sequence

import torch

from . import _C

#: The activations the ops take, in the order of the activation table (csrc/common/activation.h).
ACTIVATIONS: tuple[str, ...] = tuple(_C.activations)
REDUCTIONS: tuple[str, ...] = ("mean", "sum")


def check_tensors(fn_name: str, names: Sequence[str], values: Sequence[object], n_required: int) -> None:
    """The first ``n_required`` of ``values`` must be tensors; the rest tensors or None.

    Raises TypeError for anything else (naming ``fusedgrad.<fn_name>``, the argument, what was
    expected and the type received), ValueError for a tensor whose layout is not strided."""
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


def option(fn_name: str, name: str, value: object) -> str:
    """A string option, passed to the ops as it is: its value is checked in C++ (ValueError).

    A non-string is a wrong type: TypeError, as torch raises for one, naming the argument, the
    allowed names and the value received."""
    if not isinstance(value, str):
        choices = REDUCTIONS if name == "reduction" else ACTIVATIONS
        allowed = ", ".join(repr(c) for c in choices)
        raise TypeError(f"fusedgrad.{fn_name}: argument '{name}' must be a str, one of {allowed}, got "
                        f"{type(value).__name__} {value!r}")
    return value


# The prefix of every argument error fusedgrad raises: "fusedgrad: " (C++,
# csrc/common/problem.cpp) or "fusedgrad.<op>: " (the fake kernels, which may be those
# of an op the called one dispatches to).
_PREFIX = re.compile(r"^fusedgrad(?:\.\w+)*: ")
_DEVICE = re.compile(r"^argument '(\w+)' is on device (\S+) but x is on device (\S+);")
_DTYPE = re.compile(r"^argument '(\w+)' has dtype (\S+) but x has dtype (\S+);")


def attributed(exc: Exception, fn_name: str, names: Sequence[str], values: Sequence[object],
               renames: Optional[Mapping[str, str]] = None) -> Exception:
    """``exc`` (an argument error from the ops) as the error of ``fn_name``, the
    function the user called; ``exc`` itself when it is not one of fusedgrad's
    messages. Raise the result ``from None`` and bind it to no local name: a
    local of the raising frame would make a reference cycle through the
    traceback, keeping the call's tensors alive until the cycle collector runs.

    The ops compare every argument with ``x``; where ``x`` is the odd one out (the
    weights and biases share one device or dtype that ``x`` lacks), ``x`` is the
    argument blamed. ``renames`` maps argument names to the caller's own
    (e.g. ``w1`` → ``linear1.weight``).
    """
    message = str(exc)
    if not _PREFIX.match(message):
        return exc
    body = _PREFIX.sub("", message, count=1)
    tensors = {n: v for n, v in zip(names, values) if isinstance(v, torch.Tensor)}
    x = tensors.get("x")
    weights = {n: t for n, t in tensors.items() if n in ("w1", "b1", "w2", "b2")}
    for pattern, attr in ((_DEVICE, "device"), (_DTYPE, "dtype")):
        if pattern.match(body) is None or x is None or not weights:
            continue
        theirs = {getattr(t, attr) for t in weights.values()}
        if len(theirs) == 1 and getattr(x, attr) not in theirs:
            (other,) = theirs
            listed = ", ".join(f"'{(renames or {}).get(n, n)}'" for n in weights)
            if attr == "device":
                body = (f"argument 'x' is on device {x.device} but the weights ({listed}) are on device {other}; "
                        "all tensor arguments must be on one device")
            else:
                body = (f"argument 'x' has dtype {x.dtype} but the weights ({listed}) have dtype {other}; "
                        "all tensor arguments must share one dtype")
    for old, new in (renames or {}).items():
        body = body.replace(f"argument '{old}'", f"parameter '{new}'").replace(f"'{old}'", f"'{new}'")
    return type(exc)(f"{fn_name}: {body}")
