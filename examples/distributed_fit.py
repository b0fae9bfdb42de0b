"""A curve fit on more rows than one process should hold, data-parallel over torch.distributed.

    torchrun --standalone --nproc-per-node=2 examples/distributed_fit.py [--rows 1000000] [--steps 300]

Each rank builds (here: generates) only its own shard of the rows and trains the same FusedMLP with
``fusedgrad.Trainer(net, opt, process_group=...)``: every step the ranks' gradient sums are
all-reduced inside the C++ loop, so all ranks hold the same parameters and report the same global
loss. ``--ddp`` wraps the net in DistributedDataParallel instead (DDP's own semantics: the mean of
each rank's loss). ``--sweep`` trains a learning-rate sweep of K models sharded over the ranks and
gathers the losses and the best model on rank 0. gloo on the CPU; one torch thread per rank.
"""
import argparse
import gc
import time

import torch
import torch.distributed as dist

import fusedgrad
from fusedgrad import distributed as fdist


def my_shard(rows, rank, world):
    """This rank's rows of y = sin(3x) + noise on x in [-1, 1] (a contiguous slice of one data set)."""
    per, extra = divmod(rows, world)
    start = rank * per + min(rank, extra)
    n = per + (1 if rank < extra else 0)
    g = torch.Generator().manual_seed(1234 + rank)
    x = torch.linspace(-1, 1, rows)[start:start + n].unsqueeze(1)
    y = torch.sin(3 * x) + 0.05 * torch.randn(n, 1, generator=g)
    return x, y


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows over all ranks")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=None, help="rows per rank per step (default: full shard)")
    parser.add_argument("--ddp", action="store_true", help="wrap the net in DistributedDataParallel")
    parser.add_argument("--sweep", type=int, default=0, help="also train a K-model learning-rate sweep, sharded")
    args = parser.parse_args()

    torch.set_num_threads(1)
    dist.init_process_group("gloo")  # torchrun's environment: RANK, WORLD_SIZE, MASTER_ADDR, ...
    rank, world = dist.get_rank(), dist.get_world_size()
    x, y = my_shard(args.rows, rank, world)

    net = fusedgrad.FusedMLP(1, 20, 1, activation="tanh")  # rank 0's initial weights win (broadcast)
    opt = torch.optim.Adam(net.parameters(), lr=0.01)
    if args.ddp:
        trainer = fusedgrad.Trainer(torch.nn.parallel.DistributedDataParallel(net), opt)
    else:
        trainer = fusedgrad.Trainer(net, opt, process_group=dist.group.WORLD)
    start = time.perf_counter()
    losses = trainer.fit(x, y, args.steps, batch_size=args.batch_size,
                         generator=torch.Generator().manual_seed(rank))
    seconds = time.perf_counter() - start
    if rank == 0:
        print(f"{world} rank(s), {args.rows:,} rows: {args.steps} steps in {seconds:.2f} s "
              f"({seconds / max(args.steps, 1) * 1e6:,.0f} µs/step); loss {losses[0]:.4f} -> {losses[-1]:.4f}")

    if args.sweep:
        # K models, one learning rate each, sharded over the ranks: no communication per step.
        K = args.sweep
        torch.manual_seed(0)  # the same ensemble on every rank before sharding
        ensemble = fusedgrad.FusedMLPEnsemble(K, 1, 20, 1, activation="tanh")
        local = fdist.shard_ensemble(ensemble)
        lrs = torch.logspace(-3, -1, K, dtype=torch.float64)
        mine = fdist.model_slice(K)
        sweep = fusedgrad.Trainer(local, torch.optim.Adam(local.parameters(), lr=1.0), model_lr_scale=lrs[mine])
        xs, ys = x[:: max(1, x.shape[0] // 2000)], y[:: max(1, y.shape[0] // 2000)]
        local_losses = sweep.fit(xs, ys, args.steps)
        all_losses = fdist.gather_losses(local_losses)
        trained = fdist.gather_ensemble(local)
        if rank == 0:
            best = int(all_losses[-1].argmin())
            print(f"sweep of {K} learning rates over {world} rank(s): best lr {lrs[best].item():.2e}, "
                  f"final loss {all_losses[-1, best]:.4f}; the model: {trained.module(best)}")
    # The DistributedDataParallel wrapper (held by the trainer) goes before its process group, and no
    # rank tears the group down while another still uses it.
    del trainer
    gc.collect()  # not later, from a reference cycle (docs/distributed.md, "Teardown")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
