"""FusedMLP under torch.nn.parallel.DistributedDataParallel (gloo, 2 processes).

Two processes on 127.0.0.1 each train on one half of a batch; DDP averages
their gradients, and with reduction="mean" on equal halves that average is
exactly the full-batch gradient. So after several optimizer steps the
parameters must equal those of one process training on the whole batch
(float64, rounding-level tolerance). Both ways of training FusedMLP are run:
its forward (the fused ``mlp`` op) followed by a separate loss, and its fused
``loss`` (the ``mlp_loss`` op), wrapped so that it is DDP's forward.

Every wait is bounded: the process group has a timeout, and the processes are
killed if they have not finished by the deadline, so this can never hang CI.
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
import torch.nn.functional as F
from torch import nn

import fusedgrad

WORLD = 2
N, D, H, O = 16, 3, 6, 2  # N even: equal halves
STEPS = 6
LR = 0.5
DTYPE = torch.float64
RTOL, ATOL = 1e-12, 1e-14  # float64: the two paths differ only in summation order
DEADLINE_S = 120  # whole test, including process start-up
PG_TIMEOUT = datetime.timedelta(seconds=60)

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


class FusedLoss(nn.Module):
    """Makes FusedMLP.loss the forward, since DDP synchronises gradients of what its forward builds."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x, target):
        return self.net.loss(x, target, reduction="mean")


def make_problem():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(N, D, generator=gen, dtype=DTYPE)
    t = torch.randn(N, O, generator=gen, dtype=DTYPE)
    torch.manual_seed(1)
    net = fusedgrad.FusedMLP(D, H, O, dtype=DTYPE)
    return x, t, net


def train(model, loss_of, x, t):
    """SGD with momentum; returns the loss of every step."""
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    losses = []
    for _ in range(STEPS):
        opt.zero_grad()
        loss = loss_of(model, x, t)
        loss.backward()
        opt.step()
        losses.append(loss.detach().clone())
    return torch.stack(losses)


def via_forward(model, x, t):
    return F.mse_loss(model(x), t)


def via_fused_loss(model, x, t):
    return model(x, t) if isinstance(model, (FusedLoss, nn.parallel.DistributedDataParallel)) \
        else model.loss(x, t)


def _worker(rank, port, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD, timeout=PG_TIMEOUT)
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
    result = {}
    for name, loss_of in (("forward", via_forward), ("fused_loss", via_fused_loss)):
        _, _, net = make_problem()  # same initial weights on both ranks (DDP also broadcasts rank 0's)
        module = net if name == "forward" else FusedLoss(net)
        ddp = nn.parallel.DistributedDataParallel(module)
        losses = train(ddp, loss_of, x[half], t[half])
        # Each rank saw half the batch: the full-batch loss is the mean of the two.
        dist.all_reduce(losses)
        result[name] = {"state": {k: v.clone() for k, v in net.state_dict().items()},
                        "losses": losses / WORLD}
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_workers(out_dir):
    ctx = mp.start_processes(_worker, args=(free_port(), out_dir), nprocs=WORLD, join=False, start_method="spawn")
    deadline = time.monotonic() + DEADLINE_S
    try:
        while not ctx.join(timeout=1):  # raises if a worker failed
            if time.monotonic() > deadline:
                pytest.fail(f"DDP workers did not finish within {DEADLINE_S} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
                p.join(5)


@pytest.mark.skipif(sys.platform == "win32", reason="gloo over TCP loopback is tested on Linux/macOS")
def test_ddp_two_halves_equal_full_batch():
    with tempfile.TemporaryDirectory() as out_dir:
        run_workers(out_dir)
        ranks = [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(WORLD)]

    x, t, _ = make_problem()
    for name, loss_of in (("forward", via_forward), ("fused_loss", via_fused_loss)):
        _, _, net = make_problem()
        initial = {k: v.clone() for k, v in net.state_dict().items()}
        losses = train(net, loss_of, x, t)
        expected = net.state_dict()
        for r, result in enumerate(ranks):
            got = result[name]["state"]
            assert got.keys() == expected.keys()
            for key in expected:
                # Training moved the parameters well beyond the tolerance.
                assert (expected[key] - initial[key]).abs().max() > 1e-3, (name, key)
                torch.testing.assert_close(got[key], expected[key], rtol=RTOL, atol=ATOL,
                                           msg=lambda m: f"{name}, rank {r}, {key}: {m}")
            torch.testing.assert_close(result[name]["losses"], losses, rtol=RTOL, atol=ATOL)
        assert losses[-1] < losses[0]
