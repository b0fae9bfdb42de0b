"""Whole training loops, timed route against route in one run (``python -m fusedgrad bench --training``).

The seed problem is the curve fit of the notebooks: 1→20→1 on 100 points, ``MSELoss``,
``Adam(lr=0.2)``, 201 full-batch steps, float32. Routes:

* ``notebook``    — the loop as the notebook writes it (``net(x)``, ``MSELoss``, ``zero_grad``,
  ``backward``, ``Adam.step``) on a native ``Linear → Sigmoid → Linear``;
* ``fused_adam``  — the same with ``Adam(fused=True)``;
* ``compile``     — the same step under ``torch.compile`` (forward, backward and ``opt.step``);
  its one-off compile time is reported separately;
* ``fusedmlp``    — ``FusedMLP`` dropped into the notebook's loop (``MSELoss()(net(x), y)``);
* ``net_loss``    — ``net.loss(x, y).backward()`` + Adam;
* ``loss_backward`` — ``net.loss_backward(x, y)`` (no autograd engine) + ``Adam(fused=True)``;
* ``step``        — ``Trainer.step`` called from Python each step;
* ``fit``         — ``Trainer.fit``: all steps in one C++ call;
* ``jax_step`` / ``jax_scan`` — JAX + optax (when installed: ``pip install jax optax``):
  ``jit(train_step)`` called per step, and all steps as one ``lax.scan`` under ``jit``.

The grid repeats the native, Trainer and JAX routes over the N×D→H→O shapes of the op bench
(``Adam(lr=1e-3)``). The optimizer rows time the seed problem's native loop and ``Trainer.fit``
with the other optimizers the Trainer runs (RMSprop, Adagrad), in the same run; the L-BFGS row
runs ``LBFGS(lr=1, max_iter=20, history_size=10, line_search_fn="strong_wolfe")`` for 50
``opt.step(closure)`` calls natively, through ``Trainer.fit`` and (scipy installed) as scipy's
L-BFGS-B on the same flattened problem, reporting wall time, loss evaluations and the final loss. Each route first trains a few steps from the same start and must end at
the notebook route's parameters (float32 tolerance), so every timed route does the same work.
"""
import copy
import time

import torch
from torch import nn

from ..module import FusedMLP
from ..trainer import Trainer
from .native import Net  # the notebooks' model, one definition
from .steps import jax_available

SEED_SHAPE = (100, 1, 20, 1)
SEED_STEPS = 201
SEED_LR = 0.2
GRID = ((100, 1, 20, 1), (10, 4, 4, 4), (256, 32, 64, 8), (1024, 64, 128, 16), (4096, 256, 256, 64),
        (16384, 512, 512, 128))
GRID_LR = 1e-3
CHECK_STEPS = 5

NAMES = {
    "notebook": "native, as the notebook writes it",
    "fused_adam": "native + Adam(fused=True)",
    "compile": "torch.compile(train step)",
    "fusedmlp": "FusedMLP in the notebook's loop (MSELoss()(net(x), y))",
    "net_loss": "net.loss(x, y).backward() + Adam",
    "loss_backward": "net.loss_backward(x, y) + Adam(fused=True)",
    "step": "fusedgrad.Trainer.step, called per step",
    "fit": "fusedgrad.Trainer.fit, one call",
    "jax_step": "JAX: jit(train_step) called per step",
    "jax_scan": "JAX: lax.scan of all steps under jit",
}


class Problem:
    def __init__(self, n, d, h, o, lr, seed=0):
        torch.manual_seed(seed)
        self.shape, self.lr = (n, d, h, o), lr
        if d == 1:
            self.x = torch.linspace(-1, 1, n).unsqueeze(1)
            self.y = self.x.pow(2) + 0.2 * torch.rand(n, o)
        else:
            self.x = torch.randn(n, d)
            self.y = torch.randn(n, o)
        self.init = Net(d, h, o).state_dict()

    def label(self):
        n, d, h, o = self.shape
        return f"{n}×{d}→{h}→{o}"

    def net(self):
        n, d, h, o = self.shape
        net = Net(d, h, o)
        net.load_state_dict(copy.deepcopy(self.init))
        return net

    def fused(self):
        n, d, h, o = self.shape
        net = FusedMLP(d, h, o)
        net.load_state_dict(copy.deepcopy(self.init))
        return net


