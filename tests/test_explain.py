"""fusedgrad.explain: the dict it returns, each documented path reached by a shape built here and
checked against what the dispatch really runs (by timing-free means: the ops and allocations the
torch profiler records, the C++ entry point the trainer calls), the engine's blocks independent of
the threads, and clear errors.

The other test files assert the path they mean to exercise through explain (or fusedgrad._C.explain_op,
its per-call form); this file checks that explain tells the truth."""
import math

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import fusedgrad
from fusedgrad import _C

KEYS = {"path", "why", "call", "rows", "widths", "dtype", "threads"}
ENGINE_KEYS = KEYS | {"block_rows", "blocks", "chunks", "vector_bytes", "layout"}
# Every value "path" takes (fusedgrad/explain.py's docstring).
PATHS = {"gemm", "cuda", "ensemble", "engine", "trainer-narrow", "trainer-narrow-fixed",
         "trainer-engine", "trainer-lbfgs"}
TRAINER_ROUTES = ("deep_train_steps", "deep_train_steps_fast", "deep_train_step_fast", "train_steps",
                  "train_steps_fast", "train_step_fast")
# the engine's entry points: the Python route, the C++ routes of fit and of step
ENGINE_ROUTES = {"deep_train_steps", "deep_train_steps_fast", "deep_train_step_fast"}


def net_and_data(D, H, O, N, dtype=torch.float32, **kw):
    torch.manual_seed(0)
    net = fusedgrad.FusedMLP(D, H, O, dtype=dtype, **kw)
    return net, torch.randn(N, D, dtype=dtype), torch.randn(N, O, dtype=dtype)


def check_dict(info, call, rows, widths, dtype, engine=False):
    """The keys of the dict and the type of each value."""
    team = {"team_threads"} if engine and info["path"] == "trainer-engine" else set()
    team |= {"create_graph", "create_graph_why"} if call == "forward" else set()
    assert set(info) == ((ENGINE_KEYS if engine else KEYS) | team), sorted(info)
    assert isinstance(info["path"], str) and info["path"] in PATHS
    assert isinstance(info["why"], str) and info["why"]
    assert info["call"] == call
    assert type(info["rows"]) is int and info["rows"] == rows
    assert isinstance(info["widths"], list) and all(type(w) is int for w in info["widths"])
    assert info["widths"] == widths
    assert isinstance(info["dtype"], torch.dtype) and info["dtype"] == dtype
    assert type(info["threads"]) is int and info["threads"] == torch.get_num_threads()
    if call == "forward":
        assert info["create_graph"] in ("nested-jets", "torch-recompute") and info["create_graph_why"]
    if engine:
        for key in ("block_rows", "blocks", "chunks", "vector_bytes", *(team - {"create_graph", "create_graph_why"})):
            assert type(info[key]) is int and info[key] >= 1, key


