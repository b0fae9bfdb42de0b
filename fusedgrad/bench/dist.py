"""The fused trainer data-parallel over torch.distributed: ``python -m fusedgrad bench --dist``.

Ranks are processes on this machine (gloo over loopback, a file rendezvous), one torch thread each,
started with ``torch.multiprocessing`` as ``torchrun`` would start them. For each case
(10⁶ and 10⁷ rows of 1→20→1 and 16→64→4, sigmoid, float32, full batch, Adam lr 1e-3):

* **one rank**: ``Trainer(net, opt).fit`` on all rows, one thread (what a user runs without
  torch.distributed);
* **two ranks**: ``Trainer(net, opt, process_group=WORLD).fit``, each rank on half the rows;
  the loss histories of both runs are compared first (float32, relative 1e-4);
* **all-reduce**: the same two ranks time the collective alone on a buffer of the step's size
  (the gradient sums and the row count, float64), its share of the two-rank step;
* **native DDP** (10⁶ rows of 1→20→1 only): ``DistributedDataParallel`` over the same layers
  (``nn.Sequential``), two ranks, one thread each, the same shards, ``opt.zero_grad();
  F.mse_loss(ddp(x), y).backward(); opt.step()``.

Each figure is µs per step: the median of ``repeats`` timed ``fit`` calls of ``steps`` steps, the
slower rank's where two run. ``quick=True`` is a seconds-long smoke run (10⁴ rows), never a
measurement.
"""
import datetime
import gc
import os
import platform
import statistics
import tempfile
import time
from queue import Empty

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from .machine import cpu_facts

CASES = [  # (rows, D, H, O, steps per timed fit)
    (1_000_000, 1, 20, 1, 20),
    (10_000_000, 1, 20, 1, 4),
    (1_000_000, 16, 64, 4, 4),
    (10_000_000, 16, 64, 4, 2),
]
QUICK = [(10_000, 1, 20, 1, 5), (10_000, 16, 64, 4, 5)]
NATIVE_CASE = (1_000_000, 1, 20, 1)
RANK_TIMEOUT_S = 300      # the process group's timeout: a collective waiting longer raises
QUICK_DEADLINE_S = 120    # the most the parent waits for the two ranks of one case
CASE_DEADLINE_S = 1800


def shard(rows, D, O, rank, world, seed=0):
    """Rank `rank`'s rows of `world` equal shards of one data set (uniform x, a smooth target)."""
    g = torch.Generator().manual_seed(seed * 1000 + world * 100 + rank)
    n = rows // world + (1 if rank < rows % world else 0)
    x = torch.rand(n, D, generator=g) * 2 - 1
    w = torch.linspace(0.5, 1.5, D * O).reshape(D, O)
    y = torch.sin(3 * x @ w)
    return x, y


def whole(rows, D, O, world):
    parts = [shard(rows, D, O, r, world) for r in range(world)]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def _time_fit(trainer, x, y, steps, repeats):
    trainer.fit(x, y, 1)  # warm-up: buffers, optimizer state
    times, losses = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        losses = trainer.fit(x, y, steps)
        times.append((time.perf_counter() - start) / steps * 1e6)
    return statistics.median(times), losses


def _net(D, H, O):
    import fusedgrad

    torch.manual_seed(0)
    return fusedgrad.FusedMLP(D, H, O)


def _rank_main(rank, world, init_file, case, repeats, native, queue):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=RANK_TIMEOUT_S))
    import fusedgrad

    rows, D, H, O, steps = case
    result = {}
    trainer = ddp = None
    try:
        x, y = shard(rows, D, O, rank, world)
        net = _net(D, H, O)
        trainer = fusedgrad.Trainer(net, torch.optim.Adam(net.parameters(), lr=1e-3),
                                    process_group=dist.group.WORLD)
        dist.barrier()
        result["fused_us"], losses = _time_fit(trainer, x, y, steps, repeats)
        result["losses"] = losses.tolist()  # plain numbers: a tensor would travel as a file descriptor
        # The collective alone, on the step's buffer: the gradient sums (one per parameter), the loss
        # and the row count, float64 (csrc/trainer/step_reducer.h).
        buffer = torch.zeros(sum(p.numel() for p in net.parameters()) + 2, dtype=torch.float64)
        for _ in range(20):
            dist.all_reduce(buffer)
        n = 500
        dist.barrier()
        start = time.perf_counter()
        for _ in range(n):
            dist.all_reduce(buffer)
        result["allreduce_us"] = (time.perf_counter() - start) / n * 1e6
        result["buffer_bytes"] = buffer.numel() * 8
        if native:
            seq = _net(D, H, O).to_module(copy=True)
            ddp = torch.nn.parallel.DistributedDataParallel(seq)
            opt = torch.optim.Adam(ddp.parameters(), lr=1e-3)

            def native_steps(k):
                for _ in range(k):
                    opt.zero_grad()
                    F.mse_loss(ddp(x), y).backward()
                    opt.step()
            native_steps(1)
            times = []
            for _ in range(repeats):
                dist.barrier()
                start = time.perf_counter()
                native_steps(steps)
                times.append((time.perf_counter() - start) / steps * 1e6)
            result["native_ddp_us"] = statistics.median(times)
    finally:
        queue.put((rank, result))
        # DDP's Reducer must not hold the last reference to the process group: it is freed with the
        # GIL held, and gloo's destructor then joins a worker thread that may need the GIL to free
        # its last finished work -- a deadlock at teardown (seen here in 1 run of ~20; pytorch#56297).
        # So the wrapper and the trainer go first, while the group is still registered.
        del trainer, ddp
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()


