"""Networks of more than one hidden layer, route against route in one run (``python -m fusedgrad bench --deep``).

Cases (float32, Adam lr 1e-3, full batch, every route from the same data and the same initial weights):

* ``curve``     — curve fit 100×1→[20]×3→1 tanh, 201 steps per timed loop;
* ``pinn``      — PINN-sized regression 2 540×2→[20]×3→1 tanh (DeepXDE's Burgers network);
* ``surrogate`` — 4 096×32→[64]×4→8 relu;
* ``wide``      — 16 384×64→[128]×4→16 relu;
* ``ensemble``  — K = 256 curve-fit networks, µs per model-step;
* ``tall``      — one ``net.loss(x, y).backward()`` of 1→[20]×3→1 tanh over 10⁴, 10⁵, 10⁶ rows, ns per row.

Routes (µs per training step):

* ``native``       — the eager loop: ``zero_grad``, ``F.mse_loss``, ``backward``, ``Adam.step`` (foreach);
* ``native_fused`` — the same with ``Adam(fused=True)``;
* ``compile``      — ``torch.compile`` of that whole step, Adam's update included (only with ``--compile``:
  10–20 s of compiling a case);
* ``net_loss``     — ``net.loss(x, y).backward()`` + ``Adam(fused=True)``: the fused op under autograd;
* ``fit``          — ``fusedgrad.Trainer(net, Adam(...)).fit(x, y, steps)``: every step in C++;
* ``jax_jit``      — JAX + optax, one ``jit``-compiled step per Python call (blocked on at the loop's end);
* ``jax_scan``     — JAX + optax, all the loop's steps as one ``lax.scan`` under ``jit``.

For the ensemble: ``loop`` (a Python loop over the models, each with its own ``Adam``; timed on a
subset of the models and scaled to K — the output says how many), ``torch_func``
(``stack_module_state`` + ``vmap(grad(functional_call))`` + ``Adam(fused=True)`` on the stacked
parameters), ``fit`` (``Trainer.fit`` of a ``FusedMLPEnsemble``) and ``jax_vmap`` (``vmap`` of the
``lax.scan`` training). The JAX routes are skipped (with the reason) when ``jax``/``optax`` are not
importable (``pip install fusedgrad[bench]``).

Every route is checked before it is timed. The reference is the native loop (the Python loop over
the models for the ensemble) in float64, ``CHECK_STEPS`` Adam steps from the shared start on the
shared data (both exactly representable in float32, so every dtype trains the same problem):

* float64: the route's own float64 run must end within ``TOL64`` (1e-8) × the largest parameter of
  the reference, elementwise — the tight check (each framework in its float64 mode: JAX's x64;
  torch.compile under the float64 default dtype, so that Adam's step counters are float64 too:
  compiled, Adam computes its bias corrections in the counter's dtype, and in float32 1 − 0.999 is
  off by 1.3e-5);
* float32, the very route instance that is then timed: its distance to the float64 reference,
  ‖Δparameters‖₂ / ‖reference − start‖₂ (a fraction of the distance trained), must be at most
  ``TOL32`` (1e-3) or twice the native float32 loop's own, whichever is larger — as accurate as
  native, or nearly. Not elementwise and not against native's float32 run: Adam moves a parameter
  by about ±lr whatever its gradient's size, so a gradient element that float32 rounding makes
  noise (a sum over thousands of rows that cancels) moves its parameter by ±lr at random. Measured
  on the wide case: native's float32 gradients are off by up to 1.2e-3 of a tensor's largest
  element, its float32 loop ends 0.95 % of the distance trained from float64 (JAX's too), the fused
  routes' 0.08 % — against native's float32 run, the more accurate route would look wrong.

A route that fails either check, or raises, is reported as failed (with the measured error or the
exception) and not timed. Tall data is checked as gradients: float64 against native's at the
smallest N to 1e-10; float32, at every N, against the float64 gradients of the same data, to
``TOL_TALL32`` (1e-3) of the largest element (native's own float32 error is recorded beside it).

Timing: each route is warmed up with one loop of the timed length (JAX and ``torch.compile``
compile there or in the check; those first calls' seconds are reported), then the median of
``repeats`` loops (fewer past a time budget), the routes of a case interleaved: each round times one
loop of every route in turn (``time_interleaved``), so that a ratio compares the same minutes. FLOPs of a step: forward 2N·Σ n_{l−1}n_l, backward
twice that less the first layer's input gradient (2N·n₀n₁, which no route computes):
6N·Σ n_{l−1}n_l − 2N·n₀n₁; activations, loss and the Adam update not counted. GFLOP/s are against
a square SGEMM (``torch.mm``) timed in the same run at the same thread count (the better of a
measurement before and one after the cases).
"""
from __future__ import annotations

import contextlib
import copy
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .machine import cpu_facts, cpu_label
from .steps import gemm_peak_gflops, jax_available

CHECK_STEPS = 3
LR = 1e-3
TOL64 = 1e-8
TOL32 = 1e-3  # float32: distance to the float64 reference over the distance trained (or 2× native's, if larger)
TOL64_TALL = 1e-10
TOL_TALL32 = 1e-3
JAX_MISSING = "jax/optax not importable (pip install jax optax, or fusedgrad[bench])"


