"""Networks of more than one hidden layer, route against route in one run (``python -m fusedgrad bench --deep``).

Cases (float32, Adam, full batch, every route from the same data and the same initial weights):

* ``curve``     — curve fit 100×1→[20]×3→1 tanh (the depth-3 version of the notebooks' fit);
* ``pinn``      — PINN-sized regression 2 540×2→[20]×3→1 tanh (DeepXDE's Burgers network);
* ``surrogate`` — 4 096×32→[64]×4→8 relu;
* ``wide``      — 16 384×64→[128]×4→16 relu;
* ``ensemble``  — K = 256 curve-fit networks, µs per model-step;
* ``tall``      — one ``net.loss(x, y).backward()`` of 1→[20]×3→1 tanh over 10⁴…10⁶ rows, ns per row.

Routes: ``native`` (the eager loop: ``zero_grad``, ``MSELoss``, ``backward``, ``Adam.step``),
``native_fused`` (the same with ``Adam(fused=True)``), ``compile`` (``torch.compile`` of the step,
with ``--compile``: 10–20 s of compiling per case), ``net_loss`` (``net.loss(x, y).backward()`` +
``Adam(fused=True)``: the fused op under autograd), ``fit`` (``Trainer.fit``: every step in C++),
``jax_scan`` (JAX + optax, all steps as one ``lax.scan`` under ``jit``, when installed); for the
ensemble ``loop`` (a Python loop over the models, timed on a subset and scaled — said in the
output), ``torch_func`` (``stack_module_state`` + ``vmap(grad(functional_call))`` +
``Adam(fused=True)`` on the stacked parameters), ``fit`` and ``jax_vmap`` (``vmap`` of the scan).

Every route is first checked: it trains ``CHECK_STEPS`` steps in float64 from the shared start
and must end within 1e-8 (relative to the parameters' scale) of the native float64 loop; a route
that does not is reported as failed and not timed. (A float32 check cannot be tight: one ReLU input
within rounding of 0 flips its derivative, and Adam's first steps move every parameter by about
±lr whatever its gradient's size, so a gradient element near 0 whose sign rounds the other way
moves its parameter by 2·lr.) The timings are float32. GFLOP/s count 6·N·Σ n_{l−1} n_l per step (forward 2, backward 4;
the fused routes skip the first layer's input gradient), against a square SGEMM timed in the same
run at the same thread count.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..ensemble import FusedMLPEnsemble
from ..module import FusedMLP
from ..trainer import Trainer
from .steps import gemm_peak_gflops, jax_available

CHECK_STEPS = 3
LR = 1e-3


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

    @property
    def widths(self):
        return [self.D] + [self.H] * self.layers + [self.O]

    def flops(self):
        w = self.widths
        return 6 * self.N * sum(a * b for a, b in zip(w, w[1:]))

    @property
    def label(self):
        return f"{self.N}×{self.D}→[{self.H}]×{self.layers}→{self.O} {self.act}"


CASES = {
    "curve": Case("curve", 100, 1, 20, 3, 1, "tanh", 201),
    "pinn": Case("pinn", 2540, 2, 20, 3, 1, "tanh", 50),
    "surrogate": Case("surrogate", 4096, 32, 64, 4, 8, "relu", 10),
    "wide": Case("wide", 16384, 64, 128, 4, 16, "relu", 3),
}
QUICK_CASES = {
    "curve": Case("curve", 100, 1, 20, 3, 1, "tanh", 20),
    "pinn": Case("pinn", 254, 2, 20, 3, 1, "tanh", 5),
    "surrogate": Case("surrogate", 256, 32, 64, 4, 8, "relu", 3),
    "wide": Case("wide", 512, 64, 128, 4, 16, "relu", 2),
}


class Problem:
    def __init__(self, case: Case, seed: int = 0, dtype=torch.float32):
        torch.manual_seed(seed)
        self.case, self.dtype = case, dtype
        net = FusedMLP(case.D, case.H, case.O, activation=case.act, hidden_layers=case.layers, dtype=dtype)
        self.init = copy.deepcopy(net.state_dict())
        gen = torch.Generator().manual_seed(seed + 1)
        self.x = (torch.rand(case.N, case.D, generator=gen, dtype=torch.float64) * 2 - 1).to(dtype)
        self.y = torch.sin(3 * self.x.sum(-1, keepdim=True)).expand(case.N, case.O).contiguous()

    def fused(self):
        net = FusedMLP(self.case.D, self.case.H, self.case.O, activation=self.case.act,
                       hidden_layers=self.case.layers, dtype=self.dtype)
        net.load_state_dict(self.init)
        return net

    def native(self):
        return self.fused().to_module(copy=True)


def _params(module):
    return [p.detach().clone() for p in module.parameters()]


# ---------------------------------------------------------------------------- routes: run(steps), params()
def route_native(problem, fused_adam=False):
    model = problem.native()
    opt = torch.optim.Adam(model.parameters(), lr=LR, fused=fused_adam)
    x, y = problem.x, problem.y

    def run(steps):
        for _ in range(steps):
            opt.zero_grad()
            F.mse_loss(model(x), y).backward()
            opt.step()

    return run, lambda: _params(model)


def route_compile(problem):
    model = problem.native()
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    x, y = problem.x, problem.y

    @torch.compile
    def step():
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        opt.step()

    def run(steps):
        for _ in range(steps):
            step()

    return run, lambda: _params(model)


def route_net_loss(problem):
    net = problem.fused()
    opt = torch.optim.Adam(net.parameters(), lr=LR, fused=True)
    x, y = problem.x, problem.y

    def run(steps):
        for _ in range(steps):
            opt.zero_grad()
            net.loss(x, y).backward()
            opt.step()

    return run, lambda: _params(net)


def route_fit(problem):
    net = problem.fused()
    trainer = Trainer(net, torch.optim.Adam(net.parameters(), lr=LR))
    x, y = problem.x, problem.y

    def run(steps):
        trainer.fit(x, y, steps)

    return run, lambda: _params(net)


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


def _jax_params_of(state_dict, layers):
    import jax.numpy as jnp

    return [(jnp.asarray(state_dict[f"linear{l}.weight"].numpy()), jnp.asarray(state_dict[f"linear{l}.bias"].numpy()))
            for l in range(1, layers + 2)]


def route_jax_scan(problem):
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    case = problem.case
    loss = _jax_loss(case.act)
    tx = optax.adam(LR)
    if problem.dtype == torch.float64:
        jax.config.update("jax_enable_x64", True)  # arrays made from float32 data stay float32
    x, y = jnp.asarray(problem.x.numpy()), jnp.asarray(problem.y.numpy())
    params = _jax_params_of(problem.init, case.layers)
    state = {"p": params, "s": tx.init(params)}
    compiled = {}

    def step(carry, _):
        p, s = carry
        g = jax.grad(loss)(p, x, y)
        u, s = tx.update(g, s, p)
        return (optax.apply_updates(p, u), s), None

    def run(steps):
        if steps not in compiled:
            compiled[steps] = jax.jit(lambda p, s: jax.lax.scan(step, (p, s), None, length=steps)[0])
        state["p"], state["s"] = jax.block_until_ready(compiled[steps](state["p"], state["s"]))

    def params_now():
        return [torch.from_numpy(np.array(t)) for pair in state["p"] for t in pair]  # np.array: a writable copy

    return run, params_now


ROUTES = {
    "native": (lambda p: route_native(p, False), lambda: True),
    "native_fused": (lambda p: route_native(p, True), lambda: True),
    "compile": (route_compile, lambda: True),
    "net_loss": (route_net_loss, lambda: True),
    "fit": (route_fit, lambda: True),
    "jax_scan": (route_jax_scan, jax_available),
}
NAMES = {
    "native": "native eager loop + Adam",
    "native_fused": "native + Adam(fused=True)",
    "compile": "torch.compile(step)",
    "net_loss": "net.loss(x, y).backward() + Adam(fused=True)",
    "fit": "fusedgrad Trainer.fit",
    "jax_scan": "JAX lax.scan under jit",
}


def _agrees(params, reference, rtol):
    scale = max(float(p.abs().max()) for p in reference)
    return max(float((a.double() - b.double()).abs().max()) for a, b in zip(params, reference)) <= rtol * scale


def _time(run, steps, repeats, budget_s):
    """Median seconds per step over `repeats` loops of `steps` steps (fewer if over budget)."""
    run(steps)  # warm: first-call work (JAX compiles per length) out of the timing
    times, start = [], time.perf_counter()
    for _ in range(repeats):
        t0 = time.perf_counter()
        run(steps)
        times.append((time.perf_counter() - t0) / steps)
        if time.perf_counter() - start > budget_s:
            break
    times.sort()
    return times[len(times) // 2]


def bench_case(case, routes, repeats, budget_s, progress=None):
    problem = Problem(case)
    check = Problem(case, dtype=torch.float64)
    reference = None
    out = {"case": case.name, "label": case.label, "flops_per_step": case.flops(), "us_per_step": {}, "failed": {},
           "skipped": {}}
    for name in routes:
        make, available = ROUTES[name]
        if not available():
            out["skipped"][name] = "not installed (pip install jax optax)"
            continue
        if progress:
            progress(f"{case.name}: {name}")
        run, params = make(check)
        run(CHECK_STEPS)
        if reference is None:
            reference = params()
        elif not _agrees(params(), reference, 1e-8):
            out["failed"][name] = f"float64 parameters after {CHECK_STEPS} steps differ from the native loop's"
            continue
        run, _ = make(problem)
        t0 = time.perf_counter()
        run(1)
        if name in ("compile", "jax_scan"):
            out.setdefault("first_call_s", {})[name] = time.perf_counter() - t0
        out["us_per_step"][name] = _time(run, case.steps, repeats, budget_s) * 1e6
    return out


# ---------------------------------------------------------------------------- ensembles
def bench_ensemble(K, steps, repeats, budget_s, loop_models, progress=None):
    case = CASES["curve"]
    torch.manual_seed(0)
    ens = FusedMLPEnsemble(K, case.D, case.H, case.O, activation=case.act, hidden_layers=case.layers)
    init = copy.deepcopy(ens.state_dict())
    x = torch.linspace(-1, 1, case.N).unsqueeze(1)
    y = torch.sin(3 * x)
    out = {"case": "ensemble", "label": f"K={K} × {case.label}", "K": K, "us_per_model_step": {}, "failed": {},
           "skipped": {}, "loop_models_timed": loop_models}

    def fresh():
        e = FusedMLPEnsemble(K, case.D, case.H, case.O, activation=case.act, hidden_layers=case.layers, device="meta")
        e = e.to_empty(device="cpu")
        e.load_state_dict(init)
        return e

    # fused
    if progress:
        progress("ensemble: fit")
    e = fresh()
    trainer = Trainer(e, torch.optim.Adam(e.parameters(), lr=LR))
    trainer.fit(x, y, CHECK_STEPS)
    reference = [p.detach().clone() for p in e.parameters()]
    out["us_per_model_step"]["fit"] = _time(lambda s: trainer.fit(x, y, s), steps, repeats, budget_s) * 1e6 / K

    # torch.func: vmap over the stacked parameters of K nn.Sequentials
    if progress:
        progress("ensemble: torch.func")
    from torch.func import functional_call, grad, stack_module_state, vmap

    models = [m.to_module(copy=True) for m in fresh().to_modules()]
    params, buffers = stack_module_state(models)
    base = copy.deepcopy(models[0]).to("meta")
    stacked = [params[k] for k in params]
    opt = torch.optim.Adam(stacked, lr=LR, fused=True)
    names = list(params)

    def model_loss(p, xx, yy):
        return F.mse_loss(functional_call(base, p, (xx,)), yy)

    grads_of = vmap(grad(model_loss), in_dims=(0, None, None))

    def func_run(s):
        for _ in range(s):
            g = grads_of(params, x, y)
            for n in names:
                params[n].grad = g[n]
            opt.step()

    func_run(CHECK_STEPS)
    mine = [params[n] for n in names]
    # float32, 3 steps of tanh nets (no kink): Adam's first steps are ±lr, so agreement to 1e-4 of the scale
    ok = _agrees([t.detach() for t in mine], [t.detach() for t in _ens_in_seq_order(reference, case.layers)], 1e-4)
    if ok:
        out["us_per_model_step"]["torch_func"] = _time(func_run, max(1, steps // 4), repeats, budget_s) * 1e6 / K
    else:
        out["failed"]["torch_func"] = "parameters differ from the fused fit's"

    # the Python loop, on a subset of the models (scaled: the loop is K times one model)
    if progress:
        progress("ensemble: loop")
    subset = [m.to_module(copy=True) for m in fresh().to_modules()[:loop_models]]
    opts = [torch.optim.Adam(m.parameters(), lr=LR) for m in subset]

    def loop_run(s):
        for _ in range(s):
            for m, o in zip(subset, opts):
                o.zero_grad()
                F.mse_loss(m(x), y).backward()
                o.step()

    out["us_per_model_step"]["loop"] = _time(loop_run, max(1, steps // 20), repeats, budget_s) * 1e6 / loop_models

    if jax_available():
        if progress:
            progress("ensemble: JAX vmap(scan)")
        out["us_per_model_step"]["jax_vmap"] = _jax_ensemble(init, K, case, x, y, steps, repeats, budget_s) * 1e6 / K
    else:
        out["skipped"]["jax_vmap"] = "not installed (pip install jax optax)"
    return out


def _ens_in_seq_order(ens_params, layers):
    """An ensemble's parameters (weight1 … weightL, bias1 … biasL) in nn.Sequential order (w, b per layer)."""
    L = layers + 1
    return [t for l in range(L) for t in (ens_params[l], ens_params[L + l])]


