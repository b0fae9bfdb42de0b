"""Time a training step (forward + MSE + backward, gradients into .grad) of
fusedgrad against native autograd and torch.compile over the N×D→H→O grid, at
1 and 2 threads, float32 and float64. Prints a table (µs per step, speed-ups,
GFLOP/s, % of the GEMM peak measured in the same run, peak memory of a step),
writes JSON and a PNG of speed-up against problem size. Every case first checks
that all paths give the same gradients. `--quick` is a seconds-long smoke run
that never fails on speed."""
import argparse
import json
import os
import platform
import sys
import time

import torch

from ..bench import steps as B
from ..bench.machine import cpu_facts
from . import positive_int

HELP = "benchmark fusedgrad against native autograd and torch.compile"


def parse_shape(text):
    parts = text.lower().replace("→", "x").replace("×", "x").split("x")
    if len(parts) != 4 or not all(p.isdigit() for p in parts):
        raise argparse.ArgumentTypeError(f"shape {text!r} must be NxDxHxO, e.g. 256x32x64x8")
    return tuple(int(p) for p in parts)


def add_arguments(parser):
    parser.add_argument("--quick", action="store_true",
                        help="a seconds-long smoke run (one tiny shape, 1 thread, float32, no compile; "
                             "ignores --shapes, --threads, --dtypes, --repeats)")
    parser.add_argument("--shapes", nargs="+", type=parse_shape, default=None,
                        help="NxDxHxO shapes, e.g. 256x32x64x8; None: the full grid")
    parser.add_argument("--threads", nargs="+", type=positive_int, default=[1, 2],
                        help="torch thread counts to time each shape at")
    parser.add_argument("--dtypes", nargs="+", choices=["float32", "float64"], default=["float32", "float64"],
                        help="dtypes to time each shape in")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile path")
    parser.add_argument("--x-grad", action="store_true", help="also time the variant where x requires grad")
    parser.add_argument("--repeats", type=positive_int, default=7,
                        help="timed repeats per path and shape (the median is reported)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="device to run on")
    parser.add_argument("--out", default="bench-results", help="folder for results.json, results.md and speedup.png")
    parser.add_argument("--training", action="store_true",
                        help="instead: whole training loops (seed-004 problem and the grid) by route, native, "
                             "torch.compile, fusedgrad.Trainer and JAX when installed; training.json/.md/.png")
    parser.add_argument("--ensemble", action="store_true",
                        help="instead: training K models at once (µs per model-step by route; ensemble.json/.md)")
    parser.add_argument("--deep", action="store_true",
                        help="instead: networks of more than one hidden layer (curve fit, PINN-sized, surrogate, wide, "
                             "a K=256 ensemble, tall data) by route: native, Adam(fused=True), net.loss, Trainer.fit, "
                             "torch.func and JAX (jit, lax.scan, vmap) when installed, each checked against the native "
                             "loop first; deep.json and deep.md (float32, threads = largest --threads; --compile adds "
                             "torch.compile; --quick: smoke sizes)")
    parser.add_argument("--compile", action="store_true", help="with --deep: also time torch.compile of the step")
    parser.add_argument("--pinn", action="store_true",
                        help="instead: one training step of the Burgers PINN (u, u_x, u_t, u_xx) by route: autograd "
                             "with create_graph, torch.func, FusedMLP dropped in, net.derivatives and JAX when "
                             "installed, each checked against the native step first; pinn.json and pinn.md "
                             "(float32, threads = largest --threads; --quick: smoke sizes)")
    parser.add_argument("--sklearn", action="store_true",
                        help="instead: scikit-learn's MLPRegressor against fusedgrad.sklearn.MLPRegressor (and skorch "
                             "when installed) on diabetes, make_friedman1 (1e4 rows) and 1e6 synthetic rows: fit time "
                             "and held-out R²; sklearn.json and sklearn.md (needs pip install 'fusedgrad[sklearn]'; torch and "
                             "BLAS threads = largest --threads; --quick: smoke sizes; --repeats: the small cases' "
                             "repeats)")
    parser.add_argument("--dist", action="store_true",
                        help="instead: the trainer data-parallel over torch.distributed (gloo, processes on this "
                             "machine): one rank against two ranks of one thread each on 1e6 and 1e7 rows of 1→20→1 "
                             "and 16→64→4, the all-reduce's share of a step, native DDP at 1e6 rows of 1→20→1; "
                             "dist.json and dist.md (--quick: smoke sizes; --repeats capped at 3)")
    parser.add_argument("--rows", action="store_true",
                        help="instead of the grid, the N-scaling suite (N = 1e2..1e6; 1→20→1, 16→64→4, 256→256→1): "
                             "rows.json, rows.md, rows.png (float32 = first --dtypes, threads = largest --threads)")


class Progress:
    def __init__(self, total):
        self.total, self.done, self.start = total, 0, time.perf_counter()

    def show(self, label):
        width = 30
        filled = int(width * self.done / max(self.total, 1))
        elapsed = time.perf_counter() - self.start
        sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} "
                         f"{elapsed:6.0f}s  {label:<48}")
        sys.stderr.flush()

    def step(self, label):
        self.done += 1
        self.show(label)

    def close(self):
        sys.stderr.write("\n")