@dataclass(frozen=True)
class Case:
    name: str
    N: int
    D: int
    H: int
    layers: int
    O: int
    act: str
    steps: int  # steps per timed loop
    large: bool = False  # GFLOP/s tabled

    @property
    def widths(self):
        return [self.D] + [self.H] * self.layers + [self.O]

    def flops(self):
        w = self.widths
        return 6 * self.N * sum(a * b for a, b in zip(w, w[1:])) - 2 * self.N * w[0] * w[1]

    @property
    def label(self):
        return f"{self.N}×{self.D}→[{self.H}]×{self.layers}→{self.O} {self.act}"


CASES = {
    "curve": Case("curve", 100, 1, 20, 3, 1, "tanh", 201),
    "pinn": Case("pinn", 2540, 2, 20, 3, 1, "tanh", 50),
    "surrogate": Case("surrogate", 4096, 32, 64, 4, 8, "relu", 10, large=True),
    "wide": Case("wide", 16384, 64, 128, 4, 16, "relu", 3, large=True),
}
# --quick: the same networks on few rows, loops of CHECK_STEPS steps (JAX's scan then compiles one length)
QUICK_CASES = {
    "curve": Case("curve", 100, 1, 20, 3, 1, "tanh", 3),
    "pinn": Case("pinn", 254, 2, 20, 3, 1, "tanh", 3),
    "surrogate": Case("surrogate", 256, 32, 64, 4, 8, "relu", 3, large=True),
    "wide": Case("wide", 512, 64, 128, 4, 16, "relu", 3, large=True),
}
ENSEMBLE = {"K": 256, "steps": 201, "loop_models": 8}
QUICK_ENSEMBLE = {"K": 16, "steps": 3, "loop_models": 2}
TALL_SIZES = [10**4, 10**5, 10**6]
QUICK_TALL_SIZES = [10**3, 10**4]

ROUTES = ("native", "native_fused", "compile", "net_loss", "fit", "jax_jit", "jax_scan")
ENSEMBLE_ROUTES = ("loop", "torch_func", "fit", "jax_vmap")
NAMES = {
    "native": "native loop + Adam",
    "native_fused": "native + Adam(fused)",
    "compile": "torch.compile(step)",
    "net_loss": "net.loss().backward() + Adam(fused)",
    "fit": "Trainer.fit",
    "jax_jit": "JAX jit per step",
    "jax_scan": "JAX lax.scan",
    "loop": "Python loop over models",
    "torch_func": "torch.func vmap + Adam(fused)",
    "jax_vmap": "JAX vmap(scan)",
}
JAX_ROUTES = {"jax_jit", "jax_scan", "jax_vmap"}

_ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU, "sigmoid": nn.Sigmoid}


# ---------------------------------------------------------------------------- problems
def _sequential(case, dtype=torch.float32):
    """nn.Sequential(Linear, act, …, Linear) of the case's widths (nn.Linear's own initialisation)."""
    w = case.widths
    items = []
    for l, (a, b) in enumerate(zip(w, w[1:])):
        if l:
            items.append(_ACTIVATIONS[case.act]())
        items.append(nn.Linear(a, b, dtype=dtype))
    return nn.Sequential(*items)


def _load(params, values):
    with torch.no_grad():
        for p, v in zip(params, values):
            p.copy_(v)


def _data(case, seed):
    """x uniform in [-1, 1), y = sin(3·Σx + output index): float64 tensors holding float32 values."""
    gen = torch.Generator().manual_seed(seed)
    x = (torch.rand(case.N, case.D, generator=gen) * 2 - 1).double()
    y = torch.sin(3 * x.sum(-1, keepdim=True) + torch.arange(case.O, dtype=torch.float64)).float().double()
    return x, y


class Problem:
    """One case's data and initial weights (float32, drawn by nn.Linear), in any dtype."""

    def __init__(self, case: Case, seed: int = 0):
        self.case = case
        torch.manual_seed(seed)
        self.init = [p.detach().clone() for p in _sequential(case).parameters()]  # w1, b1, w2, b2, …
        self._x, self._y = _data(case, seed + 1)

    def data(self, dtype):
        return self._x.to(dtype), self._y.to(dtype)

    def init_params(self, dtype):
        return [t.to(dtype) for t in self.init]

    def native(self, dtype):
        model = _sequential(self.case, dtype)
        _load(model.parameters(), self.init_params(dtype))
        return model

    def fused(self, dtype):
        """``FusedMLP(D, H, O, activation, hidden_layers)`` holding the shared start (keys linear{l}.*)."""
        from ..module import FusedMLP

        c = self.case
        net = FusedMLP(c.D, c.H, c.O, activation=c.act, hidden_layers=c.layers, dtype=dtype)
        init = self.init_params(dtype)
        net.load_state_dict({f"linear{l // 2 + 1}.{'weight' if l % 2 == 0 else 'bias'}": t
                             for l, t in enumerate(init)})
        return net


def _module_params(module):
    return [p.detach().clone() for p in module.parameters()]


# ---------------------------------------------------------------------------- routes: make(problem, dtype) -> (run(steps), params())
def route_native(problem, dtype, fused_adam=False):
    model = problem.native(dtype)
    opt = torch.optim.Adam(model.parameters(), lr=LR, fused=fused_adam)
    x, y = problem.data(dtype)

    def run(steps):
        for _ in range(steps):
            opt.zero_grad()
            F.mse_loss(model(x), y).backward()
            opt.step()

    return run, lambda: _module_params(model)


