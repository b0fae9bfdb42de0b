"""scikit-learn's MLPRegressor against fusedgrad.sklearn.MLPRegressor (and skorch when installed).

``python -m fusedgrad bench --sklearn``: three regression problems, nothing downloaded —

* ``diabetes``  — sklearn's bundled diabetes data, 331 training rows × 10 (test: the other 111),
  hidden (32,), logistic, Adam lr 0.01, batch 64, 60 epochs;
* ``friedman1`` — ``make_friedman1`` 10⁴ rows (8 000 train), hidden (64, 64), relu, Adam lr 0.001,
  batch 200, 20 epochs;
* ``synthetic`` — 10⁶ rows × 10 (``y = sin(x₀) + x₁·x₂ + 0.5·x₃² + noise``, 90 % train), hidden
  (64,), relu, Adam lr 0.001, batch 200, 3 epochs.

Inputs and targets are standardised on the training split; R² is on the held-out split (the same
for the scaled and the original target). Every estimator trains the same number of epochs
(``tol=0``, no early stopping), alpha 1e-4 (skorch: no L2, its Adam in torch's form), float32
(sklearn: float32 input, so it computes in float32 too), the same random_state for sklearn and
fusedgrad (the same initial weights and shuffles), the same thread count for torch and numpy's
BLAS (``threads``, through threadpoolctl, which scikit-learn installs). Times are the wall time of ``fit``: the
median of ``repeats`` fits after an untimed one for the small cases, one fit for the 10⁶ case; ratios are of the same
run. ``quick=True`` is a seconds-long smoke run (small sizes, few epochs), never a measurement.
"""
import platform
import statistics
import time
import warnings

import numpy as np
import torch

from .machine import cpu_facts, cpu_label

CASES = {
    # name: (rows, hidden, activation, lr, batch, epochs, repeats)
    "diabetes": (None, (32,), "logistic", 0.01, 64, 60, 15),
    "friedman1": (10_000, (64, 64), "relu", 0.001, 200, 20, 3),
    "synthetic": (1_000_000, (64,), "relu", 0.001, 200, 3, 1),
}
QUICK = {"diabetes": (None, 5, 1), "friedman1": (1_000, 3, 1), "synthetic": (10_000, 2, 1)}


def skorch_available():
    try:
        import skorch  # noqa: F401
    except ImportError:
        return False
    return True


def data(name, rows, seed=0):
    """(X_train, X_test, y_train, y_test), float32, standardised on the training split."""
    from sklearn.datasets import load_diabetes, make_friedman1
    from sklearn.model_selection import train_test_split

    if name == "diabetes":
        X, y = load_diabetes(return_X_y=True)
        test_size = 111
    elif name == "friedman1":
        X, y = make_friedman1(n_samples=rows, noise=1.0, random_state=seed)
        test_size = 0.2
    else:
        rng = np.random.default_rng(seed)
        X = rng.standard_normal((rows, 10))
        y = np.sin(X[:, 0]) + X[:, 1] * X[:, 2] + 0.5 * X[:, 3] ** 2 + 0.1 * rng.standard_normal(rows)
        test_size = 0.1
    Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=test_size, random_state=seed)
    mx, sx, my, sy = Xtr.mean(0), Xtr.std(0), ytr.mean(), ytr.std()
    f = np.float32
    return (((Xtr - mx) / sx).astype(f), ((Xte - mx) / sx).astype(f), ((ytr - my) / sy).astype(f),
            ((yte - my) / sy).astype(f))


def params(hidden, activation, lr, batch, epochs):
    return dict(hidden_layer_sizes=hidden, activation=activation, solver="adam", learning_rate_init=lr,
                batch_size=batch, max_iter=epochs, tol=0.0, n_iter_no_change=10 ** 9, alpha=1e-4, random_state=0)


def skorch_model(n_features, hidden, activation, lr, batch, epochs):
    from skorch import NeuralNetRegressor
    from torch import nn

    act = {"logistic": nn.Sigmoid, "relu": nn.ReLU, "tanh": nn.Tanh, "identity": nn.Identity}[activation]
    layers, width = [], n_features
    for h in hidden:
        layers += [nn.Linear(width, h), act()]
        width = h
    layers.append(nn.Linear(width, 1))
    torch.manual_seed(0)
    return NeuralNetRegressor(nn.Sequential(*layers), criterion=nn.MSELoss, optimizer=torch.optim.Adam, lr=lr,
                              batch_size=batch, max_epochs=epochs, train_split=None, iterator_train__shuffle=True,
                              verbose=0)


