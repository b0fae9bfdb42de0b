"""The Burgers PINN of DeepXDE's example, trained with fused input derivatives.

    u_t + u u_x − (0.01/π) u_xx = 0,   x ∈ [−1, 1], t ∈ [0, 1],
    u(x, 0) = −sin πx,   u(±1, t) = 0

Network 2→[20]×3→1 tanh (DeepXDE's ``FNN([2] + [20] * 3 + [1], "tanh", "Glorot normal")``);
2 540 collocation points, 80 initial and 80 boundary points; Adam (lr 1e-3), then L-BFGS
(``torch.optim.LBFGS`` with the strong-Wolfe line search). The loss needs u, u_x, u_t and u_xx at
every collocation point: ``net.derivatives(x, order=2)`` computes them in one fused pass
(and their parameter gradient in one more), where PINN code calls ``autograd.grad`` with
``create_graph=True`` twice. ``--native`` trains the same network the autograd way (``nn.Sequential``),
for the wall-time comparison; ``--dropin`` keeps the autograd code and drops FusedMLP in (its nested
input gradients run on the engine: README, "Nested input gradients"). As in DeepXDE (``PDE.losses``), the network runs once over one batch of
all the points, [collocation; initial; boundary], and each term of the loss takes its rows.

The reference solution is the exact one, by the Cole–Hopf transformation:

    u(x, t) = −∫ sin π(x−η) · f(x−η) · e^(−η²/4νt) dη / ∫ f(x−η) · e^(−η²/4νt) dη,
    f(y) = exp(−cos(πy) / (2πν))

evaluated by quadrature on a 256 × 100 grid, and the example reports the L2 relative error
‖u_net − u‖₂ / ‖u‖₂ over that grid.

    python examples/pinn_burgers.py                      # fused, 15 000 Adam + up to 5 000 L-BFGS iterations
    python examples/pinn_burgers.py --native             # the same with autograd.grad(create_graph=True)
    python examples/pinn_burgers.py --dropin             # that autograd code on FusedMLP
    python examples/pinn_burgers.py --adam 2000 --lbfgs 0
"""
from __future__ import annotations

import argparse
import math
import time

import torch
from torch import nn

import fusedgrad

NU = 0.01 / math.pi


def cole_hopf(x: torch.Tensor, t: torch.Tensor, nodes: int = 2001) -> torch.Tensor:
    """The exact solution at points (x, t) (float64, any shape), by trapezoid quadrature in η = √(4νt)·z,
    z ∈ [−10, 10] (the Gaussian weight is e^(−z²): beyond |z| = 10 it is below 1e-43). The weights
    f(x−η) span e^(±50): they are taken relative to their largest (log-sum-exp), so nothing overflows."""
    x, t = torch.broadcast_tensors(x.double(), t.double())
    shape = x.shape
    x, t = x.reshape(-1, 1), t.reshape(-1, 1)
    z = torch.linspace(-10.0, 10.0, nodes, dtype=torch.float64)
    y = x - torch.sqrt(4 * NU * t.clamp_min(0)) * z          # (points, nodes): x − η
    log_w = -torch.cos(math.pi * y) / (2 * math.pi * NU) - z * z
    w = torch.exp(log_w - log_w.max(dim=1, keepdim=True).values)
    u = -(torch.sin(math.pi * y) * w).sum(1) / w.sum(1)
    u = torch.where(t[:, 0] > 0, u, -torch.sin(math.pi * x[:, 0]))
    return u.reshape(shape)


def points(n_domain=2540, n_initial=80, n_boundary=80, seed=0):
    gen = torch.Generator().manual_seed(seed)
    xc = torch.rand(n_domain, 2, generator=gen) * torch.tensor([2.0, 1.0]) - torch.tensor([1.0, 0.0])
    xi = torch.stack([torch.rand(n_initial, generator=gen) * 2 - 1, torch.zeros(n_initial)], 1)
    xb = torch.stack([torch.where(torch.rand(n_boundary, generator=gen) < 0.5, -1.0, 1.0),
                      torch.rand(n_boundary, generator=gen)], 1)
    return xc, xi, -torch.sin(math.pi * xi[:, 0]), xb


def fused_terms(net, x):
    """u, u_x, u_t, u_xx at every point of x, from one fused pass."""
    u, du, d2u = net.derivatives(x, order=2)            # (M, 1), (M, 1, 2), (M, 1, 2): columns x, t
    return u[:, 0], du[:, 0, 0], du[:, 0, 1], d2u[:, 0, 0]