def recorded(fn):
    """(op names, largest single allocation in bytes) of what fn runs, as the torch profiler records them."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = prof.events()
    return {e.name for e in events}, max([e.self_cpu_memory_usage for e in events] + [0])


@pytest.fixture
def trainer_routes(monkeypatch):
    """The names of the C++ trainer entry points fusedgrad.Trainer calls (spied on, then called)."""
    calls = []
    for name in TRAINER_ROUTES:
        def spy(*args, _real=getattr(_C, name), _name=name, **kwargs):
            calls.append(_name)
            return _real(*args, **kwargs)

        monkeypatch.setattr(_C, name, spy)
    return calls


# ----------------------------------------------------------------------------------------- the dict

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_keys_and_types_of_each_kind_of_call(dtype):
    net, x, y = net_and_data(3, 5, 2, 11, dtype)
    check_dict(fusedgrad.explain(net, x, y), "loss", 11, [3, 5, 2], dtype, engine=True)
    check_dict(fusedgrad.explain(net, x), "forward", 11, [3, 5, 2], dtype, engine=True)
    # leading dimensions of x are rows
    check_dict(fusedgrad.explain(net, x.reshape(1, 11, 3), y.reshape(1, 11, 2)), "loss", 11, [3, 5, 2], dtype,
               engine=True)
    wide, xw, yw = net_and_data(3, 4096, 2, 11, dtype)  # 3·4096 + 4096·2 multiply-adds a row: BLAS's
    check_dict(fusedgrad.explain(wide, xw, yw), "loss", 11, [3, 4096, 2], dtype)
    trainer = fusedgrad.Trainer(net, torch.optim.SGD(net.parameters(), lr=0.1))
    check_dict(fusedgrad.explain(trainer, x, y), "train", 11, [3, 5, 2], dtype)
    deep, x, y = net_and_data(3, 5, 2, 11, dtype, hidden_layers=2)
    check_dict(fusedgrad.explain(deep, x, y), "loss", 11, [3, 5, 5, 2], dtype, engine=True)
    check_dict(fusedgrad.explain(deep, x), "forward", 11, [3, 5, 5, 2], dtype, engine=True)
    trainer = fusedgrad.Trainer(deep, torch.optim.Adam(deep.parameters()))
    check_dict(fusedgrad.explain(trainer, x, y), "train", 11, [3, 5, 5, 2], dtype, engine=True)
    ens = fusedgrad.FusedMLPEnsemble(4, 3, 5, 2, dtype=dtype)
    check_dict(fusedgrad.explain(ens, x, y), "loss", 11, [3, 5, 2], dtype)
    check_dict(fusedgrad.explain(ens, x.expand(4, -1, -1)), "forward", 11, [3, 5, 2], dtype)


def test_explain_runs_nothing():
    """explain computes the path by the dispatch's tests; it calls no op and changes nothing."""
    net, x, y = net_and_data(64, 32, 8, 1031)
    before = [p.detach().clone() for p in net.parameters()]
    names, _ = recorded(lambda: (fusedgrad.explain(net, x, y), fusedgrad.explain(net, x)))
    assert not any(n.startswith(("fusedgrad::", "aten::mm")) for n in names), sorted(names)
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))
    assert all(p.grad is None for p in net.parameters())


# ------------------------------------------------------------------- the one-hidden-layer op paths