def _jax_ensemble(init, K, case, x, y, steps, repeats, budget_s):
    import jax
    import jax.numpy as jnp
    import optax

    loss = _jax_loss(case.act)
    tx = optax.adam(LR)
    L = case.layers + 1
    params = [(jnp.asarray(init[f"weight{l}"].numpy()), jnp.asarray(init[f"bias{l}"].numpy())) for l in range(1, L + 1)]
    xj, yj = jnp.asarray(x.numpy()), jnp.asarray(y.numpy())

    def train(p, steps):
        s = tx.init(p)

        def step(carry, _):
            p, s = carry
            g = jax.grad(loss)(p, xj, yj)
            u, s = tx.update(g, s, p)
            return (optax.apply_updates(p, u), s), None

        return jax.lax.scan(step, (p, s), None, length=steps)[0][0]

    fn = jax.jit(jax.vmap(lambda p: train(p, steps)))
    state = {"p": params}

    def run(_):
        state["p"] = jax.block_until_ready(fn(state["p"]))

    return _time(run, 1, repeats, budget_s) / steps


# ---------------------------------------------------------------------------- tall data
def bench_tall(sizes, repeats):
    case = CASES["curve"]
    torch.manual_seed(0)
    net = FusedMLP(case.D, case.H, case.O, activation=case.act, hidden_layers=case.layers)
    ref = net.to_module(copy=True)
    rows = []
    for n in sizes:
        x, y = torch.randn(n, 1), torch.randn(n, 1)

        def fused():
            net.zero_grad(set_to_none=True)
            net.loss(x, y).backward()

        def native():
            ref.zero_grad(set_to_none=True)
            F.mse_loss(ref(x), y).backward()

        reps = max(3, min(repeats * 10, 10**6 // n))
        result = {"N": n}
        for name, fn in (("fused", fused), ("native", native)):
            fn()
            times = []
            for _ in range(reps):
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
            times.sort()
            result[f"{name}_ns_per_row"] = times[len(times) // 2] / n * 1e9
        rows.append(result)
    return {"case": "tall", "label": f"N×{case.D}→[{case.H}]×{case.layers}→{case.O} {case.act}, loss().backward()",
            "rows": rows}


# ---------------------------------------------------------------------------- the whole suite
def run(quick=False, threads=2, with_compile=False, repeats=5, progress=None):
    import platform

    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        cases = QUICK_CASES if quick else CASES
        routes = [r for r in ROUTES if r != "compile" or with_compile]
        budget = 2.0 if quick else 20.0
        result = {
            "date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or platform.machine(),
            "torch": torch.__version__, "threads": threads, "dtype": "float32", "quick": quick,
            "gemm_peak_gflops": gemm_peak_gflops(torch.float32, n=256 if quick else 1536),
            "cases": [bench_case(c, routes, 2 if quick else repeats, budget, progress) for c in cases.values()],
        }
        if jax_available():
            import jax

            result["jax"] = jax.__version__
        result["ensemble"] = bench_ensemble(16 if quick else 256, 5 if quick else 201, 2 if quick else 3, budget,
                                            2 if quick else 8, progress)
        if progress:
            progress("tall data")
        result["tall"] = bench_tall([10**3, 10**4] if quick else [10**4, 10**5, 10**6], 1 if quick else repeats)
        return result
    finally:
        torch.set_num_threads(saved)


def markdown(result):
    peak = result["gemm_peak_gflops"]
    lines = [f"Deep networks, float32, {result['threads']} threads, torch {result['torch']}"
             + (f", JAX {result['jax']}" if "jax" in result else "") + f", {result['date']}; "
             f"SGEMM peak {peak:.0f} GFLOP/s (same run). µs per training step (Adam, full batch), median.", ""]
    routes = [r for r in ROUTES if any(r in c["us_per_step"] for c in result["cases"])]
    lines.append("| case | " + " | ".join(NAMES[r] for r in routes) + " | fit × native | fit × Adam(fused) | "
                 "fit × JAX scan | fit GFLOP/s (% peak) |")
    lines.append("|---|" + "---:|" * (len(routes) + 4))
    for c in result["cases"]:
        us = c["us_per_step"]
        cells = [f"{us[r]:,.1f}" if r in us else ("failed" if r in c["failed"] else "—") for r in routes]
        fit = us.get("fit")

        def ratio(r):
            return f"{us[r] / fit:.1f}×" if fit and r in us else "—"

        gf = c["flops_per_step"] / (fit * 1e-6) / 1e9 if fit else 0
        lines.append(f"| {c['label']} | " + " | ".join(cells) + f" | {ratio('native')} | {ratio('native_fused')} | "
                     f"{ratio('jax_scan')} | {gf:.0f} ({100 * gf / peak:.0f}%) |")
    e = result["ensemble"]
    u = e["us_per_model_step"]
    lines += ["", f"Ensemble {e['label']}, µs per model-step (the loop timed on {e['loop_models_timed']} models and "
              "scaled):", "", "| loop | torch.func vmap + Adam(fused) | JAX vmap(scan) | Trainer.fit | fit × loop | "
              "fit × torch.func | fit × JAX |", "|---:|---:|---:|---:|---:|---:|---:|"]

    def cell(k):
        return f"{u[k]:.2f}" if k in u else "—"

    def times(k):
        return f"{u[k] / u['fit']:.1f}×" if k in u else "—"

    lines.append(f"| {cell('loop')} | {cell('torch_func')} | {cell('jax_vmap')} | {cell('fit')} | {times('loop')} | "
                 f"{times('torch_func')} | {times('jax_vmap')} |")
    t = result["tall"]
    lines += ["", f"Tall data, {t['label']}, ns per row:", "", "| N | native | fused | fused × native |",
              "|---:|---:|---:|---:|"]
    for r in t["rows"]:
        lines.append(f"| {r['N']:,} | {r['native_ns_per_row']:.1f} | {r['fused_ns_per_row']:.1f} | "
                     f"{r['native_ns_per_row'] / r['fused_ns_per_row']:.1f}× |")
    return "\n".join(lines) + "\n"