def route_compile(problem, dtype):
    torch._dynamo.reset()  # a fresh compile per route: no recompile limit reached across cases, no stale guards
    model = problem.native(dtype)
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    x, y = problem.data(dtype)

    @torch.compile
    def step():
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        opt.step()

    def run(steps):
        for _ in range(steps):
            step()

    return run, lambda: _module_params(model)


def route_net_loss(problem, dtype):
    net = problem.fused(dtype)
    opt = torch.optim.Adam(net.parameters(), lr=LR, fused=True)
    x, y = problem.data(dtype)

    def run(steps):
        for _ in range(steps):
            opt.zero_grad()
            net.loss(x, y).backward()
            opt.step()

    return run, lambda: _module_params(net.to_module())


def route_fit(problem, dtype):
    from ..trainer import Trainer

    net = problem.fused(dtype)
    trainer = Trainer(net, torch.optim.Adam(net.parameters(), lr=LR))
    x, y = problem.data(dtype)

    def run(steps):
        losses = trainer.fit(x, y, steps)
        if tuple(losses.shape) != (steps,):
            raise RuntimeError(f"Trainer.fit returned losses of shape {tuple(losses.shape)}, expected ({steps},)")

    return run, lambda: _module_params(net.to_module())


def _jax_loss(act_name):
    import jax
    import jax.numpy as jnp

    act = {"tanh": jnp.tanh, "relu": jax.nn.relu, "sigmoid": jax.nn.sigmoid}[act_name]

    def loss(params, x, y):
        a = x
        for i, (w, b) in enumerate(params):
            a = a @ w.T + b
            if i < len(params) - 1:
                a = act(a)
        return jnp.mean((a - y) ** 2)

    return loss


def _jax_step(act_name):
    import jax
    import optax

    loss, tx = _jax_loss(act_name), optax.adam(LR)

    def step(p, s, x, y):
        g = jax.grad(loss)(p, x, y)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    return step, tx


def _to_jax(tensors):
    import jax.numpy as jnp

    return [(jnp.asarray(w.numpy()), jnp.asarray(b.numpy())) for w, b in zip(tensors[0::2], tensors[1::2])]


def _from_jax(pairs):
    import numpy as np

    return [torch.from_numpy(np.array(t)) for pair in pairs for t in pair]  # np.array: a writable copy


def route_jax_jit(problem, dtype):
    import jax
    import jax.numpy as jnp

    step, tx = _jax_step(problem.case.act)
    step = jax.jit(step)
    x, y = (jnp.asarray(t.numpy()) for t in problem.data(dtype))
    params = _to_jax(problem.init_params(dtype))
    state = {"p": params, "s": tx.init(params)}

    def run(steps):
        p, s = state["p"], state["s"]
        for _ in range(steps):
            p, s = step(p, s, x, y)
        state["p"], state["s"] = jax.block_until_ready((p, s))

    return run, lambda: _from_jax(state["p"])


def route_jax_scan(problem, dtype):
    import jax
    import jax.numpy as jnp

    step, tx = _jax_step(problem.case.act)
    x, y = (jnp.asarray(t.numpy()) for t in problem.data(dtype))
    params = _to_jax(problem.init_params(dtype))
    state = {"p": params, "s": tx.init(params)}
    compiled = {}

    def run(steps):
        if steps not in compiled:
            def train(p, s, x, y):
                return jax.lax.scan(lambda c, _: (step(*c, x, y), None), (p, s), None, length=steps)[0]

            compiled[steps] = jax.jit(train)
        state["p"], state["s"] = jax.block_until_ready(compiled[steps](state["p"], state["s"], x, y))

    return run, lambda: _from_jax(state["p"])


MAKERS = {
    "native": lambda p, d: route_native(p, d, False),
    "native_fused": lambda p, d: route_native(p, d, True),
    "compile": route_compile,
    "net_loss": route_net_loss,
    "fit": route_fit,
    "jax_jit": route_jax_jit,
    "jax_scan": route_jax_scan,
}


# ---------------------------------------------------------------------------- checking and timing
@contextlib.contextmanager
def _float64_mode(route):
    """Each framework's float64 mode for the float64 check: JAX's x64 (JAX stays float32 everywhere else);
    for torch.compile the float64 default dtype, so that Adam's step counters are float64 (module docstring)."""
    if route in JAX_ROUTES:
        import jax

        if hasattr(jax, "enable_x64"):
            with jax.enable_x64(True):
                yield
        else:
            from jax.experimental import enable_x64  # older JAX

            with enable_x64():
                yield
    elif route == "compile":
        saved = torch.get_default_dtype()
        torch.set_default_dtype(torch.float64)
        try:
            yield
        finally:
            torch.set_default_dtype(saved)
    else:
        yield


def _err64(params, reference):
    """Largest elementwise difference over the largest reference element."""
    scale = max(float(p.abs().max()) for p in reference)
    return max(float((a.double() - b.double()).abs().max()) for a, b in zip(params, reference)) / scale


def _err32(params, reference, init):
    """‖params − reference‖₂ / ‖reference − init‖₂: the distance to the reference over the distance it trained."""
    diff = math.sqrt(sum(float((a.double() - b.double()).pow(2).sum()) for a, b in zip(params, reference)))
    moved = math.sqrt(sum(float((b.double() - i.double()).pow(2).sum()) for b, i in zip(reference, init)))
    return diff / moved


def _reason(exc):
    text = (f"{type(exc).__name__}: {exc}".strip().splitlines() or [type(exc).__name__])[0]
    return text if len(text) <= 300 else text[:297] + "..."


