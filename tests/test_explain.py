"""fusedgrad.explain: the path each kind of call takes, as the dispatch decides it (the same C++ tests),
the engine's blocks independent of the threads, and clear errors."""
import pytest
import torch

import fusedgrad
from fusedgrad import _C

KEYS = {"path", "why", "call", "rows", "widths", "dtype", "threads"}
ENGINE_KEYS = KEYS | {"block_rows", "blocks", "chunks", "vector_bytes"}


def net_and_data(D, H, O, N, **kw):
    torch.manual_seed(0)
    return fusedgrad.FusedMLP(D, H, O, **kw), torch.randn(N, D), torch.randn(N, O)


@pytest.mark.parametrize("D,H,O,N,loss_path,forward_path", [
    (1, 20, 1, 100, "stream", "stream"),      # narrow rows: streamed
    (33, 4, 2, 10, "small", "gemm"),          # too wide to stream, few multiply-adds: direct loops (loss only)
    (64, 32, 8, 1031, "gemm", "gemm"),        # BLAS
])
def test_op_paths(D, H, O, N, loss_path, forward_path):
    net, x, y = net_and_data(D, H, O, N)
    info = fusedgrad.explain(net, x, y)
    assert set(info) == KEYS and info["path"] == loss_path and info["call"] == "loss"
    assert info["rows"] == N and info["widths"] == [D, H, O] and info["dtype"] == torch.float32
    assert fusedgrad.explain(net, x)["path"] == forward_path
    assert fusedgrad.explain(net, x)["call"] == "forward"


def test_op_path_follows_the_small_path_crossover():
    net, x, y = net_and_data(33, 4, 2, 10)
    previous = _C._set_small_path_max_macs(0)
    try:
        assert fusedgrad.explain(net, x, y)["path"] == "gemm"
    finally:
        _C._set_small_path_max_macs(previous)
    assert fusedgrad.explain(net, x, y)["path"] == "small"


@pytest.mark.parametrize("D,H,O,act,path", [
    (1, 20, 1, "sigmoid", "trainer-narrow-fixed"),
    (1, 20, 1, "tanh", "trainer-narrow"),
    (4, 4, 4, "sigmoid", "trainer-narrow"),
    (32, 64, 8, "sigmoid", "trainer-engine"),
    (32, 160, 8, "relu", "trainer-gemm"),
])
def test_trainer_paths_at_one_hidden_layer(D, H, O, act, path):
    net, x, y = net_and_data(D, H, O, 50, activation=act)
    info = fusedgrad.explain(fusedgrad.Trainer(net, torch.optim.Adam(net.parameters())), x, y)
    assert info["path"] == path and info["call"] == "train"
    assert set(info) == (ENGINE_KEYS if path == "trainer-engine" else KEYS)


def test_deep_net_trainer_and_ensemble():
    net, x, y = net_and_data(2, 20, 1, 2540, activation="tanh", hidden_layers=3)
    info = fusedgrad.explain(net, x, y)
    assert set(info) == ENGINE_KEYS and info["path"] == "engine" and info["widths"] == [2, 20, 20, 20, 1]
    assert info["blocks"] >= info["chunks"] >= 1 and info["block_rows"] * info["blocks"] >= 2540
    assert info["vector_bytes"] in (32, 64)
    trainer = fusedgrad.Trainer(net, torch.optim.Adam(net.parameters()))
    assert fusedgrad.explain(trainer, x, y)["path"] == "trainer-engine"
    ens = fusedgrad.FusedMLPEnsemble(3, 2, [8, 8], 1)
    assert fusedgrad.explain(ens, x, y.expand(3, -1, -1))["path"] == "engine"
    assert fusedgrad.explain(fusedgrad.FusedMLPEnsemble(3, 2, 8, 1), x, y)["path"] == "ensemble"


def test_engine_blocks_do_not_depend_on_the_threads():
    net, x, y = net_and_data(2, 20, 1, 20000, activation="tanh", hidden_layers=3)
    previous = torch.get_num_threads()
    try:
        infos = []
        for n in (1, 2):
            torch.set_num_threads(n)
            info = fusedgrad.explain(net, x, y)
            infos.append((info["block_rows"], info["blocks"], info["chunks"], info["vector_bytes"]))
    finally:
        torch.set_num_threads(previous)
    assert infos[0] == infos[1]


def test_bad_arguments():
    with pytest.raises(TypeError, match=r"fusedgrad.explain: argument 'net_or_trainer' must be a FusedMLP"):
        fusedgrad.explain(torch.nn.Linear(2, 2), torch.randn(3, 2))
    net, x, y = net_and_data(1, 4, 1, 5)
    with pytest.raises(TypeError, match=r"fusedgrad.explain: argument 'x' must be a torch.Tensor, got list"):
        fusedgrad.explain(net, [1.0])
