"""The fused trainer over torch.distributed (gloo, two processes on this machine).

Each scenario starts two ranks of tests/distributed_worker.py (as torchrun would, with a file
rendezvous, one thread each) and compares what they saved with each other and with one process
training on all rows with native autograd and torch.optim, in float64. The ranks are started once
per scenario (module fixtures), so the many checks below cost two process pairs plus the two
failure scenarios.
"""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import fusedgrad

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch without torch.distributed")

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "distributed_worker.py")
sys.path.insert(0, HERE)
import distributed_worker as worker  # noqa: E402  (the shards and seeds the ranks used)

TOL = 1e-10


def run_ranks(tmp_path, scenario, world=2, timeout=180):
    """Starts `world` ranks of the worker, waits for all, returns their saved results by rank."""
    init = tmp_path / "rendezvous"
    env = dict(os.environ)
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(fusedgrad.__file__)))
    env["PYTHONPATH"] = os.pathsep.join([package_root, env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    procs = [subprocess.Popen([sys.executable, WORKER, scenario, str(r), str(world), str(init), str(tmp_path)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(world)]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=timeout)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    results = []
    for r in range(world):
        path = tmp_path / f"rank{r}.pt"
        results.append(torch.load(path, weights_only=False) if path.exists() else None)
    return results, [p.returncode for p in procs], logs


def _no_crash(results, logs):
    for r, out in enumerate(results):
        assert out is not None, f"rank {r} saved nothing:\n{logs[r]}"
        assert "crash" not in out, f"rank {r}:\n{out['crash']}"


def _scenario(tmp_path_factory, name):
    """Both ranks' results of a scenario that must finish cleanly."""
    results, codes, logs = run_ranks(tmp_path_factory.mktemp(name), name)
    _no_crash(results, logs)
    assert codes == [0, 0], logs
    return results


@pytest.fixture(scope="module")
def train(tmp_path_factory):
    return _scenario(tmp_path_factory, "train")


@pytest.fixture(scope="module")
def ensemble(tmp_path_factory):
    return _scenario(tmp_path_factory, "ensemble")


def native(state, dtype=torch.float64, activation="tanh"):
    """The network as plain torch layers (nn.Sequential), from a FusedMLP state dict."""
    widths = [state["linear1.weight"].shape[1]] + [state[f"linear{l}.weight"].shape[0]
                                                   for l in range(1, len(state) // 2 + 1)]
    net = fusedgrad.FusedMLP(widths[0], widths[1:-1], widths[-1], dtype=dtype, activation=activation)
    net.load_state_dict(state)
    return net.to_module(copy=True)


def assert_state_close(got, expected, tol=TOL):
    assert got.keys() == expected.keys()
    for k in got:
        torch.testing.assert_close(got[k], expected[k], rtol=0, atol=tol, msg=k)


def assert_ranks_identical(results, key):
    a, b = results[0][key], results[1][key]
    for k in a:
        assert torch.equal(a[k], b[k]), f"{key}[{k}] differs between the ranks"


def test_each_case_takes_the_route_it_names(train):
    """The cases cover both step loops that all-reduce: the narrow one-hidden-layer kernels and the engine."""
    expected = {"sgd_full": "trainer-narrow", "f32": "trainer-narrow", "adam_batches": "trainer-engine",
                "ddp": "trainer-engine", "wide": "trainer-engine"}
    for rank, out in enumerate(train):
        for case, path in expected.items():
            info = out["paths"][case]
            assert info["path"] == path, (case, info)
            assert info["data_parallel"]["world_size"] == 2 and info["data_parallel"]["rank"] == rank
        assert "DistributedDataParallel" in out["paths"]["ddp"]["data_parallel"]["semantics"]
        assert "mean over every rank" in out["paths"]["sgd_full"]["data_parallel"]["semantics"]


def test_full_batch_sgd_equals_one_process_on_all_rows(train):
    xs = worker.shards(1, [13, 7], 3, 2)
    x, y = torch.cat([s[0] for s in xs]), torch.cat([s[1] for s in xs])
    ref = native(train[0]["sgd_full_initial"])  # rank 0's weights: broadcast to rank 1 by the trainer
    opt = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(worker.STEPS + 1):
        opt.zero_grad()
        loss = F.mse_loss(ref(x), y)  # the mean over both shards' 20 rows
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    for out in train:
        torch.testing.assert_close(out["sgd_full_losses"], torch.stack(losses[:-1]), rtol=0, atol=TOL)
        torch.testing.assert_close(out["sgd_full_step_loss"], losses[-1], rtol=0, atol=TOL)
    got = train[0]["sgd_full_after_step"]
    expected = {k: v for k, v in zip(got.keys(), [p.detach() for p in ref.state_dict().values()])}
    assert_state_close(got, expected)
    assert_ranks_identical(train, "sgd_full_params")
    assert_ranks_identical(train, "sgd_full_after_step")


def test_minibatch_adam_uneven_shards_equals_one_process(train):
    """Step s takes batch s mod B_r of rank r's own epoch (its randperm), the loss the mean over the
    union of the ranks' batches: a rank with fewer batches starts its next epoch sooner."""
    shards = worker.shards(2, [23, 10], 2, 1)
    bs, steps = 4, worker.STEPS
    orders = []
    for rank, (xr, _) in enumerate(shards):
        n = xr.shape[0]
        per_epoch = -(-n // bs)
        epochs = -(-steps // per_epoch)
        g = torch.Generator().manual_seed(100 + rank)
        orders.append(torch.cat([torch.randperm(n, generator=g) for _ in range(epochs)]))
    ref = native(train[0]["adam_batches_initial"])
    opt = torch.optim.Adam(ref.parameters(), lr=0.01)
    losses = []
    for s in range(steps):
        xb, yb = [], []
        for (xr, yr), order in zip(shards, orders):
            n = xr.shape[0]
            per_epoch = -(-n // bs)
            epoch, b = divmod(s, per_epoch)
            rows = order[epoch * n + b * bs: epoch * n + min((b + 1) * bs, n)]
            xb.append(xr[rows])
            yb.append(yr[rows])
        opt.zero_grad()
        loss = F.mse_loss(ref(torch.cat(xb)), torch.cat(yb))
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    for out in train:
        torch.testing.assert_close(out["adam_batches_losses"], torch.stack(losses), rtol=0, atol=TOL)
    got = train[0]["adam_batches_params"]
    assert_state_close(got, dict(zip(got.keys(), [p.detach() for p in ref.state_dict().values()])))
    assert_ranks_identical(train, "adam_batches_params")


def test_float32_ranks_bitwise_identical(train):
    assert torch.equal(train[0]["f32_losses"], train[1]["f32_losses"])
    assert_ranks_identical(train, "f32_params")
    assert bool(torch.isfinite(train[0]["f32_losses"]).all())


def test_ddp_wrapped_equals_native_ddp(train):
    for out in train:
        assert_state_close(out["ddp_fused_params"], out["ddp_native_params"])
        # DDP's semantics: each rank's loss over its own rows, gradients averaged over the ranks;
        # the fused route returns the ranks' mean loss
        torch.testing.assert_close(out["ddp_fused_losses"], out["ddp_native_mean_losses"], rtol=0, atol=TOL)
    assert_ranks_identical(train, "ddp_fused_params")


@pytest.mark.parametrize("case, words", [
    ("ensemble", ["process_group", "shard_ensemble"]),
    ("lbfgs", ["LBFGS", "data-parallel"]),
    ("find_unused", ["find_unused_parameters"]),
    ("comm_hook", ["communication hook"]),
    ("no_sync", ["no_sync"]),
    ("user_hook", ["linear1.weight", "tensor hook"]),
    ("steps_differ", ["fusedgrad.Trainer.fit", "disagree"]),
    ("shapes_differ", ["fusedgrad.Trainer", "disagree"]),
    ("not_a_group", ["process_group", "ProcessGroup", "int"]),
])
def test_what_cannot_be_honoured_is_refused_by_name(train, case, words):
    for out in train:
        message = out["errors"][case]
        assert message is not None, f"{case} was accepted"
        for w in words:
            assert w in message, (case, message)


def test_sharded_ensemble_equals_one_process(ensemble):
    assert [tuple(out["slice"]) for out in ensemble] == [(0, 3), (3, 5)]
    assert ensemble[1]["gathered"] is None and ensemble[1]["losses"] is None
    gathered, losses = ensemble[0]["gathered"], ensemble[0]["losses"]
    whole = fusedgrad.FusedMLPEnsemble(5, 1, 8, 1, dtype=torch.float64, activation="tanh")
    whole.load_state_dict(ensemble[0]["initial"])
    x = torch.linspace(-1, 1, 30, dtype=torch.float64).unsqueeze(1)
    scale = torch.linspace(0.5, 1.5, 5, dtype=torch.float64)
    expected = fusedgrad.Trainer(whole, torch.optim.Adam(whole.parameters(), lr=0.01),
                                 model_lr_scale=scale).fit(x, torch.sin(3 * x), worker.STEPS)
    # each model's steps are computed alike wherever it is trained: the same bits
    assert torch.equal(losses, expected)
    for k, v in whole.state_dict().items():
        assert torch.equal(gathered[k], v), k


@pytest.mark.parametrize("scenario", ["kill", "stall"])
def test_a_failed_rank_makes_the_other_raise(tmp_path, scenario):
    """Rank 1 dies (kill) or stops stepping (stall) mid-training: rank 0's fit raises a RuntimeError
    naming the call and the all-reduce within the group's timeout (5 s here) plus slack, never hangs."""
    results, codes, logs = run_ranks(tmp_path, scenario, timeout=120)
    out = results[0]
    assert out is not None and "crash" not in out, logs[0]
    assert out["error"] is not None, "rank 0 finished training without its peer"
    assert "fusedgrad.Trainer.fit" in out["error"] and "all-reduce" in out["error"], out["error"]
    assert out["seconds"] < worker.TIMEOUT_SECONDS + 20, out["seconds"]


def _env():
    env = dict(os.environ)
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(fusedgrad.__file__)))
    env["PYTHONPATH"] = os.pathsep.join([package_root, env.get("PYTHONPATH", "")])
    return env


def test_example_runs_under_torchrun():
    """examples/distributed_fit.py as its docstring says to run it (smaller), with the DDP and sweep options."""
    example = os.path.join(os.path.dirname(HERE), "examples", "distributed_fit.py")
    for extra in ([], ["--ddp", "--batch-size", "500", "--sweep", "3"]):
        done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                               example, "--rows", "20000", "--steps", "60", *extra],
                              env=_env(), capture_output=True, text=True, timeout=180)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "2 rank(s), 20,000 rows: 60 steps" in done.stdout, done.stdout
        first, last = [float(v) for v in done.stdout.split("loss ")[1].split()[0:3:2]]
        assert last < first, done.stdout
        if "--sweep" in extra:
            assert "sweep of 3 learning rates over 2 rank(s)" in done.stdout, done.stdout


def test_bench_dist_quick(tmp_path):
    """`python -m fusedgrad bench --dist --quick` runs (it checks the two-rank losses against one rank's)."""
    done = subprocess.run([sys.executable, "-m", "fusedgrad", "bench", "--dist", "--quick", "--out", str(tmp_path)],
                          env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / "dist.json").exists() and (tmp_path / "dist.md").exists()
    assert "native DDP" in (tmp_path / "dist.md").read_text()


def _sleeper(queue, rank, seconds):
    import time
    time.sleep(seconds)
    queue.put((rank, {"ok": True}))


def _crasher(queue, rank):
    os._exit(3)


@pytest.mark.parametrize("failure", ["crash", "stuck"])
def test_bench_dist_never_waits_forever_on_a_rank(failure):
    """bench --dist's parent returns (and kills the ranks) when one rank dies without a result or
    the deadline passes, instead of blocking on the queue or join (the hang CI once hit)."""
    import time
    import multiprocessing as mp
    from fusedgrad.bench import dist as bench_dist

    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_sleeper, args=(queue, 0, 60))]
    procs.append(ctx.Process(target=_crasher, args=(queue, 1)) if failure == "crash"
                 else ctx.Process(target=_sleeper, args=(queue, 1, 60)))
    for p in procs:
        p.start()
    start = time.monotonic()
    deadline = 30 if failure == "crash" else 3  # a crash ends the wait at once, a stuck rank at the deadline
    results = bench_dist._collect(procs, queue, start + deadline)
    assert time.monotonic() - start < (20 if failure == "crash" else 15)
    assert results == {}
    assert all(not p.is_alive() for p in procs)
    assert procs[0].exitcode == -9
    assert procs[1].exitcode == (3 if failure == "crash" else -9)


def test_bench_dist_collects_both_ranks():
    import time
    import multiprocessing as mp
    from fusedgrad.bench import dist as bench_dist

    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_sleeper, args=(queue, r, 0.2 * r)) for r in range(2)]
    for p in procs:
        p.start()
    results = bench_dist._collect(procs, queue, time.monotonic() + 60)
    assert results == {0: {"ok": True}, 1: {"ok": True}}
    assert [p.exitcode for p in procs] == [0, 0]