def time_interleaved(runs, repeats, budget_s, failed):
    """Median seconds per step of each route of `runs` ({name: (run, steps)}), timed in rounds: each round
    runs one loop of `steps` steps of every route in turn, so that every route's loops fall in the same
    minutes and a ratio between two routes does not measure the machine's drift between them (on the
    2-vCPU guest the same step took 1.5–2× longer in some minutes than in others). `repeats` rounds,
    fewer once past `budget_s` seconds a route. A route that raises is dropped, its reason put in
    `failed`, and the others go on."""
    times = {name: [] for name in runs}
    live, start = dict(runs), time.perf_counter()
    for _ in range(repeats):
        for name, (run, steps) in list(live.items()):
            try:
                t0 = time.perf_counter()
                run(steps)
                times[name].append((time.perf_counter() - t0) / steps)
            except Exception as exc:  # reported, not fatal
                failed[name] = _reason(exc)
                del live[name]
        if not live or time.perf_counter() - start > budget_s * len(runs):
            break
    return {name: statistics.median(t) for name, t in times.items() if name in live and t}


def _check(name, make64, make32, ref64, init, native32, out, timing_steps, check64=True):
    """Check route `name` against the float64 reference `ref64` (its float64 run elementwise to TOL64, unless
    `check64` is False; its float32 run to max(TOL32, 2 × `native32`), the native float32 loop's own error, or
    only recorded when `native32` is None: the native route itself), then warm that float32 instance up at
    the timed length `timing_steps`. Fills out['failed'|'check'|'first_call_s']; returns (float32 error,
    its run), or None where it failed."""
    try:
        e64 = None
        if check64:
            with _float64_mode(name):
                run, params = make64()
                run(CHECK_STEPS)
                e64 = _err64(params(), ref64)
        t0 = time.perf_counter()
        run, params = make32()
        run(CHECK_STEPS)
        first_call = time.perf_counter() - t0
        e32 = _err32(params(), ref64, init)
        tol32 = None if native32 is None else max(TOL32, 2 * native32)
        out["check"][name] = {"float64_max_rel": e64, "float32_rel_to_distance": e32, "float32_tolerance": tol32}
        if e64 is not None and not e64 <= TOL64:  # `not <=`: a NaN fails
            out["failed"][name] = (f"float64 parameters after {CHECK_STEPS} steps differ from the reference by "
                                   f"{e64:.2e} of their scale (tolerance {TOL64:.0e})")
            return None
        if not (e32 <= tol32 if tol32 is not None else e32 == e32):
            out["failed"][name] = (f"float32 parameters after {CHECK_STEPS} steps are {e32:.2e} of the distance "
                                   f"trained from the float64 reference (tolerance {tol32:.1e}: the larger of "
                                   f"{TOL32:.0e} and twice the native float32 loop's {native32:.1e})")
            return None
        t0 = time.perf_counter()
        run(timing_steps)  # warm-up at the timed length (JAX's scan compiles per length)
        if name in JAX_ROUTES or name == "compile":
            out["first_call_s"][name] = first_call + (time.perf_counter() - t0 if name in ("jax_scan", "jax_vmap")
                                                      and timing_steps != CHECK_STEPS else 0.0)
        return e32, run
    except Exception as exc:  # a route that raises is reported, not fatal: the others still run
        out["failed"][name] = _reason(exc)
        return None


class _Bar:
    """A tqdm progress line for one case (routes as units); silent when disabled or tqdm is missing."""

    def __init__(self, desc, total, enabled):
        self.bar = None
        if enabled:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, desc=f"{desc:<10}", unit="route", file=sys.stderr, leave=True,
                                bar_format="{desc} {percentage:3.0f}%|{bar:20}| {n_fmt}/{total_fmt} "
                                           "[{elapsed}] {postfix}")
            except ImportError:
                pass

    def route(self, name):
        if self.bar is not None:
            self.bar.set_postfix_str(name)

    def done(self):
        if self.bar is not None:
            self.bar.update(1)

    def close(self):
        if self.bar is not None:
            self.bar.set_postfix_str("")
            self.bar.close()


def _ratios(us, fused_routes, others):
    """{'fit_x_native': native µs / fit µs, …}: how many times faster the fused route is."""
    return {f"{f}_x_{o}": us[o] / us[f] for f in fused_routes if f in us for o in others if o in us}


def check_and_time_routes(routes, makers, problem, ref64, init, steps, repeats, budget_s, out, bar):
    """Checks each route of `routes` (makers[name](problem, dtype) -> (run, params)), the native route first
    (its float32 error sets the others' tolerance; JAX routes skipped without JAX), then times the checked
    ones interleaved (time_interleaved) into out['us_per_step']."""
    native32, runs = None, {}
    for name in ["native"] + [r for r in routes if r != "native"]:
        bar.route(name)
        if name in JAX_ROUTES and not jax_available():
            out["skipped"][name] = JAX_MISSING
        else:
            checked = _check(name, lambda: makers[name](problem, torch.float64),
                             lambda: makers[name](problem, torch.float32), ref64, init, native32, out, steps,
                             check64=name != "native")
            if name == "native":
                if checked is None:
                    raise RuntimeError(f"the native route (the reference) failed: {out['failed'].get('native')}")
                native32 = checked[0]
            if checked is not None:
                runs[name] = (checked[1], steps)
        bar.done()
    bar.route("timing, interleaved")
    for name, seconds in time_interleaved(runs, repeats, budget_s, out["failed"]).items():
        out["us_per_step"][name] = seconds * 1e6


