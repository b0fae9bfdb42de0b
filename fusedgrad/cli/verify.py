"""Check the matrix calculus of Linear → activation → Linear → squared loss three ways.

For one problem (by default the 1→20→1 curve fit, y = x² + noise on
100 points) every gradient is computed

  * by native autograd (torch.sigmoid or the torch.nn activation, matmul, F.mse_loss, .backward()),
  * by fusedgrad's fused kernel (fusedgrad.mlp_loss, .backward()),
  * by the textbook formulas, written out in plain torch (no autograd):

      h = x w1ᵀ + b1    s = act(h)  p = s w2ᵀ + b2    r = p − t
      L = c Σ r²        c = 1/(N·O) for "mean", 1 for "sum"
      g   = 2c · r
      dw2 = gᵀ s        db2 = Σ_rows g
      ds  = g w2        dh  = ds ⊙ act'(h)   (σ' = s ⊙ (1 − s); another activation's
                                             own derivative from autograd)
      dw1 = dhᵀ x       db1 = Σ_rows dh        dx = dh w1

(a per-sample bias keeps its rows: its gradient is g or dh itself), and the
differences are printed as a table. The exit status is 1 when any two of the
three disagree by more than the dtype's tolerance.
"""
import argparse
import sys

import torch
import torch.nn.functional as F

from .._checks import ACTIVATIONS
from ..functional import mlp_loss
from ..module import activation_module
from . import positive_int

HELP = "check the hand-derived gradients against autograd and the fused kernel"

NAMES = ("x", "w1", "b1", "w2", "b2")
# Relative tolerance on a whole tensor: max|a − b| ≤ rtol · max|reference|.
# float64: rounding of a few ops and sums, far below 1e-10. float32: sums of up
# to a few hundred terms in a different order, each step ~6e-8 relative.
RTOL = {torch.float64: 1e-10, torch.float32: 1e-5}
BIAS_KINDS = ("none", "vector", "per-sample")


def make_problem(n=100, d=1, h=20, o=1, *, seed=0, bias="vector", dtype=torch.float64):
    """Inputs (x, w1, b1, w2, b2, target) of one problem, all plain tensors.

    D = O = 1 gives the notebooks' curve fit, x = linspace(−1, 1, n) and
    y = x² + 0.2·U(0, 1); other widths draw x and the target from N(0, 1).
    Weights are initialised as nn.Linear does (from ``seed``); a per-sample
    bias is a matrix with one row per sample, as in the notebooks.
    """
    if bias not in BIAS_KINDS:
        raise ValueError(f"bias must be one of {', '.join(BIAS_KINDS)}, got {bias!r}")
    gen = torch.Generator().manual_seed(seed)
    if d == 1 and o == 1:
        x = torch.linspace(-1, 1, n, dtype=dtype).unsqueeze(1)
        target = x.pow(2) + 0.2 * torch.rand(x.shape, generator=gen, dtype=dtype)
    else:
        x = torch.randn(n, d, generator=gen, dtype=dtype)
        target = torch.randn(n, o, generator=gen, dtype=dtype)
    torch.manual_seed(seed)
    lin1 = torch.nn.Linear(d, h, dtype=dtype)
    lin2 = torch.nn.Linear(h, o, dtype=dtype)
    w1, w2 = lin1.weight.detach().clone(), lin2.weight.detach().clone()
    b1 = b2 = None
    if bias == "vector":
        b1, b2 = lin1.bias.detach().clone(), lin2.bias.detach().clone()
    elif bias == "per-sample":
        b1 = lin1.bias.detach() + 0.1 * torch.randn(n, h, generator=gen, dtype=dtype)
        b2 = lin2.bias.detach() + 0.1 * torch.randn(n, o, generator=gen, dtype=dtype)
    return x, w1, b1, w2, b2, target


def _activate(name, h):
    """(act(h), act'(h)): σ by its formula; any other activation by its torch.nn module, the
    derivative of the element-wise function by autograd."""
    if name == "sigmoid":
        s = torch.sigmoid(h)
        return s, s * (1 - s)
    leaf = h.detach().requires_grad_()
    with torch.enable_grad():
        s = activation_module(name)(leaf)
        (derivative,) = torch.autograd.grad(s.sum(), leaf)
    return s.detach(), derivative


