"""Train the 1→20→1 curve-fit network (y = x² + noise, 100 points, Adam lr=0.2)
from the same initial weights four ways — native autograd (nn.Linear → nn.Sigmoid
→ nn.Linear + nn.MSELoss), FusedMLP.loss(...).backward(), fusedgrad.Trainer.step
per step and one fusedgrad.Trainer.fit call — and show that the losses agree and
what each costs."""
import statistics
import sys
import time

import torch
from torch import nn

from ..bench.native import Net  # noqa: F401  (the reference model; fusedgrad.cli.demo.Net as before)
from ..module import FusedMLP
from ..trainer import Trainer
from . import positive_float, positive_int

HELP = "train the 1→20→1 curve fit with fusedgrad and native autograd side by side"


def make_data(n_points=100, seed=0, dtype=torch.float32):
    """Built-in data: y = x² + 0.2·U(0, 1) on x ∈ [−1, 1]."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.linspace(-1, 1, n_points, dtype=dtype).unsqueeze(1)
    y = x.pow(2) + 0.2 * torch.rand(x.shape, generator=gen, dtype=dtype)
    return x, y


def train(model, loss_fn, x, y, steps, lr):
    """Adam training; returns (losses, seconds of forward+loss+backward, seconds of whole steps)."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    losses, grad_times, step_times = [], [], []
    for _ in range(steps):
        start = time.perf_counter()
        opt.zero_grad()
        loss = loss_fn(model, x, y)
        loss.backward()
        mid = time.perf_counter()
        opt.step()
        end = time.perf_counter()
        losses.append(loss.item())
        grad_times.append(mid - start)
        step_times.append(end - mid + (mid - start))
    return losses, grad_times, step_times


def native_loss(model, x, y):
    return nn.functional.mse_loss(model(x), y)


def fused_loss(model, x, y):
    return model.loss(x, y)


def compare(steps=201, hidden=20, lr=0.2, seed=0, dtype=torch.float32):
    """Runs both trainings; returns a dict of their losses, times and final weights."""
    x, y = make_data(seed=seed, dtype=dtype)
    torch.manual_seed(seed)
    native = Net(1, hidden, 1).to(dtype)
    fused = FusedMLP(1, hidden, 1, dtype=dtype)
    fused.load_state_dict(native.state_dict())  # same initial weights
    # Warm both paths up (first-call allocations, thread pool start) on copies.
    for model, fn in ((Net(1, hidden, 1).to(dtype), native_loss), (FusedMLP(1, hidden, 1, dtype=dtype), fused_loss)):
        train(model, fn, x, y, 20, lr)
    by_step, by_fit = (FusedMLP(1, hidden, 1, dtype=dtype) for _ in range(2))
    by_step.load_state_dict(native.state_dict())
    by_fit.load_state_dict(native.state_dict())
    warm = FusedMLP(1, hidden, 1, dtype=dtype)
    Trainer(warm, torch.optim.Adam(warm.parameters(), lr=lr)).fit(x, y, 20)
    start = time.perf_counter()
    native_run = train(native, native_loss, x, y, steps, lr)
    native_total = time.perf_counter() - start
    start = time.perf_counter()
    fused_run = train(fused, fused_loss, x, y, steps, lr)
    fused_total = time.perf_counter() - start
    trainer = Trainer(by_step, torch.optim.Adam(by_step.parameters(), lr=lr))
    step_losses, step_s = [], []
    start = time.perf_counter()
    for _ in range(steps):
        t0 = time.perf_counter()
        loss = trainer.step(x, y)
        step_s.append(time.perf_counter() - t0)
        step_losses.append(loss.item())
    step_total = time.perf_counter() - start
    trainer = Trainer(by_fit, torch.optim.Adam(by_fit.parameters(), lr=lr))
    start = time.perf_counter()
    fit_losses = trainer.fit(x, y, steps)
    fit_total = time.perf_counter() - start
    return {
        "x": x, "y": y, "native": native, "fused": fused, "trainer_step": by_step, "trainer_fit": by_fit,
        "native_losses": native_run[0], "fused_losses": fused_run[0],
        "step_losses": step_losses, "fit_losses": fit_losses.tolist(),
        "native_grad_s": native_run[1], "fused_grad_s": fused_run[1],
        "native_step_s": native_run[2], "fused_step_s": fused_run[2], "trainer_step_s": step_s,
        "total_s": {"native": native_total, "fused": fused_total, "step": step_total, "fit": fit_total},
    }


def add_arguments(parser):
    parser.add_argument("--steps", type=positive_int, default=201, help="Adam steps (at least 1)")
    parser.add_argument("--hidden", type=positive_int, default=20, help="hidden width H of the 1→H→1 network")
    parser.add_argument("--lr", type=positive_float, default=0.2, help="Adam learning rate")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data's noise and of the initial weights")
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32",
                        help="dtype of the data and both networks")
    parser.add_argument("--plot", metavar="PATH", default=None,
                        help="also save a figure (PNG, PDF, SVG, ... by extension): the fitted curve over the "
                             "data and the loss curves of both paths; needs matplotlib "
                             "(pip install 'fusedgrad[plot]')")