def autograd_terms(net, x):
    """The same by autograd.grad(create_graph=True), as PINN code computes them."""
    x = x.detach().requires_grad_()
    u = net(x)
    g, = torch.autograd.grad(u.sum(), x, create_graph=True)
    u_xx = torch.autograd.grad(g[:, 0].sum(), x, create_graph=True)[0][:, 0]
    return u[:, 0], g[:, 0], g[:, 1], u_xx


def make_net(native: bool, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    net = fusedgrad.FusedMLP(2, 20, 1, hidden_layers=3, activation="tanh")
    for layer in net.to_module():                       # Glorot normal weights, zero biases (DeepXDE's)
        if isinstance(layer, nn.Linear):
            nn.init.xavier_normal_(layer.weight)
            nn.init.zeros_(layer.bias)
    return net.to_module(copy=True) if native else net


def l2_relative_error(net, grid_x, grid_t, exact):
    with torch.no_grad():
        pred = net(torch.stack([grid_x.reshape(-1), grid_t.reshape(-1)], 1).float())[:, 0].double()
    return float((pred - exact.reshape(-1)).norm() / exact.norm())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adam", type=int, default=15000, help="Adam steps (lr 1e-3)")
    parser.add_argument("--lbfgs", type=int, default=5000, help="L-BFGS iterations at most (0: none)")
    routes = parser.add_mutually_exclusive_group()
    routes.add_argument("--native", action="store_true",
                        help="derivatives by autograd.grad(create_graph=True) on nn.Sequential")
    routes.add_argument("--dropin", action="store_true",
                        help="derivatives by autograd.grad(create_graph=True) on FusedMLP")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    xc, xi, ui, xb = points(seed=args.seed)
    x = torch.cat([xc, xi, xb])                         # one batch: rows [:nd] collocation, then initial, boundary
    nd, ni = len(xc), len(xi)
    net = make_net(args.native, args.seed)
    terms = autograd_terms if args.native or args.dropin else fused_terms

    def loss_fn():
        u, u_x, u_t, u_xx = terms(net, x)
        residual = u_t[:nd] + u[:nd] * u_x[:nd] - NU * u_xx[:nd]
        return residual.pow(2).mean() + (u[nd:nd + ni] - ui).pow(2).mean() + u[nd + ni:].pow(2).mean()

    grid_x, grid_t = torch.meshgrid(torch.linspace(-1, 1, 256, dtype=torch.float64),
                                    torch.linspace(0, 1, 100, dtype=torch.float64), indexing="ij")
    exact = cole_hopf(grid_x, grid_t)

    route = ("autograd.grad(create_graph=True) on nn.Sequential" if args.native else
             "autograd.grad(create_graph=True) on FusedMLP" if args.dropin else "net.derivatives(x, order=2)")
    print(f"Burgers PINN, 2→[20]×3→1 tanh, derivatives by {route}, {torch.get_num_threads()} threads")
    start = time.perf_counter()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    for step in range(1, args.adam + 1):
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        opt.step()
        if step % max(args.adam // 5, 1) == 0:
            print(f"  Adam {step:6d}: loss {loss.item():.3e}, L2 relative error "
                  f"{l2_relative_error(net, grid_x, grid_t, exact):.3e} ({time.perf_counter() - start:.1f} s)")
    adam_s = time.perf_counter() - start
    lbfgs_evals = 0
    if args.lbfgs:
        lbfgs = torch.optim.LBFGS(net.parameters(), lr=1.0, max_iter=args.lbfgs, max_eval=int(args.lbfgs * 1.25),
                                  history_size=50, tolerance_grad=1e-8, tolerance_change=0.0,
                                  line_search_fn="strong_wolfe")

        def closure():
            nonlocal lbfgs_evals
            lbfgs_evals += 1
            lbfgs.zero_grad()
            value = loss_fn()
            value.backward()
            return value

        lbfgs.step(closure)
    total_s = time.perf_counter() - start
    with torch.enable_grad() if args.native or args.dropin else torch.no_grad():
        final_loss = loss_fn().item()
    err = l2_relative_error(net, grid_x, grid_t, exact)
    print(f"final loss {final_loss:.3e}; L2 relative error {err:.3e} against the Cole–Hopf solution")
    print(f"wall time {total_s:.1f} s: Adam {args.adam} steps {adam_s:.1f} s ({adam_s / max(args.adam, 1) * 1e3:.2f} "
          f"ms/step), L-BFGS {lbfgs_evals} evaluations {total_s - adam_s:.1f} s")
    return err


if __name__ == "__main__":
    main()