def bench_case(case, routes, repeats, budget_s, progress=True):
    problem = Problem(case)
    out = {"case": case.name, "label": case.label, "N": case.N, "widths": case.widths, "activation": case.act,
           "steps_per_loop": case.steps, "flops_per_step": case.flops(), "us_per_step": {}, "gflops": {},
           "check": {}, "failed": {}, "skipped": {}, "first_call_s": {}}
    bar = _Bar(case.name, len(routes), progress)
    try:
        bar.route("native (reference)")
        ref64_run, ref64_params = route_native(problem, torch.float64)
        ref64_run(CHECK_STEPS)
        ref64 = ref64_params()
        init = problem.init_params(torch.float64)
        check_and_time_routes(routes, MAKERS, problem, ref64, init, case.steps, repeats, budget_s, out, bar)
    finally:
        bar.close()
    for name, us in out["us_per_step"].items():
        out["gflops"][name] = case.flops() / (us * 1e-6) / 1e9
    out["ratios"] = _ratios(out["us_per_step"], ("fit", "net_loss"),
                            ("native", "native_fused", "compile", "jax_jit", "jax_scan"))
    return out


# ---------------------------------------------------------------------------- ensembles
class EnsembleProblem:
    """K curve-fit networks (each drawn by nn.Linear, one after the other) on the curve case's data."""

    def __init__(self, case: Case, K: int, seed: int = 0):
        self.case, self.K = case, K
        torch.manual_seed(seed)
        models = [list(_sequential(case).parameters()) for _ in range(K)]
        self.init = [torch.stack([m[i].detach() for m in models]) for i in range(len(models[0]))]  # (K, …) each
        self._x, self._y = _data(case, seed + 1)

    def data(self, dtype):
        return self._x.to(dtype), self._y.to(dtype)

    def init_params(self, dtype, k):
        return [t[:k].to(dtype) for t in self.init]

    def natives(self, dtype, k):
        models = []
        for i in range(k):
            model = _sequential(self.case, dtype)
            _load(model.parameters(), [t[i].to(dtype) for t in self.init])
            models.append(model)
        return models


def ens_loop(prob, dtype, k):
    models = prob.natives(dtype, k)
    opts = [torch.optim.Adam(m.parameters(), lr=LR) for m in models]
    x, y = prob.data(dtype)

    def run(steps):
        for _ in range(steps):
            for m, o in zip(models, opts):
                o.zero_grad()
                F.mse_loss(m(x), y).backward()
                o.step()

    def params():
        per_model = [list(m.parameters()) for m in models]
        return [torch.stack([pm[i].detach() for pm in per_model]) for i in range(len(per_model[0]))]

    return run, params


def ens_torch_func(prob, dtype, k):
    from torch.func import functional_call, grad, stack_module_state, vmap

    models = prob.natives(dtype, k)
    params, _ = stack_module_state(models)  # {"0.weight": (k, …), …}, Sequential order
    base = copy.deepcopy(models[0]).to("meta")
    names = list(params)
    opt = torch.optim.Adam([params[n] for n in names], lr=LR, fused=True)
    x, y = prob.data(dtype)

    def model_loss(p, xx, yy):
        return F.mse_loss(functional_call(base, p, (xx,)), yy)

    grads_of = vmap(grad(model_loss), in_dims=(0, None, None))

    def run(steps):
        for _ in range(steps):
            g = grads_of(params, x, y)
            for n in names:
                params[n].grad = g[n]
            opt.step()

    return run, lambda: [params[n].detach().clone() for n in names]


def ens_fit(prob, dtype, k):
    from ..ensemble import FusedMLPEnsemble
    from ..trainer import Trainer

    c = prob.case
    ens = FusedMLPEnsemble(k, c.D, c.H, c.O, hidden_layers=c.layers, activation=c.act, dtype=dtype)
    names = [f"{kind}{l}" for l in range(1, c.layers + 2) for kind in ("weight", "bias")]  # Sequential order
    _load([getattr(ens, n) for n in names], prob.init_params(dtype, k))
    trainer = Trainer(ens, torch.optim.Adam(ens.parameters(), lr=LR))
    x, y = prob.data(dtype)

    def run(steps):
        losses = trainer.fit(x, y, steps)
        if tuple(losses.shape) != (steps, k):
            raise RuntimeError(f"Trainer.fit returned losses of shape {tuple(losses.shape)}, expected ({steps}, {k})")

    return run, lambda: [getattr(ens, n).detach().clone() for n in names]


def ens_jax_vmap(prob, dtype, k):
    import jax
    import jax.numpy as jnp

    step, tx = _jax_step(prob.case.act)
    x, y = (jnp.asarray(t.numpy()) for t in prob.data(dtype))
    params = _to_jax(prob.init_params(dtype, k))
    state = {"p": params, "s": jax.vmap(tx.init)(params)}
    compiled = {}

    def run(steps):
        if steps not in compiled:
            def train(p, s, x, y):
                return jax.lax.scan(lambda c, _: (step(*c, x, y), None), (p, s), None, length=steps)[0]

            compiled[steps] = jax.jit(jax.vmap(train, in_axes=(0, 0, None, None)))
        state["p"], state["s"] = jax.block_until_ready(compiled[steps](state["p"], state["s"], x, y))

    return run, lambda: _from_jax(state["p"])