def textbook_gradients(x, w1, b1, w2, b2, target, reduction="mean", activation="sigmoid"):
    """The formulas of the module docstring, one line each, in plain torch.

    x (N, D), w1 (H, D), w2 (O, H), target (N, O); b1 / b2 are None, (H,) / (O,)
    vectors or (N, H) / (N, O) per-sample matrices. Returns (loss, {name: grad})
    with a gradient for each tensor argument that is not None.
    """
    n, o = x.shape[0], w2.shape[0]
    c = 1.0 / (n * o) if reduction == "mean" else 1.0
    h = x @ w1.T + (0 if b1 is None else b1)
    s, act_prime = _activate(activation, h)
    p = s @ w2.T + (0 if b2 is None else b2)
    r = p - target
    loss = c * (r * r).sum()

    g = 2 * c * r                   # dL/dp            (N, O)
    dw2 = g.T @ s                   # (O, H)
    ds = g @ w2                     # dL/ds            (N, H)
    dh = ds * act_prime             # σ'(h) = s(1 − s) (N, H)
    dw1 = dh.T @ x                  # (H, D)
    dx = dh @ w1                    # (N, D)
    grads = {"x": dx, "w1": dw1, "w2": dw2}
    if b1 is not None:
        grads["b1"] = dh.sum(0) if b1.dim() == 1 else dh   # Σ_rows for a vector, per row for a matrix
    if b2 is not None:
        grads["b2"] = g.sum(0) if b2.dim() == 1 else g
    return loss, grads


def _leaves(args):
    return [None if a is None else a.detach().clone().requires_grad_() for a in args]


def _backward(loss, leaves):
    loss.backward()
    return loss.detach(), {name: t.grad for name, t in zip(NAMES, leaves) if t is not None}


def native_gradients(x, w1, b1, w2, b2, target, reduction="mean", activation="sigmoid"):
    """Native autograd: the model written with torch ops, F.mse_loss, backward()."""
    x, w1, b1, w2, b2 = leaves = _leaves((x, w1, b1, w2, b2))
    h = x @ w1.T
    if b1 is not None:
        h = h + b1
    act = torch.sigmoid if activation == "sigmoid" else activation_module(activation)
    p = act(h) @ w2.T
    if b2 is not None:
        p = p + b2
    return _backward(F.mse_loss(p, target, reduction=reduction), leaves)


def fused_gradients(x, w1, b1, w2, b2, target, reduction="mean", activation="sigmoid"):
    """fusedgrad's one-pass loss and its C++ backward."""
    leaves = _leaves((x, w1, b1, w2, b2))
    return _backward(mlp_loss(*leaves, target, reduction=reduction, activation=activation), leaves)


def _diff(a, b):
    """(max |a − b|, that divided by max |b|)."""
    err = (a - b).abs().max().item()
    scale = b.abs().max().item()
    return err, (err / scale if scale > 0 else (0.0 if err == 0 else float("inf")))


def compare(x, w1, b1, w2, b2, target, reduction="mean", activation="sigmoid"):
    """Runs the three paths; returns one row per quantity (the loss first, then each gradient)."""
    args = (x, w1, b1, w2, b2, target)
    results = {
        "native": native_gradients(*args, reduction=reduction, activation=activation),
        "fused": fused_gradients(*args, reduction=reduction, activation=activation),
        "formula": textbook_gradients(*args, reduction=reduction, activation=activation),
    }
    tol = RTOL[x.dtype]
    rows = []
    for name in ("loss",) + NAMES:
        vals = {}
        for path, (loss, grads) in results.items():
            if name == "loss":
                vals[path] = loss
            elif name in grads:
                vals[path] = grads[name]
        if not vals:
            continue  # an absent bias
        if set(vals) != set(results):
            raise RuntimeError(f"{name}: only {', '.join(sorted(vals))} produced a gradient")
        ref = vals["native"]
        row = {"name": name, "shape": tuple(ref.shape), "scale": ref.abs().max().item(), "tol": tol}
        for a, b in (("fused", "native"), ("formula", "native"), ("fused", "formula")):
            if vals[a].shape != vals[b].shape:
                raise RuntimeError(f"{name}: {a} has shape {tuple(vals[a].shape)}, {b} {tuple(vals[b].shape)}")
            row[f"{a}-{b}"] = _diff(vals[a], vals[b])
        row["ok"] = all(row[k][1] <= tol for k in ("fused-native", "formula-native", "fused-formula"))
        row["values"] = vals
        rows.append(row)
    return rows


