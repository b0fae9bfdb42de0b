"""Where the streaming path (csrc/cpu/stream_path.cpp) stops paying.

    python benchmarks/stream_crossover.py --baseline /path/to/built/checkout [--threads 2]

Times the fused loss-and-gradients op (parameters' gradients, as a training
step asks) on a grid of widths and heights twice, each in a subprocess that
imports fusedgrad from one root: this checkout and --baseline, a built
checkout of the commit before the streaming path (its small-loop / GEMM
paths). The library has no switch between its paths, so to measure past the
current rule, raise kMaxStreamIn / kMaxStreamHidden / kMaxStreamOut in
csrc/cpu/stream_path.cpp, rebuild, run this, and set them back to where
the streaming column stops winning (docs/streaming.md has the last run).
"""
import argparse
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SHAPES = [(n, d, h, o) for (d, h, o) in [(1, 20, 1), (1, 64, 1), (4, 32, 4), (16, 64, 4), (32, 128, 16),
                                         (64, 128, 16), (32, 256, 16), (16, 64, 64), (256, 256, 1),
                                         (64, 64, 8), (128, 128, 8)]
          for n in (100, 1_000, 10_000, 100_000)]
# and the grid of the main benchmark (fusedgrad/bench/steps.py GRID), which must not get slower
SHAPES += [(10, 4, 4, 4), (256, 32, 64, 8), (1024, 64, 128, 16), (4096, 256, 256, 64)]

CHILD = r"""
import json, sys, time, torch, fusedgrad
torch.set_num_threads(int(sys.argv[1]))
op = torch.ops.fusedgrad.mlp_loss_and_grads.default
out = {}
for N, D, H, O in json.loads(sys.argv[2]):
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(N, D, generator=g), torch.randn(N, O, generator=g)
    ws = [torch.randn(H, D, generator=g) / D ** 0.5, torch.randn(H, generator=g),
          torch.randn(O, H, generator=g) / H ** 0.5, torch.randn(O, generator=g)]
    call = lambda: op(x, *ws, t, "mean", "sigmoid", [False, True, True, True, True, False])
    for _ in range(3): call()
    reps = max(3, int(3e6 / (N * (D * H + H * O) + 10000)))
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(reps): call()
        best = min(best, (time.perf_counter() - start) / reps)
    out[f"{N}x{D}x{H}x{O}"] = best * 1e6
print(json.dumps(out))
"""


def run(root, threads):
    env = {**os.environ, "PYTHONPATH": root}
    proc = subprocess.run([sys.executable, "-c", CHILD, str(threads), json.dumps(SHAPES)],
                          env=env, capture_output=True, text=True, check=True, cwd="/")
    return json.loads(proc.stdout)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", required=True, help="root of a built checkout without the streaming path")
    parser.add_argument("--threads", nargs="+", type=int, default=[2])
    args = parser.parse_args()
    for threads in args.threads:
        new, old = run(HERE, threads), run(args.baseline, threads)
        print(f"\n{threads} thread(s): µs per fused loss+gradients call (best of 5)")
        print(f"{'N×D×H×O':<20}{'this tree':>12}{'baseline':>12}{'×':>8}")
        for (N, D, H, O) in SHAPES:
            key = f"{N}x{D}x{H}x{O}"
            print(f"{key:<20}{new[key]:>12.1f}{old[key]:>12.1f}{old[key] / new[key]:>7.2f}×")


if __name__ == "__main__":
    main()
