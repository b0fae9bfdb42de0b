"""One training step of the Burgers PINN, route against route in one run (``python -m fusedgrad bench --pinn``).

The problem is DeepXDE's Burgers example (``examples/pinn_burgers.py`` trains it to the end):
2→[20]×3→1 tanh; residual u_t + u u_x − (0.01/π) u_xx on 2 540 collocation points in
[−1, 1] × [0, 1], u(x, 0) = −sin πx on 80 initial points, u(±1, t) = 0 on 80 boundary points;
loss = mean(residual²) + mean((u − u₀)²) over the initial points + mean(u²) over the boundary
points; one Adam step (lr 1e-3). Every route starts from the same weights on the same points.

Every route evaluates the loss as DeepXDE does (``deepxde/data/pde.py``, ``PDE.losses``): the
network and its input derivatives once over one batch of all 2 700 points, the residual's
terms taken from the collocation rows, u₀ and u = 0 compared on the initial and boundary rows.

Routes (µs per step):

* ``native``     — ``nn.Sequential``; u_x, u_t from ``autograd.grad(u.sum(), x, create_graph=True)``,
  u_xx from a second one; ``loss.backward()``; ``Adam(fused=True)``: what DeepXDE and PINA users write;
* ``torch_func`` — ``torch.func``: ``vmap(jacrev)`` and ``vmap(hessian)`` of the network per point;
* ``dropin``     — the ``native`` code with ``FusedMLP`` dropped in for the ``nn.Sequential`` (its
  double backward runs in plain torch ops: see fusedgrad.deep);
* ``fused``      — ``u, du, d2u = net.derivatives(x, order=2)``: one fused pass forward, one backward;
* ``jax_jit``    — JAX: the derivatives as gradients of the batch sum (``grad`` of ``grad``), one
  ``jit``-compiled step per Python call; ``jax_scan``: the same steps in one ``lax.scan`` under ``jit``.

After the routes, the fused route's two jet ops are timed on their own (:func:`jet_pass_us`): the
table then says what share of the fused step the fused pass is, and what the torch calls around it take.

Each route is checked before it is timed, as in ``bench --deep`` (fusedgrad/bench/deep.py): its
float64 run after 3 steps within 1e-8 of the native float64 run, elementwise; its float32 run
within 1e-3 of the distance trained (or twice native float32's own error).
"""
from __future__ import annotations

import math
import platform
import time

import torch
from torch import nn

from . import deep as _deep
from .machine import cpu_facts, cpu_label
from .steps import gemm_peak_gflops

NU = 0.01 / math.pi
WIDTHS = (2, 20, 20, 20, 1)
LR = 1e-3
STEPS = 50  # steps per timed loop
N_INITIAL, N_BOUNDARY = 80, 80
QUICK = {"n_domain": 254, "steps": 3}
ROUTES = ("native", "torch_func", "dropin", "fused", "jax_jit", "jax_scan")
NAMES = {
    "native": "autograd.grad(create_graph) + Adam(fused)",
    "torch_func": "torch.func vmap(jacrev, hessian)",
    "dropin": "FusedMLP dropped into the native code",
    "fused": "net.derivatives(x, order=2)",
    "jax_jit": "JAX jit per step",
    "jax_scan": "JAX lax.scan",
}


def burgers_points(n_domain=2540, n_initial=N_INITIAL, n_boundary=N_BOUNDARY, seed=0):
    """(collocation (N, 2), initial points (80, 2), u₀ there (80,), boundary points (80, 2)): columns x, t;
    float64 tensors holding float32 values (every dtype trains the same problem)."""
    gen = torch.Generator().manual_seed(seed)
    lo, span = torch.tensor([-1.0, 0.0]), torch.tensor([2.0, 1.0])
    xc = torch.rand(n_domain, 2, generator=gen) * span + lo
    xi = torch.stack([torch.rand(n_initial, generator=gen) * 2 - 1, torch.zeros(n_initial)], 1)
    side = torch.where(torch.rand(n_boundary, generator=gen) < 0.5, -1.0, 1.0)
    xb = torch.stack([side, torch.rand(n_boundary, generator=gen)], 1)
    ui = -torch.sin(math.pi * xi[:, 0])
    return tuple(t.float().double() for t in (xc, xi, ui, xb))


