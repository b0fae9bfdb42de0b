"""Trainer.step, one call a step, on the engine: its C++ route against the Python route and the native loop.

    python benchmarks/trainer_step.py [--threads 2]

For each net: `Trainer.step` as it runs (one C++ call, csrc/trainer/deep_train.cpp:
deep_train_step_fast), the same with the C++ route turned off (Trainer._fast_step = False: the
Python route, which prepares x and target and reads the optimizer in C++), `Trainer.fit` divided by
its steps, and the native loop (`zero_grad`, `mse_loss(...).backward()`, `Adam(fused=True).step()`).
The routes are interleaved in one process; medians of 5 loops of 2 000 calls."""
import argparse
import time

import torch
from torch import nn

import fusedgrad

# (label, in, hidden widths, out, rows, activation)
NETS = [("curve fit 1→[20]×3→1 tanh", 1, [20, 20, 20], 1, 100, "tanh"),
        ("tabular 32→16→1 tanh", 32, [16], 1, 100, "tanh"),
        ("PINN-sized 2→[20]×3→1 tanh", 2, [20, 20, 20], 1, 2540, "tanh")]


def timed(fn, calls):
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e6


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"Trainer.step on the engine, Adam, float32, {args.threads} threads; µs a step, median of 5 interleaved")
    print("| net | rows | step(): C++ route | step(): Python route | fit() a step | native loop, Adam(fused) |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, D, widths, O, N, act in NETS:
        torch.manual_seed(0)
        x, y = torch.randn(N, D), torch.randn(N, O)
        nets = [fusedgrad.FusedMLP(D, widths, O, activation=act) for _ in range(3)]
        fast, slow, fit = (fusedgrad.Trainer(n, torch.optim.Adam(n.parameters(), lr=1e-3)) for n in nets)
        slow._fast_step = False
        native = nets[0].to_module(copy=True)
        opt = torch.optim.Adam(native.parameters(), lr=1e-3, fused=True)

        def native_step():
            opt.zero_grad()
            nn.functional.mse_loss(native(x), y).backward()
            opt.step()

        calls = max(20, min(2000, int(4e6 / (N * sum(widths)))))
        # (a loop: `repeat` calls of fn, each `steps` steps) per route
        routes = [(lambda: fast.step(x, y), calls, 1), (lambda: slow.step(x, y), calls, 1),
                  (lambda: fit.fit(x, y, calls), 1, calls), (native_step, calls, 1)]
        loops = [[] for _ in routes]
        for rep in range(6):
            for i, (fn, repeat, steps) in enumerate(routes):
                us = timed(fn, repeat) / steps
                if rep:  # the first loop warms up (optimizer state, caches)
                    loops[i].append(us)
        a, b, c, d = (sorted(t)[2] for t in loops)
        print(f"| {label} | {N} | {a:.1f} | {b:.1f} | {c:.1f} | {d:.1f} |", flush=True)


if __name__ == "__main__":
    main()
