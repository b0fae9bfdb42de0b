"""Training K models at once: µs per model-step of one Adam step, by route.

``python -m fusedgrad bench --ensemble`` times, for K copies of a problem (each
model its own initialisation, one shared x / y, MSE loss, Adam lr=0.2):

* ``loop``     a Python loop over K native ``nn.Sequential`` models, each with its own Adam
               (its cost per model does not depend on K, so at large K it is timed on
               the first ``LOOP_MODELS_CAP`` models; the table says so);
* ``func``     ``torch.func``: ``stack_module_state`` + ``vmap(grad(functional_call))`` +
               ``Adam(fused=True)`` on the stacked parameters;
* ``func_fused`` the torch.func model-ensembling recipe over ``FusedMLP`` modules:
               ``stack_module_state`` + ``vmap(functional_call)`` forward (the fused ops' vmap
               rule: one stacked engine call), the summed losses' ``backward()``, ``Adam(fused=True)``;
* ``fused``    ``FusedMLPEnsemble.loss(x, y).sum().backward()`` + ``Adam(fused=True)``;
* ``jax``      JAX ``vmap`` of a ``jit``'d ``lax.scan`` training loop (optax Adam), only
               when ``jax`` and ``optax`` can be imported (nothing is installed for it).

A route is one entry of ROUTES: a name and ``prepare(problem) -> Run``, where a
Run trains its models ``steps`` more steps when called and reports the models it
trains and their stacked parameters (checked against the loop route before
timing). Another route, e.g. the fused trainer's ``Trainer(ens, opt).fit``, is
one more entry.
"""
import time
from dataclasses import dataclass

import torch
from torch import nn

from ..ensemble import FusedMLPEnsemble
from .steps import jax_available

LR = 0.2
LOOP_MODELS_CAP = 64
CHECK_STEPS = 3
WARMUP_STEPS = 5

# (label, K, N, D, H, O): the seed-004 problem (1→20→1, 100 points) at growing K, and a mid size.
CASES = [("100×1→20→1", K, 100, 1, 20, 1) for K in (1, 16, 256, 4096)] + [("256×32→64→8", 64, 256, 32, 64, 8)]
QUICK_CASES = [("100×1→20→1", 4, 100, 1, 20, 1)]


@dataclass
class Problem:
    label: str
    K: int
    N: int
    D: int
    H: int
    O: int
    dtype: torch.dtype
    x: torch.Tensor
    y: torch.Tensor
    init: tuple  # stacked (w1, b1, w2, b2) every route starts from

    @classmethod
    def make(cls, label, K, N, D, H, O, dtype=torch.float32, seed=0):
        torch.manual_seed(seed)
        ens = FusedMLPEnsemble(K, D, H, O, dtype=dtype)
        if D == 1:
            x = torch.linspace(-1, 1, N, dtype=dtype).unsqueeze(1)
            y = x.pow(2) + 0.2 * torch.rand(N, O, dtype=dtype)
        else:
            x = torch.randn(N, D, dtype=dtype)
            y = torch.randn(N, O, dtype=dtype)
        init = tuple(p.detach().clone() for p in ens._params())
        return cls(label, K, N, D, H, O, dtype, x, y, init)


class Run:
    """A prepared route: call ``run(steps)``; ``models`` are the models it trains
    (the first ``models`` of the problem's K); ``params()`` their stacked (w1, b1, w2, b2)."""

    def __init__(self, step=None, models=0, params=None, run_steps=None):
        self._step, self.models, self.params, self._run_steps = step, models, params, run_steps

    def __call__(self, steps):
        if self._run_steps is not None:
            return self._run_steps(steps)
        for _ in range(steps):
            self._step()


def _sequential(problem, k):
    m = nn.Sequential(nn.Linear(problem.D, problem.H), nn.Sigmoid(), nn.Linear(problem.H, problem.O)).to(problem.dtype)
    w1, b1, w2, b2 = problem.init
    with torch.no_grad():
        m[0].weight.copy_(w1[k]), m[0].bias.copy_(b1[k]), m[2].weight.copy_(w2[k]), m[2].bias.copy_(b2[k])
    return m


def prepare_loop(problem, max_models=LOOP_MODELS_CAP):
    models = [_sequential(problem, k) for k in range(min(problem.K, max_models))]
    opts = [torch.optim.Adam(m.parameters(), lr=LR) for m in models]
    loss_fn = nn.MSELoss()
    x, y = problem.x, problem.y

    def step():
        for m, opt in zip(models, opts):
            opt.zero_grad()
            loss_fn(m(x), y).backward()
            opt.step()

    def params():
        return tuple(torch.stack([getattr(m[i], n).detach() for m in models])
                     for i, n in ((0, "weight"), (0, "bias"), (2, "weight"), (2, "bias")))

    return Run(step, len(models), params)


