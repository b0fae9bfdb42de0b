"""One rank of the distributed tests (tests/test_distributed.py starts two of these, as torchrun would).

    python tests/distributed_worker.py SCENARIO RANK WORLD INIT_FILE OUT_DIR

Each scenario trains on this rank's shard with gloo and saves what it saw to OUT_DIR/rank{RANK}.pt;
the test compares the ranks with each other and with one process (native autograd) on all rows.
"""
import datetime
import gc
import os
import sys
import time
import traceback

import torch
import torch.distributed as dist
import torch.nn.functional as F

import fusedgrad
from fusedgrad import distributed as fdist

STEPS = 20


def shards(seed, sizes, D, O, dtype=torch.float64):
    """Every rank's rows (the same on every rank: each takes its own)."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, D, generator=g, dtype=dtype), torch.randn(n, O, generator=g, dtype=dtype)) for n in sizes]


def net_for(seed, D, H, O, dtype=torch.float64, activation="tanh", rank=0):
    # Every rank but 0 starts from other weights: the trainer broadcasts rank 0's.
    torch.manual_seed(seed + 1000 * rank)
    return fusedgrad.FusedMLP(D, H, O, dtype=dtype, activation=activation)


def scenario_train(rank, world, out):
    # 1. Full batch, SGD with momentum, one hidden layer, uneven shards.
    x, y = shards(1, [13, 7], 3, 2)[rank]
    net = net_for(1, 3, 7, 2, rank=rank)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    trainer = fusedgrad.Trainer(net, opt, process_group=dist.group.WORLD)
    out["sgd_full_initial"] = {k: v.clone() for k, v in net_for(1, 3, 7, 2, rank=0).state_dict().items()}
    out["paths"] = {"sgd_full": fusedgrad.explain(trainer, x, y)}
    out["sgd_full_losses"] = trainer.fit(x, y, STEPS)
    out["sgd_full_params"] = {k: v.clone() for k, v in net.state_dict().items()}
    out["sgd_full_step_loss"] = trainer.step(x, y)  # one more through step()
    out["sgd_full_after_step"] = {k: v.clone() for k, v in net.state_dict().items()}

    # 2. Mini-batches, Adam, two hidden layers, uneven shards (23 and 10 rows, batches of 4: the
    #    ranks' epochs have 6 and 3 batches), each rank shuffling its shard with its own generator.
    x, y = shards(2, [23, 10], 2, 1)[rank]
    torch.manual_seed(2)
    net = fusedgrad.FusedMLP(2, [6, 5], 1, dtype=torch.float64, activation="tanh")
    out["adam_batches_initial"] = {k: v.clone() for k, v in net.state_dict().items()}
    opt = torch.optim.Adam(net.parameters(), lr=0.01)
    trainer = fusedgrad.Trainer(net, opt, process_group=dist.group.WORLD)
    out["paths"]["adam_batches"] = fusedgrad.explain(trainer, x, y)
    gen = torch.Generator().manual_seed(100 + rank)
    out["adam_batches_losses"] = trainer.fit(x, y, STEPS, batch_size=4, generator=gen)
    out["adam_batches_params"] = {k: v.clone() for k, v in net.state_dict().items()}

    # 3. float32, reduction "sum", AdamW: the ranks stay bitwise identical.
    x, y = shards(3, [50, 64], 4, 3, dtype=torch.float32)[rank]
    net = net_for(3, 4, 16, 3, dtype=torch.float32, activation="sigmoid", rank=rank)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    trainer = fusedgrad.Trainer(net, opt, reduction="sum", process_group=dist.group.WORLD)
    out["paths"]["f32"] = fusedgrad.explain(trainer, x, y)
    out["f32_losses"] = trainer.fit(x, y, STEPS, batch_size=16, generator=torch.Generator().manual_seed(rank))
    out["f32_params"] = {k: v.clone() for k, v in net.state_dict().items()}

    # 4. DistributedDataParallel: native DDP training against Trainer(DDP(net)), uneven shards, Adam.
    x, y = shards(4, [17, 9], 3, 2)[rank]
    torch.manual_seed(4)
    reference = fusedgrad.FusedMLP(3, [5, 4], 2, dtype=torch.float64, activation="tanh")
    fused = fusedgrad.FusedMLP(3, [5, 4], 2, dtype=torch.float64, activation="tanh")
    fused.load_state_dict(reference.state_dict())
    native_ddp = torch.nn.parallel.DistributedDataParallel(reference)
    opt = torch.optim.Adam(native_ddp.parameters(), lr=0.01)
    native_losses = []
    for _ in range(STEPS):
        opt.zero_grad()
        loss = F.mse_loss(native_ddp(x), y)
        loss.backward()
        opt.step()
        native_losses.append(loss.detach().clone())
    fused_ddp = torch.nn.parallel.DistributedDataParallel(fused)
    opt = torch.optim.Adam(fused_ddp.parameters(), lr=0.01)
    fused_trainer = fusedgrad.Trainer(fused_ddp, opt)
    out["paths"]["ddp"] = fusedgrad.explain(fused_trainer, x, y)
    out["ddp_fused_losses"] = fused_trainer.fit(x, y, STEPS)
    # a wide one-hidden-layer net (the trainer's GEMM widths) takes the engine when data-parallel
    wide = fusedgrad.FusedMLP(64, 128, 32)
    out["paths"]["wide"] = fusedgrad.explain(
        fusedgrad.Trainer(wide, torch.optim.SGD(wide.parameters(), lr=0.1), process_group=dist.group.WORLD),
        torch.zeros(10, 64), torch.zeros(10, 32))
    # DDP's loss on each rank is that rank's own; the fused route reports their mean
    every = [torch.zeros(STEPS, dtype=torch.float64) for _ in range(world)]
    dist.all_gather(every, torch.stack(native_losses))
    out["ddp_native_mean_losses"] = torch.stack(every).mean(0)
    out["ddp_native_params"] = {k: v.clone() for k, v in reference.state_dict().items()}
    out["ddp_fused_params"] = {k: v.clone() for k, v in fused.state_dict().items()}

    # 5. What cannot be honoured is refused, by name, on every rank alike.
    errors = {}

    def refused(name, make):
        try:
            make()
        except (ValueError, TypeError, RuntimeError) as e:
            errors[name] = f"{type(e).__name__}: {e}"
        else:
            errors[name] = None

    ens = fusedgrad.FusedMLPEnsemble(3, 2, 4, 1, dtype=torch.float64)
    refused("ensemble", lambda: fusedgrad.Trainer(ens, torch.optim.SGD(ens.parameters(), lr=0.1),
                                                  process_group=dist.group.WORLD))
    lb = fusedgrad.FusedMLP(2, 4, 1, dtype=torch.float64)
    refused("lbfgs", lambda: fusedgrad.Trainer(lb, torch.optim.LBFGS(lb.parameters()), process_group=dist.group.WORLD))
    unused = torch.nn.parallel.DistributedDataParallel(fusedgrad.FusedMLP(2, 4, 1, dtype=torch.float64),
                                                       find_unused_parameters=True)
    refused("find_unused", lambda: fusedgrad.Trainer(unused, torch.optim.SGD(unused.parameters(), lr=0.1)))
    hooked = torch.nn.parallel.DistributedDataParallel(fusedgrad.FusedMLP(2, 4, 1, dtype=torch.float64))
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    hooked.register_comm_hook(None, default_hooks.allreduce_hook)
    refused("comm_hook", lambda: fusedgrad.Trainer(hooked, torch.optim.SGD(hooked.parameters(), lr=0.1)))
    plain = torch.nn.parallel.DistributedDataParallel(fusedgrad.FusedMLP(2, 4, 1, dtype=torch.float64))
    tr = fusedgrad.Trainer(plain, torch.optim.SGD(plain.parameters(), lr=0.1))
    xs, ys = torch.randn(5, 2, dtype=torch.float64), torch.randn(5, 1, dtype=torch.float64)

    def in_no_sync():
        with plain.no_sync():
            tr.fit(xs, ys, 2)
    refused("no_sync", in_no_sync)
    extra = torch.nn.parallel.DistributedDataParallel(fusedgrad.FusedMLP(2, 4, 1, dtype=torch.float64))
    extra.module.linear1.weight.register_hook(lambda g: g * 2)
    refused("user_hook", lambda: fusedgrad.Trainer(extra, torch.optim.SGD(extra.parameters(), lr=0.1)))
    m = fusedgrad.FusedMLP(2, 4, 1, dtype=torch.float64)
    tm = fusedgrad.Trainer(m, torch.optim.SGD(m.parameters(), lr=0.1), process_group=dist.group.WORLD)
    refused("steps_differ", lambda: tm.fit(xs, ys, 3 + rank))
    other = fusedgrad.FusedMLP(2, 4 + rank, 1, dtype=torch.float64)
    refused("shapes_differ", lambda: fusedgrad.Trainer(other, torch.optim.SGD(other.parameters(), lr=0.1),
                                                       process_group=dist.group.WORLD))
    refused("not_a_group", lambda: fusedgrad.Trainer(m, torch.optim.SGD(m.parameters(), lr=0.1), process_group=3))
    out["errors"] = errors


def scenario_ensemble(rank, world, out):
    torch.manual_seed(5)
    whole = fusedgrad.FusedMLPEnsemble(5, 1, 8, 1, dtype=torch.float64, activation="tanh")
    out["initial"] = {k: v.clone() for k, v in whole.state_dict().items()}
    local = fdist.shard_ensemble(whole, dist.group.WORLD)
    part = fdist.model_slice(5)
    scale = torch.linspace(0.5, 1.5, 5, dtype=torch.float64)
    x = torch.linspace(-1, 1, 30, dtype=torch.float64).unsqueeze(1)
    y = torch.sin(3 * x)
    trainer = fusedgrad.Trainer(local, torch.optim.Adam(local.parameters(), lr=0.01), model_lr_scale=scale[part])
    losses = trainer.fit(x, y, STEPS)
    gathered = fdist.gather_ensemble(local)
    all_losses = fdist.gather_losses(losses)
    out["slice"] = (part.start, part.stop)
    out["gathered"] = None if gathered is None else {k: v.clone() for k, v in gathered.state_dict().items()}
    out["losses"] = all_losses


def scenario_kill(rank, world, out):
    """Rank 1 dies (os._exit) before the first step; rank 0 must raise, not hang."""
    x, y = shards(6, [40, 40], 2, 1)[rank]
    net = net_for(6, 2, 8, 1, rank=rank)
    trainer = fusedgrad.Trainer(net, torch.optim.SGD(net.parameters(), lr=0.1), process_group=dist.group.WORLD)
    trainer.fit(x, y, 3)  # both ranks alive: fine
    _fail_midway(rank, trainer, x, y, out, lambda: os._exit(3))


def _fail_midway(rank, trainer, x, y, out, fail):
    """Both ranks start a long fit; rank 1 calls `fail` at its step 50, while rank 0 is inside the C++
    loop of its next call (steps 51-100)."""
    def callback(step, loss):
        if rank == 1 and step == 50:
            fail()
        if step == 50:
            out["started"] = time.perf_counter()
    try:
        trainer.fit(x, y, 1000, callback=callback, callback_every=50)
        out["error"] = None
    except RuntimeError as e:
        out["error"] = str(e)
    out["seconds"] = time.perf_counter() - out.get("started", 0.0)


def scenario_stall(rank, world, out):
    """Rank 1 stays alive but stops stepping for longer than the group's timeout; rank 0 must raise."""
    x, y = shards(7, [40, 40], 2, 1)[rank]
    net = net_for(7, 2, 8, 1, rank=rank)
    trainer = fusedgrad.Trainer(net, torch.optim.SGD(net.parameters(), lr=0.1), process_group=dist.group.WORLD)
    trainer.fit(x, y, 3)

    def stall():
        time.sleep(TIMEOUT_SECONDS + 4)
        os._exit(0)
    _fail_midway(rank, trainer, x, y, out, stall)


TIMEOUT_SECONDS = 5
SCENARIOS = {"train": scenario_train, "ensemble": scenario_ensemble, "kill": scenario_kill, "stall": scenario_stall}


def main():
    name, rank, world, init_file, out_dir = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=TIMEOUT_SECONDS))
    out = {}
    try:
        SCENARIOS[name](rank, world, out)
    except BaseException:
        out["crash"] = traceback.format_exc()
    torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    if name in ("kill", "stall"):
        os._exit(0)  # the group has a dead peer: nothing left to tear down cleanly
    # The scenario's DDP wrappers (their Reducers hold the group) are freed before the group is torn
    # down, and no rank tears it down while another still uses it (see fusedgrad/bench/dist.py).
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