def run_grid(shapes, threads, dtypes, paths, x_grad_variants, repeats, device, quick):
    cases = [(t, B.Case(*shape, dtype=getattr(torch, dt), x_grad=xg, device=device))
             for t in threads for dt in dtypes for shape in shapes for xg in x_grad_variants]
    progress = Progress(len(cases))
    peaks, rows = {}, []
    saved_threads = torch.get_num_threads()
    try:
        for threads_now, case in cases:
            torch.set_num_threads(threads_now)
            progress.show(f"{case.label} {str(case.dtype)[6:]} {threads_now} thr")
            key = (threads_now, case.dtype)
            if key not in peaks:
                peaks[key] = B.gemm_peak_gflops(case.dtype, n=256 if quick else 1024, device=device)
            problem = B.Problem(case)
            B.assert_paths_agree(problem, paths)  # compiles the compile path, too
            seconds = B.time_paths(problem, paths, repeats=repeats,
                                   min_repeat_s=0.002 if quick else 0.02,
                                   max_total_s=2.0 if quick else 30.0)
            row = {"shape": case.label, "N": case.N, "D": case.D, "H": case.H, "O": case.O,
                   "dtype": str(case.dtype).replace("torch.", ""), "threads": threads_now,
                   "x_requires_grad": case.x_grad, "flops_per_step": case.flops(),
                   "gemm_peak_gflops": peaks[key],
                   "us_per_step": {p: s * 1e6 for p, s in seconds.items()},
                   "compile_seconds": problem.compile_seconds}
            rows.append(row)
            progress.step(f"{case.label} done")
    finally:
        torch.set_num_threads(saved_threads)
        progress.close()
    return rows


def print_table(rows, paths):
    has = set(paths)
    head = (f"{'N×D→H→O':<20}{'dtype':>8}{'thr':>4}{'xg':>3}{'native':>10}"
            + (f"{'compile':>10}" if "compile" in has else "") + f"{'fused':>10}{'no-AG':>10}"
            + f"{'fused/nat':>10}" + (f"{'fused/cmp':>10}" if "compile" in has else "")
            + f"{'noAG/nat':>9}{'GFLOP/s':>9}{'%peak':>7}{'MiB nat/fused':>15}")
    print("\nµs per step (median); speed-ups are ratios of the same run; GFLOP/s and % of the "
          "GEMM peak are for the fused path")
    print(head)
    print("-" * len(head))
    for r in rows:
        us = r["us_per_step"]
        gflops = r["flops_per_step"] / (us["fused"] * 1e-6) / 1e9
        mem = r.get("peak_mib")
        mem_s = f"{mem['native']:.1f}/{mem['fused']:.1f}" if mem else "-"
        line = (f"{r['shape']:<20}{r['dtype']:>8}{r['threads']:>4}{'y' if r['x_requires_grad'] else 'n':>3}"
                f"{us['native']:>10.1f}" + (f"{us['compile']:>10.1f}" if "compile" in has else "")
                + f"{us['fused']:>10.1f}{us['no_autograd']:>10.1f}"
                + f"{us['native'] / us['fused']:>9.2f}×"
                + (f"{us['compile'] / us['fused']:>9.2f}×" if "compile" in has else "")
                + f"{us['native'] / us['no_autograd']:>8.2f}×{gflops:>9.2f}"
                + f"{100 * gflops / r['gemm_peak_gflops']:>6.0f}%{mem_s:>15}")
        print(line)
    compile_times = [(r["shape"], r["dtype"], r["compile_seconds"]) for r in rows if r.get("compile_seconds")]
    if compile_times:
        print("\ntorch.compile time (first call, forward+backward; excluded from the step times): "
              + ", ".join(f"{s} {d}: {c:.1f}s" for s, d, c in compile_times))