def time_fit(make, X, y, repeats):
    """The median wall time of ``repeats`` fits of fresh estimators, after one untimed fit when
    ``repeats > 1`` (every route alike: first-call costs such as lazy imports and allocator warm-up
    are not a fit's)."""
    seconds, model = [], None
    if repeats > 1:
        make().fit(X, y)
    for _ in range(repeats):
        model = make()
        start = time.perf_counter()
        model.fit(X, y)
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds), model


def run(quick=False, repeats=None, threads=None, progress=print):
    """The three cases; ``threads`` (default: torch's current count) caps torch's threads and, through
    threadpoolctl, numpy's BLAS threads, so every estimator runs on the same number of threads."""
    from threadpoolctl import threadpool_limits

    threads = threads or torch.get_num_threads()
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with threadpool_limits(limits=threads):
            return _run(quick, repeats, threads, progress)
    finally:
        torch.set_num_threads(saved)


def _run(quick, repeats, threads, progress):
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.metrics import r2_score
    from sklearn.neural_network import MLPRegressor as SkMLPRegressor

    from ..sklearn import MLPRegressor

    rows_out = []
    with_skorch = skorch_available()
    for name, (rows, hidden, activation, lr, batch, epochs, reps) in CASES.items():
        if quick:
            rows, epochs, reps = QUICK[name]
        reps = repeats if (repeats and name != "synthetic" and not quick) else reps
        Xtr, Xte, ytr, yte = data(name, rows)
        p = params(hidden, activation, lr, batch, epochs)
        row = {"case": name, "train_rows": len(Xtr), "test_rows": len(Xte), "features": Xtr.shape[1],
               "hidden": list(hidden), "activation": activation, "lr": lr, "batch": batch, "epochs": epochs,
               "repeats": reps, "seconds": {}, "r2": {}}
        routes = [("sklearn", lambda: SkMLPRegressor(**p), ytr),
                  ("fusedgrad", lambda: MLPRegressor(**p), ytr)]
        if with_skorch:
            routes.append(("skorch", lambda: skorch_model(Xtr.shape[1], hidden, activation, lr, batch, epochs),
                           ytr.reshape(-1, 1)))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            for route, make, target in routes:
                progress(f"bench --sklearn: {name} ({len(Xtr)} rows, {epochs} epochs): {route} ...")
                seconds, model = time_fit(make, Xtr, target, reps)
                row["seconds"][route] = seconds
                row["r2"][route] = float(r2_score(yte, np.asarray(model.predict(Xte)).ravel()))
        rows_out.append(row)
    meta = {"torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
            **cpu_facts(), "threads": threads, "quick": quick,
            "date": time.strftime("%Y-%m-%d %H:%M:%S %z"), "sklearn": _version("sklearn"),
            "skorch": _version("skorch") if with_skorch else None}
    return {"meta": meta, "rows": rows_out}


def _version(module):
    import importlib

    return importlib.import_module(module).__version__


def markdown(result):
    meta, rows = result["meta"], result["rows"]
    has_skorch = any("skorch" in r["seconds"] for r in rows)
    cols = ["case", "train rows × features", "model", "epochs", "sklearn s"] + (["skorch s"] if has_skorch else []) \
        + ["fusedgrad s", "fusedgrad × sklearn"] + (["fusedgrad × skorch"] if has_skorch else []) \
        + ["R² sklearn"] + (["R² skorch"] if has_skorch else []) + ["R² fusedgrad"]
    lines = [f"scikit-learn {meta['sklearn']} MLPRegressor vs "
             + (f"skorch {meta['skorch']} NeuralNetRegressor vs " if has_skorch else "")
             + f"fusedgrad.sklearn.MLPRegressor; torch {meta['torch']}, {meta['threads']} thread(s) (torch and BLAS), "
             f"{cpu_label(meta)}; {meta['date']}. Adam, float32, fit wall time (median of the repeats), "
             "R² on the held-out split; ratios from the same run.", "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * 3 + "---:|" * (len(cols) - 3)]
    for r in rows:
        s, q = r["seconds"], r["r2"]
        model = f"{r['features']}→{'→'.join(map(str, r['hidden']))}→1 {r['activation']}, batch {r['batch']}"
        cells = [r["case"], f"{r['train_rows']} × {r['features']}", model, str(r["epochs"]), f"{s['sklearn']:.3f}"] \
            + ([f"{s['skorch']:.3f}"] if has_skorch else []) \
            + [f"{s['fusedgrad']:.3f}", f"{s['sklearn'] / s['fusedgrad']:.1f}×"] \
            + ([f"{s['skorch'] / s['fusedgrad']:.1f}×"] if has_skorch else []) \
            + [f"{q['sklearn']:.3f}"] + ([f"{q['skorch']:.3f}"] if has_skorch else []) + [f"{q['fusedgrad']:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
