"""Where the one-hidden-layer ops' engine path stops beating the GEMM path (csrc/ops/engine_path.cpp).

    python benchmarks/crossover.py [--threads 1 2]

Times the fused loss-and-gradients op on shapes around the threshold twice, in
subprocesses forced onto each path (fusedgrad._C._set_engine_path_max_macs(huge / 0)),
and prints µs per call and the multiply-adds a row D·H + H·O of each shape (the rule's measure)."""
import argparse
import json
import subprocess
import sys

SHAPES = [(10, 4, 4, 4), (100, 1, 20, 1), (256, 32, 64, 8), (2048, 64, 128, 16), (4096, 100, 100, 10),
          (1000, 256, 32, 1), (2048, 128, 96, 32), (1024, 16, 512, 16), (2048, 32, 256, 32),
          (4096, 128, 128, 128), (4096, 256, 256, 64)]

CHILD = r"""
import json, sys, time, torch, fusedgrad
torch.set_num_threads(int(sys.argv[1]))
fusedgrad._C._set_engine_path_max_macs(int(sys.argv[3]))
op = torch.ops.fusedgrad.mlp_loss_and_grads.default
out = {}
for N, D, H, O in json.loads(sys.argv[2]):
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(N, D, generator=g), torch.randn(N, O, generator=g)
    ws = [torch.randn(H, D, generator=g), torch.randn(H, generator=g), torch.randn(O, H, generator=g), torch.randn(O, generator=g)]
    call = lambda: op(x, *ws, t, "mean", "sigmoid", [False, True, True, True, True, False])
    for _ in range(20): call()
    reps = max(5, int(2e5 / (N * (D * H + H * O) + 1000)))
    best = float("inf")
    for _ in range(7):
        start = time.perf_counter()
        for _ in range(reps): call()
        best = min(best, (time.perf_counter() - start) / reps)
    out[f"{N}x{D}x{H}x{O}"] = best * 1e6
print(json.dumps(out))
"""


def run(threads, limit):
    proc = subprocess.run([sys.executable, "-c", CHILD, str(threads), json.dumps(SHAPES), str(limit)],
                          capture_output=True, text=True, check=True)
    return json.loads(proc.stdout)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    args = parser.parse_args()
    for threads in args.threads:
        engine, gemm = run(threads, 1 << 62), run(threads, 0)
        print(f"\n{threads} thread(s): µs per fused loss+gradients call (best of 7)")
        print(f"{'N×D×H×O':<18}{'MACs/row':>10}{'engine':>10}{'GEMM':>10}  faster")
        for (N, D, H, O) in SHAPES:
            key = f"{N}x{D}x{H}x{O}"
            macs = D * H + H * O
            print(f"{key:<18}{macs:>10}{engine[key]:>10.1f}{gemm[key]:>10.1f}  "
                  f"{'engine' if engine[key] < gemm[key] else 'GEMM'}")


if __name__ == "__main__":
    main()