def markdown_table(rows, paths):
    """The table of print_table as Markdown (the README's Performance table)."""
    has_compile = "compile" in paths
    cols = ["N×D→H→O", "dtype", "threads", "x grad", "native µs"] + (["compile µs"] if has_compile else []) + [
        "fused µs", "no-autograd µs", "fused ×native"] + (["fused ×compile"] if has_compile else []) + [
        "no-autograd ×native", "fused GFLOP/s", "% GEMM peak", "peak MiB native / fused"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * 4 + "---:|" * (len(cols) - 4)]
    for r in rows:
        us = r["us_per_step"]
        gflops = r["flops_per_step"] / (us["fused"] * 1e-6) / 1e9
        mem = r.get("peak_mib")
        cells = [r["shape"], r["dtype"], str(r["threads"]), "yes" if r["x_requires_grad"] else "no",
                 f"{us['native']:.0f}"] + ([f"{us['compile']:.0f}"] if has_compile else []) + [
                 f"{us['fused']:.0f}", f"{us['no_autograd']:.0f}", f"{us['native'] / us['fused']:.2f}×"] + (
                 [f"{us['compile'] / us['fused']:.2f}×"] if has_compile else []) + [
                 f"{us['native'] / us['no_autograd']:.2f}×", f"{gflops:.1f}",
                 f"{100 * gflops / r['gemm_peak_gflops']:.0f} %",
                 f"{mem['native']:.1f} / {mem['fused']:.1f}" if mem else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    peaks = sorted({(r["dtype"], r["threads"], r["gemm_peak_gflops"]) for r in rows})
    lines.append("")
    lines.append("GEMM peak measured in the same run (1024² torch.mm, GFLOP/s): "
                 + ", ".join(f"{d} {t} thr {g:.1f}" for d, t, g in peaks) + ".")
    return "\n".join(lines) + "\n"


def plot(rows, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(speed-up plot skipped: matplotlib is not installed; pip install matplotlib)")
        return False
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for ax, dtype in zip(axes, ("float32", "float64")):
        for threads in sorted({r["threads"] for r in rows}):
            sel = [r for r in rows if r["dtype"] == dtype and r["threads"] == threads and not r["x_requires_grad"]]
            if not sel:
                continue
            sel.sort(key=lambda r: r["flops_per_step"])
            xs = [r["flops_per_step"] for r in sel]
            for step_path, style in (("fused", "-o"), ("no_autograd", "--s"), ("compile", ":^")):
                if step_path in sel[0]["us_per_step"]:
                    ys = [r["us_per_step"]["native"] / r["us_per_step"][step_path] for r in sel]
                    ax.plot(xs, ys, style, label=f"{step_path}, {threads} thr")
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(f"{dtype}: speed-up over native autograd")
        ax.set_xlabel("FLOPs per training step")
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    axes[0].set_ylabel("× faster than native (same run)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def run_ensemble(args):
    """--ensemble: fusedgrad/bench/ensemble.py, at the largest of --threads."""
    from ..bench import ensemble as E

    saved = torch.get_num_threads()
    torch.set_num_threads(max(args.threads))
    try:
        rows, routes = E.run_ensemble_bench(quick=args.quick, repeats=args.repeats)
    finally:
        torch.set_num_threads(saved)
    table = E.markdown(rows, routes)
    print("\nµs per model-step of one Adam step (best of the timed blocks; ratios from the same run)\n" + table)
    os.makedirs(args.out, exist_ok=True)
    meta = {"torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
            **cpu_facts(), "threads": max(args.threads), "quick": args.quick, "routes": routes}
    with open(os.path.join(args.out, "ensemble.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    with open(os.path.join(args.out, "ensemble.md"), "w") as f:
        f.write(table)
    print(f"wrote {os.path.join(args.out, 'ensemble.json')} and ensemble.md")
    return 0


def run_training(args):
    """--training: fusedgrad/bench/training.py, at the largest of --threads."""
    from ..bench import training as T

    saved = torch.get_num_threads()
    torch.set_num_threads(max(args.threads))
    try:
        result = T.run_training_bench(quick=args.quick, compile=not args.no_compile, repeats=args.repeats)
    finally:
        torch.set_num_threads(saved)
    table = T.markdown(result)
    print("\n" + table)
    os.makedirs(args.out, exist_ok=True)
    meta = {"torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
            **cpu_facts(), "threads": max(args.threads), "quick": args.quick}
    try:
        import jax
        meta["jax"] = jax.__version__
    except ImportError:
        meta["jax"] = None
    with open(os.path.join(args.out, "training.json"), "w") as f:
        json.dump({"meta": meta, **result}, f, indent=1)
    with open(os.path.join(args.out, "training.md"), "w") as f:
        f.write(table)
    wrote = ["training.json", "training.md"]
    if T.plot(result, os.path.join(args.out, "training.png")):
        wrote.append("training.png")
    print(f"wrote {', '.join(os.path.join(args.out, w) for w in wrote)}")
    return 0


def run_deep(args):
    """--deep: fusedgrad/bench/deep.py (float32, CPU), at the largest of --threads."""
    from ..bench import deep

    if args.device != "cpu":
        print("bench --deep: deep networks run on the CPU only; drop --device", file=sys.stderr)
        return 2
    result = deep.run(quick=args.quick, threads=max(args.threads), with_compile=args.compile,
                      repeats=args.repeats)
    table = deep.markdown(result)
    print("\n" + table)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "deep.json"), "w") as f:
        json.dump(result, f, indent=1)
    with open(os.path.join(args.out, "deep.md"), "w") as f:
        f.write(table)
    print(f"wrote {os.path.join(args.out, 'deep.json')} and deep.md ({result['meta']['seconds']:.0f} s)")
    return 0


def run_pinn(args):
    """--pinn: fusedgrad/bench/pinn.py (float32, CPU), at the largest of --threads."""
    from ..bench import pinn

    if args.device != "cpu":
        print("bench --pinn: input derivatives run on the CPU only; drop --device", file=sys.stderr)
        return 2
    result = pinn.run(quick=args.quick, threads=max(args.threads), repeats=args.repeats)
    table = pinn.markdown(result)
    print("\n" + table)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "pinn.json"), "w") as f:
        json.dump(result, f, indent=1)
    with open(os.path.join(args.out, "pinn.md"), "w") as f:
        f.write(table)
    print(f"wrote {os.path.join(args.out, 'pinn.json')} and pinn.md ({result['meta']['seconds']:.0f} s)")


def run_dist(args):
    """--dist: fusedgrad/bench/dist.py (float32, CPU, ranks of one thread each)."""
    from ..bench import dist as Dist

    if args.device != "cpu":
        print("bench --dist: the data-parallel trainer runs on the CPU (gloo); drop --device", file=sys.stderr)
        return 2
    result = Dist.run(quick=args.quick, repeats=min(args.repeats, 3))
    table = Dist.markdown(result)
    print("\n" + table)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "dist.json"), "w") as f:
        json.dump(result, f, indent=1, default=float)
    with open(os.path.join(args.out, "dist.md"), "w") as f:
        f.write(table)
    print(f"wrote {os.path.join(args.out, 'dist.json')} and dist.md ({result['meta']['seconds']:.0f} s)")
    return 0