def _residual(u, u_x, u_t, u_xx):
    return u_t + u * u_x - NU * u_xx


def _loss(u, u_x, u_t, u_xx, ui):
    """The PINN loss from u and its derivatives over the batch [collocation; initial; boundary] (each (M,)):
    the residual's mean square on the collocation rows, (u − u₀)² on the initial rows, u² on the boundary
    rows. The derivatives of the last 160 rows are computed and not used, as in DeepXDE. Torch or JAX arrays."""
    nd = u.shape[0] - N_INITIAL - N_BOUNDARY
    r = _residual(u[:nd], u_x[:nd], u_t[:nd], u_xx[:nd])
    return (r ** 2).mean() + ((u[nd:nd + N_INITIAL] - ui) ** 2).mean() + (u[nd + N_INITIAL:] ** 2).mean()


def autograd_loss(model, x, ui):
    """The loss as PINN code writes it: derivatives by autograd.grad(create_graph=True)."""
    x = x.detach().requires_grad_()
    u = model(x)
    g, = torch.autograd.grad(u.sum(), x, create_graph=True)
    u_xx = torch.autograd.grad(g[:, 0].sum(), x, create_graph=True)[0][:, 0]
    return _loss(u[:, 0], g[:, 0], g[:, 1], u_xx, ui)


def fused_loss(net, x, ui):
    """The loss from one fused pass: u, ∂u/∂(x, t), ∂²u/∂(x, t)² (the Hessian's diagonal)."""
    u, du, d2u = net.derivatives(x, order=2)
    return _loss(u[:, 0], du[:, 0, 0], du[:, 0, 1], d2u[:, 0, 0], ui)


def torch_func_loss(model, x, ui):
    """The derivatives per point with torch.func (vmap of jacrev and hessian over the points)."""
    from torch.func import functional_call, hessian, jacrev, vmap

    params = dict(model.named_parameters())

    def u_of(p, point):
        return functional_call(model, p, (point,))[0]

    g = vmap(jacrev(u_of, argnums=1), in_dims=(None, 0))(params, x)
    hess = vmap(hessian(u_of, argnums=1), in_dims=(None, 0))(params, x)
    return _loss(model(x)[:, 0], g[:, 0], g[:, 1], hess[:, 0, 0], ui)


class Problem:
    """The points and the shared initial weights (nn.Linear's initialisation, float32), in any dtype."""

    def __init__(self, n_domain=2540, seed=0):
        torch.manual_seed(seed)
        self.init = [p.detach().clone() for p in self._sequential(torch.float32).parameters()]
        self.points = burgers_points(n_domain, seed=seed + 1)

    @staticmethod
    def _sequential(dtype):
        layers = []
        for l, (a, b) in enumerate(zip(WIDTHS, WIDTHS[1:])):
            if l:
                layers.append(nn.Tanh())
            layers.append(nn.Linear(a, b, dtype=dtype))
        return nn.Sequential(*layers)

    def data(self, dtype):
        """(x, u₀): the batch [collocation; initial; boundary] (N + 160, 2) and u₀ on the initial rows (80,)."""
        xc, xi, ui, xb = self.points
        return torch.cat([xc, xi, xb]).to(dtype), ui.to(dtype)

    def init_params(self, dtype):
        return [t.to(dtype) for t in self.init]

    def native(self, dtype):
        model = self._sequential(dtype)
        _deep._load(model.parameters(), self.init_params(dtype))
        return model

    def fused(self, dtype):
        from ..module import FusedMLP

        net = FusedMLP(2, 20, 1, hidden_layers=3, activation="tanh", dtype=dtype)
        _deep._load(net.parameters(), self.init_params(dtype))  # linear1.weight, linear1.bias, … in order
        return net


