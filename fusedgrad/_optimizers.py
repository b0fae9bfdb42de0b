"""The Python half of fusedgrad.Trainer's optimizer registry.

Each optimizer the fused steps run has one description in C++
(csrc/trainer/optimizers.h: its options and how they are read from
``param_groups``, its state names, its element-wise update) and its mirror
here: the ``torch.optim`` classes it describes and the state torch creates for
a parameter before its first update (which fusedgrad.Trainer makes the same way
before the first fused step, so plain ``opt.step()`` and ``state_dict()`` see
what they would have seen). The optimizer is read at every call by one reader,
in C++ (csrc/trainer/binding_helpers.h: read_optimizer), through the C++
description; ``fusedgrad._C.optimizer_descriptions()`` lists them.

Adding an element-wise optimizer: its struct in csrc/trainer/optimizers.h (and
its entry in ``AnyOptimizer``), its ``Description`` below, its tests.

``torch.optim.LBFGS`` is described here too but is not element-wise (its dot
products couple every parameter): it has its own C++ loop (csrc/trainer/lbfgs.cpp),
for ``Trainer.fit`` on the full batch of one network.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch


def scalar_dtype(group) -> torch.dtype:
    """torch.optim.optimizer._get_scalar_dtype: the fused kernels keep step in float32."""
    if group.get("fused"):
        return torch.float32
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def _step(group, p):
    device = p.device if group.get("capturable") or group.get("fused") else None
    return torch.zeros((), dtype=scalar_dtype(group), device=device)


def _zeros(p):
    return torch.zeros_like(p, memory_format=torch.preserve_format)


def _init_adam(optimizer, group, p, state):
    """torch.optim.Adam._init_group (AdamW is Adam)."""
    state["step"] = _step(group, p)
    state["exp_avg"] = _zeros(p)
    state["exp_avg_sq"] = _zeros(p)
    if group.get("amsgrad", False):
        state["max_exp_avg_sq"] = _zeros(p)


def _init_rmsprop(optimizer, group, p, state):
    """torch.optim.RMSprop._init_group."""
    state["step"] = _step(group, p)
    state["square_avg"] = _zeros(p)
    if group["momentum"] > 0:
        state["momentum_buffer"] = _zeros(p)
    if group["centered"]:
        state["grad_avg"] = _zeros(p)


def _init_adagrad(optimizer, group, p, state):
    """torch.optim.Adagrad._init_group (its constructor makes the same state for every parameter):
    the accumulator starts at the optimizer's *defaults*' initial_accumulator_value."""
    state["step"] = _step(group, p) if group.get("fused") else torch.tensor(0.0, dtype=scalar_dtype(group))
    state["sum"] = torch.full_like(p, optimizer.defaults["initial_accumulator_value"],
                                   memory_format=torch.preserve_format)


@dataclass(frozen=True)
class Description:
    name: str  # its C++ description's kName (csrc/trainer/optimizers.h)
    classes: tuple  # the torch.optim classes it describes, exactly (a subclass may step otherwise)
    # Makes parameter p's state as torch does before its first update, where it is empty;
    # None: the first gradient fills it (SGD's momentum buffer, made by the C++ reader).
    init_state: Optional[Callable[[torch.optim.Optimizer, dict, torch.Tensor, dict], None]]
    elementwise: bool = True  # in the C++ registry; False: LBFGS


DESCRIPTIONS = (
    Description("sgd", (torch.optim.SGD,), None),
    Description("adam", (torch.optim.Adam,), _init_adam),
    Description("adamw", (torch.optim.AdamW,), _init_adam),
    Description("rmsprop", (torch.optim.RMSprop,), _init_rmsprop),
    Description("adagrad", (torch.optim.Adagrad,), _init_adagrad),
)
LBFGS = Description("lbfgs", (torch.optim.LBFGS,), None, elementwise=False)
_BY_CLASS = {cls: d for d in DESCRIPTIONS + (LBFGS,) for cls in d.classes}
_NAMES = [cls.__name__ for d in DESCRIPTIONS + (LBFGS,) for cls in d.classes]
SUPPORTED = "torch.optim." + ", ".join(_NAMES[:-1]) + " or " + _NAMES[-1]  # "torch.optim.SGD, Adam, ... or LBFGS"


def description_of(fn: str, optimizer) -> Description:
    """The description of the optimizer's exact class; TypeError for any other."""
    d = _BY_CLASS.get(type(optimizer))
    if d is None:
        raise TypeError(f"{fn}: argument 'optimizer' must be a {SUPPORTED}, got "
                        f"{type(optimizer).__module__}.{type(optimizer).__qualname__}")
    return d


def prepare_state(d: Description, optimizer, group, p) -> None:
    """Parameter p's state made as torch makes it where it is empty, and a number step (old state
    dicts) made the tensor torch.optim makes of it."""
    state = optimizer.state[p]
    if len(state) == 0:
        if d.init_state is not None:
            d.init_state(optimizer, group, p, state)
        return
    step = state.get("step")
    if step is not None and not isinstance(step, torch.Tensor):
        state["step"] = torch.tensor(float(step), dtype=scalar_dtype(group))
