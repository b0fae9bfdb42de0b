"""The N-scaling suite of ``python -m fusedgrad bench --rows``: tall data through narrow networks.

For each shape D→H→O and N = 10² … 10⁶ rows, one training step (forward, MSE,
backward, gradients into ``.grad``; see fusedgrad/bench/steps.py) of

* ``native``      — nn.Linear → Sigmoid → nn.Linear + nn.MSELoss, ``loss.backward()``
* ``fused``       — ``FusedMLP.loss(x, y).backward()``
* ``no_autograd`` — ``FusedMLP.loss_backward(x, y)`` (no autograd engine)

timed round-robin in one run (same-run ratios), with µs per step, ns per row
and the peak extra resident memory of one step (measured in a child process,
as fusedgrad/cli/bench.py does for the main grid). Writes rows.json, rows.md
and rows.png into the output folder.
"""
import json
import os
import platform
import sys

import torch

from . import steps as B
from .machine import cpu_facts

SHAPES = ((1, 20, 1), (16, 64, 4), (256, 256, 1))
SIZES = (100, 1_000, 10_000, 100_000, 1_000_000)
PATHS = ("native", "fused", "no_autograd")


def run_rows(shapes=SHAPES, sizes=SIZES, threads=2, dtype="float32", repeats=5, quick=False, progress=None):
    rows = []
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for D, H, O in shapes:
            for N in sizes:
                if progress:
                    progress(f"{N}×{D}→{H}→{O}")
                case = B.Case(N, D, H, O, dtype=getattr(torch, dtype))
                problem = B.Problem(case)
                B.assert_paths_agree(problem, PATHS)
                seconds = B.time_paths(problem, PATHS, repeats=repeats,
                                       min_repeat_s=0.002 if quick else 0.02,
                                       max_total_s=2.0 if quick else 20.0)
                rows.append({"shape": f"{D}→{H}→{O}", "N": N, "D": D, "H": H, "O": O, "dtype": dtype,
                             "threads": threads, "us_per_step": {p: s * 1e6 for p, s in seconds.items()}})
                del problem
    finally:
        torch.set_num_threads(saved)
    return rows


def markdown_table(rows):
    cols = ["D→H→O", "N", "native µs", "fused µs", "no-autograd µs", "fused ×native", "no-autograd ×native",
            "ns/row native", "ns/row fused", "ns/row no-autograd", "peak MiB native / fused / no-autograd"]
    lines = ["| " + " | ".join(cols) + " |", "|---|" + "---:|" * (len(cols) - 1)]
    for r in rows:
        us, N = r["us_per_step"], r["N"]
        mem = r.get("peak_mib")
        cells = [r["shape"], f"{N:,}".replace(",", " "), f"{us['native']:.0f}", f"{us['fused']:.0f}",
                 f"{us['no_autograd']:.0f}", f"{us['native'] / us['fused']:.2f}×",
                 f"{us['native'] / us['no_autograd']:.2f}×"] + [
                 f"{us[p] * 1e3 / N:.1f}" for p in PATHS] + [
                 " / ".join(f"{mem[p]:.1f}" for p in PATHS) if mem else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def print_table(rows):
    print(f"\nN-scaling, {rows[0]['dtype']}, {rows[0]['threads']} threads (µs per step, median; ratios of the same run)")
    print(markdown_table(rows))


def plot(rows, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(rows plot skipped: matplotlib is not installed)")
        return False
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    styles = {"native": "-o", "fused": "--s", "no_autograd": ":^"}
    for i, shape in enumerate(shapes):
        sel = sorted((r for r in rows if r["shape"] == shape), key=lambda r: r["N"])
        ns = [r["N"] for r in sel]
        color = f"C{i}"
        for p in PATHS:
            axes[0].plot(ns, [r["us_per_step"][p] * 1e3 / r["N"] for r in sel], styles[p], color=color,
                         label=f"{shape} {p}")
        if all("peak_mib" in r for r in sel):
            for p in PATHS:
                axes[1].plot(ns, [max(r["peak_mib"][p], 1e-2) for r in sel], styles[p], color=color,
                             label=f"{shape} {p}")
    axes[0].set_title("time per row of a training step")
    axes[0].set_ylabel("ns per row")
    axes[1].set_title("peak extra memory of a step")
    axes[1].set_ylabel("MiB")
    for ax in axes:
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("rows N")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def run(args):
    """Entry of ``bench --rows``: float32 (first of --dtypes), 2 threads (largest of --threads)."""
    quick = args.quick
    sizes = (100, 10_000) if quick else SIZES
    shapes = ((1, 20, 1),) if quick else SHAPES
    threads = max(args.threads)
    dtype = args.dtypes[0]

    def progress(label):
        sys.stderr.write(f"\r{label:<40}")
        sys.stderr.flush()

    rows = run_rows(shapes, sizes, threads=threads, dtype=dtype, repeats=3 if quick else args.repeats,
                    quick=quick, progress=progress)
    sys.stderr.write("\n")
    B.measure_memory(rows, PATHS)
    print_table(rows)
    os.makedirs(args.out, exist_ok=True)
    meta = {"torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
            **cpu_facts(), "quick": quick, "paths": PATHS}
    with open(os.path.join(args.out, "rows.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    with open(os.path.join(args.out, "rows.md"), "w") as f:
        f.write(markdown_table(rows))
    png = os.path.join(args.out, "rows.png")
    plotted = plot(rows, png)
    print(f"\nwrote {os.path.join(args.out, 'rows.json')}, rows.md" + (f" and {png}" if plotted else ""))
    return 0