def run_sklearn(args):
    """--sklearn: fusedgrad/bench/sklearn.py (float32, CPU, the torch threads as set)."""
    try:
        from ..bench import sklearn as S
    except ImportError as exc:
        print(f"bench --sklearn: {exc}", file=sys.stderr)
        return 2
    if args.device != "cpu":
        print("bench --sklearn: the estimator trains on the CPU only; drop --device", file=sys.stderr)
        return 2
    repeats = args.repeats if "--repeats" in sys.argv else None
    result = S.run(quick=args.quick, repeats=repeats, threads=max(args.threads),
                   progress=lambda text: print(text, file=sys.stderr))
    table = S.markdown(result)
    print("\n" + table)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "sklearn.json"), "w") as f:
        json.dump(result, f, indent=1)
    with open(os.path.join(args.out, "sklearn.md"), "w") as f:
        f.write(table)
    print(f"wrote {os.path.join(args.out, 'sklearn.json')} and sklearn.md")
    return 0


def run(args):
    if getattr(args, "pinn", False):
        return run_pinn(args)
    if getattr(args, "sklearn", False):
        return run_sklearn(args)
    if getattr(args, "dist", False):
        return run_dist(args)
    if getattr(args, "deep", False):
        return run_deep(args)
    if args.training:
        return run_training(args)
    if args.ensemble:
        return run_ensemble(args)
    if getattr(args, "rows", False):
        from ..bench import rows
        return rows.run(args)
    if args.quick:
        shapes, threads, dtypes = [(10, 4, 4, 4)], [1], ["float32"]
        paths = ["native", "fused", "no_autograd"]
        repeats = 3
    else:
        shapes = args.shapes or list(B.GRID)
        threads, dtypes, repeats = args.threads, args.dtypes, args.repeats
        paths = [p for p in B.PATHS if not (p == "compile" and args.no_compile)]
    x_grad_variants = [False, True] if args.x_grad else [False]
    rows = run_grid(shapes, threads, dtypes, paths, x_grad_variants, repeats, args.device, args.quick)
    B.measure_memory(rows, paths, args.device)
    print_table(rows, paths)
    os.makedirs(args.out, exist_ok=True)
    meta = {"torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
            "processor": platform.processor(), **cpu_facts(), "device": args.device,
            "quick": args.quick, "paths": paths}
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(markdown_table(rows, paths))
    png = os.path.join(args.out, "speedup.png")
    if plot(rows, png):
        print(f"\nwrote {os.path.join(args.out, 'results.json')}, results.md and {png}")
    else:
        print(f"\nwrote {os.path.join(args.out, 'results.json')} and results.md")
    return 0
