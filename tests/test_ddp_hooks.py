"""FusedMLP.loss_backward across 2 processes (gloo, CPU): gradient hooks are honoured.

Two ranks each train on one half of a batch. Per rank:

* ``post_hook``: gradients are averaged across the ranks by a post-accumulate-grad
  hook on every parameter (``dist.all_reduce``), the way hook-based data parallelism
  (FSDP2, optimizer-in-backward) works. Trained once with ``net.loss(x, t).backward()``
  and once with ``net.loss_backward(x, t)``: both must end with the parameters of one
  process training on the whole batch. Before loss_backward ran hooks, it skipped the
  all-reduce and the ranks diverged.
* ``ddp``: under ``DistributedDataParallel`` the gradient all-reduce is a C++ hook on each
  parameter's gradient accumulator that only works in a backward following DDP's
  forward. ``loss_backward`` on the wrapped model must refuse (RuntimeError naming
  DDP), never train silently unsynchronised; the route it recommends (a DDP module whose
  forward returns ``net.loss``, then ``backward()``) is trained and checked too.

Every wait is bounded (process-group timeout, a deadline after which workers are killed).
"""
import datetime
import gc
import os
import socket
import sys
import tempfile
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import fusedgrad

WORLD = 2
N, D, H, O = 16, 3, 6, 2
STEPS = 5
LR = 0.5
DTYPE = torch.float64
RTOL, ATOL = 1e-12, 1e-14
DEADLINE_S = 120
PG_TIMEOUT = datetime.timedelta(seconds=60)

pytestmark = [
    pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                       reason="torch.distributed with gloo is not available"),
    pytest.mark.skipif(sys.platform == "win32", reason="gloo over TCP loopback is tested on Linux/macOS"),
]


class FusedLoss(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x, target):
        return self.net.loss(x, target)


def make_problem():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(N, D, generator=gen, dtype=DTYPE)
    t = torch.randn(N, O, generator=gen, dtype=DTYPE)
    torch.manual_seed(1)
    return x, t, fusedgrad.FusedMLP(D, H, O, dtype=DTYPE)


def train(net, step, x, t):
    opt = torch.optim.SGD(net.parameters(), lr=LR, momentum=0.9)
    for _ in range(STEPS):
        opt.zero_grad()
        step(x, t)
        opt.step()
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def _worker(rank, port, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=PG_TIMEOUT)
    try:
        _train_rank(rank, out_dir)
        # Everything that held the process group (DDP's reducer) died with _train_rank's
        # locals; collect any cycle too, so that the group is torn down here, while the
        # interpreter is alive: gloo's worker threads outliving it into interpreter
        # finalisation abort the process (std::terminate) now and then.
        gc.collect()
    finally:
        dist.destroy_process_group()


def _train_rank(rank, out_dir):
    x, t, _ = make_problem()
    half = slice(rank * N // WORLD, (rank + 1) * N // WORLD)
    x, t = x[half], t[half]
    result = {}

    def average(param):
        dist.all_reduce(param.grad)
        param.grad /= WORLD

    for name in ("backward", "loss_backward"):
        _, _, net = make_problem()
        for p in net.parameters():
            p.register_post_accumulate_grad_hook(average)
        step = (lambda a, b: net.loss(a, b).backward()) if name == "backward" else net.loss_backward
        result[f"post_hook/{name}"] = train(net, step, x, t)

    _, _, net = make_problem()
    ddp = nn.parallel.DistributedDataParallel(net)
    try:
        net.loss_backward(x, t)
        result["ddp/loss_backward_error"] = None
    except RuntimeError as exc:
        result["ddp/loss_backward_error"] = str(exc)
    result["ddp/grads_after_refusal"] = [p.grad for p in net.parameters()]
    del ddp

    _, _, net = make_problem()
    ddp = nn.parallel.DistributedDataParallel(FusedLoss(net))
    result["ddp/backward"] = train(net, lambda a, b: ddp(a, b).backward(), x, t)
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_workers(out_dir):
    ctx = mp.start_processes(_worker, args=(free_port(), out_dir), nprocs=WORLD, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + DEADLINE_S
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail(f"workers did not finish within {DEADLINE_S} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
                p.join(5)


def test_two_ranks_hooks_equal_full_batch():
    with tempfile.TemporaryDirectory() as out_dir:
        run_workers(out_dir)
        ranks = [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(WORLD)]

    x, t, net = make_problem()
    initial = {k: v.clone() for k, v in net.state_dict().items()}
    expected = train(net, lambda a, b: net.loss(a, b).backward(), x, t)
    for key in expected:
        assert (expected[key] - initial[key]).abs().max() > 1e-3, key  # training moved every parameter

    for r, result in enumerate(ranks):
        for name in ("post_hook/backward", "post_hook/loss_backward", "ddp/backward"):
            for key in expected:
                torch.testing.assert_close(result[name][key], expected[key], rtol=RTOL, atol=ATOL,
                                           msg=lambda m: f"rank {r}, {name}, {key}: {m}")
        error = result["ddp/loss_backward_error"]
        assert error is not None, f"rank {r}: loss_backward under DDP neither synchronised nor refused"
        assert error.startswith("FusedMLP.loss_backward: parameter 'linear1.weight' has a C++ hook on its "
                                "gradient accumulator"), error
        assert "DistributedDataParallel" in error and "ddp(x, target).backward()" in error
        assert all(g is None for g in result["ddp/grads_after_refusal"])