def _collect(procs, queue, deadline):
    """The ranks' results, waiting at most until `deadline` (time.monotonic()), never forever: a rank
    that dies (a signal, a crash) or does not finish in time ends the wait; then every rank is killed."""
    results = {}
    try:
        while len(results) < len(procs) and time.monotonic() < deadline:
            try:
                rank, result = queue.get(timeout=0.05)
                results[rank] = result
            except Empty:
                if any(p.exitcode not in (None, 0) for p in procs):  # a rank failed: its peer will not finish
                    break
                if all(p.exitcode is not None for p in procs) and queue.empty():  # all gone, nothing more comes
                    break
        if len(results) == len(procs):  # every rank is through: let them tear down, within the deadline
            for p in procs:
                p.join(timeout=max(0.0, deadline - time.monotonic()))
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    return results


def _two_ranks(case, repeats, native):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    budget = QUICK_DEADLINE_S if case in QUICK else CASE_DEADLINE_S
    with tempfile.TemporaryDirectory() as tmp:
        init = os.path.join(tmp, "rendezvous")
        procs = [ctx.Process(target=_rank_main, args=(r, 2, init, case, repeats, native, queue)) for r in range(2)]
        for p in procs:
            p.start()
        results = _collect(procs, queue, time.monotonic() + budget)
    codes = [p.exitcode for p in procs]
    if any(c != 0 for c in codes) or any(not results.get(r) for r in range(2)):
        raise RuntimeError(f"bench --dist: the two ranks did not finish {case} within {budget} s "
                           f"(exit codes {codes}; a negative code is the signal that ended the rank, "
                           f"-9 the kill after the deadline)")
    out = {"fused_us": max(results[r]["fused_us"] for r in range(2)),
           "allreduce_us": max(results[r]["allreduce_us"] for r in range(2)),
           "buffer_bytes": results[0]["buffer_bytes"], "losses": results[0]["losses"]}
    if native:
        out["native_ddp_us"] = max(results[r]["native_ddp_us"] for r in range(2))
    return out


def _one_rank(case, repeats):
    import fusedgrad

    rows, D, H, O, steps = case
    x, y = whole(rows, D, O, 2)  # the two ranks' shards, together
    net = _net(D, H, O)
    trainer = fusedgrad.Trainer(net, torch.optim.Adam(net.parameters(), lr=1e-3))
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        us, losses = _time_fit(trainer, x, y, steps, repeats)
    finally:
        torch.set_num_threads(previous)
    return us, losses


def run(quick=False, repeats=3, log=print):
    started = time.perf_counter()
    cases = QUICK if quick else CASES
    repeats = 1 if quick else repeats
    rows_out = []
    for case in cases:
        rows, D, H, O, steps = case
        label = f"{rows:.0e} rows × {D}→{H}→{O}"
        log(f"bench --dist: {label} ...")
        one_us, one_losses = _one_rank(case, repeats)
        native = (rows, D, H, O) == NATIVE_CASE or (quick and case == cases[0])
        two = _two_ranks(case, repeats, native)
        # The same training either way (float32: the reduction order differs).
        torch.testing.assert_close(torch.tensor(two["losses"]), one_losses, rtol=1e-4, atol=1e-6)
        row = {"case": label, "rows": rows, "D": D, "H": H, "O": O, "steps": steps,
               "one_rank_us": one_us, "two_ranks_us": two["fused_us"], "speedup": one_us / two["fused_us"],
               "allreduce_us": two["allreduce_us"], "allreduce_share": two["allreduce_us"] / two["fused_us"],
               "buffer_bytes": two["buffer_bytes"]}
        if "native_ddp_us" in two:
            row["native_ddp_us"] = two["native_ddp_us"]
            row["fused_vs_native_ddp"] = two["native_ddp_us"] / two["fused_us"]
        rows_out.append(row)
        log(f"  one rank {one_us:,.0f} µs/step, two ranks {two['fused_us']:,.0f} µs/step "
            f"({row['speedup']:.2f}×), all-reduce {two['allreduce_us']:.0f} µs ({row['allreduce_share']:.1%})"
            + (f", native DDP {row['native_ddp_us']:,.0f} µs ({row['fused_vs_native_ddp']:.1f}× slower)"
               if "native_ddp_us" in row else ""))
    meta = {"torch": torch.__version__, "machine": platform.machine(), "processor": platform.processor(),
            "cpus": os.cpu_count(), **cpu_facts(), "quick": quick, "repeats": repeats,
            "seconds": time.perf_counter() - started}
    return {"meta": meta, "rows": rows_out}


def markdown(result):
    lines = ["| case | one rank × 1 thread (µs/step) | two ranks × 1 thread (µs/step) | speed-up | "
             "all-reduce (µs, share of the step) | native DDP, two ranks (µs/step) | fused ÷ native DDP |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        native = (f"{r['native_ddp_us']:,.0f} | {r['fused_vs_native_ddp']:.1f}×" if "native_ddp_us" in r
                  else "— | —")
        lines.append(f"| {r['case']} | {r['one_rank_us']:,.0f} | {r['two_ranks_us']:,.0f} | {r['speedup']:.2f}× | "
                     f"{r['allreduce_us']:.0f} ({r['allreduce_share']:.1%}; {r['buffer_bytes']:,} B) | {native} |")
    m = result["meta"]
    lines.append("")
    lines.append(f"torch {m['torch']}, {m['cpus']} CPUs, gloo over loopback; medians of {m['repeats']} timed fits; "
                 f"{m['seconds']:.0f} s in all{' (quick: not a measurement)' if m['quick'] else ''}.")
    return "\n".join(lines) + "\n"