# Each route: prepare(problem) -> (run(steps), params()); params() gives (w1, b1, w2, b2).
def _params_of(net):
    return lambda: tuple(p.detach().clone() for p in (net.linear1.weight, net.linear1.bias,
                                                     net.linear2.weight, net.linear2.bias))


def _notebook_loop(net, problem, fused_adam=False, make_opt=None):
    """The notebook's loop over `net`: MSELoss()(net(x), y), zero_grad, backward, Adam step
    (or make_opt(params)'s step)."""
    loss_func = nn.MSELoss()
    opt = make_opt(net.parameters()) if make_opt else torch.optim.Adam(net.parameters(), lr=problem.lr,
                                                                         fused=fused_adam)
    x, y = problem.x, problem.y

    def run(steps):
        for _ in range(steps):
            loss = loss_func(net(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()

    return run, _params_of(net)


def _native(problem, fused):
    return _notebook_loop(problem.net(), problem, fused_adam=fused)


def prepare_compile(problem):
    net = problem.net()
    loss_func = nn.MSELoss()
    opt = torch.optim.Adam(net.parameters(), lr=problem.lr)
    x, y = problem.x, problem.y

    @torch.compile
    def train_step():
        loss = loss_func(net(x), y)
        loss.backward()
        opt.step()
        return loss

    def run(steps):
        for _ in range(steps):
            opt.zero_grad()
            train_step()

    return run, _params_of(net)


def prepare_fusedmlp(problem):
    return _notebook_loop(problem.fused(), problem)


def prepare_net_loss(problem):
    net = problem.fused()
    opt = torch.optim.Adam(net.parameters(), lr=problem.lr)
    x, y = problem.x, problem.y

    def run(steps):
        for _ in range(steps):
            opt.zero_grad()
            net.loss(x, y).backward()
            opt.step()

    return run, _params_of(net)


def prepare_loss_backward(problem):
    net = problem.fused()
    opt = torch.optim.Adam(net.parameters(), lr=problem.lr, fused=True)
    x, y = problem.x, problem.y

    def run(steps):
        for _ in range(steps):
            opt.zero_grad()
            net.loss_backward(x, y)
            opt.step()

    return run, _params_of(net)


def prepare_step(problem):
    net = problem.fused()
    trainer = Trainer(net, torch.optim.Adam(net.parameters(), lr=problem.lr))
    x, y = problem.x, problem.y

    def run(steps):
        for _ in range(steps):
            trainer.step(x, y)

    return run, _params_of(net)


def prepare_fit(problem, make_opt=None):
    net = problem.fused()
    opt = make_opt(net.parameters()) if make_opt else torch.optim.Adam(net.parameters(), lr=problem.lr)
    trainer = Trainer(net, opt)
    x, y = problem.x, problem.y

    def run(steps):
        trainer.fit(x, y, steps)

    return run, _params_of(net)


def _jax_setup(problem):
    import jax
    import jax.numpy as jnp
    import optax

    x, y = jnp.asarray(problem.x.numpy()), jnp.asarray(problem.y.numpy())
    init = problem.init
    params = tuple(jnp.asarray(init[k].numpy()) for k in ("linear1.weight", "linear1.bias", "linear2.weight",
                                                           "linear2.bias"))
    tx = optax.adam(problem.lr)

    def loss(p):
        w1, b1, w2, b2 = p
        return jnp.mean((jax.nn.sigmoid(x @ w1.T + b1) @ w2.T + b2 - y) ** 2)

    def train_step(p, s):
        g = jax.grad(loss)(p)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    return jax, params, tx, train_step


def _jax_params(state):
    import numpy as np

    return lambda: tuple(torch.from_numpy(np.asarray(p)).clone() for p in state["p"])


def prepare_jax_step(problem):
    jax, params, tx, train_step = _jax_setup(problem)
    step = jax.jit(train_step)
    state = {"p": params, "s": tx.init(params)}

    def run(steps):
        p, s = state["p"], state["s"]
        for _ in range(steps):
            p, s = step(p, s)
        state["p"], state["s"] = jax.block_until_ready((p, s))

    return run, _jax_params(state)


def prepare_jax_scan(problem):
    jax, params, tx, train_step = _jax_setup(problem)
    compiled = {}
    state = {"p": params, "s": tx.init(params)}

    def scan(p, s, steps):
        (p, s), _ = jax.lax.scan(lambda c, _: (train_step(*c), None), (p, s), None, length=steps)
        return p, s

    def run(steps):
        if steps not in compiled:
            compiled[steps] = jax.jit(lambda p, s: scan(p, s, steps))
        state["p"], state["s"] = jax.block_until_ready(compiled[steps](state["p"], state["s"]))

    return run, _jax_params(state)


ROUTES = {
    "notebook": (lambda p: _native(p, fused=False), lambda: True),
    "fused_adam": (lambda p: _native(p, fused=True), lambda: True),
    "compile": (prepare_compile, lambda: True),
    "fusedmlp": (prepare_fusedmlp, lambda: True),
    "net_loss": (prepare_net_loss, lambda: True),
    "loss_backward": (prepare_loss_backward, lambda: True),
    "step": (prepare_step, lambda: True),
    "fit": (prepare_fit, lambda: True),
    "jax_step": (prepare_jax_step, jax_available),
    "jax_scan": (prepare_jax_scan, jax_available),
}
SEED_ROUTES = tuple(ROUTES)
# The seed problem with the other optimizers: (label, factory); the native loop against Trainer.fit.
OPTIMIZERS = {
    "rmsprop": ("RMSprop(lr=0.01)", lambda p: torch.optim.RMSprop(p, lr=0.01)),
    "rmsprop_centered_momentum": ("RMSprop(lr=0.005, momentum=0.9, centered=True)",
                                  lambda p: torch.optim.RMSprop(p, lr=0.005, momentum=0.9, centered=True)),
    "adagrad": ("Adagrad(lr=0.2)", lambda p: torch.optim.Adagrad(p, lr=0.2)),
    "adagrad_decay": ("Adagrad(lr=0.2, lr_decay=0.01, weight_decay=1e-4)",
                      lambda p: torch.optim.Adagrad(p, lr=0.2, lr_decay=0.01, weight_decay=1e-4)),
}
OPTIMIZER_ROUTES = {
    "notebook": lambda problem, make: _notebook_loop(problem.net(), problem, make_opt=make),
    "fit": lambda problem, make: prepare_fit(problem, make),
}
GRID_ROUTES = ("notebook", "fused_adam", "step", "fit", "jax_scan")


def check_agreement(problem, routes):
    """CHECK_STEPS steps of each route from the same start end at the notebook route's parameters."""
    run, params = ROUTES["notebook"][0](problem)
    run(CHECK_STEPS)
    ref = params()
    for name in routes:
        if name == "notebook":
            continue
        run, params = ROUTES[name][0](problem)
        run(CHECK_STEPS)
        for a, b in zip(params(), ref):
            err = (a - b).abs().max().item()
            if not err <= 1e-3 * max(1.0, b.abs().max().item()):
                raise AssertionError(f"{problem.label()}: route {name!r} disagrees with the notebook loop after "
                                     f"{CHECK_STEPS} steps (max parameter difference {err:.2e})")


def time_route(name, problem, steps, repeats, prepare=None):
    """µs per step: the best of `repeats` whole loops of `steps` steps (a shared machine only ever
    adds time), after one untimed loop (lazy state, compilation). Returns (µs, first-loop seconds)."""
    run, _ = (prepare or ROUTES[name][0])(problem)
    t0 = time.perf_counter()
    run(steps)
    first = time.perf_counter() - t0
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        run(steps)
        best = min(best, time.perf_counter() - t0)
    return best / steps * 1e6, first


def grid_steps(shape):
    """Steps per timed loop: the notebook's 201 for small shapes, fewer where one step is long."""
    n, d, h, o = shape
    macs = n * (d * h + h * o)
    return max(5, min(SEED_STEPS, int(2e8 / (3 * macs))))


def run_optimizer_rows(quick=False, repeats=5, progress=print):
    """The seed problem with each of OPTIMIZERS: the native loop and Trainer.fit, same run, after both
    ended CHECK_STEPS steps at the same parameters. Rows {"optimizer", "label", "us_per_step": {route: µs}}."""
    seed = Problem(*SEED_SHAPE, lr=SEED_LR)
    steps = 20 if quick else SEED_STEPS
    rows = []
    for key, (label, make) in OPTIMIZERS.items():
        ends = {}
        for route, prepare in OPTIMIZER_ROUTES.items():
            run, params = prepare(seed, make)
            run(CHECK_STEPS)
            ends[route] = params()
        for a, b in zip(ends["fit"], ends["notebook"]):
            err = (a - b).abs().max().item()
            if not err <= 1e-3 * max(1.0, b.abs().max().item()):
                raise AssertionError(f"{label}: Trainer.fit disagrees with the native loop after {CHECK_STEPS} steps "
                                     f"(max parameter difference {err:.2e})")
        row = {"optimizer": key, "label": label, "steps": steps, "us_per_step": {}}
        for route, prepare in OPTIMIZER_ROUTES.items():
            row["us_per_step"][route], _ = time_route(route, seed, steps, 1 if quick else repeats,
                                                      prepare=lambda p, prepare=prepare: prepare(p, make))
        us = row["us_per_step"]
        progress(f"  seed {label}: native {us['notebook']:.2f}, fit {us['fit']:.3f} µs per step "
                 f"({us['notebook'] / us['fit']:.0f}×)")
        rows.append(row)
    return rows


# L-BFGS on the seed problem: the options of the measurement, opt.step(closure) `LBFGS_STEPS` times.
LBFGS_OPTIONS = {"lr": 1.0, "max_iter": 20, "history_size": 10, "line_search_fn": "strong_wolfe"}
LBFGS_STEPS = 50


def _lbfgs_native(seed, steps):
    """The closure loop as torch documents it: each evaluation runs the net and autograd in Python."""
    net = seed.net()
    opt = torch.optim.LBFGS(net.parameters(), **LBFGS_OPTIONS)
    loss_func = nn.MSELoss()

    def closure():
        opt.zero_grad()
        loss = loss_func(net(seed.x), seed.y)
        loss.backward()
        return loss

    t0 = time.perf_counter()
    for _ in range(steps):
        opt.step(closure)
    seconds = time.perf_counter() - t0
    with torch.no_grad():
        loss = loss_func(net(seed.x), seed.y).item()
    return seconds, loss, opt.state[opt._params[0]]["func_evals"]


def _lbfgs_fit(seed, steps):
    """Trainer.fit with the same LBFGS: `steps` whole opt.step(closure) calls in C++."""
    net = seed.fused()
    opt = torch.optim.LBFGS(net.parameters(), **LBFGS_OPTIONS)
    trainer = Trainer(net, opt)
    t0 = time.perf_counter()
    trainer.fit(seed.x, seed.y, steps)
    seconds = time.perf_counter() - t0
    with torch.no_grad():
        loss = net.loss(seed.x, seed.y).item()
    return seconds, loss, opt.state[opt.param_groups[0]["params"][0]]["func_evals"]


def _lbfgs_scipy(seed, steps):
    """scipy.optimize.minimize(method="L-BFGS-B") on the same flattened float64 problem (the loss and its
    gradient from one fused call), with the same history (maxcor) and at most steps × max_iter iterations."""
    from scipy.optimize import minimize

    from ..functional import mlp_loss_and_grads

    net = seed.fused().double()
    shapes = [p.shape for p in net.parameters()]
    x, y = seed.x.double(), seed.y.double()
    evals = [0]

    def f(theta):
        evals[0] += 1
        t = torch.from_numpy(theta)
        parts, off = [], 0
        for shape in shapes:
            n = shape.numel()
            parts.append(t[off:off + n].view(shape))
            off += n
        loss, grads = mlp_loss_and_grads(x, parts[0], parts[1], parts[2], parts[3], y, wrt=("w1", "b1", "w2", "b2"))
        return loss.item(), torch.cat([g.reshape(-1) for g in grads[1:5]]).numpy()

    theta0 = torch.cat([p.detach().reshape(-1) for p in net.parameters()]).numpy()
    t0 = time.perf_counter()
    res = minimize(f, theta0, jac=True, method="L-BFGS-B",
                   options={"maxiter": steps * LBFGS_OPTIONS["max_iter"], "maxcor": LBFGS_OPTIONS["history_size"]})
    return time.perf_counter() - t0, float(res.fun), evals[0]


def run_lbfgs_row(quick=False, repeats=3, progress=print):
    """L-BFGS on the seed problem: the native closure loop, Trainer.fit, and scipy's L-BFGS-B when scipy is
    importable; best of `repeats` wall times, the final loss and the number of loss evaluations."""
    seed = Problem(*SEED_SHAPE, lr=SEED_LR)
    steps = 5 if quick else LBFGS_STEPS
    routes = {"native": _lbfgs_native, "fit": _lbfgs_fit}
    try:
        import scipy.optimize  # noqa: F401
        routes["scipy"] = _lbfgs_scipy
    except ImportError:
        pass
    row = {"options": {k: v for k, v in LBFGS_OPTIONS.items()}, "steps": steps, "ms": {}, "loss": {}, "evals": {}}
    for name, run in routes.items():
        best = None
        for _ in range(1 if quick else repeats):
            seconds, loss, evals = run(seed, steps)
            if best is None or seconds < best[0]:
                best = (seconds, loss, evals)
        row["ms"][name], row["loss"][name], row["evals"][name] = best[0] * 1e3, best[1], best[2]
        progress(f"  seed LBFGS {name}: {best[0] * 1e3:.1f} ms, loss {best[1]:.4e}, {best[2]} evaluations")
    return row


def run_training_bench(quick=False, compile=True, repeats=5, progress=print):
    """Returns {"seed": [...], "optimizers": [...], "grid": [...]} rows with µs per step per route."""
    available = [r for r in ROUTES if ROUTES[r][1]() and (compile or r != "compile")]
    out = {"seed": [], "grid": []}
    seed = Problem(*SEED_SHAPE, lr=SEED_LR)
    seed_routes = [r for r in SEED_ROUTES if r in available and not (quick and r in ("compile", "jax_step"))]
    check_agreement(seed, seed_routes)
    steps = 20 if quick else SEED_STEPS
    for name in seed_routes:
        us, first = time_route(name, seed, steps, 1 if quick else repeats)
        out["seed"].append({"route": name, "us_per_step": us, "steps": steps, "first_loop_s": first})
        progress(f"  seed {name}: {us:.2f} µs per step")
    out["optimizers"] = run_optimizer_rows(quick, repeats, progress)
    out["lbfgs"] = run_lbfgs_row(quick, min(repeats, 3), progress)
    if quick:
        return out
    for shape in GRID:
        problem = Problem(*shape, lr=GRID_LR)
        routes = [r for r in GRID_ROUTES if r in available]
        check_agreement(problem, routes)
        row = {"shape": list(shape), "label": problem.label(), "steps": grid_steps(shape), "us_per_step": {}}
        for name in routes:
            row["us_per_step"][name], _ = time_route(name, problem, row["steps"], max(2, repeats // 2))
            progress(f"  {problem.label()} {name}: {row['us_per_step'][name]:.1f} µs per step")
        out["grid"].append(row)
    return out


def markdown(result):
    lines = ["Seed-004 training (1→20→1, 100 points, Adam(lr=0.2), MSE, full batch), whole loop:", "",
             "| route | µs per step | × the notebook |", "|---|---:|---:|"]
    seed = {r["route"]: r for r in result["seed"]}
    base = seed["notebook"]["us_per_step"]
    for name, r in seed.items():
        note = f" (first loop {r['first_loop_s']:.1f} s, compiling)" if name in ("compile", "jax_scan",
                                                                            "jax_step") else ""
        lines.append(f"| {NAMES[name]}{note} | {r['us_per_step']:.2f} | {base / r['us_per_step']:.1f}× |")
    if "jax_scan" in seed:
        lines.append("")
        lines.append(f"`fit` against JAX's `lax.scan`: {seed['jax_scan']['us_per_step'] / seed['fit']['us_per_step']:.2f}× "
                     "(same run).")
    if result.get("optimizers"):
        lines += ["", "The seed problem with the other optimizers the Trainer runs (same run), µs per step:", "",
                  "| optimizer | native loop | Trainer.fit | fit × native |", "|---|---:|---:|---:|"]
        for row in result["optimizers"]:
            us = row["us_per_step"]
            lines.append(f"| `{row['label']}` | {us['notebook']:.2f} | {us['fit']:.3f} | "
                         f"{us['notebook'] / us['fit']:.0f}× |")
    if result.get("lbfgs"):
        row = result["lbfgs"]
        opts = ", ".join(f"{k}={v!r}" for k, v in row["options"].items())
        names = {"native": "native: `opt.step(closure)`", "fit": "`Trainer.fit(x, y, steps)`",
                 "scipy": "scipy `minimize(method=\"L-BFGS-B\")`, fused loss and gradient"}
        lines += ["", f"The seed problem with `LBFGS({opts})`, {row['steps']} steps (same run):", "",
                  "| route | ms | loss evaluations | µs per evaluation | final loss | × native |",
                  "|---|---:|---:|---:|---:|---:|"]
        for name, ms in row["ms"].items():
            evals = row["evals"][name]
            lines.append(f"| {names[name]} | {ms:.1f} | {evals} | {ms * 1e3 / max(evals, 1):.1f} | "
                         f"{row['loss'][name]:.4e} | {row['ms']['native'] / ms:.0f}× |")
    if result["grid"]:
        routes = [r for r in GRID_ROUTES if r in result["grid"][0]["us_per_step"]]
        lines += ["", "Grid (Adam(lr=1e-3), full batch), µs per step and × the native loop:", "",
                  "| N×D→H→O | " + " | ".join(routes) + " | " + " | ".join(
                      f"{r} ×" for r in routes if r != "notebook") + " |",
                  "|---|" + "---:|" * (2 * len(routes) - 1)]
        for row in result["grid"]:
            us = row["us_per_step"]
            cells = [row["label"]] + [f"{us[r]:.1f}" for r in routes]
            cells += [f"{us['notebook'] / us[r]:.2f}×" for r in routes if r != "notebook"]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(result, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    seed = result["seed"]
    base = next(r["us_per_step"] for r in seed if r["route"] == "notebook")
    fig, ax = plt.subplots(figsize=(8, 4.5))
    names = [NAMES[r["route"]] for r in seed]
    speed = [base / r["us_per_step"] for r in seed]
    ax.barh(range(len(seed)), speed, color=["#888" if r["route"] in ("notebook", "fused_adam", "compile")
                                             else "#c60" if r["route"].startswith("jax") else "#36c"
                                             for r in seed])
    ax.set_yticks(range(len(seed)))
    ax.set_yticklabels(names, fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("× faster than the notebook's loop (same run)")
    ax.set_title("Seed-004 training, 201 Adam steps, float32")
    ax.invert_yaxis()
    ax.grid(True, axis="x", which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True
