"""Where the one-hidden-layer trainer's narrow kernels stop beating the engine (train_path_name in
csrc/trainer/train_cpu.cpp, reported by fusedgrad.explain as "trainer-narrow" / "trainer-engine").

    python benchmarks/trainer_crossover.py [--threads 2] [--quick]

For each shape, two Trainers over the same net, data and Adam: one forced onto the narrow kernels
(csrc/trainer/train_cpu.cpp), one onto the engine (csrc/trainer/deep_train.cpp) by overriding
Trainer._deep, which is what the rule decides. Their `fit` calls are interleaved in one process and
the median of 5 is kept, so a ratio is measured side by side. Prints µs a step, engine / narrow,
the multiply-adds a row H·(D + O) and the path the rule takes today."""
import argparse
import itertools
import time

import torch

import fusedgrad
from fusedgrad import _C

# (D, H, O) around the rule's edges: 1–3 inputs and 1–2 outputs (narrow), 4+ inputs from 192
# multiply-adds a row, 16+ inputs from 128, 4+ outputs from 320 (engine).
SHAPES = [(1, 20, 1), (2, 64, 1), (1, 256, 1), (2, 32, 2), (1, 32, 4), (1, 64, 4), (3, 64, 4), (4, 16, 1),
          (4, 32, 1), (4, 32, 2), (4, 16, 4), (8, 8, 1), (8, 16, 1), (8, 16, 4), (8, 32, 1), (16, 4, 1),
          (16, 8, 1), (32, 4, 1), (16, 16, 1), (32, 16, 1), (4, 128, 1), (16, 32, 2)]


def trainer(D, H, O, N, activation, engine):
    torch.manual_seed(0)
    net = fusedgrad.FusedMLP(D, H, O, activation=activation)
    x, y = torch.randn(N, D), torch.randn(N, O)
    t = fusedgrad.Trainer(net, torch.optim.Adam(net.parameters(), lr=1e-3))
    t._deep = (lambda: True) if engine else (lambda: False)  # the rule's choice, forced
    return t, x, y


def us_per_step(t, x, y, steps):
    start = time.perf_counter()
    t.fit(x, y, steps)
    return (time.perf_counter() - start) / steps * 1e6


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="100 rows and tanh only")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = [100] if args.quick else [100, 2000]
    acts = ["tanh"] if args.quick else ["tanh", "sigmoid"]
    print(f"Trainer.fit, Adam, float32, {args.threads} threads; µs a step, median of 5 interleaved")
    print("| D×H→O | rows | activation | H·(D+O) | narrow | engine | engine / narrow | path today |")
    print("|---|---:|---|---:|---:|---:|---:|---|")
    for (D, H, O), N, act in itertools.product(SHAPES, rows, acts):
        steps = max(20, min(401, int(2e5 / (N * H))))
        pair = [trainer(D, H, O, N, act, engine) for engine in (False, True)]
        for t in pair:
            us_per_step(*t, steps)  # first call: the optimizer state
        times = [[], []]
        for _ in range(5):
            for i, t in enumerate(pair):
                times[i].append(us_per_step(*t, steps))
        narrow, engine = (sorted(ts)[2] for ts in times)
        print(f"| {D}×{H}→{O} | {N} | {act} | {H * (D + O)} | {narrow:.1f} | {engine:.1f} | {engine / narrow:.2f} "
              f"| {_C.explain_trainer(D, H, O, act)} |", flush=True)


if __name__ == "__main__":
    main()