def prepare_func(problem):
    from torch.func import functional_call, grad, stack_module_state, vmap

    models = [_sequential(problem, k) for k in range(problem.K)]
    params, buffers = stack_module_state(models)
    base = _sequential(problem, 0).to("meta")
    names = list(params)
    leaves = [params[n] for n in names]
    opt = torch.optim.Adam(leaves, lr=LR, fused=True)
    x, y = problem.x, problem.y

    def loss(p, b):
        return nn.functional.mse_loss(functional_call(base, (p, b), (x,)), y)

    grads_fn = vmap(grad(loss), in_dims=(0, 0))

    def step():
        g = grads_fn(params, buffers)
        for n, leaf in zip(names, leaves):
            leaf.grad = g[n]
        opt.step()

    return Run(step, problem.K, lambda: tuple(params[n].detach() for n in ("0.weight", "0.bias", "2.weight",
                                                                             "2.bias")))


def prepare_func_fused(problem):
    import copy

    from torch.func import functional_call, stack_module_state, vmap

    from ..module import FusedMLP

    models = []
    for k in range(problem.K):
        m = FusedMLP(problem.D, problem.H, problem.O, dtype=problem.dtype)
        with torch.no_grad():
            for p, init in zip((m.linear1.weight, m.linear1.bias, m.linear2.weight, m.linear2.bias), problem.init):
                p.copy_(init[k])
        models.append(m)
    params, buffers = stack_module_state(models)
    base = copy.deepcopy(models[0]).to("meta")
    opt = torch.optim.Adam(list(params.values()), lr=LR, fused=True)
    x, y = problem.x, problem.y
    forward = vmap(lambda p, b: functional_call(base, (p, b), (x,)), in_dims=(0, 0))

    def step():
        opt.zero_grad()
        ((forward(params, buffers) - y) ** 2).mean((1, 2)).sum().backward()
        opt.step()

    names = ("linear1.weight", "linear1.bias", "linear2.weight", "linear2.bias")
    return Run(step, problem.K, lambda: tuple(params[n].detach() for n in names))


def prepare_fused(problem):
    ens = FusedMLPEnsemble(problem.K, problem.D, problem.H, problem.O, dtype=problem.dtype, device="meta")
    ens.weight1, ens.bias1, ens.weight2, ens.bias2 = (nn.Parameter(p.clone()) for p in problem.init)
    opt = torch.optim.Adam(ens.parameters(), lr=LR, fused=True)
    x, y = problem.x, problem.y

    def step():
        opt.zero_grad()
        ens.loss(x, y).sum().backward()
        opt.step()

    return Run(step, problem.K, lambda: tuple(p.detach() for p in ens._params()))


def prepare_fit(problem):
    """fusedgrad.Trainer(ens, Adam).fit: every step of every model in C++ (csrc/trainer/)."""
    from ..trainer import Trainer

    ens = FusedMLPEnsemble(problem.K, problem.D, problem.H, problem.O, dtype=problem.dtype, device="meta")
    ens.weight1, ens.bias1, ens.weight2, ens.bias2 = (nn.Parameter(p.clone()) for p in problem.init)
    trainer = Trainer(ens, torch.optim.Adam(ens.parameters(), lr=LR))
    x, y = problem.x, problem.y

    def run_steps(steps):
        trainer.fit(x, y, steps)

    return Run(models=problem.K, params=lambda: tuple(p.detach() for p in ens._params()), run_steps=run_steps)


def prepare_jax(problem):
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    x, y = jnp.asarray(problem.x.numpy()), jnp.asarray(problem.y.numpy())
    params = tuple(jnp.asarray(p.numpy()) for p in problem.init)
    tx = optax.adam(LR)

    def loss(p):
        w1, b1, w2, b2 = p
        return jnp.mean((jax.nn.sigmoid(x @ w1.T + b1) @ w2.T + b2 - y) ** 2)

    def train(p, steps):
        def body(carry, _):
            p, s = carry
            g = jax.grad(loss)(p)
            u, s = tx.update(g, s, p)
            return (optax.apply_updates(p, u), s), None
        (p, _), _ = jax.lax.scan(body, (p, tx.init(p)), None, length=steps)
        return p

    compiled = {}
    state = {"params": params}

    def run_steps(steps):
        if steps not in compiled:
            compiled[steps] = jax.jit(jax.vmap(lambda p: train(p, steps)))
        state["params"] = jax.block_until_ready(compiled[steps](params))

    def result():
        return tuple(torch.from_numpy(np.asarray(p)) for p in state["params"])

    return Run(models=problem.K, params=result, run_steps=run_steps)