def _torch_route(model, loss_of, problem, dtype):
    opt = torch.optim.Adam(model.parameters(), lr=LR, fused=True)
    data = problem.data(dtype)

    def run(steps):
        for _ in range(steps):
            opt.zero_grad()
            loss_of(model, *data).backward()
            opt.step()

    return run, lambda: [p.detach().clone() for p in model.parameters()]


def _jax_loss():
    import jax
    import jax.numpy as jnp

    def net(params, x):
        a = x
        for i, (w, b) in enumerate(params):
            a = a @ w.T + b
            if i < len(params) - 1:
                a = jnp.tanh(a)
        return a

    def loss(params, x, ui):
        def u_sum(x):
            return net(params, x).sum()

        g = jax.grad(u_sum)(x)
        u_xx = jax.grad(lambda x: jax.grad(u_sum)(x)[:, 0].sum())(x)[:, 0]
        return _loss(net(params, x)[:, 0], g[:, 0], g[:, 1], u_xx, ui)

    return loss


def _jax_route(problem, dtype, scan):
    import jax
    import jax.numpy as jnp
    import optax

    loss, tx = _jax_loss(), optax.adam(LR)

    def step(p, s, *data):
        g = jax.grad(loss)(p, *data)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    data = tuple(jnp.asarray(t.numpy()) for t in problem.data(dtype))
    params = _deep._to_jax(problem.init_params(dtype))
    state = {"p": params, "s": tx.init(params)}
    compiled = {}
    jit_step = jax.jit(step)

    def run(steps):
        if not scan:
            p, s = state["p"], state["s"]
            for _ in range(steps):
                p, s = jit_step(p, s, *data)
            state["p"], state["s"] = jax.block_until_ready((p, s))
            return
        if steps not in compiled:
            def train(p, s, *d):
                return jax.lax.scan(lambda c, _: (step(*c, *d), None), (p, s), None, length=steps)[0]

            compiled[steps] = jax.jit(train)
        state["p"], state["s"] = jax.block_until_ready(compiled[steps](state["p"], state["s"], *data))

    return run, lambda: _deep._from_jax(state["p"])


MAKERS = {
    "native": lambda p, d: _torch_route(p.native(d), autograd_loss, p, d),
    "torch_func": lambda p, d: _torch_route(p.native(d), torch_func_loss, p, d),
    "dropin": lambda p, d: _torch_route(p.fused(d), autograd_loss, p, d),
    "fused": lambda p, d: _torch_route(p.fused(d), fused_loss, p, d),
    "jax_jit": lambda p, d: _jax_route(p, d, scan=False),
    "jax_scan": lambda p, d: _jax_route(p, d, scan=True),
}