ENSEMBLE_MAKERS = {"loop": ens_loop, "torch_func": ens_torch_func, "fit": ens_fit, "jax_vmap": ens_jax_vmap}


def bench_ensemble(case, K, steps, loop_models, repeats, budget_s, progress=True):
    """µs per model-step of each ensemble route, each checked (all K models) against the float64 Python loop;
    the loop itself is timed on `loop_models` models and scaled to K."""
    prob = EnsembleProblem(case, K)
    out = {"case": "ensemble", "label": f"K={K} × {case.label}", "K": K, "steps_per_loop": steps,
           "loop_models_timed": loop_models, "us_per_model_step": {}, "check": {}, "failed": {}, "skipped": {},
           "first_call_s": {}, "flops_per_model_step": case.flops(), "activations_per_model_step":
           case.N * case.H * case.layers}
    timing_steps = {"loop": max(1, steps // 20), "torch_func": max(1, steps // 4)}
    bar = _Bar("ensemble", len(ENSEMBLE_ROUTES), progress)
    try:
        bar.route("loop (reference)")
        run, params = ens_loop(prob, torch.float64, K)
        run(CHECK_STEPS)
        ref64 = params()
        init = prob.init_params(torch.float64, K)
        run, params = ens_loop(prob, torch.float32, K)
        run(CHECK_STEPS)
        native32 = _err32(params(), ref64, init)
        out["check"]["loop"] = {"float64_max_rel": None, "float32_rel_to_distance": native32,
                                "float32_tolerance": None}
        runs, models = {}, {}
        for name in ENSEMBLE_ROUTES:
            bar.route(name)
            if name in JAX_ROUTES and not jax_available():
                out["skipped"][name] = JAX_MISSING
                bar.done()
                continue
            make = ENSEMBLE_MAKERS[name]
            n = timing_steps.get(name, steps)
            if name == "loop":  # the reference, checked above: timed on a subset, with a subset's error
                k = loop_models
                sub = {"check": {}, "failed": {}, "first_call_s": {}}
                checked = _check(name, None, lambda: make(prob, torch.float32, k), [t[:k] for t in ref64],
                                 [t[:k] for t in init], None, sub, n, check64=False)
                if checked is None:
                    raise RuntimeError(f"the Python loop (the reference) failed: {sub['failed'].get(name)}")
            else:
                k = K
                checked = _check(name, lambda: make(prob, torch.float64, K), lambda: make(prob, torch.float32, K),
                                 ref64, init, native32, out, n)
            if checked is not None:
                runs[name], models[name] = (checked[1], n), k
            bar.done()
        bar.route("timing, interleaved")
        for name, seconds in time_interleaved(runs, repeats, budget_s, out["failed"]).items():
            out["us_per_model_step"][name] = seconds * 1e6 / models[name]
        if "loop" not in out["us_per_model_step"]:
            raise RuntimeError(f"the Python loop (the reference) failed: {out['failed'].get('loop')}")
    finally:
        bar.close()
    out["ratios"] = _ratios(out["us_per_model_step"], ("fit",), ("loop", "torch_func", "jax_vmap"))
    return out


# ---------------------------------------------------------------------------- tall data
def bench_tall(case, sizes, repeats, progress=True):
    """ns per row of one loss + backward (gradients into .grad), fused against native, over growing N."""
    problem = Problem(case)
    out = {"case": "tall", "label": f"N×{case.D}→[{case.H}]×{case.layers}→{case.O} {case.act}, "
                                    "one loss(x, y).backward()", "rows": [], "failed": {}, "skipped": {}}
    bar = _Bar("tall", len(sizes), progress)

    def grads(model, loss_of, x, y):
        model.zero_grad(set_to_none=True)
        loss_of(x, y).backward()
        return [p.grad.detach().clone() for p in model.parameters()]

    def ns_per_row(routes, x, y, reps):
        """Median ns per row of each (model, loss_of) of `routes`, timed in turn, one call each a round."""
        times = [[] for _ in routes]
        for _ in range(reps):
            for i, (model, loss_of) in enumerate(routes):
                model.zero_grad(set_to_none=True)
                t0 = time.perf_counter()
                loss_of(x, y).backward()
                times[i].append(time.perf_counter() - t0)
        return [statistics.median(t) / x.shape[0] * 1e9 for t in times]

    try:
        for i, n in enumerate(sizes):
            bar.route(f"N={n:,}")
            gen = torch.Generator().manual_seed(n)
            x64 = torch.rand(n, case.D, generator=gen, dtype=torch.float64) * 2 - 1
            x = x64.float()
            y = torch.sin(3 * x)
            x64, y64 = x.double(), y.double()  # the float32 data, exactly, for the float64 reference
            reps = max(3, min(repeats * 10, 10**6 // n))
            row = {"N": n}
            n64 = problem.native(torch.float64)
            g64 = grads(n64, lambda a, b: F.mse_loss(n64(a), b), x64, y64)
            native = problem.native(torch.float32)

            def native_loss(xx, yy):
                return F.mse_loss(native(xx), yy)

            row["native_float32_grad_err"] = _err64(grads(native, native_loss, x, y), g64)  # and a warm-up
            try:  # the fused route: checked (gradients), then both timed, interleaved
                fused = problem.fused(torch.float32)

                def fused_loss(xx, yy):
                    return fused.loss(xx, yy)

                if i == 0:  # float64 gradients against native's, tight
                    f64 = problem.fused(torch.float64)
                    out["float64_grad_max_rel"] = _err64(grads(f64, lambda a, b: f64.loss(a, b), x64, y64), g64)
                    if not out["float64_grad_max_rel"] <= TOL64_TALL:
                        raise RuntimeError(f"float64 gradients differ from native's by "
                                           f"{out['float64_grad_max_rel']:.2e} of their scale "
                                           f"(tolerance {TOL64_TALL:.0e})")
                row["fused_float32_grad_err"] = _err64(grads(fused, fused_loss, x, y), g64)
                if not row["fused_float32_grad_err"] <= TOL_TALL32:
                    raise RuntimeError(f"float32 gradients at N={n} differ from the float64 ones by "
                                       f"{row['fused_float32_grad_err']:.2e} of their scale (tolerance "
                                       f"{TOL_TALL32:.0e}; native's float32: {row['native_float32_grad_err']:.2e})")
                row["native_ns_per_row"], row["fused_ns_per_row"] = ns_per_row(
                    [(native, native_loss), (fused, fused_loss)], x, y, reps)
                row["fused_x_native"] = row["native_ns_per_row"] / row["fused_ns_per_row"]
            except Exception as exc:
                out["failed"][f"N={n}"] = _reason(exc)
                row["native_ns_per_row"] = ns_per_row([(native, native_loss)], x, y, reps)[0]
            out["rows"].append(row)
            bar.done()
    finally:
        bar.close()
    return out


# ---------------------------------------------------------------------------- the whole suite
def _versions():
    found = {"python": platform.python_version(), "torch": torch.__version__, "jax": None, "optax": None}
    if jax_available():
        import jax
        import optax

        found["jax"], found["optax"] = jax.__version__, getattr(optax, "__version__", "?")
    try:
        from importlib.metadata import version

        found["fusedgrad"] = version("fusedgrad")
    except Exception:
        found["fusedgrad"] = None
    return found


def _limit_jax_threads(threads):
    """JAX (XLA) runs its own thread pool, not torch's; at 1 thread it is asked for one (before JAX starts)."""
    if threads == 1 and "jax" not in sys.modules:
        flags = os.environ.get("XLA_FLAGS", "")
        os.environ["XLA_FLAGS"] = (flags + " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1").strip()
        return "1 (XLA_FLAGS: --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1)"
    return f"XLA's own pool (up to the machine's {os.cpu_count()} CPUs)"


def run(quick=False, threads=2, with_compile=False, repeats=5, progress=True):
    """The whole suite at `threads` torch threads; returns the result (what deep.json holds)."""
    jax_threads = _limit_jax_threads(threads)
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    started = time.perf_counter()
    try:
        cases = QUICK_CASES if quick else CASES
        ens = QUICK_ENSEMBLE if quick else ENSEMBLE
        repeats = min(repeats, 3) if quick else repeats
        budget = 1.0 if quick else 20.0
        routes = [r for r in ROUTES if r != "compile" or with_compile]
        peak_n = 256 if quick else 1536
        peak_before = gemm_peak_gflops(torch.float32, n=peak_n)
        case_rows = [bench_case(c, routes, repeats, budget, progress) for c in cases.values()]
        ensemble = bench_ensemble(cases["curve"], ens["K"], ens["steps"], ens["loop_models"], repeats, budget,
                                  progress)
        tall = bench_tall(cases["curve"], QUICK_TALL_SIZES if quick else TALL_SIZES, repeats, progress)
        peak_after = gemm_peak_gflops(torch.float32, n=peak_n)
    finally:
        torch.set_num_threads(saved)
    peak = max(peak_before, peak_after)
    for c in case_rows:
        c["pct_peak"] = {r: 100 * g / peak for r, g in c["gflops"].items()}
        if not with_compile:
            c["skipped"]["compile"] = "not run (pass --compile: 10–20 s of compiling per case)"
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"), "machine": platform.machine(), **cpu_facts(),
        "platform": platform.platform(), **_versions(), "threads": threads,
        "jax_threads": jax_threads, "dtype": "float32", "quick": quick, "compile": with_compile, "repeats": repeats,
        "lr": LR, "optimizer": "Adam (torch.optim / optax.adam, default betas and eps)",
        "check": {"steps": CHECK_STEPS, "reference": "the native loop in float64 (ensemble: the Python loop over "
                  "the models)", "float64_max_rel": TOL64, "float32_rel_to_distance": TOL32,
                  "float32_rule": "max(float32_rel_to_distance, 2 × the native float32 loop's)",
                  "tall_float64": TOL64_TALL, "tall_float32": TOL_TALL32},
        "flops": "6N·Σ n_{l-1}n_l − 2N·n_0n_1 per step (forward 2NΣ, backward 4NΣ less the first layer's input "
                 "gradient)",
        "gemm_peak_gflops": peak, "gemm_peak_gflops_before_after": [peak_before, peak_after],
        "gemm_peak_shape": f"{peak_n}² torch.mm, best of 10",
        "seconds": time.perf_counter() - started,
    }
    return {"meta": meta, "cases": case_rows, "ensemble": ensemble, "tall": tall}


# ---------------------------------------------------------------------------- output
def _route_cell(c, r, key="us_per_step", fmt="{:,.1f}"):
    if r in c[key]:
        return fmt.format(c[key][r])
    if r in c["failed"]:
        return "FAILED"
    return "skipped" if r in c["skipped"] else "—"


def _times(ratio):
    return f"{ratio:.1f}×" if ratio is not None else "—"


def markdown(result):
    """The printed table, and deep.md."""
    m = result["meta"]
    peak = m["gemm_peak_gflops"]
    lines = [f"Deep networks, float32, {m['threads']} torch threads (JAX: {m['jax_threads']}), torch {m['torch']}"
             + (f", JAX {m['jax']} / optax {m['optax']}" if m.get("jax") else ", JAX not installed")
             + f"; {cpu_label(m)}; {m['date']}" + ("; --quick (smoke sizes)" if m["quick"] else "")
             + f". Adam lr {m['lr']}, full batch; µs per training step, median of up to {m['repeats']} loops, "
             "the routes of a case interleaved (one loop of each in turn). "
             f"Every route checked first against the native float64 loop, {m['check']['steps']} steps from the same "
             f"start: its float64 run to {m['check']['float64_max_rel']:.0e} of the parameters' scale, its float32 "
             f"run to {m['check']['float32_rel_to_distance']:.0e} of the distance trained or twice the native "
             "float32 loop's own distance, whichever is larger.", ""]
    cases = result["cases"]
    routes = [r for r in ROUTES if any(r in c["us_per_step"] or r in c["failed"] for c in cases)]
    lines.append("| case | " + " | ".join(NAMES[r] for r in routes)
                 + " | fit × native | fit × Adam(fused) | fit × JAX scan |")
    lines.append("|---|" + "---:|" * (len(routes) + 3))
    for c in cases:
        ratios = c["ratios"]
        lines.append(f"| {c['label']} | " + " | ".join(_route_cell(c, r) for r in routes)
                     + f" | {_times(ratios.get('fit_x_native'))} | {_times(ratios.get('fit_x_native_fused'))} | "
                     f"{_times(ratios.get('fit_x_jax_scan'))} |")
    large = [c for c in cases if CASES[c["case"]].large]
    if large:
        lines += ["", f"GFLOP/s (% of the same run's SGEMM peak, {peak:.0f} GFLOP/s); FLOPs a step: {m['flops']}:",
                  "", "| case | GFLOP/step | " + " | ".join(NAMES[r] for r in routes) + " |",
                  "|---|---:|" + "---:|" * len(routes)]
        for c in large:
            cells = [f"{c['gflops'][r]:.0f} ({c['pct_peak'][r]:.0f} %)" if r in c["gflops"]
                     else _route_cell(c, r) for r in routes]
            lines.append(f"| {c['label']} | {c['flops_per_step'] / 1e9:.3f} | " + " | ".join(cells) + " |")

    e = result["ensemble"]
    ratios = e["ratios"]
    lines += ["", f"Ensemble {e['label']}, µs per model-step (the Python loop timed on {e['loop_models_timed']} of the "
              f"{e['K']} models and scaled to K):", "",
              "| " + " | ".join(NAMES[r] for r in ENSEMBLE_ROUTES) + " | fit × loop | fit × torch.func | fit × JAX |",
              "|" + "---:|" * (len(ENSEMBLE_ROUTES) + 3),
              "| " + " | ".join(_route_cell(e, r, "us_per_model_step", "{:,.2f}") for r in ENSEMBLE_ROUTES)
              + f" | {_times(ratios.get('fit_x_loop'))} | {_times(ratios.get('fit_x_torch_func'))} | "
              f"{_times(ratios.get('fit_x_jax_vmap'))} |"]
    fit_us, flops = e["us_per_model_step"].get("fit"), e.get("flops_per_model_step")
    if fit_us and flops:
        rate = flops / (fit_us * 1e-6) / 1e9
        lines += ["", f"Trainer.fit's ensemble: {flops / 1e6:.3f} MFLOP a model-step (the formula above), {rate:.0f} "
                      f"GFLOP/s, {100 * rate / peak:.0f} % of the same run's SGEMM peak; at that peak the products "
                      f"alone would take {flops / (peak * 1e9) * 1e6:.2f} µs a model-step, before its "
                      f"{e['activations_per_model_step']:,} activations and the optimizer"]

    t = result["tall"]
    lines += ["", f"Tall data, {t['label']}, ns per row (median; native and fused called in turn):", "",
              "| N | native | fused | fused × native |", "|---:|---:|---:|---:|"]
    for r in t["rows"]:
        fused = f"{r['fused_ns_per_row']:.1f}" if "fused_ns_per_row" in r else "FAILED"
        native = f"{r['native_ns_per_row']:.1f}" if "native_ns_per_row" in r else "—"
        lines.append(f"| {r['N']:,} | {native} | {fused} | {_times(r.get('fused_x_native'))} |")

    notes = []
    for c in cases + [e]:
        for r, why in c["failed"].items():
            notes.append(f"- FAILED {c['case']} / {NAMES.get(r, r)}: {why}")
    for key, why in t["failed"].items():
        notes.append(f"- FAILED tall {key}: {why}")
    skipped = {}
    for c in cases + [e]:
        for r, why in c["skipped"].items():
            skipped.setdefault((r, why), []).append(c["case"])
    for (r, why), where in skipped.items():
        notes.append(f"- skipped {NAMES.get(r, r)} ({', '.join(where)}): {why}")
    firsts = [f"{c['case']} {NAMES[r]} {s:.1f} s" for c in cases + [e] for r, s in c["first_call_s"].items()]
    if firsts:
        notes.append("- first calls (compiling; not in the timings): " + ", ".join(firsts))
    if notes:
        lines += [""] + notes
    return "\n".join(lines) + "\n"