def plot_fit(r, path):
    """Saves the fitted curves over the data points and both loss curves to ``path``.

    ``r`` is what :func:`compare` returns. Raises ImportError without matplotlib.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    x, y = r["x"], r["y"]
    grid = torch.linspace(x.min().item(), x.max().item(), 400, dtype=x.dtype).unsqueeze(1)
    with torch.no_grad():
        fused_fit, native_fit = r["fused"](grid), r["native"](grid)
    fig, (ax_fit, ax_loss) = plt.subplots(1, 2, figsize=(11, 4.2))
    ax_fit.scatter(x.squeeze(1).numpy(), y.squeeze(1).numpy(), s=12, color="0.55", label="data")
    ax_fit.plot(grid.squeeze(1).numpy(), native_fit.squeeze(1).numpy(), lw=4, alpha=0.45, color="tab:blue",
                label="native autograd")
    ax_fit.plot(grid.squeeze(1).numpy(), fused_fit.squeeze(1).numpy(), lw=1.5, ls="--", color="tab:red",
                label="fusedgrad")
    ax_fit.set(title="fitted curve after training", xlabel="x", ylabel="y")
    ax_fit.legend()
    steps = range(len(r["native_losses"]))
    ax_loss.plot(steps, r["native_losses"], lw=4, alpha=0.45, color="tab:blue", label="native autograd")
    ax_loss.plot(steps, r["fused_losses"], lw=1.5, ls="--", color="tab:red", label="fusedgrad")
    ax_loss.set(title="training loss (MSE)", xlabel="Adam step", ylabel="loss", yscale="log")
    ax_loss.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run(args):
    if args.plot:  # fail before training, not after
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print("fusedgrad demo: --plot needs matplotlib, which is not installed; install it with\n"
                  "    pip install matplotlib        (or: pip install 'fusedgrad[plot]')", file=sys.stderr)
            return 2
    dtype = getattr(torch, args.dtype)
    r = compare(steps=args.steps, hidden=args.hidden, lr=args.lr, seed=args.seed, dtype=dtype)
    nl, fl, sl, tl = r["native_losses"], r["fused_losses"], r["step_losses"], r["fit_losses"]
    print(f"1→{args.hidden}→1 curve fit, y = x² + noise, 100 points, Adam(lr={args.lr}), {args.dtype}, "
          f"{torch.get_num_threads()} thread(s), from the same initial weights\n")
    print(f"{'step':>6} {'native loss':>13} {'net.loss()':>13} {'Trainer.step':>13} {'Trainer.fit':>13}")
    shown = sorted(set(range(0, len(nl), 25)) | {len(nl) - 1})
    for i in shown:
        print(f"{i:>6} {nl[i]:>13.6f} {fl[i]:>13.6f} {sl[i]:>13.6f} {tl[i]:>13.6f}")

    def rel(a, b):
        return max(abs(p - q) / max(abs(p), 1e-30) for p, q in zip(a, b))

    worst = max(rel(nl, fl), rel(nl, sl), rel(nl, tl))
    # Tolerance: float noise compounded over the run by Adam's normalisation.
    tol = 1e-4 if dtype == torch.float32 else 1e-9  # measured worst over 8 seeds: 5e-6 (float32)
    agree = worst <= tol
    print(f"\nlargest relative loss difference from native over {len(nl)} steps: {worst:.2e} "
          f"({'agree' if agree else 'DISAGREE'}, tolerance {tol:.0e})")

    def us(seconds):
        return statistics.median(seconds) * 1e6

    print(f"\n{'median µs per step':<34} {'native':>10} {'fusedgrad':>10} {'speed-up':>9}")
    for label, key in (("forward + loss + backward", "grad_s"), ("whole step incl. Adam update", "step_s")):
        n, f = us(r[f"native_{key}"]), us(r[f"fused_{key}"])
        print(f"{label:<34} {n:>10.1f} {f:>10.1f} {n / f:>8.2f}×")
    total = r["total_s"]
    print(f"\n{'whole training (' + str(len(nl)) + ' steps)':<40} {'wall ms':>9} {'µs/step':>9} {'× native':>9}")
    for label, key in (("native autograd + Adam", "native"), ("net.loss(x, y).backward() + Adam", "fused"),
                       ("fusedgrad.Trainer.step per step", "step"), ("fusedgrad.Trainer.fit, one call", "fit")):
        print(f"{label:<40} {total[key] * 1e3:>9.2f} {total[key] / len(nl) * 1e6:>9.1f} "
              f"{total['native'] / total[key]:>8.1f}×")
    if args.plot:
        plot_fit(r, args.plot)
        print(f"\nsaved the fitted curve and the loss curves to {args.plot}")
    return 0 if agree else 1