# (D, H, O, N, path): the any-depth engine takes every one-hidden-layer problem it reads directly up
# to 16 384 multiply-adds a row (csrc/ops/engine_path.cpp), tall or small; wider rows are BLAS's.
OP_SHAPES = {
    "engine-tall": (1, 20, 1, 4096, "engine"),
    "engine-small": (33, 4, 2, 10, "engine"),
    "engine-mid": (64, 32, 8, 1031, "engine"),
    "gemm": (128, 128, 8, 300, "gemm"),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("case", list(OP_SHAPES))
def test_op_paths(case, dtype):
    D, H, O, N, path = OP_SHAPES[case]
    net, x, y = net_and_data(D, H, O, N, dtype)
    assert fusedgrad.explain(net, x, y)["path"] == path
    assert fusedgrad.explain(net, x)["path"] == path
    # the same answer as the op-level form, on the module's own tensors
    w1, b1, w2, b2 = net._params()
    assert _C.explain_op(True, x, w1, b1, w2, b2, y, net.activation) == path
    assert _C.explain_op(False, x, w1, b1, w2, b2, None, net.activation) == path


def test_engine_loss_runs_no_product_and_keeps_no_row_buffer():
    """The engine takes rows through cache-sized blocks: no BLAS product, and no (N, H) buffer
    (its largest allocation is far below N·H elements; the GEMM path's holds h, N·H)."""
    D, H, O, N = 1, 20, 1, 4096
    net, x, y = net_and_data(D, H, O, N)
    assert fusedgrad.explain(net, x, y)["path"] == "engine"
    names, largest = recorded(lambda: net.loss(x, y))
    assert "fusedgrad::mlp_loss_and_grads" in names and "aten::mm" not in names
    assert largest < N * H * x.element_size() // 4, largest
    # the forward runs on the engine too (no product; it saves s for the backward, an (N, H) tensor)
    assert fusedgrad.explain(net, x)["path"] == "engine"
    names, _ = recorded(lambda: net(x))
    assert "fusedgrad::mlp_forward" in names and "aten::mm" not in names
    # without autograd the prediction keeps nothing of (N, H)
    with torch.no_grad():
        names, largest = recorded(lambda: net(x))
    assert "fusedgrad::mlp" in names and "aten::mm" not in names
    assert largest < N * H * x.element_size() // 4, largest


def test_gemm_loss_runs_products_into_row_buffers():
    D, H, O, N = 128, 128, 8, 300
    net, x, y = net_and_data(D, H, O, N)
    assert fusedgrad.explain(net, x, y)["path"] == "gemm"
    names, largest = recorded(lambda: net.loss(x, y))
    assert "aten::mm" in names
    assert largest >= N * H * x.element_size()  # h (or its gradient), N × H
    assert fusedgrad.explain(net, x)["path"] == "gemm"
    names, _ = recorded(lambda: net(x))
    assert "fusedgrad::mlp_forward" in names and "aten::mm" in names


def test_engine_path_follows_its_crossover():
    """With the crossover at 0 multiply-adds (fusedgrad._C._set_engine_path_max_macs, as
    benchmarks/crossover.py forces a path) a call the engine took is the GEMM path's, products and all."""
    net, x, y = net_and_data(33, 4, 2, 10)
    assert fusedgrad.explain(net, x, y)["path"] == "engine"
    names, _ = recorded(lambda: net.loss(x, y))
    assert "fusedgrad::mlp_loss_and_grads" in names and "aten::mm" not in names
    previous = _C._set_engine_path_max_macs(0)
    try:
        assert fusedgrad.explain(net, x, y)["path"] == "gemm"
        names, _ = recorded(lambda: net.loss(x, y))
        assert "aten::mm" in names
    finally:
        _C._set_engine_path_max_macs(previous)
    assert fusedgrad.explain(net, x, y)["path"] == "engine"


def test_engine_rule_boundaries():
    """The engine's rule as explain reports it: D·H + H·O ≤ 16 384 at any N, a second layer, biases absent or
    one per column, a target absent or of the prediction's shape; anything else is the GEMM path's."""
    for (D, H, O, N), want in [((64, 128, 64, 100), "engine"), ((64, 128, 65, 100), "gemm"),
                               ((1, 8192, 1, 3), "engine"), ((1, 8193, 1, 3), "gemm"),
                               ((1, 20, 1, 1), "engine"), ((1, 20, 1, 10 ** 6), "engine")]:
        net = fusedgrad.FusedMLP(D, H, O)
        x, y = torch.empty(N, D), torch.empty(N, O)
        assert fusedgrad.explain(net, x, y)["path"] == want, (D, H, O, N)
    x, w1, w2 = torch.randn(50, 3), torch.randn(20, 3), torch.randn(2, 20)
    b1, b2, t = torch.randn(20), torch.randn(2), torch.randn(50, 2)
    assert _C.explain_op(True, x, w1, b1, w2, b2, t, "tanh") == "engine"
    assert _C.explain_op(True, x, w1, None, w2, None, None, "tanh") == "engine"
    assert _C.explain_op(True, x, w1, b1.reshape(1, 20), w2, b2.reshape(1, 2), t, "tanh") == "engine"
    assert _C.explain_op(True, x, w1, b1, w2, b2, t[:1], "tanh") == "gemm"  # a (1, O) target: per column
    assert _C.explain_op(True, x, w1, b1, w2, b2, t[:, :1], "tanh") == "gemm"  # (N, 1): "Other"
    assert _C.explain_op(True, x, w1, torch.randn(50, 20), w2, b2, t, "tanh") == "gemm"  # a full-shape bias
    assert _C.explain_op(True, x, w1, b1, None, None, torch.randn(50, 20), "tanh") == "gemm"  # no second layer


@pytest.mark.skipif(not (torch.cuda.is_available() and "cuda" in fusedgrad.backends),
                    reason="no CUDA device or no CUDA kernels in this build")
def test_cuda_path():
    net, x, y = net_and_data(3, 8, 2, 100)
    net, x, y = net.cuda(), x.cuda(), y.cuda()
    assert fusedgrad.explain(net, x, y)["path"] == "cuda"
    assert fusedgrad.explain(net, x)["path"] == "cuda"
    net.loss(x, y)  # the path explain names runs


def test_meta_tensors_are_not_reported_as_cuda():
    net = fusedgrad.FusedMLP(3, 4, 2, device="meta")
    x, y = torch.empty(5, 3, device="meta"), torch.empty(5, 2, device="meta")
    assert fusedgrad.explain(net, x, y)["path"] == "meta"


# --------------------------------------------------------------------------------------- ensembles

def test_ensemble():
    ens = fusedgrad.FusedMLPEnsemble(3, 2, 8, 1)
    x, y = torch.randn(50, 2), torch.randn(50, 1)
    info = fusedgrad.explain(ens, x, y)
    assert info["path"] == "ensemble" and info["rows"] == 50 and info["widths"] == [2, 8, 1]
    assert fusedgrad.explain(ens, x)["path"] == "ensemble"
    names, _ = recorded(lambda: ens.loss(x, y))
    assert "fusedgrad::ensemble_mlp_loss" in names
    names, _ = recorded(lambda: ens(x))
    assert "fusedgrad::ensemble_mlp" in names
    # per-model data: rows are N of (K, N, D)
    assert fusedgrad.explain(ens, x.expand(3, -1, -1), y.expand(3, -1, -1))["rows"] == 50
    deep = fusedgrad.FusedMLPEnsemble(3, 2, [8, 8], 1)
    info = fusedgrad.explain(deep, x, y)
    assert info["path"] == "engine" and info["widths"] == [2, 8, 8, 1] and "3 models" in info["why"]
    names, _ = recorded(lambda: deep.loss(x, y))
    assert "fusedgrad::deep_mlp_loss_and_grads" in names


# ----------------------------------------------------------------------------------- deeper nets

@pytest.mark.parametrize("layers", [2, 3])
def test_deep_net_runs_the_engine(layers):
    net, x, y = net_and_data(2, 20, 1, 2540, activation="tanh", hidden_layers=layers)
    info = fusedgrad.explain(net, x, y)
    assert info["path"] == "engine" and info["widths"] == [2] + [20] * layers + [1]
    assert info["blocks"] >= info["chunks"] >= 1 and info["block_rows"] * info["blocks"] >= 2540
    assert info["vector_bytes"] in (32, 64)
    assert info["layout"] == "rows-in-lanes"  # widths 2, 20, 1 pad to 8, 24, 8 lanes: > 10 % more products
    assert fusedgrad.explain(net, x)["path"] == "engine"
    names, _ = recorded(lambda: net.loss(x, y))
    assert "fusedgrad::deep_mlp_loss_and_grads" in names and "fusedgrad::mlp_loss_and_grads" not in names
    names, _ = recorded(lambda: net(x))
    assert "fusedgrad::deep_mlp" in names and "aten::mm" not in names


# ---------------------------------------------------------------------------------------- trainers

# (D, H, O, activation, path) at one hidden layer (csrc/trainer/train_cpu.cpp train_path_name):
# σ with 1–2 inputs and 1 output: the compile-time-width kernel; other narrow layers the run-time
# one; the engine from 4 inputs and 192 multiply-adds a row, from 16 inputs and 128, from 4 outputs
# and 320, and from 2048 whatever the widths (a layer wider than 128, 1–3 outputs).
TRAINER_SHAPES = [
    (1, 20, 1, "sigmoid", "trainer-narrow-fixed"),
    (2, 20, 1, "sigmoid", "trainer-narrow-fixed"),
    (2, 300, 1, "sigmoid", "trainer-narrow-fixed"),
    (1, 20, 1, "tanh", "trainer-narrow"),
    (3, 20, 1, "sigmoid", "trainer-narrow"),
    (4, 4, 4, "sigmoid", "trainer-narrow"),
    (4, 32, 1, "tanh", "trainer-narrow"),   # 160 multiply-adds a row
    (1, 32, 4, "tanh", "trainer-narrow"),   # 160
    (2, 64, 2, "tanh", "trainer-narrow"),   # 256, 1–3 inputs and outputs
    (4, 32, 2, "tanh", "trainer-engine"),   # 192
    (16, 16, 1, "relu", "trainer-engine"),  # 272
    (1, 80, 4, "tanh", "trainer-engine"),   # 400, 4 outputs
    (16, 8, 1, "tanh", "trainer-engine"),   # 136, 16 inputs
    (16, 4, 1, "tanh", "trainer-narrow"),   # 68
    (32, 64, 8, "sigmoid", "trainer-engine"),
    (16, 64, 4, "relu", "trainer-engine"),
    (32, 160, 8, "relu", "trainer-engine"),
    (32, 64, 2, "sigmoid", "trainer-engine"),
]


@pytest.mark.parametrize("D,H,O,act,path", TRAINER_SHAPES, ids=[f"{t[4]}-{t[0]}-{t[1]}-{t[2]}-{t[3]}"
                                                                for t in TRAINER_SHAPES])
def test_trainer_paths_at_one_hidden_layer(D, H, O, act, path, trainer_routes):
    """The path explain names is the route the trainer takes: the engine's entry point for
    trainer-engine, the one-hidden-layer kernels' otherwise, with no BLAS product on any
    (trainer-narrow and trainer-narrow-fixed differ only inside train_cpu.cpp: not observable here)."""
    net, x, y = net_and_data(D, H, O, 300, torch.float64, activation=act)
    trainer = fusedgrad.Trainer(net, torch.optim.Adam(net.parameters(), lr=0.01))
    info = fusedgrad.explain(trainer, x, y)
    check_dict(info, "train", 300, [D, H, O], torch.float64, engine=path == "trainer-engine")
    assert info["path"] == path
    assert _C.explain_trainer(D, H, O, act) == path
    runs = [("deep_train_step_fast", lambda: trainer.step(x, y)), ("deep_train_steps_fast", lambda: trainer.fit(x, y, 2)),
            ("deep_train_steps_fast", lambda: trainer.fit(x, y, 2, batch_size=64))]
    for engine_route, run in runs:
        trainer_routes.clear()
        names, _ = recorded(run)
        assert trainer_routes, "no C++ trainer entry point ran"
        if path == "trainer-engine":
            # one network, nothing that needs Python: the engine's C++ route of step or fit takes the call
            assert trainer_routes == [engine_route], trainer_routes
        else:
            assert not ENGINE_ROUTES & set(trainer_routes), trainer_routes
        assert "aten::mm" not in names, (path, sorted(names))


@pytest.mark.parametrize("layers", [2, 3])
def test_deep_trainer(layers, trainer_routes):
    net, x, y = net_and_data(2, 20, 1, 500, hidden_layers=layers)
    trainer = fusedgrad.Trainer(net, torch.optim.Adam(net.parameters()))
    info = fusedgrad.explain(trainer, x, y)
    check_dict(info, "train", 500, [2] + [20] * layers + [1], torch.float32, engine=True)
    assert info["path"] == "trainer-engine"
    trainer.fit(x, y, 2)
    assert trainer_routes == ["deep_train_steps_fast"]
    trainer.step(x, y)
    assert trainer_routes == ["deep_train_steps_fast", "deep_train_step_fast"]


def test_ensemble_trainer(trainer_routes):
    x, y = torch.randn(100, 2), torch.randn(100, 1)
    ens = fusedgrad.FusedMLPEnsemble(3, 2, 8, 1)
    trainer = fusedgrad.Trainer(ens, torch.optim.Adam(ens.parameters()))
    assert fusedgrad.explain(trainer, x, y)["path"] == "trainer-narrow-fixed"
    trainer.fit(x, y, 2)
    assert trainer_routes and not ENGINE_ROUTES & set(trainer_routes)
    trainer_routes.clear()
    deep = fusedgrad.FusedMLPEnsemble(3, 2, [8, 8], 1)
    trainer = fusedgrad.Trainer(deep, torch.optim.Adam(deep.parameters()))
    info = fusedgrad.explain(trainer, x, y)
    assert info["path"] == "trainer-engine" and "3 models" in info["why"]
    trainer.fit(x, y, 2)
    assert set(trainer_routes) == {"deep_train_steps"}  # ensembles: the Python route's call


# ------------------------------------------------------------------- the engine's blocks and chunks

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_engine_blocks_and_chunks_do_not_depend_on_the_threads(dtype, restore_threads):
    nets = [net_and_data(2, 20, 1, 1, dtype, activation="tanh", hidden_layers=3)[0],
            net_and_data(16, 100, 8, 1, dtype, hidden_layers=2)[0],
            net_and_data(32, 64, 8, 1, dtype)[0]]  # one hidden layer: the trainer's engine
    for rows in (1, 15, 16, 17, 255, 256, 257, 4099, 20000, 100_000):
        seen = set()
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            for net in nets:
                params = net._params()
                x = torch.empty(rows, params[0].shape[-1], dtype=dtype)
                y = torch.empty(rows, params[-2].shape[-2], dtype=dtype)
                deep = net.hidden_layers != 1
                subject = net if deep else fusedgrad.Trainer(net, torch.optim.SGD(net.parameters(), lr=0.1))
                info = fusedgrad.explain(subject, x, y)
                assert info["threads"] == threads
                B, blocks, chunks = info["block_rows"], info["blocks"], info["chunks"]
                # the rule (csrc/engine/mlp_engine_cpu.cpp): blocks of B rows, at least two from 16 rows
                # and 2**15 multiply-adds (work a step's thread team splits), at most 16 chunks
                assert B % 8 == 0 and 16 <= B <= 256
                macs = sum(a * b for a, b in zip(info["widths"], info["widths"][1:]))
                split = 2 if rows >= 16 and rows * macs >= 2**15 else 1
                assert blocks == max(math.ceil(rows / B), split) and chunks == min(blocks, 16)
                seen.add((id(net), B, blocks, chunks, info["vector_bytes"]))
        assert len(seen) == len(nets), seen  # the same for 1, 2 and 3 threads


def test_engine_results_match_across_threads(restore_threads):
    """What the fixed chunks are for: the engine's loss and gradients are bitwise the same at 1
    and 2 threads (chunks > 1, so the work is split)."""
    net, x, y = net_and_data(2, 20, 1, 20000, torch.float64, activation="tanh", hidden_layers=3)
    assert fusedgrad.explain(net, x, y)["chunks"] > 1
    results = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        net.zero_grad()
        loss = net.loss(x, y)
        loss.backward()
        results.append([loss.detach()] + [p.grad.clone() for p in net.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*results))


# ------------------------------------------------------------------------------------------ errors

@pytest.mark.parametrize("bad", [torch.nn.Linear(2, 2), None, "net", torch.optim.SGD([torch.zeros(1)], lr=1)],
                         ids=["module", "None", "str", "optimizer"])
def test_bad_net_or_trainer(bad):
    with pytest.raises(TypeError, match=r"^fusedgrad\.explain: argument 'net_or_trainer' must be a FusedMLP, "
                                        r"FusedMLPEnsemble or Trainer, got " + type(bad).__name__):
        fusedgrad.explain(bad, torch.randn(3, 2))


@pytest.mark.parametrize("bad", [[1.0], None, 3.0], ids=["list", "None", "float"])
@pytest.mark.parametrize("which", ["net", "deep", "ensemble", "trainer"])
def test_bad_x(which, bad):
    net = fusedgrad.FusedMLP(1, 4, 1, hidden_layers=2 if which == "deep" else 1)
    subject = {"net": net, "deep": net, "ensemble": fusedgrad.FusedMLPEnsemble(2, 1, 4, 1),
               "trainer": fusedgrad.Trainer(net, torch.optim.SGD(net.parameters(), lr=0.1))}[which]
    with pytest.raises(TypeError, match=r"^fusedgrad\.explain: argument 'x' must be a torch\.Tensor, got "
                                        + type(bad).__name__):
        fusedgrad.explain(subject, bad)


def test_bad_target():
    net, x, _ = net_and_data(1, 4, 1, 5)
    with pytest.raises(TypeError, match=r"fusedgrad\.explain: argument 'target'"):
        fusedgrad.explain(net, x, [1.0])


def test_x_of_the_wrong_shape():
    deep = fusedgrad.FusedMLP(2, [4, 4], 1)
    with pytest.raises(ValueError, match=r"fusedgrad\.explain: argument 'x' must have shape \(\*, 2\), got \(5, 3\)"):
        fusedgrad.explain(deep, torch.randn(5, 3))
    ens = fusedgrad.FusedMLPEnsemble(3, 2, 8, 1)
    with pytest.raises(ValueError, match=r"must have shape \(N, 2\) or \(K, N, 2\), got \(2,\)"):
        fusedgrad.explain(ens, torch.randn(2))