def jet_pass_us(problem, repeats, calls=20):
    """µs of the fused route's two jet ops timed on their own (float32, median of `repeats` loops of
    `calls`): the forward (u, du, d2u at every point of the batch) and its backward from the cotangents
    the loss gives (d2u's t column zero: the backward carries 4 of the 5 parts)."""
    net = problem.fused(torch.float32)
    xc, ui = problem.data(torch.float32)
    outs = net.derivatives(xc, order=2)
    u, du, d2u = outs
    cot = torch.autograd.grad(_loss(u[:, 0], du[:, 0, 0], du[:, 0, 1], d2u[:, 0, 0], ui), outs)
    weights, biases = net._weights_biases()
    weights, biases = [w.detach() for w in weights], [b.detach() for b in biases]
    ops = torch.ops.fusedgrad
    forward = lambda: ops.deep_mlp_derivatives(xc, weights, biases, "tanh", 2)  # noqa: E731
    backward = lambda: ops.deep_mlp_derivatives_backward(*cot, xc, weights, biases, "tanh", 2,  # noqa: E731
                                                         [False, True])
    timed = {}
    for name, fn in (("forward", forward), ("backward", backward)):
        fn()
        loops = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            loops.append((time.perf_counter() - t0) / calls * 1e6)
        timed[name] = sorted(loops)[len(loops) // 2]
    return timed


def jet_pass_macs(rows, widths=WIDTHS, order=2, backward_parts=4):
    """Multiply-adds of the fused route's two jet ops over `rows` points (the products only: the
    activation steps' elementwise work is left out, so a time computed from this is a floor).

    Forward: every layer's product on each of the 1 + D + D parts (u, ∂u/∂x_d, ∂²u/∂x_d²). Backward:
    the parts the loss's cotangents reach (``backward_parts``; the PINN loss leaves ∂²u/∂t² out: 4 of
    5), each through the forward again, the weight gradients, and the products back to the first
    layer's output (no gradient for x)."""
    D = widths[0]
    layer = [a * b for a, b in zip(widths, widths[1:])]
    forward = (1 + D + (D if order == 2 else 0)) * sum(layer)
    backward = backward_parts * (2 * sum(layer) + sum(layer[1:]))
    return {"forward": forward * rows, "backward": backward * rows}


class _FreeJets:
    """The fused net's jet pass at zero cost: ``derivatives`` returns precomputed leaf tensors (the same
    values). The step built on it times only the torch code around the fused call: the residual, the
    initial and boundary terms, ``backward()`` and Adam."""

    def __init__(self, outputs):
        self.outputs = outputs

    def derivatives(self, x, order):
        return self.outputs


def around_jets_us(problem, steps, repeats):
    """µs per step of the fused route with the jet pass replaced by its precomputed outputs (median of
    `repeats` loops of `steps` steps): the cost of the loss code around it, so native / this is the most
    any kernel for (u, du, d2u) could give with this loss code. The jets' outputs are leaves, so nothing
    reaches the parameters: each step hands them the gradients the fused backward gives (computed once)
    before ``Adam.step()``, which then does the update the fused step pays for (it skips parameters
    without a gradient)."""
    net = problem.fused(torch.float32)
    x, ui = problem.data(torch.float32)
    params = list(net.parameters())
    fused_loss(net, x, ui).backward()
    grads = [p.grad.detach().clone() for p in params]
    outputs = tuple(t.detach().requires_grad_() for t in net.derivatives(x, order=2))
    free = _FreeJets(outputs)
    opt = torch.optim.Adam(params, lr=LR, fused=True)

    def run(steps):
        for _ in range(steps):
            opt.zero_grad()
            fused_loss(free, x, ui).backward()
            for t in outputs:
                t.grad = None  # the op's outputs keep no gradient either
            for p, g in zip(params, grads):
                p.grad = g
            opt.step()

    run(1)
    loops = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run(steps)
        loops.append((time.perf_counter() - t0) / steps * 1e6)
    return sorted(loops)[len(loops) // 2]


def run(quick=False, threads=2, repeats=5, progress=True):
    """Every route at `threads` torch threads; returns the result (what pinn.json holds)."""
    jax_threads = _deep._limit_jax_threads(threads)
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    started = time.perf_counter()
    n_domain = QUICK["n_domain"] if quick else 2540
    steps = QUICK["steps"] if quick else STEPS
    repeats = min(repeats, 3) if quick else repeats
    budget = 1.0 if quick else 20.0
    problem = Problem(n_domain)
    out = {"case": "burgers", "label": f"Burgers PINN {n_domain} + 160 points, 2→[20]×3→1 tanh",
           "steps_per_loop": steps, "us_per_step": {}, "check": {}, "failed": {}, "skipped": {}, "first_call_s": {}}
    bar = _deep._Bar("pinn", len(ROUTES), progress)
    try:
        bar.route("native (reference)")
        ref_run, ref_params = MAKERS["native"](problem, torch.float64)
        ref_run(_deep.CHECK_STEPS)
        ref64 = ref_params()
        init = problem.init_params(torch.float64)
        _deep.check_and_time_routes(ROUTES, MAKERS, problem, ref64, init, steps, repeats, budget, out, bar)
        out["jet_pass_us"] = jet_pass_us(problem, repeats)
        out["around_jets_us"] = around_jets_us(problem, steps, repeats)
        out["jet_pass_macs"] = jet_pass_macs(problem.data(torch.float32)[0].shape[0])
        out["gemm_peak_gflops"] = gemm_peak_gflops(torch.float32, n=256 if quick else 1536)
    finally:
        bar.close()
        torch.set_num_threads(saved)
    us = out["us_per_step"]
    out["ratios"] = {f"{f}_x_{o}": us[o] / us[f] for f in ("fused", "dropin") if f in us
                     for o in ("native", "torch_func", "jax_jit", "jax_scan") if o in us}
    out["meta"] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"), "machine": platform.machine(), **cpu_facts(),
        **_deep._versions(), "threads": threads, "jax_threads": jax_threads,
        "dtype": "float32", "quick": quick, "repeats": repeats, "lr": LR,
        "check": {"steps": _deep.CHECK_STEPS, "float64_max_rel": _deep.TOL64, "float32_rel_to_distance": _deep.TOL32},
        "seconds": time.perf_counter() - started,
    }
    return out


def markdown(result):
    us, meta = result["us_per_step"], result["meta"]
    fastest_jax = min((us[r] for r in ("jax_jit", "jax_scan") if r in us), default=None)
    lines = [f"Burgers PINN step ({result['label']}), float32, {meta['threads']} threads, "
             f"{meta['date']} on {cpu_label(meta)} (torch {meta['torch']}, JAX {meta['jax']}); median of up to "
             f"{meta['repeats']} loops of each route, the routes interleaved (one loop of each in turn):", "",
             "| route | µs per step | fused is × faster |", "|---|---:|---:|"]
    for r in ROUTES:
        if r in us:
            ratio = "" if r == "fused" or "fused" not in us else f"{us[r] / us['fused']:.1f}×"
            lines.append(f"| {NAMES[r]} | {us[r]:,.0f} | {ratio} |")
        else:
            why = result["failed"].get(r) or result["skipped"].get(r, "")
            lines.append(f"| {NAMES[r]} | {'FAILED' if r in result['failed'] else 'skipped'} | {why} |")
    if fastest_jax and "fused" in us:
        lines += ["", f"fused against JAX's fastest route: {fastest_jax / us['fused']:.1f}×; "
                      f"FusedMLP dropped into the autograd code against native: "
                      f"{us['native'] / us['dropin']:.2f}×" if "dropin" in us else ""]
    jet = result.get("jet_pass_us")
    if jet and "fused" in us:
        lines += ["", f"the fused step's jet pass, its two ops timed on their own: forward {jet['forward']:,.0f} µs, "
                      f"backward {jet['backward']:,.0f} µs ({(jet['forward'] + jet['backward']) / us['fused']:.0%} "
                      "of the step; the rest is the torch calls around it)"]
    around = result.get("around_jets_us")
    if around and "native" in us:
        lines += ["", "the fused step with its jet pass replaced by the jet pass's outputs, precomputed: "
                      f"{around:,.0f} µs (the residual, the initial and boundary terms, backward() and Adam around the fused "
                      f"call): {us['native'] / around:.1f}× native is the most any kernel for u, du, d2u could "
                      "give with this loss code"]
    macs, peak = result.get("jet_pass_macs"), result.get("gemm_peak_gflops")
    if jet and macs and peak and around and "native" in us:
        gflop = {k: 2 * v / 1e9 for k, v in macs.items()}
        rate = {k: gflop[k] / (jet[k] * 1e-6) for k in gflop}
        floor_us = sum(gflop.values()) / peak * 1e6
        lines += ["", f"the jet pass's products: {gflop['forward'] * 1e3:.0f} + {gflop['backward'] * 1e3:.0f} MFLOP "
                      f"(forward + backward), {rate['forward']:.0f} and {rate['backward']:.0f} GFLOP/s: "
                      f"{100 * rate['forward'] / peak:.0f} % and {100 * rate['backward'] / peak:.0f} % of the same "
                      f"run's SGEMM peak ({peak:.0f} GFLOP/s). At that peak they would take {floor_us:,.0f} µs: "
                      f"with this loss code around them the step could be at most "
                      f"{us['native'] / (around + floor_us):.1f}× native and "
                      + (f"{fastest_jax / (around + floor_us):.1f}× JAX's fastest route"
                         if fastest_jax else "(JAX not run)")]
    return "\n".join(lines) + "\n"