# name: (prepare, available?) — add a route here (e.g. the fused trainer's fit).
ROUTES = {
    "loop": (prepare_loop, lambda: True),
    "func": (prepare_func, lambda: True),
    "func_fused": (prepare_func_fused, lambda: True),
    "fused": (prepare_fused, lambda: True),
    "fit": (prepare_fit, lambda: True),
    "jax": (prepare_jax, jax_available),
}


def check_agreement(problem, routes):
    """Every route, CHECK_STEPS steps from the same start, ends at the loop route's parameters
    (float32 tolerance) on the models both train."""
    ref_run = prepare_loop(problem, max_models=min(problem.K, 4))
    ref_run(CHECK_STEPS)
    ref = ref_run.params()
    for name in routes:
        if name == "loop":
            continue
        run = ROUTES[name][0](problem)
        run(CHECK_STEPS)
        got = run.params()
        for a, b in zip(got, ref):
            a = a[: b.shape[0]]
            err = (a - b).abs().max().item()
            # JAX sums its float32 products in another order; Adam's first steps turn such
            # rounding-level differences in near-zero gradient entries into parameter differences of
            # up to ~lr·(steps) there (measured 4e-3 at 256×32→64→8, lr 0.2). A route computing
            # something else differs by O(lr) across the board, far above either bound.
            base = 1e-2 if name == "jax" else 1e-3
            tol = (base if problem.dtype == torch.float32 else 1e-9) * max(1.0, b.abs().max().item())
            if not err <= tol:
                raise AssertionError(f"{problem.label} K={problem.K}: route {name!r} disagrees with the loop "
                                     f"after {CHECK_STEPS} steps (max error {err:.2e})")


def time_route(run, min_seconds, repeats):
    """µs per model-step: the best of `repeats` timed blocks of `steps` steps, `steps` grown until
    a block takes min_seconds (or 1 step when one already does). The best block, because on a
    shared machine other processes only ever add time."""
    run(WARMUP_STEPS)  # the first steps pay one-off costs (lazy optimizer state, JAX's compile)
    steps = 1
    while True:
        t0 = time.perf_counter()
        run(steps)
        dt = time.perf_counter() - t0
        if dt >= min_seconds or steps >= 1 << 14:
            break
        steps *= 2
    best = dt
    for _ in range(repeats - 1):
        t0 = time.perf_counter()
        run(steps)
        best = min(best, time.perf_counter() - t0)
    return best / (steps * run.models) * 1e6, steps


def run_ensemble_bench(quick=False, routes=None, repeats=7, min_seconds=0.05, progress=print):
    routes = [r for r in (routes or ROUTES) if ROUTES[r][1]()]
    rows = []
    for label, K, N, D, H, O in (QUICK_CASES if quick else CASES):
        problem = Problem.make(label, K, N, D, H, O)
        check_agreement(problem, routes)
        row = {"problem": label, "K": K, "N": N, "D": D, "H": H, "O": O, "dtype": "float32",
               "threads": torch.get_num_threads(), "us_per_model_step": {}, "steps_timed": {}, "models_timed": {}}
        for name in routes:
            run = ROUTES[name][0](problem)
            us, steps = time_route(run, 0.02 if quick else min_seconds, 1 if quick else repeats)
            row["us_per_model_step"][name] = us
            row["steps_timed"][name] = steps
            row["models_timed"][name] = run.models
            progress(f"  {label} K={K} {name}: {us:.2f} µs per model-step ({steps} steps × {run.models} models)")
        rows.append(row)
    return rows, routes


def markdown(rows, routes):
    names = {"loop": "Python loop (K × nn.Sequential + Adam)", "func": "torch.func vmap + Adam",
             "func_fused": "torch.func vmap(functional_call(FusedMLP)) + Adam(fused)",
             "fused": "FusedMLPEnsemble.loss().sum().backward() + Adam(fused)",
             "fit": "Trainer(ens, Adam).fit", "jax": "JAX vmap(jit(scan))"}
    best = "fit" if "fit" in routes else "fused"
    cols = ["problem", "K"] + [f"{names.get(r, r)} µs" for r in routes]
    ratio_cols = [r for r in ("loop", "func", "func_fused", "fused", "jax") if r in routes and r != best and best in routes]
    cols += [f"{best} ×{r}" for r in ratio_cols]
    lines = ["| " + " | ".join(cols) + " |", "|---|" + "---:|" * (len(cols) - 1)]
    for r in rows:
        us = r["us_per_model_step"]
        cells = [r["problem"], str(r["K"])]
        for name in routes:
            note = "" if r["models_timed"][name] == r["K"] else f" ({r['models_timed'][name]} timed)"
            cells.append(f"{us[name]:.2f}{note}")
        cells += [f"{us[n] / us[best]:.1f}×" for n in ratio_cols]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