def format_table(rows):
    pairs = ("fused-native", "formula-native", "fused-formula")
    head1 = f"{'':<6} {'shape':<10} {'max|native|':>11}" + "".join(f"  {p.replace('-', ' vs '):^21}" for p in pairs)
    head2 = f"{'':<6} {'':<10} {'':>11}" + "".join(f"  {'max abs':>10} {'max rel':>10}" for _ in pairs)
    lines = [head1, head2]
    for row in rows:
        shape = str(row["shape"])
        line = f"{row['name']:<6} {shape:<10} {row['scale']:>11.4e}"
        for p in pairs:
            err, rel = row[p]
            line += f"  {err:>10.2e} {rel:>10.2e}"
        lines.append(line + ("  ok" if row["ok"] else "  MISMATCH"))
    return "\n".join(lines)


def add_arguments(parser):
    parser.add_argument("--shape", type=positive_int, nargs=4, metavar=("N", "D", "H", "O"), default=(100, 1, 20, 1),
                        help="samples, input, hidden and output widths (the default is the 1→20→1 curve fit "
                             "on 100 points)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random problem")
    parser.add_argument("--reduction", choices=("mean", "sum"), default="mean",
                        help="loss = c·Σ(p − t)², c = 1/(N·O) for mean (as nn.MSELoss), 1 for sum")
    parser.add_argument("--activation", choices=ACTIVATIONS, default="sigmoid",
                        help="the hidden layer's activation (gelu_tanh: F.gelu(approximate='tanh'))")
    parser.add_argument("--bias", choices=BIAS_KINDS, default="vector",
                        help="no biases, (H,)/(O,) vectors as in nn.Linear, or (N, H)/(N, O) per-sample matrices")
    parser.add_argument("--dtype", choices=("float64", "float32"), default="float64",
                        help="dtype of the problem (float64 shows agreement to ~1e-15)")
    parser.add_argument("--show-values", action="store_true",
                        help="also print each gradient as computed by the three paths (best with small shapes)")


def run(args):
    n, d, h, o = args.shape
    if min(args.shape) < 1:
        print(f"fusedgrad verify: every width in --shape must be at least 1, got {' '.join(map(str, args.shape))}",
              file=sys.stderr)
        return 2
    dtype = getattr(torch, args.dtype)
    problem = make_problem(n, d, h, o, seed=args.seed, bias=args.bias, dtype=dtype)
    rows = compare(*problem, reduction=args.reduction, activation=args.activation)
    act = "" if args.activation == "sigmoid" else f", activation={args.activation}"
    print(f"{d}→{h}→{o} network, N={n} samples, reduction={args.reduction}, bias={args.bias}, "
          f"{args.dtype}, seed {args.seed}{act}")
    print("gradients of the loss from native autograd, the fused kernel and the textbook formulas\n"
          "(max rel = max abs difference / max |reference|)\n")
    print(format_table(rows))
    if args.show_values:
        with torch.no_grad():
            for row in rows:
                for path in ("native", "fused", "formula"):
                    label = "loss" if row["name"] == "loss" else f"d{row['name']}"
                    print(f"\n{label} ({path}):\n{row['values'][path].numpy()}")
    bad = [row["name"] for row in rows if not row["ok"]]
    tol = RTOL[dtype]
    if bad:
        print(f"\nMISMATCH beyond the {args.dtype} tolerance {tol:.0e}: {', '.join(bad)}")
        return 1
    print(f"\nall {len(rows)} quantities agree within the {args.dtype} tolerance {tol:.0e}")
    return 0
